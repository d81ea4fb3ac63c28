"""Tests for plot_results.py on the hand-written run logs in tests/fixtures/results/.

Fixture numbers used below:
    learning rate 0.1, 16 filters, 4 epochs: seed 1 test accuracy 0.98, seed 2 0.985,
        seed 3 diverged at epoch 2 (validation accuracy 0.85 at epoch 1, then null)
    learning rate 0.01: seed 1 0.95, seed 2 0.96
    runtime on cpu, 3 epochs: 8 filters seeds 1 and 2, 16 filters seed 1; gpu 64 filters skipped
Broken logs sit beside them in results/lr/, and a temporary file lr0.3_seed1.json.tmp contains an
otherwise valid log for a learning rate that no other file has.
"""

import contextlib
import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys
import types

import pytest

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)

import plot_results  # noqa: E402
import run_log  # noqa: E402

FIXTURE_RESULTS = os.path.join(REPO_DIR, "tests", "fixtures", "results")
BROKEN_LOGS = {
    "empty.json": "file is empty",
    "truncated.json": "not valid JSON",
    "future_version.json": "schema_version 2 is newer",
    "nan_token.json": "NaN",
    "wrong_shape.json": "expected a JSON object",
    "lr0.001_seed1_running.json": "incomplete run (status running)",
}
FIGURE_STEMS = (
    "figure1_lr_validation_accuracy",
    "figure2_lr_validation_accuracy_zoom",
    "figure3_runtime",
)


def run_main(argv):
    """Run plot_results.main in-process and return its exit code, stdout and stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        exit_code = plot_results.main(argv)
    return exit_code, stdout.getvalue(), stderr.getvalue()


def read_csv_rows(path, key_column):
    with open(path, encoding="utf-8", newline="") as csv_file:
        return {row[key_column]: row for row in csv.DictReader(csv_file)}


def read_text(path):
    with open(path, encoding="utf-8") as text_file:
        return text_file.read()


@pytest.fixture(scope="module")
def plotted(tmp_path_factory):
    """Plot the fixture logs once, recording every path that read_log opens."""
    results_dir = tmp_path_factory.mktemp("plot") / "results"
    shutil.copytree(FIXTURE_RESULTS, results_dir)
    output_dir = results_dir.parent / "out"
    read_paths = []

    def recording_read_log(path):
        read_paths.append(str(path))
        return run_log.read_log(path)

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(plot_results, "read_log", recording_read_log)
        exit_code, stdout, stderr = run_main(
            ["--results-dir", str(results_dir), "--output-dir", str(output_dir)]
        )
    return types.SimpleNamespace(exit_code=exit_code, stdout=stdout, stderr=stderr,
                                 output_dir=output_dir, read_paths=read_paths)


def test_main_exits_zero(plotted):
    assert plotted.exit_code == 0


@pytest.mark.parametrize("stem", FIGURE_STEMS)
def test_figure_written_as_png_and_pdf(plotted, stem):
    png = plotted.output_dir / (stem + ".png")
    pdf = plotted.output_dir / (stem + ".pdf")
    assert png.read_bytes().startswith(b"\x89PNG")
    assert png.stat().st_size > 1000
    assert pdf.read_bytes().startswith(b"%PDF")
    assert pdf.stat().st_size > 1000


def test_stdout_lists_written_files(plotted):
    for name in ("table1_lr_test_accuracy.md", "table1_lr_test_accuracy.csv",
                 "table2_runtime.md", "table2_runtime.csv", "figure3_runtime.pdf"):
        assert f"wrote {plotted.output_dir / name}" in plotted.stdout
    summary = plotted.stdout.strip().splitlines()[-1]
    assert summary.startswith("skipped logs:")
    assert "1 recorded as skipped" in summary


def test_table1_csv_mean_and_std(plotted):
    rows = read_csv_rows(plotted.output_dir / "table1_lr_test_accuracy.csv", "learning rate")
    assert sorted(rows) == ["0.01", "0.1"]

    # The diverged seed 3 has no test accuracy: it counts as a seed but not in the mean.
    expected = {"0.1": (0.98, 0.985, 0.9912), "0.01": (0.95, 0.96, 0.9862)}
    for learning_rate, (first, second, report) in expected.items():
        row = rows[learning_rate]
        mean = (first + second) / 2
        sample_std = abs(first - second) / math.sqrt(2)
        assert float(row["test accuracy mean"]) == pytest.approx(mean, abs=1e-12)
        assert float(row["test accuracy std"]) == pytest.approx(sample_std, abs=1e-12)
        assert float(row["report test accuracy (2000 epochs)"]) == report
        assert float(row["difference (ours - report)"]) == pytest.approx(mean - report, abs=1e-12)
        assert row["epochs"] == "4"
        assert row["filters"] == "16"


def test_table1_counts_diverged_seed(plotted):
    rows = read_csv_rows(plotted.output_dir / "table1_lr_test_accuracy.csv", "learning rate")
    assert rows["0.1"]["seeds"] == "3"
    assert rows["0.1"]["diverged"] == "1"
    assert rows["0.01"]["seeds"] == "2"
    assert rows["0.01"]["diverged"] == "0"


def test_table1_markdown_states_epochs(plotted):
    markdown = read_text(plotted.output_dir / "table1_lr_test_accuracy.md")
    header_end = markdown.index("| learning rate")
    assert "Our runs trained for 4 epochs" in markdown[:header_end]
    assert "the report trained for 2000 epochs" in markdown[:header_end]
    assert "Diverged runs count in \"seeds\" but have no test accuracy" in markdown
    assert "| 0.1 | 16 | 4 | 3 | 1 | 0.9825 | 0.0035 | 0.9912 | -0.0087 |" in markdown
    assert "| 0.01 | 16 | 4 | 2 | 0 | 0.9550 | 0.0071 | 0.9862 | -0.0312 |" in markdown


def test_table_csv_header_matches_markdown(plotted):
    for stem, columns in (("table1_lr_test_accuracy", plot_results.TABLE1_COLUMNS),
                          ("table2_runtime", plot_results.TABLE2_COLUMNS)):
        csv_header = read_text(plotted.output_dir / (stem + ".csv")).splitlines()[0]
        assert csv_header == ",".join(columns)
        assert "| " + " | ".join(columns) + " |" in read_text(plotted.output_dir / (stem + ".md"))


def test_table2_csv_values(plotted):
    rows = read_csv_rows(plotted.output_dir / "table2_runtime.csv", "filters")
    assert sorted(rows, key=int) == ["8", "16"]

    eight = rows["8"]
    assert eight["device"] == "cpu"
    assert eight["trainable parameters"] == "52258"
    assert eight["report trainable parameters"] == "52258"
    assert eight["parameters match"] == "yes"
    assert eight["seeds"] == "2"
    assert eight["epochs"] == "3"
    assert float(eight["train seconds"]) == pytest.approx((12.5 + 13.5) / 2)
    assert float(eight["total seconds"]) == pytest.approx((15.0 + 16.0) / 2)
    assert float(eight["steady seconds per epoch"]) == pytest.approx((3.0 + 3.4) / 2)
    assert float(eight["images per second"]) == pytest.approx((333.3 + 294.1) / 2)
    assert float(eight["test accuracy"]) == pytest.approx((0.97 + 0.972) / 2)

    sixteen = rows["16"]
    assert sixteen["trainable parameters"] == "104250"
    assert sixteen["report trainable parameters"] == "104250"
    assert sixteen["parameters match"] == "yes"
    assert float(sixteen["train seconds"]) == 20.0
    assert float(sixteen["total seconds"]) == 24.0
    assert float(sixteen["steady seconds per epoch"]) == 4.8


def test_table2_lists_skipped_gpu_run(plotted):
    markdown = read_text(plotted.output_dir / "table2_runtime.md")
    assert "gpu, 64 filters: skipped (no GPU visible)" in markdown
    assert "gpu" not in read_text(plotted.output_dir / "table2_runtime.csv")


@pytest.mark.parametrize("name, reason", sorted(BROKEN_LOGS.items()))
def test_broken_log_named_once_in_warnings(plotted, name, reason):
    lines = [line for line in plotted.stderr.splitlines() if name in line]
    assert len(lines) == 1
    assert lines[0].startswith("warning: skipped ")
    assert reason in lines[0]


def test_stderr_has_only_broken_log_warnings(plotted):
    assert len(plotted.stderr.splitlines()) == len(BROKEN_LOGS)


def test_temp_file_never_read(plotted):
    assert plotted.read_paths, "read_log was not called at all"
    assert not [path for path in plotted.read_paths if not path.endswith(".json")]
    assert ".json.tmp" not in plotted.stderr
    rows = read_csv_rows(plotted.output_dir / "table1_lr_test_accuracy.csv", "learning rate")
    assert "0.3" not in rows


def test_checkpoint_and_figure_folders_not_read(plotted):
    for path in plotted.read_paths:
        assert "checkpoints" not in path.split(os.sep)
        assert "figures" not in path.split(os.sep)
    assert "model.json" not in plotted.stderr
    assert "old_output.json" not in plotted.stderr


def test_validation_curve_stops_at_divergence():
    diverged = run_log.read_log(os.path.join(FIXTURE_RESULTS, "lr", "lr0.1_seed3.json"))
    curve = plot_results.validation_curve(diverged)
    assert len(curve) == 2
    assert curve[0] == 0.85
    assert math.isnan(curve[1])


def test_mean_curve_skips_diverged_seed():
    curves = [
        plot_results.validation_curve(run_log.read_log(os.path.join(FIXTURE_RESULTS, "lr", name)))
        for name in ("lr0.1_seed1.json", "lr0.1_seed2.json", "lr0.1_seed3.json")
    ]
    mean, low, high = plot_results.combine_curves(curves)
    assert mean[0] == pytest.approx((0.90 + 0.91 + 0.85) / 3)
    assert mean[1] == pytest.approx((0.95 + 0.955) / 2)
    assert (low[0], high[0]) == (0.85, 0.91)
    assert mean[3] == pytest.approx((0.98 + 0.981) / 2)


def test_single_seed_has_no_std(tmp_path):
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    shutil.copy(os.path.join(FIXTURE_RESULTS, "lr", "lr0.1_seed1.json"), results_dir)
    exit_code, stdout, stderr = run_main(["--results-dir", str(results_dir)])

    assert exit_code == 0
    assert stderr == ""
    # Without --output-dir the files go to figures/ inside the results folder.
    output_dir = results_dir / "figures"
    row = read_csv_rows(output_dir / "table1_lr_test_accuracy.csv", "learning rate")["0.1"]
    assert float(row["test accuracy mean"]) == 0.98
    assert row["test accuracy std"] == ""
    markdown = read_text(output_dir / "table1_lr_test_accuracy.md")
    assert "| 0.1 | 16 | 4 | 1 | 0 | 0.9800 | n/a |" in markdown
    assert not (output_dir / "figure3_runtime.png").exists()
    assert not (output_dir / "table2_runtime.md").exists()


def test_duplicate_and_incomplete_logs_warned(tmp_path):
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    original = os.path.join(FIXTURE_RESULTS, "lr", "lr0.01", "seed1.json")
    shutil.copy(original, results_dir / "a.json")
    shutil.copy(original, results_dir / "b_copy.json")
    log = json.loads(read_text(original))
    del log["config"]["learning_rate"]
    (results_dir / "c_no_rate.json").write_text(json.dumps(log), encoding="utf-8")
    log = json.loads(read_text(original))
    log["status"] = "failed"
    (results_dir / "d_failed.json").write_text(json.dumps(log), encoding="utf-8")

    exit_code, stdout, stderr = run_main(["--results-dir", str(results_dir)])

    assert exit_code == 0
    warnings = stderr.splitlines()
    assert len(warnings) == 3
    assert "b_copy.json: same settings and seed as" in warnings[0]
    assert "c_no_rate.json: config.learning_rate is missing or invalid" in warnings[1]
    assert "d_failed.json: incomplete run (status failed)" in warnings[2]
    rows = read_csv_rows(results_dir / "figures" / "table1_lr_test_accuracy.csv", "learning rate")
    assert rows["0.01"]["seeds"] == "1"


def test_figure_flags_accepted(tmp_path):
    output_dir = tmp_path / "out"
    exit_code, stdout, stderr = run_main([
        "--results-dir", FIXTURE_RESULTS, "--output-dir", str(output_dir), "--log-log",
        "--zoom-epochs", "2", "--zoom-accuracy", "0.9", "1.0", "--full-epochs", "3",
    ])
    assert exit_code == 0
    for stem in FIGURE_STEMS:
        assert (output_dir / (stem + ".png")).stat().st_size > 1000


def test_no_usable_logs_exits_zero(tmp_path):
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    exit_code, stdout, stderr = run_main(["--results-dir", str(tmp_path)])
    assert exit_code == 0
    assert f"no usable run logs under {tmp_path}" in stdout
    assert "broken.json" in stderr
    assert not (tmp_path / "figures").exists()


def test_missing_results_dir_fails(tmp_path, capsys):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(SystemExit) as raised:
        plot_results.main(["--results-dir", str(missing)])
    assert raised.value.code != 0
    assert str(missing) in capsys.readouterr().err


def test_invalid_zoom_accuracy_fails(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        plot_results.main(["--results-dir", str(tmp_path), "--zoom-accuracy", "1.0", "0.8"])
    assert raised.value.code != 0
    assert "--zoom-accuracy MIN must be below MAX" in capsys.readouterr().err


def test_runs_with_tkagg_backend_and_no_display(tmp_path):
    env = dict(os.environ, MPLBACKEND="TkAgg", MPLCONFIGDIR=str(tmp_path / "mplconfig"))
    env.pop("DISPLAY", None)
    env.pop("WAYLAND_DISPLAY", None)
    output_dir = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, os.path.join(REPO_DIR, "plot_results.py"),
         "--results-dir", FIXTURE_RESULTS, "--output-dir", str(output_dir)],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr
    assert (output_dir / "figure1_lr_validation_accuracy.png").stat().st_size > 1000
    assert "tensorflow" not in completed.stderr.lower()


def test_tensorflow_never_imported():
    code = "import sys, plot_results; print('tensorflow' in sys.modules)"
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO_DIR, capture_output=True,
                               text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "False"
