"""What both experiment sweeps share: run names, resume, claims and child processes.

A sweep is a list of runs. Each run trains in its own `python cnn_mnist.py ...` process, so a
crash, an out-of-memory kill or the device setting of one run cannot reach the sweep or the next
run. A run whose log is final (completed or diverged) is skipped on the next invocation; any
other run is redone, resuming from its last checkpoint.

Two sweeps on one results folder share the work through claims: a process holds an exclusive
`flock` on `<results>/.claims/<run>.lock` while the run trains, and the kernel drops the lock
when the process ends, however it ends, so a dead process never blocks a later sweep.
"""

import argparse
import ctypes
import fcntl
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import run_log
from cli import bounded_int

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
TRAIN_SCRIPT = os.path.join(REPO_DIR, "cnn_mnist.py")
EXIT_DEVICE_UNAVAILABLE = 3  # cnn_mnist.EXIT_DEVICE_UNAVAILABLE; that module imports TensorFlow.
CLAIMS_FOLDER = ".claims"
CHECKPOINTS_FOLDER = "checkpoints"

# Rough float32 training throughput of a 2-core CPU, in images per second per filter count, used
# only for the time estimate printed before a sweep starts. Measured with benchmarks/ on a 2-core
# Xeon; other machines differ, so the estimate says "about".
CPU_IMAGES_PER_SECOND = {8: 25_000, 16: 20_000, 32: 9_000, 64: 3_000, 128: 1_000, 256: 350}
GPU_IMAGES_PER_SECOND = 300_000  # NOTE: a guess for a current NVIDIA GPU, not measured here.
MANY_RUNS = 40
# Informational lines TensorFlow's C++ runtime prints at start-up ("I0000 00:00:..."), not echoed.
TENSORFLOW_CHATTER = re.compile(r"^([IW]\d{4} |WARNING: All log messages before absl)")


class Run:
    """One training run of a sweep: its name, its cnn_mnist flags and where its files go."""

    def __init__(self, name, flags, results_dir, config, env=None):
        """`config` holds the run's settings as cnn_mnist.py's log stores them."""
        self.name = name
        self.flags = list(flags)
        self.config = dict(config)
        self.device = config["device"]
        self.epochs = config["epochs"]
        self.filters = config["filters"]
        self.env = dict(env or {})
        if self.device == "cpu":
            # A CPU run must not touch a GPU, so its process sees none.
            self.env.setdefault("CUDA_VISIBLE_DEVICES", "-1")
        self.log_path = os.path.join(results_dir, name + ".json")
        self.checkpoint_dir = os.path.join(results_dir, CHECKPOINTS_FOLDER, name)
        self.claim_path = os.path.join(results_dir, CLAIMS_FOLDER, name + ".lock")


def format_number(value):
    """Format a setting for a run name: 0.001 -> "0.001", 1e-05 -> "1e-05", 16 -> "16"."""
    return format(value, "g") if isinstance(value, float) else str(value)


def run_name(**settings):
    """Return a file name made from the settings, e.g. run_name(lr=0.1, seed=0) -> "lr0.1_seed0"."""
    return "_".join(f"{key}{format_number(value)}" for key, value in settings.items())


# ---------------------------------------------------------------------------------------------
# Command line pieces
# ---------------------------------------------------------------------------------------------

def unique_values(kind):
    """Return an argparse action that rejects a list with a value given twice."""
    class UniqueValues(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            seen = set()
            for value in values:
                if value in seen:
                    parser.error(f"argument {option_string}: {format_number(value)} is given "
                                 f"more than once; list each {kind} once")
                seen.add(value)
            setattr(namespace, self.dest, list(values))
    return UniqueValues


def add_common_arguments(parser, default_results_dir, default_epochs):
    """Add the flags both sweeps share; the training flags keep cnn_mnist.py's names."""
    parser.add_argument("--epochs", type=bounded_int(1), default=default_epochs,
                        help="epochs per run")
    parser.add_argument("--seeds", type=bounded_int(0, 2**31 - 1), nargs="+", default=[0],
                        action=unique_values("seed"),
                        help="seeds; each setting is trained once per seed")
    parser.add_argument("--batch-size", type=bounded_int(1), default=100,
                        help="images per SGD step")
    parser.add_argument("--train-size", type=bounded_int(1, 50_000), default=None,
                        help="use only the first N of the 50,000 training images (default: all)")
    parser.add_argument("--data-dir", default=None,
                        help="folder with the MNIST files (default: $MNIST_DATA_DIR, else "
                             "data/mnist/ in the repository)")
    parser.add_argument("--results-dir", default=default_results_dir,
                        help="folder for the run logs and checkpoints")
    parser.add_argument("--checkpoint-every", type=bounded_int(1), default=10,
                        help="epochs between checkpoints of a run")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep checkpoints of completed runs")
    parser.add_argument("--force", action="store_true",
                        help="redo every run, even those with a final log")
    parser.add_argument("--tensorboard-dir", default=None,
                        help="write per-epoch TensorBoard scalars here, one sub-folder per run "
                             "(default: off)")


def common_flags(args):
    """Return the cnn_mnist.py flags that every run of a sweep shares."""
    flags = ["--batch-size", str(args.batch_size), "--checkpoint-every", str(args.checkpoint_every)]
    if args.train_size is not None:
        flags += ["--train-size", str(args.train_size)]
    if args.data_dir is not None:
        flags += ["--data-dir", args.data_dir]
    return flags


# ---------------------------------------------------------------------------------------------
# Before the sweep
# ---------------------------------------------------------------------------------------------

def check_results_dir(results_dir):
    """Create `results_dir` if needed and raise SystemExit unless files can be written there."""
    try:
        os.makedirs(os.path.join(results_dir, CLAIMS_FOLDER), exist_ok=True)
        with tempfile.TemporaryFile(dir=results_dir):
            pass
    except OSError as error:
        raise SystemExit(
            f"error: cannot write to the results folder {results_dir!r} ({error.strerror}). "
            "Choose a writable folder with --results-dir or fix its permissions."
        ) from None


def estimate_seconds(runs, train_size):
    """Return a rough estimate of the training seconds of `runs`, from built-in throughputs."""
    total = 0.0
    for run in runs:
        if run.device == "gpu":
            rate = GPU_IMAGES_PER_SECOND
        else:
            known = [f for f in CPU_IMAGES_PER_SECOND if f >= run.filters]
            rate = CPU_IMAGES_PER_SECOND[min(known)] if known else (
                CPU_IMAGES_PER_SECOND[256] * 256 / run.filters)
        images = train_size or 50_000
        # Validation passes add about a tenth of an epoch.
        total += run.epochs * (images + 10_000 / 3) / rate
    return total


def format_duration(seconds):
    """Format seconds as "1 h 05 min", "12 min" or "40 s"."""
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{round(seconds / 60)} min"
    return f"{round(seconds)} s"


def announce(runs, train_size, seeds):
    """Print how many runs the sweep has and about how long they take; warn when it is a lot."""
    estimate = estimate_seconds(runs, train_size)
    print(f"sweep: {len(runs)} runs, estimated training time about {format_duration(estimate)} "
          f"(a rough figure for a 2-core CPU)", flush=True)
    if len(runs) > MANY_RUNS or len(seeds) > 10:
        print(f"warning: {len(seeds)} seeds make {len(runs)} runs, about "
              f"{format_duration(estimate)} of training. Stop with Ctrl-C if that is not what "
              "you meant; finished runs are kept.", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Claims and child processes
# ---------------------------------------------------------------------------------------------

def try_claim(run):
    """Take the run's claim and return its open file descriptor, or None if another has it."""
    fd = os.open(run.claim_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def claim_owner(run):
    """Return the process id written in a run's claim file, or "unknown"."""
    try:
        with open(run.claim_path, encoding="utf-8") as claim:
            return claim.read().strip() or "unknown"
    except OSError:
        return "unknown"


def die_with_parent():
    """Ask Linux to send SIGINT to this child when the sweep process dies (preexec_fn)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGINT)
    except OSError:
        pass  # Not Linux: an orphaned run then trains on and writes its log itself.


def read_final_log(path):
    """Return the log at `path` if it is valid and final, else None."""
    try:
        log = run_log.read_log(path)
    except run_log.LogError:
        return None
    return log if run_log.is_final(log) else None


def train(run, claim_fd, progress, extra_flags):
    """Train one run in a child process; return (exit status, last output lines)."""
    command = [sys.executable, "-u", TRAIN_SCRIPT, *run.flags, *extra_flags,
               "--output", run.log_path, "--checkpoint-dir", run.checkpoint_dir]
    env = {**os.environ, **run.env}
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        pass_fds=(claim_fd,), preexec_fn=die_with_parent, cwd=REPO_DIR,
    )
    last_lines = []
    try:
        for line in child.stdout:
            line = line.rstrip("\n")
            last_lines = (last_lines + [line])[-5:]
            if TENSORFLOW_CHATTER.match(line):
                continue
            if line.startswith("epoch: "):
                progress.epoch_done(run)
                print(f"[{run.name}] {line}  eta: {progress.eta()}", flush=True)
            else:
                print(f"[{run.name}] {line}", flush=True)
        return child.wait(), last_lines
    except KeyboardInterrupt:
        # A Ctrl-C in the terminal reaches the child too; a signal sent to the sweep alone
        # does not, so pass it on and give the child time to write its log.
        child.send_signal(signal.SIGINT)
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
        raise


class Progress:
    """Counts finished epochs across the sweep and estimates the time left."""

    def __init__(self, runs):
        self.epochs_left = sum(run.epochs for run in runs)
        self.start = time.monotonic()
        self.epochs_done = 0

    def epoch_done(self, run):
        self.epochs_done += 1
        self.epochs_left -= 1

    def skip(self, run):
        self.epochs_left -= run.epochs

    def eta(self):
        if not self.epochs_done:
            return "unknown"
        seconds_per_epoch = (time.monotonic() - self.start) / self.epochs_done
        return format_duration(seconds_per_epoch * max(self.epochs_left, 0))


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------

def run_sweep(runs, force=False, keep_checkpoints=False, tensorboard_dir=None):
    """Run every run not yet finished; return a list of (run, status, log or None, note)."""
    progress = Progress(runs)
    results = []
    device_unavailable = {}  # device -> reason, once a child has reported it missing
    for run in runs:
        if not force:
            log = read_final_log(run.log_path)
            if log is not None:
                print(f"[{run.name}] already {log['status']}: {run.log_path}", flush=True)
                progress.skip(run)
                results.append((run, log["status"], log, "kept"))
                continue
        if run.device in device_unavailable:
            results.append(record_skipped(run, device_unavailable[run.device]))
            progress.skip(run)
            continue

        claim_fd = try_claim(run)
        if claim_fd is None:
            note = f"left to process {claim_owner(run)}, which is training it"
            print(f"[{run.name}] {note}", flush=True)
            progress.skip(run)
            results.append((run, "claimed", None, note))
            continue
        try:
            # Another sweep may have finished this run between the first check and the claim.
            log = None if force else read_final_log(run.log_path)
            if log is not None:
                progress.skip(run)
                results.append((run, log["status"], log, "kept"))
                continue
            if force:
                shutil.rmtree(run.checkpoint_dir, ignore_errors=True)
            extra_flags = ["--keep-checkpoints"] if keep_checkpoints else []
            if tensorboard_dir:
                extra_flags += ["--tensorboard-dir", os.path.join(tensorboard_dir, run.name)]
            status, last_lines = train(run, claim_fd, progress, extra_flags)
        finally:
            os.close(claim_fd)

        if status == EXIT_DEVICE_UNAVAILABLE:
            reason = next((line[len("error: "):] for line in reversed(last_lines)
                           if line.startswith("error: ")), "device not available")
            device_unavailable[run.device] = reason
            results.append(record_skipped(run, reason))
            progress.skip(run)
            continue
        log = read_final_log(run.log_path)
        if log is None:
            note = f"failed with exit status {status}; rerun the sweep to retry it"
            print(f"[{run.name}] {note}", file=sys.stderr, flush=True)
            results.append((run, "failed", None, note))
        else:
            results.append((run, log["status"], log, "trained"))
    return results


def record_skipped(run, reason):
    """Write a log with status "skipped" for a run that cannot be trained here."""
    log = run_log.new_log(run.config)
    log["status"] = "skipped"
    log["skip_reason"] = reason
    run_log.write_log(run.log_path, log)
    print(f"[{run.name}] skipped: {reason}", flush=True)
    return (run, "skipped", log, reason)


def print_summary(results, columns):
    """Print a table of the sweep's runs; `columns` maps a header to a function of (run, log)."""
    headers = list(columns) + ["status", "best val", "final val", "test", "seconds", "note"]
    rows = []
    for run, status, log, note in results:
        values = [str(get(run, log)) for get in columns.values()]
        epochs = log["epochs"] if log else []
        accuracies = [e["val_accuracy"] for e in epochs if e["val_accuracy"] is not None]
        values += [
            status,
            f"{max(accuracies):.4f}" if accuracies else "-",
            f"{accuracies[-1]:.4f}" if accuracies else "-",
            f"{log['test_accuracy']:.4f}" if log and log["test_accuracy"] is not None else "-",
            f"{log['total_seconds']:.1f}" if log and log.get("total_seconds") else "-",
            note,
        ]
        rows.append(values)
    widths = [max(len(row[i]) for row in rows + [headers]) for i in range(len(headers))]
    print()
    for row in [headers, ["-" * width for width in widths]] + rows:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip())


def exit_status(results):
    """Return 0 when every run ended or was skipped or left to another process, else 1."""
    return 0 if all(status != "failed" for _, status, _, _ in results) else 1


def install_interrupt_handlers():
    """Make SIGTERM stop the sweep the way Ctrl-C does."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)


def main_wrapper(body):
    """Run a sweep's body and turn Ctrl-C into a short message and exit status 130."""
    install_interrupt_handlers()
    try:
        return body()
    except KeyboardInterrupt:
        print("\ninterrupted: finished run logs are kept; run the same command again to resume",
              file=sys.stderr, flush=True)
        return 130
