"""Reproduce the lab report's runtime experiment: training time against filter count, GPU and CPU.

The report trained the network with 8 to 256 filters for 250 epochs at learning rate 0.01 and
batch size 100, on a GPU and (up to 64 filters) on a CPU, and plotted the training time against
the number of trainable parameters (Figure 3, Table 2). Here every run trains in its own process
on the device it names: a CPU run hides every GPU from TensorFlow, and a GPU run fails rather
than fall back to the CPU. Without a GPU, the GPU runs are recorded as skipped. The logs time
the training steps of each epoch alone, apart from graph building and validation.

    python run_runtime_experiment.py --epochs 2                 # CPU runs only on a CPU machine
    python run_runtime_experiment.py --devices gpu --epochs 250 # the report's GPU series
    python plot_results.py                                      # Figure 3, Table 2

Writes: results/runtime/<device>_f<filters>_seed<seed>.json.
"""

import argparse
import sys

import sweep
from cli import accuracy_fraction, bounded_int, positive_float

REPORT_FILTERS = [8, 16, 32, 64, 128, 256]
REPORT_CPU_FILTERS = [8, 16, 32, 64]


def build_parser():
    """Return the parser; the flags shared with cnn_mnist.py keep its names."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    filter_count = bounded_int(1, 4096)
    parser.add_argument("--filters", type=filter_count, nargs="+", default=REPORT_FILTERS,
                        action=sweep.unique_values("filter count"),
                        help="filter counts of the GPU runs")
    parser.add_argument("--cpu-filters", type=filter_count, nargs="+", default=REPORT_CPU_FILTERS,
                        action=sweep.unique_values("filter count"),
                        help="filter counts of the CPU runs (the report left out 128 and 256)")
    parser.add_argument("--devices", choices=("gpu", "cpu"), nargs="+", default=["gpu", "cpu"],
                        action=sweep.unique_values("device"), help="devices to time")
    parser.add_argument("--learning-rate", type=positive_float, default=0.01,
                        help="SGD step size")
    parser.add_argument("--target-accuracy", type=accuracy_fraction, default=0.99,
                        help="validation accuracy whose first training time is logged")
    sweep.add_common_arguments(parser, default_results_dir="results/runtime", default_epochs=250)
    return parser


def plan_runs(args):
    """Return the sweep's runs: every filter count of each device, for every seed."""
    runs = []
    for seed in args.seeds:
        for device in args.devices:
            for filters in (args.filters if device == "gpu" else args.cpu_filters):
                name = sweep.run_name(**{device: "", "f": filters, "seed": seed})
                config = {
                    "experiment": "runtime", "learning_rate": args.learning_rate,
                    "filters": filters, "epochs": args.epochs, "seed": seed, "device": device,
                    "batch_size": args.batch_size, "train_size": args.train_size,
                }
                flags = sweep.common_flags(args) + [
                    "--experiment", "runtime", "--learning-rate", repr(args.learning_rate),
                    "--filters", str(filters), "--epochs", str(args.epochs), "--seed", str(seed),
                    "--device", device, "--target-accuracy", repr(args.target_accuracy),
                ]
                runs.append(sweep.Run(name, flags, args.results_dir, config))
    return runs


def main(argv=None):
    """Run the runtime sweep from the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sweep.check_arguments(parser, args)
    return sweep.run_command(args, plan_runs(args), {
        "device": lambda run, log: run.device,
        "filters": lambda run, log: run.filters,
        "seed": lambda run, log: run.config["seed"],
        "s/epoch": lambda run, log: format_epoch_seconds(log),
    })


def format_epoch_seconds(log):
    """Return the steady-state seconds per epoch of a log, or the warm-up epoch's, or "-"."""
    timing = (log or {}).get("timing") or {}
    seconds = timing.get("steady_epoch_seconds_median") or timing.get("warmup_epoch_seconds")
    return f"{seconds:.2f}" if seconds else "-"


if __name__ == "__main__":
    sys.exit(main())
