"""End-to-end tests of the two sweeps: real sweep processes, real cnn_mnist.py children, real logs.

Every sweep trains on 1,000 or 2,000 images for 1 to 4 epochs, so one run takes a few seconds,
most of them spent importing TensorFlow. The helpers at the top are shared with test_faults.py.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

import run_log
import run_lr_experiment
from conftest import REPO_DIR

LR_SCRIPT = REPO_DIR / "run_lr_experiment.py"
RUNTIME_SCRIPT = REPO_DIR / "run_runtime_experiment.py"
TIMEOUT_SECONDS = 300


def sweep_command(script, results_dir, data_dir, *flags):
    """Return the command line of a sweep writing to `results_dir`."""
    return [sys.executable, str(script), "--results-dir", str(results_dir),
            "--data-dir", str(data_dir), *flags]


def run_to_end(command, env=None):
    """Run a command to its end and return the CompletedProcess with text output."""
    return subprocess.run(command, capture_output=True, text=True, env=env,
                          timeout=TIMEOUT_SECONDS)


class SweepProcess:
    """A sweep started in its own process group, with its output collected line by line.

    Used as a context manager, it kills the whole group on the way out if it still runs, so a
    failing test leaves no training process behind.
    """

    def __init__(self, command, env=None):
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            start_new_session=True,
        )
        self.pid = self.process.pid
        self.stdout_lines = []
        self.stderr_lines = []
        self.readers = [
            threading.Thread(target=self._collect, args=(stream, lines), daemon=True)
            for stream, lines in ((self.process.stdout, self.stdout_lines),
                                  (self.process.stderr, self.stderr_lines))
        ]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _collect(stream, lines):
        for line in stream:
            lines.append(line.rstrip("\n"))

    @property
    def stdout(self):
        return "\n".join(self.stdout_lines)

    @property
    def stderr(self):
        return "\n".join(self.stderr_lines)

    def wait_for(self, condition, description, timeout=TIMEOUT_SECONDS):
        """Poll `condition()` until it is true; fail if the sweep ends first or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if self.process.poll() is not None:
                # Output printed just before the exit may have arrived meanwhile.
                for reader in self.readers:
                    reader.join(timeout=5)
                if condition():
                    return
                pytest.fail(f"the sweep exited ({self.process.returncode}) before {description}:\n"
                            f"{self.stdout}\n{self.stderr}")
            time.sleep(0.02)
        pytest.fail(f"timed out waiting for {description}:\n{self.stdout}\n{self.stderr}")

    def wait_for_line(self, pattern):
        regex = re.compile(pattern)
        self.wait_for(lambda: any(regex.search(line) for line in list(self.stdout_lines)),
                      f"an output line matching {pattern!r}")

    def wait_for_path(self, path):
        self.wait_for(path.exists, f"{path} to appear")

    def signal_group(self, signum):
        os.killpg(self.pid, signum)

    def finish(self, timeout=TIMEOUT_SECONDS):
        """Wait for the sweep to exit and return its exit status."""
        status = self.process.wait(timeout=timeout)
        for reader in self.readers:
            reader.join(timeout=10)
        return status

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self.process.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=30)
        for reader in self.readers:
            reader.join(timeout=10)


# A test-only start-up hook. Python imports `sitecustomize` from PYTHONPATH in every process it
# starts, the sweep and its cnn_mnist.py children alike, so nothing in the project changes.
PAUSE_HOOK = '''\
"""Pause this process just before it renames a file into place, so that a test can signal it there.

The FAULT_PAUSE_AT-th rename (default 1) onto a path that ends with FAULT_PAUSE_TARGET creates
the file FAULT_PAUSE_MARKER and then sleeps for 10 minutes. Without FAULT_PAUSE_TARGET nothing
changes.
"""
import os
import time

_target_end = os.environ.get("FAULT_PAUSE_TARGET")
if _target_end:
    _replace = os.replace
    _renames = 0

    def _pausing_replace(source, target, *args, **kwargs):
        global _renames
        if os.fspath(target).endswith(_target_end):
            _renames += 1
            if _renames == int(os.environ.get("FAULT_PAUSE_AT", "1")):
                open(os.environ["FAULT_PAUSE_MARKER"], "w").close()
                time.sleep(600)
        return _replace(source, target, *args, **kwargs)

    os.replace = _pausing_replace
'''


def pause_before_rename(tmp_path, target_end, at=1):
    """Return (environment, marker path) that pause a process at its `at`-th rename onto a path
    ending with `target_end`, such as "lr0.1_f16_seed0/state.json"."""
    hook_dir = tmp_path / "pause_hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(PAUSE_HOOK, encoding="utf-8")
    marker = tmp_path / "paused"
    python_path = [str(hook_dir)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(python_path), FAULT_PAUSE_TARGET=target_end,
               FAULT_PAUSE_AT=str(at), FAULT_PAUSE_MARKER=str(marker))
    return env, marker


def plan_lr_runs(results_dir, data_dir, *flags):
    """Return the sweep.Run objects that run_lr_experiment.py plans for these flags."""
    args = run_lr_experiment.build_parser().parse_args(
        ["--results-dir", str(results_dir), "--data-dir", str(data_dir), *flags])
    return run_lr_experiment.plan_runs(args)


def write_finished_log(run, status="completed"):
    """Write a final log with the run's settings, as a finished earlier sweep would have."""
    log = run_log.new_log(run.config)
    log.update(status=status, num_params=104_250, test_accuracy=0.9, graph_build_seconds=1.0,
               train_seconds=2.0, eval_seconds=0.5, total_seconds=4.0)
    log["epochs"] = [{"epoch": epoch, "train_loss": 0.5, "val_accuracy": 0.9, "seconds": 1.0}
                     for epoch in range(1, run.epochs + 1)]
    os.makedirs(os.path.dirname(run.log_path), exist_ok=True)
    run_log.write_log(run.log_path, log)


def snapshot_logs(results_dir):
    """Return {file name: (bytes, mtime in ns)} of the logs directly in `results_dir`."""
    return {path.name: (path.read_bytes(), path.stat().st_mtime_ns)
            for path in sorted(results_dir.glob("*.json"))}


def count_epoch_lines(output, run_name, epoch=1):
    """Return how often the sweep output reports `epoch` of the run `run_name` as finished."""
    return len(re.findall(rf"^\[{re.escape(run_name)}\] epoch: {epoch} ", output, re.MULTILINE))


def training_processes(results_dir):
    """Return the process ids of cnn_mnist.py processes that write into `results_dir`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                args = cmdline.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(arg.endswith("cnn_mnist.py") for arg in args) and \
                any(str(results_dir) in arg for arg in args):
            pids.append(int(entry))
    return pids


def process_environment(pid):
    """Return the environment of a running process as a dict, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            items = environ.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    return dict(item.split("=", 1) for item in items if "=" in item)


def wait_until_gone(pids, timeout=30):
    """Wait for the processes to exit and return those still running after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if os.path.exists(f"/proc/{pid}/cmdline")
                 and open(f"/proc/{pid}/cmdline", "rb").read()]
        time.sleep(0.05)
    return alive


def epoch_values(log):
    return [(entry["epoch"], entry["train_loss"], entry["val_accuracy"]) for entry in log["epochs"]]


# ---------------------------------------------------------------------------------------------
# Learning-rate sweep
# ---------------------------------------------------------------------------------------------

def test_lr_sweep_rerun_trains_nothing(mnist_dir, tmp_path):
    results = tmp_path / "lr"
    command = sweep_command(LR_SCRIPT, results, mnist_dir, "--learning-rates", "0.1", "0.01",
                            "--epochs", "1", "--train-size", "2000")
    first = run_to_end(command)
    assert first.returncode == 0, first.stdout + first.stderr

    names = ["lr0.1_f16_seed0", "lr0.01_f16_seed0"]
    assert sorted(path.name for path in results.glob("*.json")) == sorted(n + ".json" for n in names)
    for name in names:
        log = run_log.read_log(results / (name + ".json"))
        assert log["status"] == "completed"
        assert len(log["epochs"]) == 1
        assert count_epoch_lines(first.stdout, name) == 1
        # Each per-epoch line carries the time left for the whole sweep.
        epoch_line = next(line for line in first.stdout.splitlines()
                          if line.startswith(f"[{name}] epoch: 1 "))
        assert re.search(r"  eta: (\d+ s|\d+ min|\d+ h \d\d min)$", epoch_line), epoch_line

    # The summary table: one header, one row per run with the test accuracy from the log.
    lines = first.stdout.splitlines()
    header = next(line for line in lines if line.startswith("learning rate"))
    assert header.split() == ["learning", "rate", "seed", "status", "best", "val", "final",
                              "val", "test", "seconds", "note"]
    for name, rate in zip(names, ("0.1", "0.01")):
        log = run_log.read_log(results / (name + ".json"))
        row = next(line.split() for line in lines if line.startswith(rate + " "))
        assert row[:3] == [rate, "0", "completed"]
        assert row[5] == f"{log['test_accuracy']:.4f}"
        assert row[-1] == "trained"
    assert not (results / "checkpoints").exists() or not any((results / "checkpoints").iterdir())
    # TensorFlow's expected complaint about the hidden GPU is not echoed for a CPU run.
    assert "cuInit" not in first.stdout

    before = snapshot_logs(results)
    second = run_to_end(command)
    assert second.returncode == 0, second.stdout + second.stderr
    assert snapshot_logs(results) == before
    # No child process ran: cnn_mnist.py prints its "log:" line and per-epoch lines.
    assert "epoch:" not in second.stdout
    assert "log:" not in second.stdout
    for name in names:
        assert f"[{name}] already completed" in second.stdout
    assert "sweep: 2 runs, 0 to train" in second.stdout


def test_killed_run_resumes_to_same_values(mnist_dir, tmp_path):
    flags = ["--learning-rates", "0.1", "--epochs", "4", "--train-size", "2000",
             "--checkpoint-every", "1"]
    name = "lr0.1_f16_seed0"

    reference_dir = tmp_path / "uninterrupted"
    reference = run_to_end(sweep_command(LR_SCRIPT, reference_dir, mnist_dir, *flags))
    assert reference.returncode == 0, reference.stdout + reference.stderr
    expected = run_log.read_log(reference_dir / (name + ".json"))

    results = tmp_path / "interrupted"
    command = sweep_command(LR_SCRIPT, results, mnist_dir, *flags)
    with SweepProcess(command) as sweep:
        sweep.wait_for_path(results / "checkpoints" / name / "state.json")
        sweep.signal_group(signal.SIGKILL)
        assert sweep.finish() == -signal.SIGKILL
    assert run_log.read_log(results / (name + ".json"))["status"] == "running"

    rerun = run_to_end(command)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    resumed = re.search(rf"^\[{name}\] resumed: from epoch (\d+)", rerun.stdout, re.MULTILINE)
    assert resumed, rerun.stdout
    assert 1 <= int(resumed.group(1)) < 4
    assert count_epoch_lines(rerun.stdout, name, epoch=1) == 0
    assert count_epoch_lines(rerun.stdout, name, epoch=4) == 1

    log = run_log.read_log(results / (name + ".json"))
    assert log["status"] == "completed"
    assert log["resumed_from_epoch"] == int(resumed.group(1))
    assert [entry["epoch"] for entry in log["epochs"]] == [1, 2, 3, 4]
    # Restored weights and the per-epoch shuffling are exact, and the values have come out bit
    # for bit equal. TensorFlow does not promise that its multi-threaded CPU kernels sum in the
    # same order in every process, so the test allows float32 round-off in the loss and one
    # image in 10,000 in an accuracy.
    for got, want in zip(log["epochs"], expected["epochs"]):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)
        assert got["val_accuracy"] == pytest.approx(want["val_accuracy"], abs=1e-4)
    assert log["test_accuracy"] == pytest.approx(expected["test_accuracy"], abs=1e-4)
    assert not (results / "checkpoints" / name).exists()


def test_force_divergence_tensorboard_checkpoints(mnist_dir, tmp_path):
    results = tmp_path / "lr"
    tensorboard = tmp_path / "tensorboard"
    # At learning rate 1e38 the first SGD update overflows float32 and the loss is NaN.
    command = sweep_command(LR_SCRIPT, results, mnist_dir, "--learning-rates", "0.1", "1e38",
                            "--epochs", "2", "--train-size", "1000", "--checkpoint-every", "1",
                            "--tensorboard-dir", str(tensorboard))
    first = run_to_end(command)
    assert first.returncode == 0, first.stdout + first.stderr

    completed, diverged = "lr0.1_f16_seed0", "lr1e+38_f16_seed0"
    assert run_log.read_log(results / (completed + ".json"))["status"] == "completed"
    diverged_log = run_log.read_log(results / (diverged + ".json"))
    assert diverged_log["status"] == "diverged"
    assert diverged_log["diverged_at_epoch"] == 1
    assert f"[{diverged}] diverged: epoch 1" in first.stdout
    row = next(line.split() for line in first.stdout.splitlines() if line.startswith("1e+38 "))
    assert row[2] == "diverged"
    # Checkpoints of finished runs are gone.
    assert not (results / "checkpoints" / completed).exists()
    assert not (results / "checkpoints" / diverged).exists()
    # One TensorBoard folder per run, each with an events file.
    assert sorted(path.name for path in tensorboard.iterdir()) == sorted([completed, diverged])
    for name in (completed, diverged):
        assert list((tensorboard / name).glob("events.out.tfevents.*")), name

    before = snapshot_logs(results)
    forced = run_to_end(command + ["--force", "--keep-checkpoints"])
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert count_epoch_lines(forced.stdout, completed, epoch=2) == 1
    assert f"[{diverged}] diverged: epoch 1" in forced.stdout
    after = snapshot_logs(results)
    for name in (completed, diverged):
        assert after[name + ".json"][1] > before[name + ".json"][1], name
    # Kept: the checkpoint after epoch 1 (the last epoch is not checkpointed).
    state = results / "checkpoints" / completed / "state.json"
    assert state.exists()

    unforced = run_to_end(command)
    assert unforced.returncode == 0, unforced.stdout + unforced.stderr
    assert "epoch:" not in unforced.stdout
    assert f"[{completed}] already completed" in unforced.stdout
    assert f"[{diverged}] already diverged" in unforced.stdout
    assert snapshot_logs(results) == after


@pytest.mark.parametrize("target, signum", [
    ("group", signal.SIGINT),   # Ctrl-C in a terminal reaches the sweep and its child.
    ("sweep", signal.SIGINT),
    ("sweep", signal.SIGTERM),
], ids=["ctrl-c", "sigint-to-sweep", "sigterm-to-sweep"])
def test_interrupted_sweep_stops_then_completes(mnist_dir, tmp_path, target, signum):
    results = tmp_path / "lr"
    flags = ["--learning-rates", "0.1", "0.05", "--epochs", "4", "--train-size", "1000",
             "--checkpoint-every", "1"]
    first_run, second_run = plan_lr_runs(results, mnist_dir, *flags)
    command = sweep_command(LR_SCRIPT, results, mnist_dir, *flags)
    if target == "sweep":
        # A finished run from an earlier sweep; the group case finishes one in this sweep.
        write_finished_log(first_run)
    # The second run stops while it writes its checkpoint after epoch 2, so it cannot finish
    # before the signal reaches it, however fast the machine.
    env, paused = pause_before_rename(tmp_path, f"{second_run.name}/state.json", at=2)

    with SweepProcess(command, env=env) as sweep:
        sweep.wait_for_path(paused)
        finished = snapshot_logs(results)
        assert first_run.name + ".json" in finished
        children = training_processes(results)
        if target == "group":
            sweep.signal_group(signum)
        else:
            os.kill(sweep.pid, signum)
        assert sweep.finish() == 130, sweep.stdout + sweep.stderr
        assert "interrupted: finished run logs are kept" in sweep.stderr
        assert "Traceback" not in sweep.stdout + sweep.stderr
    assert len(children) == 1, "expected one cnn_mnist.py process while the second run trained"
    assert wait_until_gone(children, timeout=5) == []

    after = snapshot_logs(results)
    assert after[first_run.name + ".json"] == finished[first_run.name + ".json"]
    interrupted = run_log.read_log(second_run.log_path)
    assert interrupted["status"] == "failed"
    assert interrupted["error"] == "interrupted"

    rerun = run_to_end(command)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"[{first_run.name}] already completed" in rerun.stdout
    assert f"[{second_run.name}] resumed: from epoch 1 " in rerun.stdout
    assert run_log.read_log(second_run.log_path)["status"] == "completed"
    assert snapshot_logs(results)[first_run.name + ".json"] == finished[first_run.name + ".json"]


def test_killed_child_reported_and_sweep_goes_on(mnist_dir, tmp_path):
    results = tmp_path / "lr"
    command = sweep_command(LR_SCRIPT, results, mnist_dir, "--learning-rates", "0.1", "0.05",
                            "--epochs", "3", "--train-size", "1000")
    with SweepProcess(command) as sweep:
        sweep.wait_for_line(r"^\[lr0\.1_f16_seed0\] epoch: 1 ")
        children = training_processes(results)
        assert len(children) == 1
        os.kill(children[0], signal.SIGKILL)
        status = sweep.finish()
    assert status == 1, sweep.stdout + sweep.stderr
    assert "[lr0.1_f16_seed0] was killed by SIGKILL" in sweep.stderr
    assert count_epoch_lines(sweep.stdout, "lr0.05_f16_seed0", epoch=3) == 1
    row = next(line.split() for line in sweep.stdout.splitlines() if line.startswith("0.1 "))
    assert row[2] == "failed"
    assert run_log.read_log(results / "lr0.1_f16_seed0.json")["status"] == "running"


# ---------------------------------------------------------------------------------------------
# Runtime sweep
# ---------------------------------------------------------------------------------------------

def test_runtime_sweep_cpu_logs_and_gpu_skipped(mnist_dir, tmp_path):
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU, so no run is skipped")
    results = tmp_path / "runtime"
    command = sweep_command(RUNTIME_SCRIPT, results, mnist_dir, "--devices", "cpu", "gpu",
                            "--filters", "8", "16", "--cpu-filters", "8", "16", "--epochs", "2",
                            "--train-size", "2000", "--learning-rate", "0.1",
                            "--target-accuracy", "0.6")

    # Record the environment of every training process while the sweep runs.
    environments = {}
    with SweepProcess(command) as sweep:
        while sweep.process.poll() is None:
            for pid in training_processes(results):
                environment = process_environment(pid)
                if environment is not None:
                    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                        args = cmdline.read().decode().split("\0")
                    environments[pid] = (args[args.index("--device") + 1], environment)
            time.sleep(0.05)
        status = sweep.finish()
    assert status == 0, sweep.stdout + sweep.stderr

    cpu_environments = [env for device, env in environments.values() if device == "cpu"]
    assert cpu_environments, "no CPU training process was seen"
    for environment in cpu_environments:
        assert environment.get("CUDA_VISIBLE_DEVICES") == "-1"

    for filters in (8, 16):
        log = run_log.read_log(results / f"cpu_f{filters}_seed0.json")
        assert log["status"] == "completed"
        assert log["device"]["tf_device"] == "/cpu:0"
        assert log["device"]["visible_gpus"] == []
        seconds = [entry["seconds"] for entry in log["epochs"]]
        assert len(seconds) == 2 and all(value > 0 for value in seconds)
        timing = log["timing"]
        assert timing["warmup_epoch_seconds"] == seconds[0]
        assert timing["steady_epoch_seconds_median"] == seconds[1]
        assert timing["images_per_second"] == pytest.approx(2000 / seconds[1])
        # The defaults: half the cores inside an op, two ops at a time.
        assert timing["intra_op_threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
        assert timing["inter_op_threads"] == 2
        assert log["train_seconds"] == pytest.approx(sum(seconds))
        assert log["total_seconds"] > log["train_seconds"]
        # The training seconds until validation accuracy first reached the target.
        elapsed, reached = 0.0, None
        for entry in log["epochs"]:
            elapsed += entry["seconds"]
            if entry["val_accuracy"] >= 0.6:
                reached = elapsed
                break
        assert timing["target_accuracy"] == 0.6
        assert timing["seconds_to_target"] == (None if reached is None else pytest.approx(reached))

        skipped = run_log.read_log(results / f"gpu_f{filters}_seed0.json")
        assert skipped["status"] == "skipped"
        assert "TensorFlow sees no GPU" in skipped["skip_reason"]

    # The first GPU run found no GPU; the second was skipped without starting a process.
    assert "[gpu_f8_seed0] error: --device gpu was requested" in sweep.stdout
    assert not [line for line in sweep.stdout.splitlines()
                if line.startswith("[gpu_f16_seed0]") and "skipped:" not in line]
    assert "skipped (device not available): gpu_f8_seed0, gpu_f16_seed0" in sweep.stdout


def test_run_names_keep_settings_apart(tmp_path):
    runs = plan_lr_runs(tmp_path, tmp_path, "--learning-rates", "0.1", "0.1000001", "1e-05",
                        "--seeds", "0", "1")
    names = [run.name for run in runs]
    assert names == ["lr0.1_f16_seed0", "lr0.1000001_f16_seed0", "lr1e-05_f16_seed0",
                     "lr0.1_f16_seed1", "lr0.1000001_f16_seed1", "lr1e-05_f16_seed1"]
