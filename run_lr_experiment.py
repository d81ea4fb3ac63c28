"""Reproduce the lab report's learning-rate experiment: SGD at 0.1, 0.01, 0.001 and 0.0001.

The report trained the 16-filter network for 2000 epochs at each learning rate, with batch
size 100, and plotted the validation accuracy of every epoch (Figures 1 and 2) and the final
test accuracy (Table 1). Each run trains in its own process and writes one JSON log; a rerun
of the same command skips finished runs and resumes an interrupted one from its checkpoint.

    python run_lr_experiment.py --epochs 10                  # a demo, about 15 min on 2 cores
    python run_lr_experiment.py --seeds 0 1 2 --device gpu   # the report's 2000 epochs
    python plot_results.py                                   # Figures 1 and 2, Table 1
    python run_lr_experiment.py --seeds 0 1 2 --dry-run      # list what would be trained

Writes: results/lr/lr<rate>_f<filters>_seed<seed>.json, checkpoints under results/lr/checkpoints/
while a run trains.
"""

import argparse
import sys

import sweep
from cli import bounded_int, positive_float

REPORT_LEARNING_RATES = [0.1, 0.01, 0.001, 0.0001]


def build_parser():
    """Return the parser; the flags shared with cnn_mnist.py keep its names."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--learning-rates", type=positive_float, nargs="+",
                        default=REPORT_LEARNING_RATES, action=sweep.unique_values("learning rate"),
                        help="SGD step sizes to compare")
    parser.add_argument("--filters", type=bounded_int(1, 4096), default=16,
                        help="filters in each conv layer")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="where every run trains")
    sweep.add_common_arguments(parser, default_results_dir="results/lr", default_epochs=2000)
    return parser


def plan_runs(args):
    """Return the sweep's runs: every learning rate for every seed."""
    runs = []
    for seed in args.seeds:
        for learning_rate in args.learning_rates:
            name = sweep.run_name(lr=learning_rate, f=args.filters, seed=seed)
            config = {
                "experiment": "learning_rate", "learning_rate": learning_rate,
                "filters": args.filters, "epochs": args.epochs, "seed": seed,
                "device": args.device, "batch_size": args.batch_size,
                "train_size": args.train_size,
            }
            flags = sweep.common_flags(args) + [
                "--experiment", "learning_rate", "--learning-rate", repr(learning_rate),
                "--filters", str(args.filters), "--epochs", str(args.epochs),
                "--seed", str(seed), "--device", args.device,
            ]
            runs.append(sweep.Run(name, flags, args.results_dir, config))
    return runs


def main(argv=None):
    """Run the learning-rate sweep from the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sweep.check_arguments(parser, args)
    return sweep.run_command(args, plan_runs(args), {
        "learning rate": lambda run, log: sweep.format_number(run.config["learning_rate"]),
        "seed": lambda run, log: run.config["seed"],
    })


if __name__ == "__main__":
    sys.exit(main())
