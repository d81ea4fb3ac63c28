"""Fault tests: signals at bad moments, concurrent sweeps, stale claims, unwritable folders,
damaged data files and run logs, and invalid flags.

The sweeps and cnn_mnist.py run as real processes on real files in tmp_path. Signals land at
exact points through the test-only start-up hook of test_sweeps.pause_before_rename.
"""

import contextlib
import functools
import gzip
import http.server
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import pytest

import cnn_mnist
import plot_results
import run_log
import run_lr_experiment
import run_runtime_experiment
from conftest import REPO_DIR
from test_sweeps import (
    LR_SCRIPT, RUNTIME_SCRIPT, SweepProcess, count_epoch_lines, pause_before_rename,
    plan_lr_runs, run_to_end, snapshot_logs, sweep_command, training_processes,
    wait_until_gone, write_finished_log,
)

TRAIN_SCRIPT = REPO_DIR / "cnn_mnist.py"
PLOT_SCRIPT = REPO_DIR / "plot_results.py"
MNIST_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# Start-up lines of TensorFlow's C++ runtime on stderr, which are not part of an error message.
TENSORFLOW_CHATTER = re.compile(r"^([IWE]\d{4} |WARNING: All log messages before absl)")
REDOWNLOAD_FIX = "Delete the file and rerun to download it again"


def plot_without_display(results_dir, output_dir):
    """Run plot_results.py with an interactive backend and no display; return the result."""
    env = dict(os.environ, MPLBACKEND="TkAgg", MPLCONFIGDIR=str(output_dir.parent / "mpl"))
    env.pop("DISPLAY", None)
    env.pop("WAYLAND_DISPLAY", None)
    return run_to_end([sys.executable, str(PLOT_SCRIPT), "--results-dir", str(results_dir),
                       "--output-dir", str(output_dir)], env=env)


# ---------------------------------------------------------------------------------------------
# Signals at several points of a sweep
# ---------------------------------------------------------------------------------------------

def read_status(path):
    """Return the status of the log at `path`, or why it cannot be read."""
    try:
        return run_log.read_log(path)["status"]
    except run_log.LogError as error:
        return error.reason


FAULT_FLAGS = ["--learning-rates", "0.1", "0.05", "--epochs", "3", "--train-size", "1000",
               "--checkpoint-every", "1"]


@pytest.mark.parametrize("point", ["mid-epoch", "checkpoint", "log-write"])
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_signal_at_point_then_rerun_completes(mnist_dir, tmp_path, point, signum):
    results = tmp_path / "lr"
    finished_run, second_run = plan_lr_runs(results, mnist_dir, *FAULT_FLAGS)
    write_finished_log(finished_run)
    finished_name = finished_run.name + ".json"
    before = snapshot_logs(results)
    command = sweep_command(LR_SCRIPT, results, mnist_dir, *FAULT_FLAGS)

    env = None
    if point == "checkpoint":
        # The checkpoint after epoch 2: its weights are on disk, its state file is not.
        env, paused = pause_before_rename(tmp_path, f"{second_run.name}/state.json", at=2)
    elif point == "log-write":
        # The log is written at the start, after each of the 3 epochs and at the end: the
        # 5th write is the final one, with status "completed".
        env, paused = pause_before_rename(tmp_path, f"{second_run.name}.json", at=5)

    with SweepProcess(command, env=env) as sweep:
        if point == "mid-epoch":
            sweep.wait_for_line(rf"^\[{second_run.name}\] epoch: 1 ")
        else:
            sweep.wait_for_path(paused)
        children = training_processes(results)
        # Sent to the process group, as a terminal sends Ctrl-C.
        sweep.signal_group(signum)
        status = sweep.finish()
    assert status == (-signal.SIGKILL if signum == signal.SIGKILL else 130), sweep.stdout
    assert wait_until_gone(children, timeout=10) == []
    assert snapshot_logs(results)[finished_name] == before[finished_name]
    assert read_status(second_run.log_path) != "completed"

    temp_files = list(results.rglob("*" + run_log.TEMP_SUFFIX))
    if signum == signal.SIGINT:
        # An interrupted write deletes its temporary file.
        assert temp_files == []
    elif point != "mid-epoch":
        # SIGKILL leaves the half-done write behind, which proves the signal hit the window.
        assert len(temp_files) == 1
        if point == "log-write":
            leftover = json.loads(temp_files[0].read_text(encoding="utf-8"))
            assert leftover["status"] == "completed"
    if temp_files:
        plotted = plot_without_display(results, tmp_path / "figures")
        assert plotted.returncode == 0, plotted.stderr
        assert run_log.TEMP_SUFFIX not in plotted.stdout + plotted.stderr
        table = (tmp_path / "figures" / "table1_lr_test_accuracy.csv").read_text()
        assert [line.split(",")[0] for line in table.splitlines()[1:]] == ["0.1"]

    rerun = run_to_end(command)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"[{finished_run.name}] already completed" in rerun.stdout
    resumed = {"checkpoint": "resumed: from epoch 1 ", "log-write": "resumed: from epoch 2 "}
    if point in resumed:
        assert f"[{second_run.name}] {resumed[point]}" in rerun.stdout
    log = run_log.read_log(second_run.log_path)
    assert log["status"] == "completed"
    assert [entry["epoch"] for entry in log["epochs"]] == [1, 2, 3]
    assert snapshot_logs(results)[finished_name] == before[finished_name]
    assert list(results.rglob("*" + run_log.TEMP_SUFFIX)) == []
    assert not (results / "checkpoints" / second_run.name).exists()


def test_killed_sweep_takes_child_down(mnist_dir, tmp_path):
    results = tmp_path / "lr"
    flags = ["--learning-rates", "0.1", "--epochs", "3", "--train-size", "1000",
             "--checkpoint-every", "1"]
    (run,) = plan_lr_runs(results, mnist_dir, *flags)
    command = sweep_command(LR_SCRIPT, results, mnist_dir, *flags)
    env, paused = pause_before_rename(tmp_path, f"{run.name}/state.json", at=2)

    with SweepProcess(command, env=env) as sweep:
        sweep.wait_for_path(paused)
        children = training_processes(results)
        os.kill(sweep.pid, signal.SIGKILL)
        assert sweep.finish() == -signal.SIGKILL
    # Linux sends the orphan SIGINT (PR_SET_PDEATHSIG), so it records the interruption and exits.
    assert len(children) == 1
    assert wait_until_gone(children, timeout=30) == []
    log = run_log.read_log(run.log_path)
    assert log["status"] == "failed"
    assert log["error"] == "interrupted"

    rerun = run_to_end(command)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"[{run.name}] resumed: from epoch 1 " in rerun.stdout
    assert run_log.read_log(run.log_path)["status"] == "completed"


def test_interrupted_training_exits_130_without_traceback(mnist_dir, tmp_path):
    output = tmp_path / "run.json"
    checkpoints = tmp_path / "checkpoints"
    env, paused = pause_before_rename(tmp_path, "checkpoints/state.json", at=1)
    command = [sys.executable, str(TRAIN_SCRIPT), "--epochs", "3", "--train-size", "1000",
               "--data-dir", str(mnist_dir), "--output", str(output), "--checkpoint-dir",
               str(checkpoints), "--checkpoint-every", "1"]
    with SweepProcess(command, env=env) as training:
        training.wait_for_path(paused)
        training.signal_group(signal.SIGINT)
        assert training.finish() == 130
    assert "Traceback" not in training.stderr
    assert "interrupted: the run stopped before it finished. Run the same command again to " \
           "resume from the last checkpoint." in training.stderr
    log = run_log.read_log(output)
    assert log["status"] == "failed"
    assert log["error"] == "interrupted"


# ---------------------------------------------------------------------------------------------
# Concurrent sweeps and claims
# ---------------------------------------------------------------------------------------------

CONCURRENT_FLAGS = ["--learning-rates", "0.1", "0.05", "0.02", "--epochs", "1",
                    "--train-size", "1000"]


def run_two_sweeps(command):
    """Start two identical sweeps at the same moment and return both when they have ended."""
    with SweepProcess(command) as first, SweepProcess(command) as second:
        statuses = (first.finish(), second.finish())
    return (first, second), statuses


def test_two_sweeps_at_once_train_each_run_once(mnist_dir, tmp_path):
    results = tmp_path / "lr"
    runs = plan_lr_runs(results, mnist_dir, *CONCURRENT_FLAGS)
    sweeps, statuses = run_two_sweeps(sweep_command(LR_SCRIPT, results, mnist_dir,
                                                    *CONCURRENT_FLAGS))
    output = "\n".join(sweep.stdout for sweep in sweeps)
    assert statuses == (0, 0), output + "\n".join(sweep.stderr for sweep in sweeps)

    for run in runs:
        assert count_epoch_lines(output, run.name) == 1, run.name
        log = run_log.read_log(run.log_path)
        assert log["status"] == "completed"
        assert len(log["epochs"]) == 1
    # Each sweep names the runs it left to the other, by the other's process id.
    left = 0
    for sweep, other in (sweeps, sweeps[::-1]):
        for run in runs:
            if f"[{run.name}] left to process {other.pid}, which is training it" in sweep.stdout:
                left += 1
                assert count_epoch_lines(sweep.stdout, run.name) == 0
                assert run.name in sweep.stdout.split("left to another sweep")[-1]
    assert left >= 1


def count_trainings(output, run_name):
    """Return how often the output shows the run's first epoch, finished or diverged."""
    return len(re.findall(rf"^\[{re.escape(run_name)}\] (epoch: 1 |diverged: epoch 1 )", output,
                          re.MULTILINE))


def test_two_forced_sweeps_train_each_run_once(mnist_dir, tmp_path):
    results = tmp_path / "lr"
    # The first run trains 8 epochs and the two others diverge in epoch 1, so one sweep is still
    # on the first run when the other has finished the rest, and it must keep their new logs.
    flags = ["--learning-rates", "0.1", "1e38", "2e38", "--epochs", "8", "--train-size", "1000"]
    runs = plan_lr_runs(results, mnist_dir, *flags)
    for run in runs:
        write_finished_log(run)
        os.utime(run.log_path, (1_000_000_000, 1_000_000_000))
    command = sweep_command(LR_SCRIPT, results, mnist_dir, *flags, "--force")
    sweeps, statuses = run_two_sweeps(command)
    output = "\n".join(sweep.stdout for sweep in sweeps)
    assert statuses == (0, 0), output

    for run, status in zip(runs, ("completed", "diverged", "diverged")):
        assert count_trainings(output, run.name) == 1, (run.name, output)
        log = run_log.read_log(run.log_path)
        assert log["status"] == status
        assert log["environment"], "the log is still the one written before the sweeps"


def test_stale_claims_do_not_block(mnist_dir, tmp_path):
    results = tmp_path / "lr"
    flags = ["--learning-rates", "0.1", "0.05", "--epochs", "1", "--train-size", "1000"]
    dead_pid_run, killed_holder_run = plan_lr_runs(results, mnist_dir, *flags)
    (results / ".claims").mkdir(parents=True)

    # A claim file naming a process that has exited.
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)
    assert not os.path.exists(f"/proc/{dead_pid}")
    with open(dead_pid_run.claim_path, "w", encoding="utf-8") as claim:
        claim.write(f"{dead_pid}\n")

    # A claim locked by a process that was then killed.
    holder = hold_claim(killed_holder_run.claim_path)
    holder.kill()
    holder.wait()

    result = run_to_end(sweep_command(LR_SCRIPT, results, mnist_dir, *flags))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "left to process" not in result.stdout
    for run in (dead_pid_run, killed_holder_run):
        assert count_epoch_lines(result.stdout, run.name) == 1
        assert run_log.read_log(run.log_path)["status"] == "completed"


def hold_claim(claim_path):
    """Start a process that takes the flock of `claim_path`, as a sweep does, and keeps it."""
    code = ("import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, f'{os.getpid()}\\n'.encode())\n"
            "print('locked', flush=True)\n"
            "time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(claim_path)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    return holder


def test_live_claim_leaves_run_to_holder(mnist_dir, tmp_path):
    results = tmp_path / "lr"
    flags = ["--learning-rates", "0.1", "0.05", "--epochs", "1", "--train-size", "1000"]
    held_run, free_run = plan_lr_runs(results, mnist_dir, *flags)
    (results / ".claims").mkdir(parents=True)
    command = sweep_command(LR_SCRIPT, results, mnist_dir, *flags)

    holder = hold_claim(held_run.claim_path)
    try:
        result = run_to_end(command)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"[{held_run.name}] left to process {holder.pid}, which is training it" in result.stdout
    assert f"left to another sweep on the same folder: {held_run.name}" in result.stdout
    assert count_epoch_lines(result.stdout, held_run.name) == 0
    assert count_epoch_lines(result.stdout, free_run.name) == 1
    assert not os.path.exists(held_run.log_path)

    rerun = run_to_end(command)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert count_epoch_lines(rerun.stdout, held_run.name) == 1
    assert f"[{free_run.name}] already completed" in rerun.stdout


# ---------------------------------------------------------------------------------------------
# Folders that cannot be written
# ---------------------------------------------------------------------------------------------

def path_under_a_file(tmp_path):
    """Return a folder path below a regular file: creating it fails, for root as well."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n", encoding="utf-8")
    return blocker / "results"


@pytest.mark.parametrize("script, flags", [
    (LR_SCRIPT, []),
    (RUNTIME_SCRIPT, ["--devices", "cpu", "--cpu-filters", "8"]),
], ids=["lr", "runtime"])
def test_unwritable_results_folder_fails_early(mnist_dir, tmp_path, script, flags):
    results = path_under_a_file(tmp_path)
    result = run_to_end(sweep_command(script, results, mnist_dir, "--epochs", "1",
                                      "--train-size", "1000", *flags))
    assert result.returncode != 0
    assert f"cannot write to the results folder '{results}'" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_unwritable_training_output_fails_early(mnist_dir, tmp_path):
    output = path_under_a_file(tmp_path) / "run.json"
    result = run_to_end([sys.executable, str(TRAIN_SCRIPT), "--epochs", "1", "--train-size",
                         "1000", "--data-dir", str(mnist_dir), "--output", str(output)])
    assert result.returncode == 2
    assert f"cannot write the run log '{output}'" in result.stderr
    assert "Traceback" not in result.stderr
    assert "epoch:" not in result.stdout


def test_unwritable_figure_folder_fails(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(REPO_DIR / "tests" / "fixtures" / "results" / "lr" / "lr0.1_seed1.json", results)
    output_dir = path_under_a_file(tmp_path)
    assert plot_results.main(["--results-dir", str(results), "--output-dir", str(output_dir)]) == 1
    assert f"cannot create the output folder '{output_dir}'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Damaged data files, through the cnn_mnist.py command line
# ---------------------------------------------------------------------------------------------

def read_idx_bytes(folder, name):
    """Return the decompressed bytes of NAME or NAME.gz in `folder`."""
    if (folder / name).exists():
        return (folder / name).read_bytes()
    return gzip.decompress((folder / (name + ".gz")).read_bytes())


def copy_mnist(mnist_dir, target):
    """Copy the four MNIST files into `target`, each as NAME.gz."""
    target.mkdir()
    for name in MNIST_NAMES:
        if (mnist_dir / (name + ".gz")).exists():
            shutil.copy(mnist_dir / (name + ".gz"), target / (name + ".gz"))
        else:
            (target / (name + ".gz")).write_bytes(gzip.compress((mnist_dir / name).read_bytes()))
    return target


def html_page(folder):
    path = folder / "train-labels-idx1-ubyte.gz"
    path.write_text("<!DOCTYPE html>\n<html><body><h1>404 Not Found</h1></body></html>\n")
    return path


def truncated_gzip(folder):
    path = folder / "t10k-images-idx3-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def one_byte_changed(folder):
    path = folder / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(read_idx_bytes(folder, "t10k-labels-idx1-ubyte"))
    data[8] = (data[8] + 1) % 10  # The first label, still a valid digit.
    path.write_bytes(gzip.compress(bytes(data)))
    return path


def labels_under_images_name(folder):
    path = folder / "t10k-images-idx3-ubyte.gz"
    shutil.copy(folder / "t10k-labels-idx1-ubyte.gz", path)
    return path


def gzipped_twice(folder):
    path = folder / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(path.read_bytes()))
    return path


def header_claims_more_items(folder):
    path = folder / "t10k-images-idx3-ubyte.gz"
    data = read_idx_bytes(folder, "t10k-images-idx3-ubyte")
    path.write_bytes(gzip.compress(data[:16 + 100 * 28 * 28]))  # 100 of the 10,000 images.
    return path


DATA_DAMAGES = {
    "html-page": (html_page, ["looks like an HTML page, not IDX data"]),
    "truncated-gzip": (truncated_gzip, ["invalid or truncated gzip data"]),
    "one-byte-changed": (one_byte_changed, ["SHA-256 mismatch", "expected", "found"]),
    "labels-as-images": (labels_under_images_name,
                         ["found labels data", "where images data", "was expected"]),
    "gzipped-twice": (gzipped_twice, ["gzip-compressed twice", "expected an IDX header"]),
    "header-claims-more": (header_claims_more_items,
                           ["the header says 10000 images", "100 whole images"]),
}


def train_once(data_dir, output, env=None):
    return run_to_end([sys.executable, str(TRAIN_SCRIPT), "--epochs", "1", "--train-size", "1000",
                       "--data-dir", str(data_dir), "--output", str(output)], env=env)


def error_paragraph(stderr):
    """Return the lines of stderr from the first "error: " line to the end, chatter removed."""
    lines = [line for line in stderr.splitlines() if not TENSORFLOW_CHATTER.match(line)]
    starts = [index for index, line in enumerate(lines) if line.startswith("error: ")]
    assert len(starts) == 1, stderr
    return lines[starts[0]:]


@pytest.mark.parametrize("damage", sorted(DATA_DAMAGES))
def test_damaged_data_file_rejected(mnist_dir, tmp_path, damage):
    damage_file, phrases = DATA_DAMAGES[damage]
    data_dir = copy_mnist(mnist_dir, tmp_path / "data")
    damaged = damage_file(data_dir)
    output = tmp_path / "run.json"

    result = train_once(data_dir, output)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "epoch:" not in result.stdout
    paragraph = error_paragraph(result.stderr)
    assert len(paragraph) == 1, paragraph
    message = paragraph[0]
    assert message.startswith(f"error: {damaged}: ")
    for phrase in phrases:
        assert phrase in message
    assert REDOWNLOAD_FIX in message
    # Nothing was trained: the log records a failure before the graph was built.
    log = run_log.read_log(output)
    assert log["status"] == "failed"
    assert log["num_params"] is None


class RecordingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files from a folder and records the requested paths; logs nothing."""

    requested = []

    def do_GET(self):
        self.requested.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


def test_damaged_download_not_kept(mnist_dir, tmp_path):
    name = "t10k-labels-idx1-ubyte"
    data_dir = copy_mnist(mnist_dir, tmp_path / "data")
    (data_dir / (name + ".gz")).unlink()
    served = tmp_path / "served"
    (served / "empty").mkdir(parents=True)
    (served / "damaged").mkdir()
    labels = bytearray(read_idx_bytes(mnist_dir, name))
    labels[8] = (labels[8] + 1) % 10
    (served / "damaged" / (name + ".gz")).write_bytes(gzip.compress(bytes(labels)))

    RecordingHandler.requested = []
    handler = functools.partial(RecordingHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
    env.update(MNIST_MIRRORS=f"{base}/empty/ {base}/damaged/", no_proxy="127.0.0.1")
    try:
        result = train_once(data_dir, tmp_path / "run.json", env=env)
    finally:
        server.shutdown()
        server.server_close()

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "epoch:" not in result.stdout
    assert RecordingHandler.requested == [f"/empty/{name}.gz", f"/damaged/{name}.gz"]
    paragraph = error_paragraph(result.stderr)
    assert "" not in paragraph
    message = "\n".join(paragraph)
    assert f"could not download {name}.gz from any mirror" in message
    assert f"{base}/empty/{name}.gz: HTTPError: HTTP Error 404" in message
    assert f"{base}/damaged/{name}.gz: MnistDataError" in message
    assert "SHA-256 mismatch" in message
    assert "by hand" in message
    # Neither the damaged file nor a partial download is left in the data folder.
    assert sorted(path.name for path in data_dir.iterdir()) == sorted(
        other + ".gz" for other in MNIST_NAMES if other != name)


def test_sweep_stops_on_damaged_data(mnist_dir, tmp_path):
    data_dir = copy_mnist(mnist_dir, tmp_path / "data")
    damaged = labels_under_images_name(data_dir)
    results = tmp_path / "lr"
    first, second = plan_lr_runs(results, data_dir, "--learning-rates", "0.1", "0.05")
    result = run_to_end(sweep_command(LR_SCRIPT, results, data_dir, "--learning-rates", "0.1",
                                      "0.05", "--epochs", "1", "--train-size", "1000"))
    assert result.returncode == 1
    assert f"[{first.name}] error: {damaged}: found labels data" in result.stdout
    assert "error: stopping the sweep" in result.stderr
    # The second run never started a process.
    assert not [line for line in result.stdout.splitlines() if line.startswith(f"[{second.name}]")]
    row = next(line.split() for line in result.stdout.splitlines() if line.startswith("0.05 "))
    assert row[2:4] == ["not", "started"]


# ---------------------------------------------------------------------------------------------
# Damaged run logs
# ---------------------------------------------------------------------------------------------

def damage_log_text(text, damage):
    """Return the text of a valid log changed the way `damage` names."""
    damages = {
        "empty": lambda: "",
        "truncated": lambda: text[:len(text) // 2],
        "not-json": lambda: "status: completed\n",
        "list": lambda: "[1, 2, 3]\n",
        "missing-keys": lambda: '{"schema_version": 1, "status": "completed"}\n',
        "future-version": lambda: text.replace('"schema_version": 1', '"schema_version": 2'),
        "nan": lambda: text.replace('"val_accuracy": 0.9', '"val_accuracy": NaN', 1),
        "infinity": lambda: text.replace('"test_accuracy": 0.9', '"test_accuracy": Infinity'),
        "overflow": lambda: text.replace('"test_accuracy": 0.9', '"test_accuracy": 1e999'),
        "deep-nesting": lambda: "[" * 100_000,
    }
    damaged = damages[damage]()
    assert damaged != text
    return damaged


LOG_DAMAGES = ["empty", "truncated", "not-json", "list", "missing-keys", "future-version", "nan",
               "infinity", "overflow", "deep-nesting"]


def test_dry_run_redoes_damaged_logs(mnist_dir, tmp_path):
    results = tmp_path / "lr"
    rates = [str(index + 1) for index in range(len(LOG_DAMAGES) + 4)]
    flags = ["--learning-rates", *rates, "--epochs", "2"]
    runs = plan_lr_runs(results, mnist_dir, *flags)
    damaged_runs, (finished, other_settings, running, invalid_bytes) = runs[:-4], runs[-4:]
    for run, damage in zip(damaged_runs, LOG_DAMAGES):
        write_finished_log(run)
        text = open(run.log_path, encoding="utf-8").read()
        with open(run.log_path, "w", encoding="utf-8") as log_file:
            log_file.write(damage_log_text(text, damage))
    write_finished_log(finished)
    write_finished_log(other_settings)
    log = run_log.read_log(other_settings.log_path)
    log["config"]["epochs"] = 1
    run_log.write_log(other_settings.log_path, log)
    write_finished_log(running, status="running")
    with open(invalid_bytes.log_path, "wb") as log_file:
        log_file.write(b"\xff\xfe\x00\x01")
    before = snapshot_logs(results)

    result = run_to_end([sys.executable, str(LR_SCRIPT), "--results-dir", str(results),
                         "--data-dir", str(mnist_dir), *flags, "--dry-run"])
    assert result.returncode == 0, result.stderr
    plan = dict(line.split("] ", 1) for line in result.stdout.splitlines() if line.startswith("["))
    plan = {name.lstrip("["): action for name, action in plan.items()}
    for run, damage in zip(damaged_runs, LOG_DAMAGES):
        assert plan[run.name].startswith("train: its log is unusable: "), (damage, plan[run.name])
    assert plan[finished.name] == "keep: already completed"
    assert plan[other_settings.name] == "train: its log has other settings: epochs 1 where " \
                                        "this sweep has 2"
    assert plan[running.name] == "train: its log has status running"
    assert plan[invalid_bytes.name].startswith("train: its log is unusable: cannot be read")
    assert f"sweep: {len(runs)} runs, {len(runs) - 1} to train" in result.stdout
    # A dry run writes nothing.
    assert snapshot_logs(results) == before
    assert not (results / ".claims").exists()


def test_sweep_redoes_damaged_logs(mnist_dir, tmp_path):
    results = tmp_path / "lr"
    flags = ["--learning-rates", "0.1", "0.05", "--epochs", "1", "--train-size", "1000"]
    runs = plan_lr_runs(results, mnist_dir, *flags)
    for run, damage in zip(runs, ["truncated", "nan"]):
        write_finished_log(run)
        text = open(run.log_path, encoding="utf-8").read()
        with open(run.log_path, "w", encoding="utf-8") as log_file:
            log_file.write(damage_log_text(text, damage))

    result = run_to_end(sweep_command(LR_SCRIPT, results, mnist_dir, *flags))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"[{runs[0].name}] to train: its log is unusable: not valid JSON" in result.stdout
    assert f"[{runs[1].name}] to train: its log is unusable: not strict JSON" in result.stdout
    for run in runs:
        assert count_epoch_lines(result.stdout, run.name) == 1
        assert run_log.read_log(run.log_path)["status"] == "completed"


def test_plot_names_each_damaged_log(tmp_path):
    """Damages beyond those in tests/fixtures/results, each skipped and named once."""
    results = tmp_path / "results"
    results.mkdir()
    valid = REPO_DIR / "tests" / "fixtures" / "results" / "lr" / "lr0.1_seed1.json"
    shutil.copy(valid, results)
    text = valid.read_text(encoding="utf-8")
    damaged = {
        "not_json.json": "status: completed\n",
        "missing_keys.json": damage_log_text(text, "missing-keys"),
        "infinity.json": text.replace('"test_accuracy": 0.98', '"test_accuracy": -Infinity'),
        "overflow.json": text.replace('"test_accuracy": 0.98', '"test_accuracy": 1e999'),
        "deep_nesting.json": damage_log_text(text, "deep-nesting"),
        "epoch_as_text.json": text.replace('"epoch": 1,', '"epoch": "1",'),
        "bom.json": "\ufeff" + text,
    }
    for name, content in damaged.items():
        assert content != text, name
        (results / name).write_text(content, encoding="utf-8")
    (results / "invalid_utf8.json").write_bytes(b"\xff\xfe\x00\x01")

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = plot_results.main(["--results-dir", str(results),
                                    "--output-dir", str(tmp_path / "figures")])
    assert status == 0
    warnings = stderr.getvalue().splitlines()
    for name in [*damaged, "invalid_utf8.json"]:
        named = [line for line in warnings if name in line]
        assert len(named) == 1, (name, warnings)
        assert named[0].startswith("warning: skipped ")
    assert len(warnings) == len(damaged) + 1
    assert (tmp_path / "figures" / "figure1_lr_validation_accuracy.png").exists()
    assert "skipped logs: 8 unreadable or invalid" in stdout.getvalue()


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------

HUGE = str(10**12)
OUT_OF_RANGE = ("0", "-1", HUGE)
SWEEP_INTEGER_FLAGS = ("--epochs", "--batch-size", "--train-size", "--checkpoint-every")


def rejected_cases():
    """Yield (script, flags, flag name) for every flag value that must be rejected."""
    for script in ("lr", "runtime"):
        for flag in SWEEP_INTEGER_FLAGS:
            for value in OUT_OF_RANGE:
                yield script, [flag, value], flag
        for value in ("-1", HUGE):
            yield script, ["--seeds", value], "--seeds"

    for value in OUT_OF_RANGE:
        yield "lr", ["--filters", value], "--filters"
        yield "runtime", ["--filters", value], "--filters"
        yield "runtime", ["--cpu-filters", value], "--cpu-filters"
        yield "runtime", ["--target-accuracy", value], "--target-accuracy"
        yield "cnn", ["--target-accuracy", value], "--target-accuracy"
        yield "plot", ["--zoom-epochs", value], "--zoom-epochs"
        yield "plot", ["--full-epochs", value], "--full-epochs"

    for value in ("0", "-1", "nan", "inf"):
        yield "lr", ["--learning-rates", value], "--learning-rates"
        yield "runtime", ["--learning-rate", value], "--learning-rate"
        yield "cnn", ["--learning-rate", value], "--learning-rate"

    for flag in ("--filters", "--kernel-size", "--epochs", "--batch-size", "--train-size",
                 "--eval-batch-size", "--steps-per-run", "--checkpoint-every"):
        for value in OUT_OF_RANGE:
            yield "cnn", [flag, value], flag

    for flag in ("--seed", "--intra-op-threads", "--inter-op-threads"):
        for value in ("-1", HUGE):
            yield "cnn", [flag, value], flag

    for low, high in (("-1", "1"), ("0.5", HUGE), ("nan", "1"), ("0", "0")):
        yield "plot", ["--zoom-accuracy", low, high], "--zoom-accuracy"

    # Unknown devices, values listed twice, and a batch larger than the training set.
    yield "lr", ["--device", "tpu"], "--device"
    yield "runtime", ["--devices", "cpu", "tpu"], "--devices"
    yield "runtime", ["--devices", "cpu", "cpu"], "--devices"
    yield "runtime", ["--filters", "8", "16", "8"], "--filters"
    yield "runtime", ["--cpu-filters", "16", "16"], "--cpu-filters"
    yield "lr", ["--learning-rates", "0.1", "1e-1"], "--learning-rates"
    yield "lr", ["--seeds", "1", "1"], "--seeds"
    yield "lr", ["--batch-size", "2000", "--train-size", "1000"], "--batch-size"


# Values at the edge that a user may mean. A learning rate has no upper bound, because a
# divergence test needs 1e38.
ACCEPTED_CASES = [
    ("lr", ["--seeds", "0"]),
    ("lr", ["--learning-rates", HUGE]),
    ("runtime", ["--learning-rate", HUGE]),
    ("cnn", ["--learning-rate", HUGE]),
    ("cnn", ["--seed", "0"]),
    ("cnn", ["--intra-op-threads", "0", "--inter-op-threads", "0"]),
    ("plot", ["--zoom-accuracy", "0", "1"]),
]


def parse_with(script, flags, tmp_path):
    """Parse `flags` as `script` does before any work, raising SystemExit for invalid ones."""
    if script == "cnn":
        return cnn_mnist.parse_config(flags)
    if script == "plot":
        return plot_results.parse_arguments(["--results-dir", str(tmp_path), *flags])
    module = run_lr_experiment if script == "lr" else run_runtime_experiment
    # A dry run prints the plan and trains nothing.
    return module.main([*flags, "--results-dir", str(tmp_path / "results"), "--dry-run"])


@pytest.mark.parametrize("script, flags, flag", list(rejected_cases()),
                         ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_invalid_flag_rejected(tmp_path, capsys, script, flags, flag):
    with pytest.raises(SystemExit) as raised:
        parse_with(script, flags, tmp_path)
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert f"error: argument {flag}" in error or f"error: {flag}" in error, error
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("script, flags", ACCEPTED_CASES)
def test_edge_flag_accepted(tmp_path, capsys, script, flags):
    parse_with(script, flags, tmp_path)
    assert "error" not in capsys.readouterr().err


@pytest.mark.parametrize("script, flags", [
    (LR_SCRIPT, ["--epochs", "0"]),
    (RUNTIME_SCRIPT, ["--cpu-filters", HUGE]),
    (PLOT_SCRIPT, ["--zoom-epochs", "-1"]),
    (TRAIN_SCRIPT, ["--checkpoint-every", "0"]),
], ids=["lr", "runtime", "plot", "cnn_mnist"])
def test_invalid_flag_no_traceback(tmp_path, script, flags):
    result = run_to_end([sys.executable, str(script), "--results-dir" if script == PLOT_SCRIPT
                         else "--data-dir", str(tmp_path), *flags])
    assert result.returncode == 2
    assert f"error: argument {flags[0]}" in result.stderr
    assert "usage: " in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_many_seeds_dry_run_warns(tmp_path, capsys):
    results = tmp_path / "results"
    seeds = [str(seed) for seed in range(50)]
    status = run_lr_experiment.main(["--seeds", *seeds, "--epochs", "1", "--train-size", "100",
                                     "--results-dir", str(results), "--dry-run"])
    assert status == 0
    captured = capsys.readouterr()
    warning = re.search(r"^warning: 50 seeds make 200 runs, 200 of them to train, about "
                        r"(\d+ min|\d+ h \d\d min)\.", captured.err, re.MULTILINE)
    assert warning, captured.err
    assert len([line for line in captured.out.splitlines() if line.startswith("[")]) == 200
    assert not results.exists()


def test_many_seeds_warn_before_training(mnist_dir, tmp_path):
    results = tmp_path / "results"
    seeds = [str(seed) for seed in range(50)]
    command = sweep_command(LR_SCRIPT, results, mnist_dir, "--learning-rates", "0.1", "--seeds",
                            *seeds, "--epochs", "1", "--train-size", "100")
    with SweepProcess(command) as sweep:
        sweep.wait_for(lambda: any(line.startswith("warning: 50 seeds make 50 runs")
                                   for line in list(sweep.stderr_lines)), "the warning")
        output_so_far = list(sweep.stdout_lines)
        sweep.signal_group(signal.SIGKILL)
        sweep.finish()
    # The warning came before any run printed a line.
    assert [line for line in output_so_far if line.startswith("[")] == []
    assert output_so_far[0].startswith("sweep: 50 runs, 50 to train, estimated time about ")
