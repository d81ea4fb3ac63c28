"""What both experiment sweeps share: run names, resume, claims and child processes.

A sweep is a list of runs. Each run trains in its own `python cnn_mnist.py ...` process, so a
crash, an out-of-memory kill or the device setting of one run cannot reach the sweep or the next
run. The next invocation skips a run whose log is final (completed or diverged) and records the
run's settings. It redoes any other run, resuming from its last checkpoint. With --force a sweep
redoes every run whose log was written before the sweep started.

Two sweeps on one results folder share the work through claims. A process holds an exclusive
`flock` on `<results>/.claims/<run>.lock` while the run trains. The kernel drops the lock when
the process ends, however it ends, so a dead process never blocks a later sweep. The child
process inherits the lock, so a run whose sweep was killed stays claimed until its child exits.
"""

import argparse
import ctypes
import fcntl
import functools
import glob
import json
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
from mnist_data import TRAIN_SIZE

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
TRAIN_SCRIPT = os.path.join(REPO_DIR, "cnn_mnist.py")
EXIT_DEVICE_UNAVAILABLE = 3  # cnn_mnist.EXIT_DEVICE_UNAVAILABLE; that module imports TensorFlow.
# cnn_mnist.py's exit status for a rejected flag or an unusable data file, which every run of a
# sweep shares. Python itself exits with 2 when it cannot open the script.
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
CLAIMS_FOLDER = ".claims"
CHECKPOINTS_FOLDER = "checkpoints"
MAX_EPOCHS = 1_000_000  # The same limit as cnn_mnist.py's --epochs.

# Rough float32 training throughput of a 2-core CPU, in images per second per filter count, used
# only for the time estimate printed before a sweep starts. The values at 8, 16 and 64 filters
# were measured by benchmarks/benchmark_training.py on a 2-core Xeon. The others are estimates
# scaled by the training FLOPs per image. Other machines differ, so the printed estimate is marked "about".
CPU_IMAGES_PER_SECOND = {8: 50_000, 16: 34_000, 32: 12_000, 64: 4_700, 128: 1_300, 256: 350}
GPU_IMAGES_PER_SECOND = 300_000  # NOTE: a guess for a current NVIDIA GPU, not measured here.
# Seconds each run spends before its first step: importing TensorFlow, loading and checking
# MNIST, building the graph. About 5 s for cnn_mnist.py on a 2-core CPU, an estimate as well.
RUN_STARTUP_SECONDS = 5
MANY_RUNS = 40
MANY_SEEDS = 10
# Seconds a child gets to stop by itself after a Ctrl-C before the sweep passes the signal on,
# and then to write its log and exit before it is killed.
CHILD_STOP_SECONDS = 3
CHILD_INTERRUPTED_SECONDS = 60
# Informational lines TensorFlow's C++ runtime prints at start-up ("I0000 00:00:..."), not echoed.
TENSORFLOW_CHATTER = re.compile(r"^([IW]\d{4} |WARNING: All log messages before absl)")
# A CUDA build of TensorFlow logs this error when it finds no GPU driver, or when
# CUDA_VISIBLE_DEVICES=-1 hides every GPU as in a CPU run. The sweep hides it for CPU runs only.
NO_GPU_ERROR = re.compile(r"^E\d{4} .*failed call to cuInit")
RESUMED_LINE = re.compile(r"^resumed: from epoch (\d+)")


class Run:
    """One training run of a sweep: its name, its cnn_mnist flags and where its files go."""

    def __init__(self, name, flags, results_dir, config, env=None):
        """`config` contains the run's settings as cnn_mnist.py's log stores them."""
        self.name = name
        self.flags = list(flags)
        self.config = dict(config)
        self.device = config["device"]
        self.epochs = config["epochs"]
        self.filters = config["filters"]
        self.env = dict(env or {})
        if self.device == "cpu":
            # A CPU run must not touch a GPU, so every GPU is hidden from its process.
            self.env.setdefault("CUDA_VISIBLE_DEVICES", "-1")
        self.log_path = os.path.join(results_dir, name + ".json")
        self.checkpoint_dir = os.path.join(results_dir, CHECKPOINTS_FOLDER, name)
        self.claim_path = os.path.join(results_dir, CLAIMS_FOLDER, name + ".lock")


def format_number(value):
    """Format a setting for a run name: 0.001 -> "0.001", 1e-05 -> "1e-05", 16 -> "16".

    A float that "g" would round (0.1000001) keeps all its digits, so that two different
    settings never share a run name and a log file.
    """
    if not isinstance(value, float):
        return str(value)
    short = format(value, "g")
    return short if float(short) == value else repr(value)


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
    parser.add_argument("--epochs", type=bounded_int(1, MAX_EPOCHS), default=default_epochs,
                        help="epochs per run")
    parser.add_argument("--seeds", type=bounded_int(0, 2**31 - 1), nargs="+", default=[0],
                        action=unique_values("seed"),
                        help="seeds; each setting is trained once per seed")
    parser.add_argument("--batch-size", type=bounded_int(1, TRAIN_SIZE), default=100,
                        help="images per SGD step")
    parser.add_argument("--train-size", type=bounded_int(1, TRAIN_SIZE), default=None,
                        help="use only the first N of the 50,000 training images (default: all)")
    parser.add_argument("--data-dir", default=None,
                        help="folder with the MNIST files (default: $MNIST_DATA_DIR, else "
                             "data/mnist/ in the repository)")
    parser.add_argument("--results-dir", default=default_results_dir,
                        help="folder for the run logs and checkpoints")
    parser.add_argument("--checkpoint-every", type=bounded_int(1, MAX_EPOCHS), default=10,
                        help="epochs between checkpoints of a run")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep checkpoints of completed runs")
    parser.add_argument("--force", action="store_true",
                        help="redo every run, even those with a final log")
    parser.add_argument("--tensorboard-dir", default=None,
                        help="write per-epoch TensorBoard scalars here, one sub-folder per run "
                             "(default: off)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print each run and whether it would be trained, resumed or kept, "
                             "with the time estimate, and train nothing")


def check_arguments(parser, args):
    """Reject flag combinations that would make every run of the sweep fail."""
    train_size = args.train_size or TRAIN_SIZE
    if args.batch_size > train_size:
        parser.error(f"argument --batch-size: {args.batch_size} is larger than the training set "
                     f"({train_size} images); lower --batch-size or raise --train-size")


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


def check_log(run):
    """Return (the run's final log, None), or (None, the reason the run must be trained)."""
    try:
        log = run_log.read_log(run.log_path)
    except run_log.LogError as error:
        if not os.path.lexists(run.log_path):
            return None, "no log yet"
        return None, f"its log is unusable: {error.reason}"
    if not run_log.is_final(log):
        return None, f"its log has status {log['status']}"
    # The run name leaves out settings such as --epochs and --train-size, so a log from an
    # earlier sweep with other values has the same name.
    changed = [f"{key} {log['config'].get(key)!r} where this sweep has {value!r}"
               for key, value in run.config.items() if log["config"].get(key) != value]
    if changed:
        return None, "its log has other settings: " + ", ".join(changed)
    return log, None


def checkpoint_epoch(run):
    """Return the epoch of the run's last checkpoint, or None when there is none."""
    try:
        with open(os.path.join(run.checkpoint_dir, "state.json"), encoding="utf-8") as state:
            epoch = json.load(state).get("epoch")
    except (OSError, ValueError, AttributeError):
        return None
    return epoch if isinstance(epoch, int) else None


def runs_to_train(runs, force):
    """Return the runs that a sweep would train, in order."""
    return runs if force else [run for run in runs if check_log(run)[0] is None]


def estimate_seconds(runs, train_size):
    """Return a rough estimate of the seconds `runs` take, from built-in throughputs."""
    total = 0.0
    for run in runs:
        if run.device == "gpu":
            rate = GPU_IMAGES_PER_SECOND
        else:
            known = [f for f in CPU_IMAGES_PER_SECOND if f >= run.filters]
            rate = CPU_IMAGES_PER_SECOND[min(known)] if known else (
                CPU_IMAGES_PER_SECOND[256] * 256 / run.filters)
        images = train_size or TRAIN_SIZE
        # Validation passes add about a tenth of an epoch.
        total += RUN_STARTUP_SECONDS + run.epochs * (images + 10_000 / 3) / rate
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


def announce(runs, pending, train_size, seeds):
    """Print how many runs the sweep trains and about how long; warn when it is a lot."""
    estimate = format_duration(estimate_seconds(pending, train_size))
    print(f"sweep: {len(runs)} runs, {len(pending)} to train, estimated time about {estimate} "
          f"(a rough figure for a 2-core CPU)", flush=True)
    if pending and (len(pending) > MANY_RUNS or len(seeds) > MANY_SEEDS):
        print(f"warning: {len(seeds)} seeds make {len(runs)} runs, {len(pending)} of them to "
              f"train, about {estimate}. Stop with Ctrl-C if that is not what you meant; "
              "finished runs are kept.", file=sys.stderr, flush=True)


def print_plan(runs, force):
    """Print what a sweep would do with each run, without training or writing anything."""
    for run in runs:
        log, reason = check_log(run)
        if log is not None and not force:
            print(f"[{run.name}] keep: already {log['status']}", flush=True)
            continue
        if force:
            reason = "--force"
        epoch = None if force else checkpoint_epoch(run)
        action = f"resume from epoch {epoch}" if epoch else "train"
        print(f"[{run.name}] {action}: {reason}", flush=True)


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
    # The owner writes its id just after it takes the lock, so the file may still be empty.
    for _ in range(20):
        try:
            with open(run.claim_path, encoding="utf-8") as claim:
                owner = claim.read().strip()
        except OSError:
            return "unknown"
        if owner:
            return owner
        time.sleep(0.01)
    return "unknown"


def remove_temp_files(run):
    """Delete temporary copies of the run's log that a killed writer left before its rename.

    Call it only while holding the run's claim, because then no living process writes that log.
    """
    folder, name = os.path.split(run.log_path)
    pattern = os.path.join(glob.escape(folder), f".{glob.escape(name)}.*{run_log.TEMP_SUFFIX}")
    for path in glob.glob(pattern):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def die_with_parent(sweep_pid):
    """Ask Linux to send SIGINT to this child when the sweep process dies (preexec_fn)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGINT)
    except OSError:
        return  # Not Linux: an orphaned run then trains on and writes its log itself.
    if os.getppid() != sweep_pid:
        # The sweep died before prctl took effect, so no signal would ever come.
        os._exit(EXIT_INTERRUPTED)


def stop_child(child):
    """Stop a child after the sweep was interrupted, giving it time to write its log."""
    # A Ctrl-C in the terminal reaches the child too, and a second SIGINT could cut short the
    # log it writes on the way out. A signal sent to the sweep alone does not reach it, so
    # after a moment the sweep passes SIGINT on.
    try:
        child.wait(timeout=CHILD_STOP_SECONDS)
        return
    except subprocess.TimeoutExpired:
        pass
    child.send_signal(signal.SIGINT)
    try:
        child.wait(timeout=CHILD_INTERRUPTED_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def train(run, claim_fd, progress, extra_flags):
    """Train one run in a child process; return (exit status, last output lines)."""
    command = [sys.executable, "-u", TRAIN_SCRIPT, *run.flags, *extra_flags,
               "--output", run.log_path, "--checkpoint-dir", run.checkpoint_dir]
    env = {**os.environ, **run.env}
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        env=env, pass_fds=(claim_fd,), preexec_fn=functools.partial(die_with_parent, os.getpid()),
        cwd=REPO_DIR,
    )
    last_lines = []
    try:
        for line in child.stdout:
            line = line.rstrip("\n")
            last_lines = (last_lines + [line])[-5:]
            if TENSORFLOW_CHATTER.match(line) or (run.device == "cpu" and NO_GPU_ERROR.match(line)):
                continue
            resumed = RESUMED_LINE.match(line)
            if resumed:
                progress.resume(int(resumed.group(1)))
            if line.startswith("epoch: "):
                progress.epoch_done()
                print(f"[{run.name}] {line}  eta: {progress.eta()}", flush=True)
            else:
                print(f"[{run.name}] {line}", flush=True)
        return child.wait(), last_lines
    except KeyboardInterrupt:
        stop_child(child)
        raise


def describe_exit(status, last_lines):
    """Return why a child ended without a final log, with its last error line if it printed one."""
    if status is None:
        text = "could not be started"
    elif status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        text = f"was killed by {name}"
        if -status == signal.SIGKILL:
            text += " (perhaps by the out-of-memory killer)"
    elif status == EXIT_INTERRUPTED:
        text = "was interrupted"
    else:
        text = f"failed with exit status {status}"
    error = next((line for line in reversed(last_lines) if line.startswith("error: ")), None)
    if error:
        text += f" ({error})"
    return text


class Progress:
    """Counts finished epochs across the sweep and estimates the time left."""

    def __init__(self, runs):
        self.epochs_left = sum(run.epochs for run in runs)
        self.start = time.monotonic()
        self.epochs_done = 0

    def epoch_done(self):
        self.epochs_done += 1
        self.epochs_left -= 1

    def resume(self, epochs):
        """Count the epochs that a resumed run takes from its checkpoint."""
        self.epochs_left -= epochs

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

def find_finished_log(run, force, sweep_start):
    """Return the run's final log if the sweep keeps it, else None.

    With `force`, only a log written after `sweep_start` (a time.time() value) is kept, because
    another sweep started with --force at the same time has just redone that run.
    """
    log, _ = check_log(run)
    if log is None or not force:
        return log
    try:
        return log if os.stat(run.log_path).st_mtime >= sweep_start else None
    except OSError:
        return None


def run_sweep(runs, force=False, keep_checkpoints=False, tensorboard_dir=None):
    """Run every run not yet finished; return a list of (run, status, log or None, note)."""
    sweep_start = time.time()
    progress = Progress(runs)
    results = []
    device_unavailable = {}  # device -> reason, once a child has reported it missing
    for index, run in enumerate(runs):
        log = find_finished_log(run, force, sweep_start)
        if log is not None:
            print(f"[{run.name}] already {log['status']}: {run.log_path}", flush=True)
            progress.skip(run)
            results.append((run, log["status"], log, "kept"))
            continue
        reason = "--force" if force else check_log(run)[1]
        if reason not in ("no log yet", "--force"):
            print(f"[{run.name}] to train: {reason}", flush=True)

        claim_fd = try_claim(run)
        if claim_fd is None:
            note = f"left to process {claim_owner(run)}, which is training it"
            print(f"[{run.name}] {note}", flush=True)
            progress.skip(run)
            results.append((run, "claimed", None, note))
            continue
        try:
            # Another sweep may have finished this run between the first check and the claim.
            log = find_finished_log(run, force, sweep_start)
            if log is not None:
                progress.skip(run)
                results.append((run, log["status"], log, "kept"))
                continue
            remove_temp_files(run)
            if run.device in device_unavailable:
                results.append(record_skipped(run, device_unavailable[run.device]))
                progress.skip(run)
                continue
            if force:
                shutil.rmtree(run.checkpoint_dir, ignore_errors=True)
            extra_flags = ["--keep-checkpoints"] if keep_checkpoints else []
            if tensorboard_dir:
                extra_flags += ["--tensorboard-dir", os.path.join(tensorboard_dir, run.name)]
            try:
                status, last_lines = train(run, claim_fd, progress, extra_flags)
            except OSError as error:
                status, last_lines = None, [f"error: {TRAIN_SCRIPT}: {error}"]
            if status == EXIT_DEVICE_UNAVAILABLE:
                reason = next((line[len("error: "):] for line in reversed(last_lines)
                               if line.startswith("error: ")), "device not available")
                device_unavailable[run.device] = reason
                results.append(record_skipped(run, reason))
                progress.skip(run)
                continue
        finally:
            os.close(claim_fd)

        log, _ = check_log(run)
        if log is not None:
            results.append((run, log["status"], log, "trained"))
            continue
        note = describe_exit(status, last_lines)
        print(f"[{run.name}] {note}. Rerun the sweep to retry it.", file=sys.stderr, flush=True)
        results.append((run, "failed", None, note))
        if status == EXIT_BAD_INPUT:
            print("error: stopping the sweep, because cnn_mnist.py rejected a flag or a data "
                  "file that every run shares. Fix the error above and run the same command "
                  "again.", file=sys.stderr, flush=True)
            results += [(other, "not started", None, "") for other in runs[index + 1:]]
            break
    return results


def record_skipped(run, reason):
    """Write a log with status "skipped" for a run that cannot be trained here."""
    log = run_log.new_log(run.config)
    log["status"] = "skipped"
    log["skip_reason"] = reason
    run_log.write_log(run.log_path, log)
    print(f"[{run.name}] skipped: {reason}", flush=True)
    return (run, "skipped", log, reason)


def shorten_note(note, width=60):
    """Return the first sentence of `note`, cut to `width` characters; the run's output above
    and its log keep the whole message."""
    first = note.split(". ")[0]
    return first if len(first) <= width else first[:width - 3] + "..."


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
            shorten_note(note),
        ]
        rows.append(values)
    widths = [max(len(row[i]) for row in rows + [headers]) for i in range(len(headers))]
    print()
    for row in [headers, ["-" * width for width in widths]] + rows:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip())

    skipped = [run.name for run, status, _, _ in results if status == "skipped"]
    if skipped:
        print(f"\nskipped (device not available): {', '.join(skipped)}")
    claimed = [run.name for run, status, _, _ in results if status == "claimed"]
    if claimed:
        print(f"\nleft to another sweep on the same folder: {', '.join(claimed)}")
    sys.stdout.flush()


def exit_status(results):
    """Return 0 when every run ended or was skipped or left to another process, else 1."""
    return 0 if all(status not in ("failed", "not started") for _, status, _, _ in results) else 1


def install_interrupt_handlers():
    """Make SIGTERM stop the sweep the way Ctrl-C does."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)


def run_command(args, runs, columns):
    """Carry out a planned sweep for a command line and return the exit status.

    `args` contains the flags of add_common_arguments, and `columns` the sweep's own columns of
    the summary table (see print_summary).
    """
    pending = runs_to_train(runs, args.force)
    if args.dry_run:
        announce(runs, pending, args.train_size, args.seeds)
        print_plan(runs, args.force)
        return 0

    check_results_dir(args.results_dir)
    announce(runs, pending, args.train_size, args.seeds)
    install_interrupt_handlers()
    try:
        results = run_sweep(runs, args.force, args.keep_checkpoints, args.tensorboard_dir)
    except KeyboardInterrupt:
        print("\ninterrupted: finished run logs are kept; run the same command again to resume",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    print_summary(results, columns)
    return exit_status(results)
