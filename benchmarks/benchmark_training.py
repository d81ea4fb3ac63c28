"""Time this project's training loop against the usual ways to train the same network.

Every implementation trains the same LeNet-style network: two 3x3 conv layers with F filters,
ReLU and 2x2 max-pooling, a dense layer of 128 units and 10 logits. Training is plain SGD at
learning rate 0.1 with batch size 100, the training images are reshuffled every epoch, and the
validation set is evaluated after every epoch. Each implementation runs in its own process, and
the processes take turns (A B C A B C ...), so that a slow spell of a shared machine hits every
implementation alike.

    python benchmarks/benchmark_training.py                  # the full run, 10 min on 2 cores
    python benchmarks/benchmark_training.py --quick          # a CI-sized check, under a minute
    python benchmarks/benchmark_training.py --filters 16 256 --device gpu --rounds 2
    python benchmarks/benchmark_training.py --implementations project project,precision=bf16 \
        --filters 16 --epochs 5 --rounds 1 --output benchmarks/out/bf16.md

An implementation is named by a spec: a base name (project, feed-dict, keras, pytorch) and
optional comma-separated settings. Lower-case settings are options of that base (for project and
feed-dict, the cnn_mnist.py flags of the same name), and upper-case ones are environment
variables of its process: "project,steps-per-run=50", "keras,steps-per-execution=50",
"project,TF_ENABLE_ONEDNN_OPTS=0".

Writes: the Markdown report given by --output (default benchmarks/RESULTS.md; with --quick,
benchmarks/out/RESULTS-quick.md). When the file already has the report's begin and end markers,
only the text between them is replaced, so hand-written notes around them stay.
"""

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
import traceback

BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCHMARKS_DIR)
if REPO_DIR not in sys.path:
    sys.path.insert(0, REPO_DIR)

from cli import bounded_int  # noqa: E402  (the repository's argparse types; no TensorFlow)

# The training setting that every implementation shares.
BATCH_SIZE = 100
LEARNING_RATE = 0.1
KERNEL_SIZE = 3
HIDDEN_UNITS = 128
NUM_CLASSES = 10
SEED = 0
# Evaluation batch of the Keras and PyTorch runs: the default of cnn_mnist.py --eval-batch-size.
PEER_EVAL_BATCH_SIZE = 250

# The steps_per_execution of the tuned Keras run: the fastest of 10, 20, 50, 100, 200 and 500 at
# 8 and 16 filters on a 2-core Intel Xeon with AVX-512, TensorFlow 2.21 with Keras 3.15.
TUNED_STEPS_PER_EXECUTION = 50

DEFAULT_FILTERS = [8, 16, 64]
DEFAULT_IMPLEMENTATIONS = [
    "project", "feed-dict", "keras", f"keras,steps-per-execution={TUNED_STEPS_PER_EXECUTION}",
    "pytorch",
]
BASELINE = "feed-dict"
PROJECT = "project"
PEER_BASES = ("keras", "pytorch")

BASE_DESCRIPTIONS = {
    "project": "this project's loop as the experiments run it: cnn_mnist.build_model, "
               "train_epoch and evaluate with the default flags",
    "feed-dict": "baseline: the same graph, one session.run per batch, the batch fed from NumPy "
                 "through feed_dict, TensorFlow's own thread counts",
    "keras": "Keras 3 model.fit with the same layers, SGD, batch size 100 and shuffle=True",
    "pytorch": "PyTorch with the same layers, torch.optim.SGD, batch size 100, reshuffled "
               "every epoch",
}

# The options each base accepts in a spec, with the type of their value.
BASE_OPTIONS = {
    "project": {"steps-per-run": int, "eval-batch-size": int, "intra-op-threads": int,
                "inter-op-threads": int, "precision": str},
    "feed-dict": {"eval-batch-size": int, "intra-op-threads": int, "inter-op-threads": int,
                  "precision": str},
    "keras": {"steps-per-execution": int},
    "pytorch": {"channels-last": int, "threads": int},
}
ENVIRONMENT_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")

QUICK_SETTINGS = {"filters": [8], "train_size": 1000, "validation_size": 1000, "epochs": 2,
                  "rounds": 1, "eval_memory_filters": 0}
FULL_SETTINGS = {"filters": DEFAULT_FILTERS, "train_size": 50_000, "validation_size": 10_000,
                 "epochs": 2, "rounds": 2, "eval_memory_filters": 256}

# Exit statuses of a worker process besides 0 and 1.
EXIT_DEVICE_UNAVAILABLE = 3  # The same status as cnn_mnist.EXIT_DEVICE_UNAVAILABLE.
EXIT_SKIPPED = 4
RESULT_PREFIX = "benchmark-result: "

MATMUL_SIZE = 2048
EVAL_MEMORY_LIMIT_BYTES = 2 * 1024**3
REPORT_BEGIN = "<!-- begin: written by benchmarks/benchmark_training.py -->"
REPORT_END = "<!-- end: written by benchmarks/benchmark_training.py -->"

# Targets checked in the report: speed-up of the project loop over the feed_dict baseline.
SPEEDUP_TARGETS = {16: 1.25, 64: 1.10}
PEER_TARGET_FILTERS = (8, 16, 64)
VALIDATION_SHARE_TARGET = 0.10  # Validation time / training time of an epoch, at 16 filters.
GPU_EPOCH_SECONDS_TARGET = 0.1  # At 16 filters.


class Skipped(Exception):
    """The implementation cannot run here for lack of a package or device, which is no failure."""


class DeviceUnavailable(Exception):
    """The requested device does not exist on this machine."""


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------

def forward_flops_per_image(filters, kernel_size=KERNEL_SIZE):
    """Return the multiply-add FLOPs (2 per multiply-add) of one image's forward pass, by layer.

    Only the convolutions and matrix products are counted. Bias additions, ReLU, max-pooling and
    the softmax would add about 3 % at 16 filters, so the count is a slight underestimate.
    """
    taps = kernel_size * kernel_size
    return {
        "conv1": 2 * 28 * 28 * filters * taps * 1,          # [28, 28, F] outputs, 1 input channel
        "conv2": 2 * 14 * 14 * filters * taps * filters,    # [14, 14, F] outputs, F inputs
        "dense1": 2 * 7 * 7 * filters * HIDDEN_UNITS,
        "logits": 2 * HIDDEN_UNITS * NUM_CLASSES,
    }


def training_flops_per_image(filters, kernel_size=KERNEL_SIZE):
    """Return the FLOPs of one image's SGD step: forward, weight gradients, input gradients.

    Each layer's weight gradient and input gradient cost as much as its forward pass. The first
    layer needs no input gradient, because nothing below it is trained. At 16 filters this is
    3 x 1.33 - 0.23 = 3.77 MFLOP per image.
    """
    layers = forward_flops_per_image(filters, kernel_size)
    return 3 * sum(layers.values()) - layers["conv1"]


# ---------------------------------------------------------------------------------------------
# Implementation specs
# ---------------------------------------------------------------------------------------------

def parse_spec(spec):
    """Split a spec such as "project,steps-per-run=50,OMP_NUM_THREADS=2" into its parts.

    Return (base, options, environment); raise ValueError naming the bad part and the fix.
    """
    base, *settings = spec.split(",")
    if base not in BASE_OPTIONS:
        raise ValueError(f"implementation {spec!r}: unknown base {base!r}; use one of "
                         f"{', '.join(BASE_OPTIONS)}")
    options, environment = {}, {}
    for setting in settings:
        key, equals, value = setting.partition("=")
        if not equals or not key:
            raise ValueError(f"implementation {spec!r}: {setting!r} is not KEY=VALUE")
        if ENVIRONMENT_NAME.match(key):
            environment[key] = value
        elif key in BASE_OPTIONS[base]:
            try:
                options[key] = BASE_OPTIONS[base][key](value)
            except ValueError:
                raise ValueError(f"implementation {spec!r}: {key}={value!r} is invalid") from None
        else:
            raise ValueError(f"implementation {spec!r}: {base} has no option {key!r}; its "
                             f"options are {', '.join(BASE_OPTIONS[base])}, and upper-case "
                             "names set environment variables")
    return base, options, environment


def implementation_spec(text):
    """Check a spec for argparse and return it unchanged, because it names the implementation."""
    try:
        parse_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def role(spec):
    """Return "project", "baseline", "peer" or "variant" for a spec."""
    base, options, environment = parse_spec(spec)
    if spec == PROJECT:
        return "project"
    if spec == BASELINE:
        return "baseline"
    if base in PEER_BASES:
        return "peer"
    return "variant"


# ---------------------------------------------------------------------------------------------
# Worker processes: each function below runs in a child process
# ---------------------------------------------------------------------------------------------

def peak_rss_bytes():
    """Return this process's peak resident memory in bytes (Linux reports kilobytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def load_data(settings):
    """Load the training subset and the validation subset this benchmark run uses."""
    import mnist_data

    data = mnist_data.load_mnist(settings["data_dir"], train_size=settings["train_size"])
    size = settings["validation_size"]
    return data._replace(validation_images=data.validation_images[:size],
                         validation_labels=data.validation_labels[:size])


def shuffled_order(seed, epoch, num_train):
    """Return cnn_mnist.epoch_permutation(seed, epoch, num_train) without importing TensorFlow."""
    import numpy as np

    return np.random.default_rng([seed, epoch]).permutation(num_train).astype(np.int32)


def train_tensorflow_graph(settings, base, options):
    """Train with cnn_mnist's graph: its own loop ("project") or feed_dict ("feed-dict")."""
    start = time.perf_counter()
    import tensorflow as tf
    import cnn_mnist
    import_seconds = time.perf_counter() - start

    start = time.perf_counter()
    data = load_data(settings)
    num_train = len(data.train_images)
    data_seconds = time.perf_counter() - start

    # The project's defaults, overridden only by the spec's options.
    flags = ["--filters", str(settings["filters"]), "--device", settings["device"],
             "--learning-rate", repr(LEARNING_RATE), "--batch-size", str(BATCH_SIZE),
             "--seed", str(SEED), "--train-size", str(num_train), "--output", os.devnull]
    if base == "feed-dict":
        # The baseline keeps TensorFlow's own thread counts, which suit its whole batches best.
        flags += ["--intra-op-threads", "0", "--inter-op-threads", "0"]
    for key, value in options.items():
        flags += [f"--{key}", str(value)]
    config = cnn_mnist.parse_config(flags)

    start = time.perf_counter()
    try:
        tf_device, gpu_name = cnn_mnist.select_device(config["device"])
        session_settings = cnn_mnist.session_config(
            tf_device, config["precision"], config["intra_op_threads"],
            config["inter_op_threads"],
        )
    except cnn_mnist.DeviceUnavailableError as error:
        raise DeviceUnavailable(str(error)) from None
    # As in cnn_mnist.run: never more chained steps than an epoch has.
    steps_per_run = max(1, min(config["steps_per_run"], num_train // BATCH_SIZE))
    if base == "feed-dict":
        steps_per_run = 1  # The baseline never runs the chained steps, so one is enough.
    model = cnn_mnist.build_model(config["filters"], config["kernel_size"], num_train,
                                  BATCH_SIZE, steps_per_run, SEED, tf_device)
    session = tf.compat.v1.Session(graph=model.graph, config=session_settings)
    session.run(model.init)
    if base == "project":
        session.run(model.data_initializer, {model.train_images_input: data.train_images,
                                             model.train_labels_input: data.train_labels})
    graph_seconds = time.perf_counter() - start

    epochs = []
    for epoch in range(1, settings["epochs"] + 1):
        permutation = cnn_mnist.epoch_permutation(SEED, epoch, num_train)
        if base == "project":
            loss, seconds = cnn_mnist.train_epoch(session, model, permutation, BATCH_SIZE,
                                                  LEARNING_RATE)
        else:
            loss, seconds = train_epoch_feed_dict(session, model, data, permutation)
        start = time.perf_counter()
        accuracy = cnn_mnist.evaluate(session, model, data.validation_images,
                                      data.validation_labels, config["eval_batch_size"])
        validation_seconds = time.perf_counter() - start
        epochs.append({"seconds": seconds, "validation_seconds": validation_seconds,
                       "train_loss": loss, "val_accuracy": accuracy})
    session.close()
    return {
        "epochs": epochs, "import_seconds": import_seconds, "data_seconds": data_seconds,
        "graph_seconds": graph_seconds,
        "images_per_epoch": (num_train // BATCH_SIZE) * BATCH_SIZE,
        "eval_batch_size": config["eval_batch_size"], "steps_per_run": steps_per_run,
        "device_name": gpu_name or "CPU", "framework": f"TensorFlow {tf.__version__}",
    }


def train_epoch_feed_dict(session, model, data, permutation):
    """Run one epoch the 2017 way; return (mean loss, seconds of the steps)."""
    import numpy as np

    num_steps = len(permutation) // BATCH_SIZE
    losses = []
    start = time.perf_counter()
    for step in range(num_steps):
        batch = permutation[step * BATCH_SIZE:(step + 1) * BATCH_SIZE]
        loss, _ = session.run([model.loss, model.train_op], {
            model.images: data.train_images[batch],
            model.labels: data.train_labels[batch],
            model.learning_rate: LEARNING_RATE,
        })
        losses.append(loss)
    seconds = time.perf_counter() - start
    return float(np.mean(losses)), seconds


def train_keras(settings, options):
    """Train with Keras 3 model.fit, timing the epochs with callbacks."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    start = time.perf_counter()
    import keras
    import tensorflow as tf
    import_seconds = time.perf_counter() - start

    start = time.perf_counter()
    data = load_data(settings)
    data_seconds = time.perf_counter() - start

    start = time.perf_counter()
    gpus = tf.config.list_physical_devices("GPU")
    if settings["device"] == "gpu" and not gpus:
        raise DeviceUnavailable("--device gpu was requested, but TensorFlow sees no GPU")
    keras.utils.set_random_seed(SEED)
    filters = settings["filters"]
    layers = keras.layers
    model = keras.Sequential([
        keras.Input(shape=(28, 28, 1)),
        layers.Conv2D(filters, KERNEL_SIZE, padding="same", activation="relu"),
        layers.MaxPooling2D(2),
        layers.Conv2D(filters, KERNEL_SIZE, padding="same", activation="relu"),
        layers.MaxPooling2D(2),
        layers.Flatten(),
        layers.Dense(HIDDEN_UNITS, activation="relu"),
        layers.Dense(NUM_CLASSES),
    ])
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        steps_per_execution=options.get("steps-per-execution", 1),
    )
    graph_seconds = time.perf_counter() - start

    class EpochTimer(keras.callbacks.Callback):
        """Record each epoch's seconds and, inside it, the validation pass's seconds."""

        def __init__(self):
            super().__init__()
            self.epochs = []

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch_start = time.perf_counter()

        def on_test_begin(self, logs=None):
            self.test_start = time.perf_counter()

        def on_test_end(self, logs=None):
            self.test_seconds = time.perf_counter() - self.test_start

        def on_epoch_end(self, epoch, logs=None):
            total = time.perf_counter() - self.epoch_start
            self.epochs.append({
                "seconds": total - self.test_seconds, "validation_seconds": self.test_seconds,
                "train_loss": float(logs["loss"]), "val_accuracy": float(logs["val_accuracy"]),
            })

    timer = EpochTimer()
    model.fit(data.train_images, data.train_labels, batch_size=BATCH_SIZE,
              epochs=settings["epochs"], shuffle=True,
              validation_data=(data.validation_images, data.validation_labels),
              validation_batch_size=PEER_EVAL_BATCH_SIZE, callbacks=[timer], verbose=0)
    return {
        "epochs": timer.epochs, "import_seconds": import_seconds, "data_seconds": data_seconds,
        "graph_seconds": graph_seconds, "images_per_epoch": len(data.train_images),
        "eval_batch_size": PEER_EVAL_BATCH_SIZE,
        "device_name": "GPU" if settings["device"] == "gpu" else "CPU",
        "framework": f"Keras {keras.__version__}, TensorFlow {tf.__version__}",
    }


def train_pytorch(settings, options):
    """Train with PyTorch: the data on the device, one batch gathered per step."""
    if importlib.util.find_spec("torch") is None:
        raise Skipped("PyTorch is not installed (pip install torch)")
    start = time.perf_counter()
    import torch
    import_seconds = time.perf_counter() - start

    start = time.perf_counter()
    data = load_data(settings)
    num_train = len(data.train_images)
    data_seconds = time.perf_counter() - start

    start = time.perf_counter()
    if settings["device"] == "gpu":
        if not torch.cuda.is_available():
            raise Skipped(f"PyTorch {torch.__version__} finds no CUDA GPU (perhaps a CPU-only "
                          "build)")
        device = torch.device("cuda")
    else:
        device = torch.device("cpu")
    if "threads" in options:
        torch.set_num_threads(options["threads"])
    memory_format = (torch.channels_last if options.get("channels-last")
                     else torch.contiguous_format)
    torch.manual_seed(SEED)
    filters = settings["filters"]
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(1, filters, KERNEL_SIZE, padding="same"), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(filters, filters, KERNEL_SIZE, padding="same"), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(7 * 7 * filters, HIDDEN_UNITS), nn.ReLU(),
        nn.Linear(HIDDEN_UNITS, NUM_CLASSES),
    ).to(device, memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)

    def to_device(images, labels):
        # NHWC arrays to NCHW tensors [N, 1, 28, 28], copied to the device once.
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
        images = images.contiguous(memory_format=memory_format).to(device)
        return images, torch.from_numpy(labels).long().to(device)

    train_images, train_labels = to_device(data.train_images, data.train_labels)
    validation_images, validation_labels = to_device(data.validation_images,
                                                     data.validation_labels)
    graph_seconds = time.perf_counter() - start

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    epochs = []
    for epoch in range(1, settings["epochs"] + 1):
        order = torch.from_numpy(shuffled_order(SEED, epoch, num_train)).long().to(device)
        model.train()
        synchronize()
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        num_steps = num_train // BATCH_SIZE
        for step in range(num_steps):
            batch = order[step * BATCH_SIZE:(step + 1) * BATCH_SIZE]
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(train_images[batch]), train_labels[batch])
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
        mean_loss = float(loss_sum) / num_steps
        synchronize()
        seconds = time.perf_counter() - start

        start = time.perf_counter()
        model.eval()
        correct = 0
        with torch.no_grad():
            for first in range(0, len(validation_images), PEER_EVAL_BATCH_SIZE):
                logits = model(validation_images[first:first + PEER_EVAL_BATCH_SIZE])
                labels = validation_labels[first:first + PEER_EVAL_BATCH_SIZE]
                correct += int((logits.argmax(dim=1) == labels).sum())
        validation_seconds = time.perf_counter() - start
        epochs.append({"seconds": seconds, "validation_seconds": validation_seconds,
                       "train_loss": mean_loss,
                       "val_accuracy": correct / len(validation_images)})
    return {
        "epochs": epochs, "import_seconds": import_seconds, "data_seconds": data_seconds,
        "graph_seconds": graph_seconds,
        "images_per_epoch": (num_train // BATCH_SIZE) * BATCH_SIZE,
        "eval_batch_size": PEER_EVAL_BATCH_SIZE,
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
        "framework": f"PyTorch {torch.__version__}",
    }


def measure_matmul(settings):
    """Return the float32 throughput of a 2048x2048 matmul in TensorFlow (and NumPy on a CPU)."""
    import numpy as np
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if settings["device"] == "gpu" and not gpus:
        raise DeviceUnavailable(
            "--device gpu was requested, but TensorFlow sees no GPU on this machine. Install "
            'GPU support with: pip install "tensorflow[and-cuda]" (Linux, NVIDIA driver '
            "required), check that nvidia-smi lists the GPU, or run with --device cpu."
        )
    device = "/gpu:0" if settings["device"] == "gpu" else "/cpu:0"
    flops = 2 * MATMUL_SIZE**3
    chain = 10
    with tf.device(device):
        rng = np.random.default_rng(SEED)
        # Entries of size 1/sqrt(n) keep a chain of products in the float32 range.
        a = tf.constant(rng.standard_normal((MATMUL_SIZE, MATMUL_SIZE), np.float32)
                        / np.float32(np.sqrt(MATMUL_SIZE)))

        @tf.function
        def chained_products(x):
            # Each product needs the previous one, so none can be skipped or run at once.
            for _ in range(chain):
                x = tf.linalg.matmul(x, a)
            return tf.reduce_sum(x)

        chained_products(a).numpy()  # Trace, and warm the kernels up.
        seconds = []
        for _ in range(5):
            start = time.perf_counter()
            chained_products(a).numpy()  # .numpy() waits until the device has finished.
            seconds.append(time.perf_counter() - start)
    result = {"tensorflow_flops_per_second": chain * flops / statistics.median(seconds),
              "device_name": "CPU"}
    if gpus and settings["device"] == "gpu":
        details = tf.config.experimental.get_device_details(gpus[0])
        result["device_name"] = details.get("device_name", gpus[0].name)
    else:
        left = rng.standard_normal((MATMUL_SIZE, MATMUL_SIZE), np.float32)
        np.matmul(left, left)
        seconds = []
        for _ in range(5):
            start = time.perf_counter()
            np.matmul(left, left)
            seconds.append(time.perf_counter() - start)
        result["numpy_flops_per_second"] = flops / statistics.median(seconds)
    return result


def measure_eval_memory(settings):
    """Build the network as a training run does, evaluate the validation set, report peak RSS."""
    import tensorflow as tf
    import cnn_mnist

    data = load_data(settings)
    filters = settings["filters"]
    config = cnn_mnist.parse_config(["--filters", str(filters), "--output", os.devnull])
    model = cnn_mnist.build_model(filters, config["kernel_size"], len(data.train_images),
                                  BATCH_SIZE, config["steps_per_run"], SEED, "/cpu:0")
    session_settings = cnn_mnist.session_config("/cpu:0", config["precision"],
                                                config["intra_op_threads"],
                                                config["inter_op_threads"])
    with tf.compat.v1.Session(graph=model.graph, config=session_settings) as session:
        session.run(model.init)
        session.run(model.data_initializer, {model.train_images_input: data.train_images,
                                             model.train_labels_input: data.train_labels})
        before = peak_rss_bytes()
        start = time.perf_counter()
        accuracy = cnn_mnist.evaluate(session, model, data.validation_images,
                                      data.validation_labels, config["eval_batch_size"])
        seconds = time.perf_counter() - start
    return {"filters": filters, "images": len(data.validation_images),
            "eval_batch_size": config["eval_batch_size"], "accuracy": accuracy,
            "eval_seconds": seconds, "peak_rss_bytes_before_eval": before}


def run_worker(task, spec, settings):
    """Run one task in this (child) process and print its result as one JSON line."""
    try:
        if task == "matmul":
            result = measure_matmul(settings)
        elif task == "eval-memory":
            result = measure_eval_memory(settings)
        else:
            base, options, _ = parse_spec(spec)
            if base in ("project", "feed-dict"):
                result = train_tensorflow_graph(settings, base, options)
            elif base == "keras":
                result = train_keras(settings, options)
            else:
                result = train_pytorch(settings, options)
    except DeviceUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_DEVICE_UNAVAILABLE
    except Skipped as error:
        print(f"skipped: {error}", file=sys.stderr)
        return EXIT_SKIPPED
    except Exception:  # noqa: BLE001 - the parent shows the traceback and carries on.
        traceback.print_exc()
        return 1
    result["peak_rss_bytes"] = peak_rss_bytes()
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# The parent process: schedule, collect, summarise
# ---------------------------------------------------------------------------------------------

def start_worker(task, spec, settings, timeout_seconds):
    """Run a worker process; return (status, result or None, message).

    status is "ok", "skipped", "device unavailable" or "failed".
    """
    environment = dict(os.environ)
    environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    environment.setdefault("KERAS_BACKEND", "tensorflow")
    if settings["device"] == "cpu":
        # A CPU run must not touch a GPU, so CUDA hides every GPU from its process.
        environment["CUDA_VISIBLE_DEVICES"] = "-1"
    if spec:
        environment.update(parse_spec(spec)[2])
    command = [sys.executable, os.path.abspath(__file__), "--worker", task,
               "--worker-settings", json.dumps(settings)]
    if spec:
        command += ["--worker-spec", spec]
    try:
        finished = subprocess.run(command, env=environment, capture_output=True, text=True,
                                  timeout=timeout_seconds, cwd=REPO_DIR)
    except subprocess.TimeoutExpired:
        return "failed", None, f"timed out after {timeout_seconds} s"
    for line in finished.stdout.splitlines():
        if line.startswith(RESULT_PREFIX) and finished.returncode == 0:
            return "ok", json.loads(line[len(RESULT_PREFIX):]), ""
    stderr_lines = [line for line in finished.stderr.splitlines() if line.strip()]
    last_line = stderr_lines[-1] if stderr_lines else f"exit status {finished.returncode}"
    if finished.returncode == EXIT_SKIPPED:
        return "skipped", None, last_line.removeprefix("skipped: ")
    if finished.returncode == EXIT_DEVICE_UNAVAILABLE:
        return "device unavailable", None, last_line.removeprefix("error: ")
    tail = "\n".join(stderr_lines[-15:])
    return "failed", None, f"exit status {finished.returncode}:\n{tail}"


def busy_cpu_seconds():
    """Return the CPU seconds all processes on this machine have used since boot, or None."""
    try:
        with open("/proc/stat", encoding="utf-8") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds():
    """Return the CPU seconds this process and its finished workers have used."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def worker_settings(settings, filters):
    """Return the settings a worker needs, as a JSON-ready dict."""
    keys = ("device", "train_size", "validation_size", "epochs", "data_dir")
    return {**{key: settings[key] for key in keys}, "filters": filters}


def run_benchmark(settings):
    """Run every implementation at every filter count, round after round; return the records."""
    records = {"runs": [], "matmul": [], "eval_memory": None, "notes": []}
    timeout = settings["worker_timeout"]
    for round_number in range(1, settings["rounds"] + 1):
        status, result, message = start_worker("matmul", None, worker_settings(settings, 0),
                                               timeout)
        if status == "device unavailable":
            raise DeviceUnavailable(message)
        if status != "ok":
            raise RuntimeError(f"the matmul throughput measurement failed: {message}")
        records["matmul"].append(result)
        print(f"round: {round_number} matmul_gflops: "
              f"{result['tensorflow_flops_per_second'] / 1e9:.1f}", flush=True)

        for filters in settings["filters"]:
            for spec in settings["implementations"]:
                start = time.perf_counter()
                machine_start, own_start = busy_cpu_seconds(), own_cpu_seconds()
                status, result, message = start_worker(
                    "train", spec, worker_settings(settings, filters), timeout)
                wall_seconds = time.perf_counter() - start
                other_cores = None
                if machine_start is not None:
                    others = (busy_cpu_seconds() - machine_start) - (own_cpu_seconds() - own_start)
                    other_cores = max(0.0, others) / wall_seconds
                records["runs"].append({"round": round_number, "filters": filters,
                                        "spec": spec, "status": status, "result": result,
                                        "message": message, "wall_seconds": wall_seconds,
                                        "other_cores": other_cores})
                print_run_line(round_number, filters, spec, status, result, message, other_cores)
                if status == "device unavailable":
                    raise DeviceUnavailable(message)

    if settings["eval_memory_filters"] and settings["device"] == "cpu":
        memory_settings = {**worker_settings(settings, settings["eval_memory_filters"]),
                           "validation_size": settings["validation_size"]}
        status, result, message = start_worker("eval-memory", None, memory_settings, timeout)
        records["eval_memory"] = {"status": status, "result": result, "message": message}
        if result:
            print(f"eval_memory: filters {result['filters']} images {result['images']} "
                  f"peak_rss_mb {result['peak_rss_bytes'] / 2**20:.0f}", flush=True)
        else:
            print(f"eval_memory: {status}: {message}", flush=True)
    return records


def print_run_line(round_number, filters, spec, status, result, message, other_cores):
    """Print one key: value line per worker, which a person and grep can both read."""
    prefix = f"round: {round_number} filters: {filters} implementation: {spec}"
    if other_cores is not None:
        prefix += f" other_processes_cores: {other_cores:.2f}"
    if status != "ok":
        print(f"{prefix} status: {status} reason: {message.splitlines()[0] if message else ''}",
              flush=True)
        if status == "failed":
            print(message, file=sys.stderr, flush=True)
        return
    steady = [e["seconds"] for e in result["epochs"][1:]]
    print(f"{prefix} status: ok epoch_seconds: {statistics.median(steady):.3f} "
          f"validation_seconds: {result['epochs'][-1]['validation_seconds']:.3f} "
          f"val_accuracy: {result['epochs'][-1]['val_accuracy']:.4f}", flush=True)


def summarise(records, settings):
    """Return {filters: {spec: summary}} from the records of all rounds."""
    matmul = statistics.median(m["tensorflow_flops_per_second"] for m in records["matmul"])
    table = {}
    for filters in settings["filters"]:
        rows = {}
        for spec in settings["implementations"]:
            runs = [r for r in records["runs"] if r["filters"] == filters and r["spec"] == spec]
            done = [r["result"] for r in runs if r["status"] == "ok"]
            other_cores = [r["other_cores"] for r in runs
                           if r["status"] == "ok" and r["other_cores"] is not None]
            if not done:
                other = runs[0] if runs else {"status": "not run", "message": ""}
                rows[spec] = {"status": other["status"], "message": other["message"]}
                continue
            # The first epoch of every process is its warm-up and is left out.
            steady = [e["seconds"] for result in done for e in result["epochs"][1:]]
            validation = [e["validation_seconds"] for result in done
                          for e in result["epochs"][1:]]
            images = done[0]["images_per_epoch"]
            median = statistics.median(steady)
            rows[spec] = {
                "status": "ok", "rounds": len(done), "median": median, "min": min(steady),
                "max": max(steady), "images_per_second": images / median,
                "utilisation": images * training_flops_per_image(filters) / median / matmul,
                "validation_seconds": statistics.median(validation),
                "val_accuracy": statistics.median(r["epochs"][-1]["val_accuracy"] for r in done),
                "peak_rss_bytes": max(r["peak_rss_bytes"] for r in done),
                "import_seconds": statistics.median(r["import_seconds"] for r in done),
                "data_seconds": statistics.median(r["data_seconds"] for r in done),
                "graph_seconds": statistics.median(r["graph_seconds"] for r in done),
                "eval_batch_size": done[0]["eval_batch_size"],
                "framework": done[0]["framework"], "device_name": done[0]["device_name"],
                "other_cores": max(other_cores) if other_cores else None,
            }
        add_ratios(rows)
        table[filters] = rows
    return table


def add_ratios(rows):
    """Add each row's speed-up over the baseline and over the fastest peer (> 1: faster)."""
    timed = {spec: row["median"] for spec, row in rows.items() if row["status"] == "ok"}
    peers = [seconds for spec, seconds in timed.items() if role(spec) == "peer"]
    for spec, row in rows.items():
        if row["status"] != "ok":
            continue
        row["vs_baseline"] = timed[BASELINE] / row["median"] if BASELINE in timed else None
        row["vs_fastest_peer"] = min(peers) / row["median"] if peers else None


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

def cpu_model():
    """Return the CPU model name from /proc/cpuinfo, or platform.processor().

    The same as cnn_mnist.cpu_model, repeated because importing cnn_mnist loads TensorFlow,
    which this parent process keeps out so that it does not skew the timed workers.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name):
    """Return an installed package's version without importing it, or "not installed"."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def plural(count, noun):
    return f"{count} {noun}" + ("" if count == 1 else "s")


def format_ratio(value):
    return "-" if value is None else f"{value:.2f}x"


def format_megabytes(count):
    return f"{count / 2**20:,.0f}"


def results_table(rows):
    """Return the Markdown table of one filter count."""
    lines = [
        "| implementation | s/epoch median | min | max | images/s | vs baseline | "
        "vs fastest peer | MFU | validation s (share of epoch) | val. accuracy | "
        "peak RSS MB | start-up s: import + data + graph | others' load |",
        "| --- " + "| ---: " * 10 + "| --- | ---: |",
    ]
    for spec, row in rows.items():
        if row["status"] != "ok":
            reason = row["message"].splitlines()[0] if row["message"] else ""
            lines.append(f"| `{spec}` | {row['status']}: {reason} | | | | | | | | | | | |")
            continue
        share = row["validation_seconds"] / row["median"]
        startup = row["import_seconds"] + row["data_seconds"] + row["graph_seconds"]
        lines.append(
            f"| `{spec}` | {row['median']:.3f} | {row['min']:.3f} | {row['max']:.3f} | "
            f"{row['images_per_second']:,.0f} | {format_ratio(row['vs_baseline'])} | "
            f"{format_ratio(row['vs_fastest_peer'])} | {row['utilisation']:.0%} | "
            f"{row['validation_seconds']:.3f} ({share:.1%}) | {row['val_accuracy']:.4f} | "
            f"{format_megabytes(row['peak_rss_bytes'])} | {startup:.1f}: "
            f"{row['import_seconds']:.1f} + {row['data_seconds']:.1f} + "
            f"{row['graph_seconds']:.1f} | "
            + ("-" if row["other_cores"] is None else f"{row['other_cores']:.2f}") + " |"
        )
    return "\n".join(lines)


def check_targets(table, records, settings):
    """Return (target, measured, met) rows for the targets this run has the data for."""
    checks = []

    def row(filters, spec):
        found = table.get(filters, {}).get(spec)
        return found if found and found["status"] == "ok" else None

    for filters, wanted in SPEEDUP_TARGETS.items():
        project = row(filters, PROJECT)
        if project and project["vs_baseline"] is not None:
            checks.append((f"F={filters}: project loop at least {wanted:.2f}x faster than "
                           "feed_dict", f"{project['vs_baseline']:.2f}x",
                           project["vs_baseline"] >= wanted))
    for filters in PEER_TARGET_FILTERS:
        project = row(filters, PROJECT)
        if project and project["vs_fastest_peer"] is not None:
            peers = [spec for spec in table[filters] if role(spec) == "peer"
                     and table[filters][spec]["status"] == "ok"]
            checks.append((f"F={filters}: project loop no slower than any peer "
                           f"({', '.join(peers)})",
                           f"{project['vs_fastest_peer']:.2f}x the fastest peer",
                           project["vs_fastest_peer"] >= 1.0))
    project = row(16, PROJECT)
    if project:
        share = project["validation_seconds"] / project["median"]
        checks.append((f"F=16: validation pass at most {VALIDATION_SHARE_TARGET:.0%} of an epoch",
                       f"{project['validation_seconds']:.3f} s, {share:.1%}",
                       share <= VALIDATION_SHARE_TARGET))
        if settings["device"] == "gpu":
            checks.append((f"F=16 on the GPU: at most {GPU_EPOCH_SECONDS_TARGET} s per epoch",
                           f"{project['median']:.3f} s",
                           project["median"] <= GPU_EPOCH_SECONDS_TARGET))
    memory = records["eval_memory"]
    if memory and memory["result"]:
        result = memory["result"]
        checks.append((f"evaluating {result['images']:,} images at F={result['filters']} stays "
                       "under 2 GB peak RSS", f"{format_megabytes(result['peak_rss_bytes'])} MB",
                       result["peak_rss_bytes"] < EVAL_MEMORY_LIMIT_BYTES))
    return checks


def build_report(records, settings, table, elapsed_seconds):
    """Return the report's Markdown text."""
    matmul = [m["tensorflow_flops_per_second"] / 1e9 for m in records["matmul"]]
    numpy_matmul = [m["numpy_flops_per_second"] / 1e9 for m in records["matmul"]
                    if "numpy_flops_per_second" in m]
    device_name = records["matmul"][0]["device_name"]
    lines = [
        REPORT_BEGIN,
        "",
        f"Command: `{settings['command']}`",
        "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"whole run {elapsed_seconds / 60:.1f} min.",
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB memory; "
        f"device: {settings['device']} ({device_name}).",
        f"- Software: Python {platform.python_version()}, TensorFlow "
        f"{package_version('tensorflow')}, Keras {package_version('keras')}, NumPy "
        f"{package_version('numpy')}, PyTorch {package_version('torch')}.",
        f"- Setting: {settings['train_size']:,} training images per epoch, batch {BATCH_SIZE}, "
        f"SGD at {LEARNING_RATE}, {settings['validation_size']:,} validation images after every "
        f"epoch; {settings['epochs']} epochs per process of which the first is a warm-up and "
        f"is not timed; {plural(settings['rounds'], 'round')}, implementations interleaved.",
        f"- Float32 {MATMUL_SIZE}x{MATMUL_SIZE} matmul throughput, TensorFlow: "
        f"{statistics.median(matmul):.0f} GFLOP/s (median of {plural(len(matmul), 'round')}, "
        f"{min(matmul):.0f}-{max(matmul):.0f})"
        + (f"; NumPy: {statistics.median(numpy_matmul):.0f} GFLOP/s." if numpy_matmul else "."),
    ]
    if "other_cpu_seconds" in records:
        others = records["other_cpu_seconds"]
        lines.append(f"- Other processes on this machine used {others:.0f} CPU seconds during the "
                     f"run, {others / elapsed_seconds:.2f} cores on average (from /proc/stat).")
    if settings["device"] == "gpu":
        lines.append("- On NVIDIA GPUs since Ampere, TensorFlow runs float32 matmuls and "
                     "convolutions in TensorFloat-32 by default, the reference matmul included.")
    lines += [
        "",
        "Columns: seconds per epoch of the training steps alone, over the timed epochs of all "
        "rounds; vs baseline and vs fastest peer are speed-ups (the other's seconds divided by "
        "this row's, above 1 means faster); MFU is model-FLOP utilisation: training FLOPs per "
        "epoch (conv and matmul multiply-adds, 2 FLOPs each, forward + weight gradients + "
        "input gradients except the first layer's) per second, divided by the matmul "
        "throughput above; validation is the median time of one validation pass; peak RSS is "
        "the process's peak resident memory; start-up is import, data loading and graph "
        "building (Keras traces its functions in the warm-up epoch instead); others' load is "
        "the most CPU cores that other processes on the machine used on average while one of "
        "this row's processes ran.",
        "",
        "Implementations:",
        "",
    ]
    for spec in settings["implementations"]:
        base = parse_spec(spec)[0]
        lines.append(f"- `{spec}`: {BASE_DESCRIPTIONS[base]}"
                     + ("" if spec == base else f", with {spec.split(',', 1)[1]}") + ".")
    for filters, rows in table.items():
        flops = training_flops_per_image(filters)
        lines += ["", f"### {filters} filters ({flops / 1e6:.2f} MFLOP per training image)", "",
                  results_table(rows)]

    memory = records["eval_memory"]
    if memory:
        lines += ["", "### Evaluation memory", ""]
        if memory["result"]:
            result = memory["result"]
            lines.append(
                f"Building the {result['filters']}-filter network with the training set in the "
                f"graph, as a training run does, then evaluating {result['images']:,} validation "
                f"images in batches of {result['eval_batch_size']}: peak RSS "
                f"{format_megabytes(result['peak_rss_bytes_before_eval'])} MB before the "
                f"evaluation, {format_megabytes(result['peak_rss_bytes'])} MB after it "
                f"(resource.getrusage); the evaluation took {result['eval_seconds']:.1f} s.")
        else:
            lines.append(f"The evaluation-memory check {memory['status']}: {memory['message']}")

    checks = check_targets(table, records, settings)
    if checks:
        lines += ["", "### Targets", "", "| target | measured | met |", "| --- | --- | --- |"]
        lines += [f"| {target} | {measured} | {'yes' if met else 'no'} |"
                  for target, measured, met in checks]
    lines += ["", REPORT_END]
    return "\n".join(lines) + "\n"


def write_report(path, report):
    """Write the report, replacing only the marked block when the file already has one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = report
    if os.path.exists(path):
        with open(path, encoding="utf-8") as existing:
            old = existing.read()
        if REPORT_BEGIN in old and REPORT_END in old:
            before = old.split(REPORT_BEGIN, 1)[0]
            after = old.split(REPORT_END, 1)[1]
            text = before + report.rstrip("\n") + after
    else:
        text = "# Training-loop benchmark\n\n" + report
    with open(path, "w", encoding="utf-8") as output:
        output.write(text)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def build_parser():
    """Return the argument parser."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Implementation bases: " + "; ".join(
            f"{name}: {text}" for name, text in BASE_DESCRIPTIONS.items()),
    )
    parser.add_argument("--filters", type=bounded_int(1, 4096), nargs="+", default=None,
                        help="filter counts to time (default: 8 16 64; add 256 for the "
                             "report's largest network)")
    parser.add_argument("--implementations", type=implementation_spec, nargs="+",
                        default=DEFAULT_IMPLEMENTATIONS,
                        help="specs to time, in this order within a round (default: "
                             f"{' '.join(DEFAULT_IMPLEMENTATIONS)})")
    parser.add_argument("--epochs", type=bounded_int(2, 1000), default=None,
                        help="epochs per process, the first of which is an untimed warm-up "
                             "(default: 2)")
    parser.add_argument("--rounds", type=bounded_int(1, 100), default=None,
                        help="times each implementation is run, in turns (default: 2)")
    parser.add_argument("--train-size", type=bounded_int(BATCH_SIZE, 50_000), default=None,
                        help="training images per epoch, the first N of the 50,000 "
                             "(default: 50000)")
    parser.add_argument("--validation-size", type=bounded_int(1, 10_000), default=None,
                        help="validation images evaluated after every epoch (default: 10000)")
    parser.add_argument("--eval-memory-filters", type=bounded_int(0, 4096), default=None,
                        help="filter count of the evaluation-memory check, run once at the end "
                             "on a CPU; 0 skips it (default: 256)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="where every implementation trains; gpu fails when none is "
                             "visible (default: cpu)")
    parser.add_argument("--data-dir", default=None,
                        help="folder with the MNIST files (default: $MNIST_DATA_DIR, else "
                             "data/mnist/ in the repository)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run for CI: 8 filters, 1,000 training and 1,000 validation "
                             "images, 2 epochs, 1 round, no memory check; flags given "
                             "explicitly still apply")
    parser.add_argument("--output", default=None,
                        help="Markdown report path (default: benchmarks/RESULTS.md, with "
                             "--quick benchmarks/out/RESULTS-quick.md)")
    parser.add_argument("--worker-timeout", type=bounded_int(10), default=1800,
                        help="seconds after which one implementation's process is stopped "
                             "(default: 1800)")
    # Internal: the parent starts each measurement as `--worker TASK`.
    parser.add_argument("--worker", choices=("train", "matmul", "eval-memory"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--worker-spec", help=argparse.SUPPRESS)
    parser.add_argument("--worker-settings", help=argparse.SUPPRESS)
    return parser


def resolve_settings(args, argv):
    """Return the run's settings: explicit flags, then --quick's values, then the defaults."""
    preset = QUICK_SETTINGS if args.quick else FULL_SETTINGS
    settings = {key: getattr(args, key) if getattr(args, key) is not None else value
                for key, value in preset.items()}
    settings.update(device=args.device, data_dir=args.data_dir,
                    implementations=list(dict.fromkeys(args.implementations)),
                    worker_timeout=args.worker_timeout)
    settings["filters"] = list(dict.fromkeys(settings["filters"]))
    default_output = os.path.join(BENCHMARKS_DIR, "out", "RESULTS-quick.md") if args.quick \
        else os.path.join(BENCHMARKS_DIR, "RESULTS.md")
    settings["output"] = args.output or default_output
    script = os.path.relpath(os.path.abspath(__file__), REPO_DIR)
    settings["command"] = " ".join(["python", script, *map(shlex.quote, argv)])
    return settings


def main(argv=None):
    """Run the benchmark from the command line; return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.worker:
        return run_worker(args.worker, args.worker_spec, json.loads(args.worker_settings))

    settings = resolve_settings(args, argv)
    import mnist_data

    try:
        # Load once here, so missing data fails before any worker starts.
        mnist_data.load_mnist(settings["data_dir"], train_size=settings["train_size"])
    except mnist_data.MnistDataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if "pytorch" in {parse_spec(spec)[0] for spec in settings["implementations"]} \
            and importlib.util.find_spec("torch") is None:
        print("note: PyTorch is not installed, so the pytorch runs are skipped "
              "(pip install torch to include them)", flush=True)

    start = time.perf_counter()
    machine_start, own_start = busy_cpu_seconds(), own_cpu_seconds()
    try:
        records = run_benchmark(settings)
    except DeviceUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_DEVICE_UNAVAILABLE
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    elapsed_seconds = time.perf_counter() - start
    if machine_start is not None:
        # Other processes' CPU time shows whether the machine was quiet while it was timed.
        others = (busy_cpu_seconds() - machine_start) - (own_cpu_seconds() - own_start)
        records["other_cpu_seconds"] = max(0.0, others)

    table = summarise(records, settings)
    report = build_report(records, settings, table, elapsed_seconds)
    write_report(settings["output"], report)
    print()
    print(report)
    print(f"report: {settings['output']}")
    failed = [r for r in records["runs"] if r["status"] == "failed"]
    memory = records["eval_memory"]
    return 1 if failed or (memory and memory["status"] == "failed") else 0


if __name__ == "__main__":
    sys.exit(main())
