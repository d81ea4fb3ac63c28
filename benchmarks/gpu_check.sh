#!/usr/bin/env bash
# Check training on a machine with an NVIDIA GPU, from a fresh checkout, in under 8 minutes.
# The script installs GPU TensorFlow into a new virtual environment, times the training loops at
# 16 and 256 filters on the GPU and on the CPU, and runs a short learning-rate sweep on the GPU.
#
#     bash benchmarks/gpu_check.sh
#     OUT=/tmp/gpu-check MNIST_DATA_DIR=/data/mnist bash benchmarks/gpu_check.sh
#
# Writes into $OUT (default: benchmarks/gpu-out/) five files, few enough to copy back whole:
#   gpu_check.log     everything the steps printed, with each step's exit status and seconds
#   environment.txt   nvidia-smi, the Python version and the installed packages
#   benchmark-gpu.md  the benchmark report on the GPU (16 and 256 filters)
#   benchmark-cpu.md  the benchmark report on the CPU (16 and 256 filters, 5,000 images an epoch)
#   lr-sweep.tar.gz   the JSON run logs of the learning-rate sweep
#
# Settings read from the environment:
#   MNIST_DATA_DIR  folder with the four MNIST files; without it they are read from, or
#                   downloaded into, data/mnist/ in the repository
#   VENV            where the virtual environment goes (default: $TMPDIR or /tmp, then
#                   cnn-mnist-gpu-venv); an existing one is reused
#   PYTHON          the interpreter that creates it (default: python3)
#   pip's own PIP_INDEX_URL, PIP_FIND_LINKS and PIP_NO_INDEX, on a machine without internet
#
# Every step has a time limit, and together they stay under 8 minutes. A step that fails or runs
# out of time is logged and the next one still runs; the script exits with the status of the
# first step that failed (124: a time limit), or 0.

set -uo pipefail  # No -e: a failed step must not hide the results of the steps after it.
cd "$(dirname "$0")/.."

OUT="${OUT:-benchmarks/gpu-out}"
VENV="${VENV:-${TMPDIR:-/tmp}/cnn-mnist-gpu-venv}"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d)"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1

first_failure=0

# Run one step under a time limit in seconds: step NAME LIMIT COMMAND...
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local status=$?
    echo "== $name: exit status $status after $((SECONDS - start)) s"
    if [ "$status" -ne 0 ] && [ "$first_failure" -eq 0 ]; then
        first_failure=$status
    fi
}

install_packages() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV" || return
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "tensorflow[and-cuda]>=2.21,<3" -r requirements.txt
}

describe_environment() {
    {
        date -u +"%Y-%m-%d %H:%M UTC"
        nvidia-smi || echo "nvidia-smi failed or is not installed"
        "$VENV/bin/python" --version
        "$VENV/bin/python" -m pip list --format=freeze --disable-pip-version-check
    } >"$OUT/environment.txt" 2>&1
}

check_data() {
    # Fails fast, with the loader's message, when the files are neither there nor downloadable.
    "$VENV/bin/python" -c "import mnist_data; mnist_data.load_mnist()"
}

# The CUDA libraries make this the largest download. The time limit assumes a nearby package
# index or a folder of wheels.
step "install" 150 install_packages
describe_environment
step "data" 20 check_data

# Every implementation at 16 and 256 filters on the GPU, plus the project's loop with 100 steps
# per session.run, because on a GPU the time per session.run weighs more than on a CPU.
step "benchmark on the GPU" 170 "$VENV/bin/python" benchmarks/benchmark_training.py \
    --device gpu --filters 16 256 --rounds 1 --epochs 3 --eval-memory-filters 0 \
    --implementations project feed-dict keras,steps-per-execution=50 pytorch \
    project,steps-per-run=100 \
    --output "$OUT/benchmark-gpu.md"

# The CPU side of the same machine, on a tenth of the training set so that 256 filters fits in
# the time limit, and the evaluation-memory check at 256 filters.
step "benchmark on the CPU" 60 "$VENV/bin/python" benchmarks/benchmark_training.py \
    --device cpu --filters 16 256 --rounds 1 --epochs 2 --train-size 5000 \
    --validation-size 2000 --implementations project feed-dict \
    --output "$OUT/benchmark-cpu.md"

# The learning-rate experiment end to end on the GPU, on 10,000 training images per epoch.
step "learning-rate sweep on the GPU" 75 "$VENV/bin/python" run_lr_experiment.py \
    --device gpu --epochs 20 --train-size 10000 --results-dir "$WORK/lr"
tar -czf "$OUT/lr-sweep.tar.gz" -C "$WORK" --exclude=checkpoints --exclude=.claims lr \
    || echo "no sweep logs to pack"
rm -rf "$WORK"

echo "== done after $SECONDS s; files in $OUT; first failed status: $first_failure"
exit "$first_failure"
