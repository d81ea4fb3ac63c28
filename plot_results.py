"""Draw the figures and tables of the 2017 lab report from the JSON run logs.

Reproduces Figures 1-3 and Tables 1-2 of "Deep Learning Lab Course 2017 - Exercise 2" from the
run logs (format in run_log.py). It imports only the standard library, NumPy, Matplotlib,
run_log and cli, so it works on a machine without TensorFlow.

    python plot_results.py
    python plot_results.py --results-dir results/ --output-dir results/figures/ --log-log
    python plot_results.py --full-epochs 1000 --zoom-epochs 350 --zoom-accuracy 0.8 1.0

Files written to --output-dir, each only when there are logs for it:
    figure1_lr_validation_accuracy.png, .pdf       validation accuracy per epoch and learning rate
    figure2_lr_validation_accuracy_zoom.png, .pdf  the same, zoomed in
    table1_lr_test_accuracy.md, .csv               test accuracy per learning rate beside the report
    figure3_runtime.png, .pdf                      training time against trainable parameters
    table2_runtime.md, .csv                        parameter counts and timings per filter count
"""

import argparse
import csv
import json
import os
import sys
import warnings
from collections import defaultdict

import numpy as np
import matplotlib

# Figures are only written to files. An interactive MPLBACKEND such as TkAgg can fail on a machine
# without a display, so Agg is forced before pyplot is imported.
matplotlib.use("Agg", force=True)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from cli import bounded_int  # noqa: E402
from run_log import LogError, read_log  # noqa: E402

# Test accuracy after 2000 epochs with 16 filters, from Table 1 of the report.
REPORT_EPOCHS = 2000
REPORT_TEST_ACCURACY = {0.1: 0.9912, 0.01: 0.9862, 0.001: 0.9848, 0.0001: 0.9811}
# Trainable parameters per number of filters in each convolutional layer, from Table 2 of the report.
REPORT_NUM_PARAMS = {8: 52258, 16: 104250, 32: 211690, 64: 440394, 128: 953098, 256: 2199690}

MAX_EPOCHS = 1_000_000  # The same limit as cnn_mnist.py's --epochs.
IGNORED_FOLDERS = ("figures", "checkpoints")
INCOMPLETE_STATUSES = ("running", "failed")
MISSING = "n/a"

TABLE1_COLUMNS = (
    "learning rate", "filters", "epochs", "seeds", "diverged", "test accuracy mean",
    "test accuracy std", f"report test accuracy ({REPORT_EPOCHS} epochs)", "difference (ours - report)",
)
TABLE2_COLUMNS = (
    "filters", "device", "trainable parameters", "report trainable parameters", "parameters match",
    "seeds", "epochs", "steady seconds per epoch", "images per second", "total seconds",
    "train seconds", "test accuracy",
)


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", default="results/",
                        help="folder searched recursively for run logs (*.json) (default: %(default)s)")
    parser.add_argument("--output-dir", default=None,
                        help="folder for the figures and tables "
                             "(default: figures/ inside --results-dir, so results/figures/)")
    parser.add_argument("--zoom-epochs", type=bounded_int(1, MAX_EPOCHS), default=350,
                        help="last epoch shown in Figure 2, in epochs (default: %(default)s)")
    parser.add_argument("--zoom-accuracy", type=float, nargs=2, default=[0.8, 1.0],
                        metavar=("MIN", "MAX"),
                        help="validation accuracy range of Figure 2, as fractions (default: 0.8 1.0)")
    parser.add_argument("--full-epochs", type=bounded_int(1, MAX_EPOCHS), default=None,
                        help="last epoch shown in Figure 1, in epochs (default: all epochs)")
    parser.add_argument("--log-log", action="store_true",
                        help="draw Figure 3 with logarithmic axes (default: linear axes)")
    args = parser.parse_args(argv)

    if not os.path.isdir(args.results_dir):
        parser.error(f"--results-dir {args.results_dir!r} does not exist or is not a folder. "
                     "Run the experiments first, or pass the folder that contains their logs.")
    if args.output_dir is None:
        args.output_dir = os.path.join(args.results_dir, "figures")
    if not all(0 <= value <= 1 for value in args.zoom_accuracy):
        parser.error(f"--zoom-accuracy takes two fractions from 0 to 1, got {args.zoom_accuracy}")
    if args.zoom_accuracy[0] >= args.zoom_accuracy[1]:
        parser.error(f"--zoom-accuracy MIN must be below MAX, got {args.zoom_accuracy}")
    return args


def warn(path, reason):
    print(f"warning: skipped {path}: {reason}", file=sys.stderr)


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def find_log_paths(results_dir, output_dir):
    """Return the sorted `*.json` paths under `results_dir`, outside output and checkpoint folders."""
    output_folder = os.path.realpath(output_dir)
    paths = []
    for folder, subfolders, files in os.walk(results_dir):
        subfolders[:] = sorted(
            name for name in subfolders
            if name not in IGNORED_FOLDERS
            and os.path.realpath(os.path.join(folder, name)) != output_folder
        )
        # Matching the whole ".json" ending leaves out the writers' temporary "*.json.tmp" files.
        paths.extend(os.path.join(folder, name) for name in sorted(files) if name.endswith(".json"))
    return paths


def find_field_problem(log):
    """Return why a finished run's log lacks a value the figures need, or None if it has them all."""
    config = log["config"]
    needed = {"filters": is_int, "epochs": is_int}
    if config.get("experiment") == "learning_rate":
        needed["learning_rate"] = is_number
    else:
        needed["device"] = lambda value: isinstance(value, str)
    for key, check in needed.items():
        if not check(config.get(key)):
            return f"config.{key} is missing or invalid ({config.get(key)!r})"
    for entry in log["epochs"]:
        if entry["epoch"] < 1:
            return f"epoch number {entry['epoch']} is below 1"
    if config["experiment"] == "runtime":
        if not is_int(log["num_params"]):
            return "num_params is null"
        if not isinstance(log.get("timing"), dict):
            return "timing is missing or not an object"
    return None


def read_usable_logs(paths):
    """Read every log and sort it into runs to plot, runs recorded as skipped, and ignored logs.

    Each unusable log gets one warning line on stderr. Returns the runs per experiment, the
    skipped runs, and a count per reason for ignoring a log.
    """
    runs = {"learning_rate": [], "runtime": []}
    skipped_runs = {"learning_rate": [], "runtime": []}
    ignored = defaultdict(int)
    first_path_by_config = {}
    for path in paths:
        try:
            log = read_log(path)
        except LogError as error:
            warn(error.path, error.reason)
            ignored["unreadable or invalid"] += 1
            continue

        experiment = log["config"].get("experiment")
        status = log["status"]
        if status in INCOMPLETE_STATUSES:
            warn(path, f"incomplete run (status {status})")
            ignored["incomplete (running or failed)"] += 1
        elif experiment not in runs:
            ignored["not from the learning-rate or runtime experiment"] += 1
        elif status == "skipped":
            skipped_runs[experiment].append(log)
        elif experiment == "runtime" and status != "completed":
            warn(path, f"runtime run has status {status}, so its timings are not comparable")
            ignored["runtime run not completed"] += 1
        elif problem := find_field_problem(log):
            warn(path, problem)
            ignored["unreadable or invalid"] += 1
        else:
            # Two logs with the same settings, seed included, are the same run written twice.
            config_key = json.dumps(log["config"], sort_keys=True)
            if config_key in first_path_by_config:
                warn(path, f"same settings and seed as {first_path_by_config[config_key]}")
                ignored["duplicate"] += 1
                continue
            first_path_by_config[config_key] = path
            runs[experiment].append(log)
    return runs, skipped_runs, ignored


def group_runs(logs, key_function):
    groups = defaultdict(list)
    for log in logs:
        groups[key_function(log)].append(log)
    return groups


def validation_curve(log):
    """Return validation accuracy per epoch (index 0 is epoch 1), NaN where null or after divergence."""
    last_epoch = max((entry["epoch"] for entry in log["epochs"]), default=0)
    if is_int(log.get("diverged_at_epoch")):
        last_epoch = min(last_epoch, log["diverged_at_epoch"])
    curve = np.full(last_epoch, np.nan)
    for entry in log["epochs"]:
        if entry["epoch"] <= last_epoch and entry["val_accuracy"] is not None:
            curve[entry["epoch"] - 1] = entry["val_accuracy"]
    return curve


def combine_curves(curves):
    """Return the mean, min and max over seeds per epoch, each over the seeds that have a value."""
    stacked = np.full((len(curves), max(len(curve) for curve in curves)), np.nan)
    for row, curve in zip(stacked, curves):
        row[: len(curve)] = curve
    # NOTE: after one seed diverges, the mean covers only the seeds still training.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "Mean of empty slice" where all are NaN
        return np.nanmean(stacked, axis=0), np.nanmin(stacked, axis=0), np.nanmax(stacked, axis=0)


def mean_or_none(values):
    numbers = [value for value in values if is_number(value)]
    return float(np.mean(numbers)) if numbers else None


def join_unique(values):
    unique = sorted(set(values))
    return unique[0] if len(unique) == 1 else ", ".join(str(value) for value in unique)


def save_figure(figure, output_dir, stem):
    figure.tight_layout()
    paths = [os.path.join(output_dir, stem + extension) for extension in (".png", ".pdf")]
    for path in paths:
        figure.savefig(path, dpi=150)
    plt.close(figure)
    return paths


def write_table(output_dir, stem, columns, rows, intro, notes):
    """Write `rows` (dicts keyed by the names in `columns`) as Markdown and as CSV."""
    markdown_path = os.path.join(output_dir, stem + ".md")
    csv_path = os.path.join(output_dir, stem + ".csv")
    lines = intro + ["", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(column, row[column]) for column in columns) + " |")
    if notes:
        lines += [""] + notes
    with open(markdown_path, "w", encoding="utf-8") as markdown_file:
        markdown_file.write("\n".join(lines) + "\n")

    with open(csv_path, "w", encoding="utf-8", newline="") as csv_file:
        writer = csv.DictWriter(csv_file, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({column: "" if row[column] is None else row[column] for column in columns})
    return [markdown_path, csv_path]


def format_cell(column, value):
    if value is None:
        return MISSING
    if column.startswith("difference"):
        return f"{value:+.4f}"
    if "accuracy" in column:
        return f"{value:.4f}"
    if column == "learning rate":
        return f"{value:g}"
    if isinstance(value, float):
        return f"{value:.0f}" if "images" in column else f"{value:.2f}"
    return str(value)


def label_lr_group(key, logs, show_settings):
    filters, epochs, learning_rate = key
    label = f"learning rate {learning_rate:g}"
    if show_settings:
        label += f", {filters} filters, {epochs} epochs"
    diverged = sum(log["status"] == "diverged" for log in logs)
    if diverged == len(logs):
        label += " (diverged)"
    elif diverged:
        label += f" ({diverged} of {len(logs)} seeds diverged)"
    return label


def plot_lr_curves(axes, groups, last_epoch):
    """Draw one mean curve per learning rate with a min-max band over seeds, up to `last_epoch`."""
    show_settings = len({(key[0], key[1]) for key in groups}) > 1
    marked_divergence = False
    for index, (key, logs) in enumerate(groups.items()):
        color = f"C{index % 10}"
        curves = [validation_curve(log) for log in logs]
        mean, low, high = combine_curves([curve[:last_epoch] for curve in curves])
        epochs = np.arange(1, len(mean) + 1)
        marker = "." if len(mean) < 50 else None
        axes.plot(epochs, mean, color=color, marker=marker, linewidth=1.2,
                  label=label_lr_group(key, logs, show_settings))
        if len(logs) > 1:
            axes.fill_between(epochs, low, high, color=color, alpha=0.2, linewidth=0)
        # An x marks the last validation accuracy of each diverged run, if it is in view.
        for log, curve in zip(logs, curves):
            finite = np.flatnonzero(np.isfinite(curve))
            if log["status"] == "diverged" and finite.size and finite[-1] < (last_epoch or len(curve)):
                axes.plot(finite[-1] + 1, curve[finite[-1]], "x", color=color, markersize=8)
                marked_divergence = True
    if marked_divergence:
        axes.plot([], [], "x", color="gray", label="last validation accuracy before divergence")


def first_sentence(text):
    """Return the first sentence of a skip reason; the run log keeps the whole of it."""
    return text.split(". ")[0].rstrip(".")


def write_lr_figures(groups, args):
    """Write Figure 1 (all epochs, or --full-epochs) and Figure 2 (the zoomed view)."""
    settings = sorted({(key[0], key[1]) for key in groups})
    title = "Validation accuracy per learning rate"
    if len(settings) == 1:
        title += f", {settings[0][0]} filters, {settings[0][1]} epochs"
    if max(len(logs) for logs in groups.values()) > 1:
        title += "\nline: mean over seeds, band: min to max"

    written = []
    # Runs shorter than the zoom window are drawn over their own length, not over empty space.
    longest = max(len(log["epochs"]) for logs in groups.values() for log in logs)
    views = (
        ("figure1_lr_validation_accuracy", args.full_epochs, None),
        ("figure2_lr_validation_accuracy_zoom", min(args.zoom_epochs, max(longest, 1)),
         args.zoom_accuracy),
    )
    for stem, last_epoch, accuracy_range in views:
        figure, axes = plt.subplots(figsize=(7, 4.5))
        plot_lr_curves(axes, groups, last_epoch)
        axes.set_xlim(0, last_epoch)
        if accuracy_range:
            axes.set_ylim(*accuracy_range)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("epoch")
        axes.set_ylabel("validation accuracy")
        axes.set_title(title, fontsize=10)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, loc="lower right")
        written += save_figure(figure, args.output_dir, stem)
    return written


def summarize_lr_groups(groups):
    rows = []
    for (filters, epochs, learning_rate), logs in groups.items():
        accuracies = [log["test_accuracy"] for log in logs if log["test_accuracy"] is not None]
        mean = float(np.mean(accuracies)) if accuracies else None
        report = REPORT_TEST_ACCURACY.get(learning_rate)
        rows.append({
            "learning rate": learning_rate,
            "filters": filters,
            "epochs": epochs,
            "seeds": len(logs),
            "diverged": sum(log["status"] == "diverged" for log in logs),
            "test accuracy mean": mean,
            "test accuracy std": float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else None,
            TABLE1_COLUMNS[7]: report,
            "difference (ours - report)": mean - report if mean is not None and report else None,
        })
    return rows


def describe_epochs(epoch_counts):
    ours = " or ".join(str(count) for count in sorted(set(epoch_counts)))
    if set(epoch_counts) == {REPORT_EPOCHS}:
        return f"Our runs trained for {ours} epochs, the same as the report."
    return (f"Our runs trained for {ours} epochs, but the report trained for {REPORT_EPOCHS} epochs, "
            "so the report column and the difference compare different training lengths.")


def write_lr_outputs(logs, skipped_runs, args):
    groups = group_runs(logs, lambda log: (log["config"]["filters"], log["config"]["epochs"],
                                           log["config"]["learning_rate"]))
    # Largest learning rate first, as in the report.
    groups = dict(sorted(groups.items(), key=lambda item: (item[0][0], item[0][1], -item[0][2])))
    written = write_lr_figures(groups, args)

    rows = summarize_lr_groups(groups)
    intro = [
        "# Table 1: test accuracy per learning rate",
        "",
        describe_epochs([row["epochs"] for row in rows]),
        "Test accuracy is the mean and sample standard deviation (ddof=1) over seeds. "
        f"The standard deviation is {MISSING} with one seed.",
        f"Report values are after {REPORT_EPOCHS} epochs with 16 filters.",
    ]
    notes = ["Diverged runs count in \"seeds\" but have no test accuracy, "
             "so the mean and standard deviation cover only the other seeds."]
    for log in skipped_runs:
        config = log["config"]
        notes.append(f"learning rate {config.get('learning_rate')}, seed {config.get('seed')}: "
                     f"skipped ({first_sentence(log.get('skip_reason') or 'no reason given')})")
    return written + write_table(args.output_dir, "table1_lr_test_accuracy", TABLE1_COLUMNS, rows,
                                 intro, notes)


def name_device(config):
    """Return the device name used in tables, with the precision when it is not fp32."""
    precision = config.get("precision", "fp32")
    return config["device"] if precision == "fp32" else f"{config['device']} {precision}"


def summarize_runtime_groups(groups):
    rows = []
    for (device, epochs, filters), logs in groups.items():
        num_params = join_unique(log["num_params"] for log in logs)
        report = REPORT_NUM_PARAMS.get(filters)
        match = None
        if report is not None:
            match = "yes" if num_params == report else "no"
        rows.append({
            "filters": filters,
            "device": device,
            "trainable parameters": num_params,
            "report trainable parameters": report,
            "parameters match": match,
            "seeds": len(logs),
            "epochs": epochs,
            "steady seconds per epoch": mean_or_none(log["timing"].get("steady_epoch_seconds_median")
                                                     for log in logs),
            "images per second": mean_or_none(log["timing"].get("images_per_second") for log in logs),
            "total seconds": mean_or_none(log.get("total_seconds") for log in logs),
            "train seconds": mean_or_none(log["train_seconds"] for log in logs),
            "test accuracy": mean_or_none(log["test_accuracy"] for log in logs),
            "mean parameters": float(np.mean([log["num_params"] for log in logs])),
        })
    return rows


def write_runtime_figure(rows, args):
    """Draw training seconds (a) and steady-state seconds per epoch (b) against parameters."""
    figure, panels = plt.subplots(1, 2, figsize=(11, 4.5))
    several_lengths = len({row["epochs"] for row in rows}) > 1
    series = group_runs(rows, lambda row: (row["device"], row["epochs"]))
    # GPU before CPU, as in the report.
    for index, ((device, epochs), series_rows) in enumerate(sorted(series.items(), reverse=True)):
        label = device.upper() + (f", {epochs} epochs" if several_lengths else "")
        for axes, column in zip(panels, ("train seconds", "steady seconds per epoch")):
            ordered_rows = sorted(series_rows, key=lambda row: row["filters"])
            points = [(row["mean parameters"] / 1e6, row[column], row["filters"])
                      for row in ordered_rows if row[column] is not None]
            if not points:
                continue
            x, y, filters = zip(*points)
            axes.plot(x, y, marker="o", color=f"C{index % 10}", label=label)
            for point_x, point_y, filter_count in points:
                axes.annotate(str(filter_count), (point_x, point_y), textcoords="offset points",
                              xytext=(4, 4), fontsize=8)

    titles = ("(a) training time", "(b) steady-state time per epoch")
    y_labels = ("training seconds (sum of step times)", "seconds per epoch (median of epochs 2+)")
    for axes, title, y_label in zip(panels, titles, y_labels):
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("trainable parameters (millions)")
        axes.set_ylabel(y_label)
        axes.grid(alpha=0.3, which="both")
        axes.margins(0.1)
        if args.log_log:
            axes.set_xscale("log")
            axes.set_yscale("log")
        else:
            axes.set_xlim(left=0)
            axes.set_ylim(bottom=0)
        if axes.has_data():
            axes.legend(fontsize=8)
    epochs_text = "" if several_lengths else f", {rows[0]['epochs']} epochs"
    figure.suptitle(f"Runtime against trainable parameters{epochs_text}\n"
                    "point labels: filters per convolutional layer", fontsize=10)
    return save_figure(figure, args.output_dir, "figure3_runtime")


def write_runtime_outputs(logs, skipped_runs, args):
    groups = group_runs(logs, lambda log: (name_device(log["config"]), log["config"]["epochs"],
                                           log["config"]["filters"]))
    rows = summarize_runtime_groups(dict(sorted(groups.items(), key=lambda item: item[0][::-1])))
    written = write_runtime_figure(rows, args)

    intro = [
        "# Table 2: trainable parameters and runtime per number of filters",
        "",
        "Each timing is the mean over seeds. Steady seconds per epoch is the median of epochs 2 and "
        f"later, so it is {MISSING} for one-epoch runs. Images per second comes from the same epochs, "
        "or from epoch 1 in a one-epoch run.",
        "Total seconds is the whole run's wall time, including graph build and validation. Train "
        "seconds is the sum of the training steps only.",
        "Report parameter counts are from Table 2 of the report, which trained for 250 epochs.",
    ]
    notes = []
    for log in skipped_runs:
        config = log["config"]
        notes.append(f"{config.get('device')}, {config.get('filters')} filters: "
                     f"skipped ({first_sentence(log.get('skip_reason') or 'no reason given')})")
    return written + write_table(args.output_dir, "table2_runtime", TABLE2_COLUMNS, rows, intro, notes)


def summarize_ignored(ignored, skipped_count):
    parts = [f"{count} {reason}" for reason, count in sorted(ignored.items())]
    if skipped_count:
        parts.append(f"{skipped_count} recorded as skipped")
    return "skipped logs: " + (", ".join(parts) if parts else "none")


def main(argv=None):
    args = parse_arguments(argv)
    paths = find_log_paths(args.results_dir, args.output_dir)
    runs, skipped_runs, ignored = read_usable_logs(paths)
    summary = summarize_ignored(ignored, sum(len(logs) for logs in skipped_runs.values()))
    if not runs["learning_rate"] and not runs["runtime"]:
        print(f"no usable run logs under {args.results_dir} ({len(paths)} *.json files found)")
        print(summary)
        return 0

    try:
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as error:
        print(f"error: cannot create the output folder {args.output_dir!r} ({error.strerror}). "
              "Choose another --output-dir.", file=sys.stderr)
        return 1
    written = []
    if runs["learning_rate"]:
        written += write_lr_outputs(runs["learning_rate"], skipped_runs["learning_rate"], args)
    if runs["runtime"]:
        written += write_runtime_outputs(runs["runtime"], skipped_runs["runtime"], args)
    for path in written:
        print(f"wrote {path}")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
