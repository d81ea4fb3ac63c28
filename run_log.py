"""The JSON run log: one file per training run, the single source of truth for figures and tables.

Writers build a log with `new_log`, fill it in and save it with `write_log`, which writes strict
JSON (NaN and infinity become null) to a temporary file in the same folder and renames it over
the target, so a reader never sees half a file. Readers use `read_log`, which raises `LogError`
naming the file for anything that is not a whole log of a known schema version.

This module imports only the standard library, so plotting works without TensorFlow.
"""

import json
import math
import itertools
import os

SCHEMA_VERSION = 1

# A run is "running" while it trains, and it ends as one of the other statuses. "completed" and
# "diverged" are final: a sweep never redoes them. "failed" and "skipped" runs are redone.
STATUSES = ("running", "completed", "diverged", "failed", "skipped")
FINAL_STATUSES = ("completed", "diverged")

# Keys every log has, with the JSON types they may take (None means null is allowed).
REQUIRED_KEYS = {
    "schema_version": (int,),
    "status": (str,),
    "config": (dict,),
    "num_params": (int, type(None)),
    "epochs": (list,),
    "test_accuracy": (float, int, type(None)),
    "graph_build_seconds": (float, int, type(None)),
    "train_seconds": (float, int, type(None)),
    "eval_seconds": (float, int, type(None)),
    "environment": (dict,),
}
EPOCH_KEYS = ("epoch", "train_loss", "val_accuracy", "seconds")

# Suffix of the temporary files `write_log` creates. Readers that glob "*.json" never match it.
TEMP_SUFFIX = ".json.tmp"
_temp_counter = itertools.count()


class LogError(ValueError):
    """A run log that is missing, unreadable, not JSON or not of the expected shape."""

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def new_log(config):
    """Return an empty log for a run with the given settings, status "running"."""
    return {
        "schema_version": SCHEMA_VERSION,
        "status": "running",
        "config": dict(config),
        "num_params": None,
        "epochs": [],
        "diverged_at_epoch": None,
        "test_accuracy": None,
        "data_seconds": None,
        "graph_build_seconds": None,
        "train_seconds": None,
        "eval_seconds": None,
        "total_seconds": None,
        "timing": {},
        "device": {},
        "environment": {},
        "error": None,
        "skip_reason": None,
    }


def to_strict_json(value):
    """Return a copy of `value` with every non-finite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): to_strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_strict_json(item) for item in value]
    # NumPy scalars have .item(); converting them keeps this module free of a NumPy import.
    if hasattr(value, "item") and callable(value.item):
        return to_strict_json(value.item())
    return value


def write_json_atomic(path, value):
    """Write `value` as strict, indented JSON to `path` through a temporary file and a rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    text = json.dumps(to_strict_json(value), indent=2, allow_nan=False) + "\n"
    temp_path = os.path.join(
        folder, f".{os.path.basename(path)}.{os.getpid()}.{next(_temp_counter)}{TEMP_SUFFIX}"
    )
    # os.open with mode 0o666 lets the umask decide the permissions, as open() would; mkstemp
    # would make the log readable by its owner only.
    handle = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as temp_file:
            temp_file.write(text)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.replace(temp_path, path)
    except BaseException:
        # Covers KeyboardInterrupt and a full disk alike: the old file at `path` stays as it was.
        try:
            os.unlink(temp_path)
        except FileNotFoundError:
            pass
        raise


def write_log(path, log):
    """Validate `log` and write it atomically to `path`."""
    problem = find_shape_problem(to_strict_json(log))
    if problem:
        raise ValueError(f"refusing to write an invalid run log to {path}: {problem}")
    write_json_atomic(path, log)


def _reject_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


def _parse_finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        # Python reads a literal such as 1e999 as infinity.
        raise ValueError(f"number {text} is out of the float range")
    return value


def read_log(path):
    """Read and validate one run log, raising LogError with the reason if it is unusable."""
    try:
        with open(path, encoding="utf-8") as log_file:
            text = log_file.read()
    except FileNotFoundError:
        raise LogError(path, "file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise LogError(path, f"cannot be read ({error})") from None
    if not text.strip():
        raise LogError(path, "file is empty")
    try:
        # Python's json accepts NaN and Infinity by default. Other tools write them; we reject
        # them here so that a log is either strict JSON or reported.
        log = json.loads(text, parse_constant=_reject_constant, parse_float=_parse_finite_float)
    except json.JSONDecodeError as error:
        raise LogError(path, f"not valid JSON, perhaps truncated ({error})") from None
    except ValueError as error:
        raise LogError(path, f"not strict JSON ({error})") from None
    except RecursionError:
        raise LogError(path, "not a run log: its JSON is nested too deeply to read") from None
    problem = find_shape_problem(log)
    if problem:
        raise LogError(path, problem)
    return log


def find_shape_problem(log):
    """Return a sentence describing why `log` is not a valid run log, or None if it is."""
    if not isinstance(log, dict):
        return f"expected a JSON object, found {type(log).__name__}"
    version = log.get("schema_version")
    if isinstance(version, int) and version > SCHEMA_VERSION:
        return (
            f"schema_version {version} is newer than this code understands "
            f"({SCHEMA_VERSION}); update the code"
        )
    for key, types in REQUIRED_KEYS.items():
        if key not in log:
            return f"missing key {key!r}"
        if isinstance(log[key], bool) or not isinstance(log[key], types):
            return f"key {key!r} has type {type(log[key]).__name__}"
    if version != SCHEMA_VERSION:
        return f"unknown schema_version {version}; expected {SCHEMA_VERSION}"
    if log["status"] not in STATUSES:
        return f"unknown status {log['status']!r}; expected one of {', '.join(STATUSES)}"
    for index, entry in enumerate(log["epochs"]):
        if not isinstance(entry, dict):
            return f"epochs[{index}] is not an object"
        for key in EPOCH_KEYS:
            if key not in entry:
                return f"epochs[{index}] is missing {key!r}"
        if not isinstance(entry["epoch"], int) or isinstance(entry["epoch"], bool):
            return f"epochs[{index}].epoch is not an integer"
        for key in ("train_loss", "val_accuracy", "seconds"):
            value = entry[key]
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                return f"epochs[{index}].{key} is not a number"
    return None


def is_final(log):
    """Return whether a log records a finished run that a sweep must not redo."""
    return log.get("status") in FINAL_STATUSES
