"""Train the LeNet-style CNN of the 2017 lab report on MNIST, in TensorFlow 1.x graph style.

The network: conv 3x3 with F filters (stride 1, SAME padding) + ReLU + 2x2 max-pool, the same
again, a dense layer of 128 units + ReLU, and a dense layer of 10 logits trained with softmax
cross-entropy by plain SGD. The report used F=16; its parameter counts for F = 8 ... 256 are
checked by the tests. One run writes one JSON log (schema in run_log.py).

    python cnn_mnist.py --epochs 3 --learning-rate 0.1
    python cnn_mnist.py --filters 64 --device cpu --epochs 5 --output results/f64.json
    python cnn_mnist.py --epochs 1 --train-size 2000      # a quick check, about a minute

Writes: the run log given by --output (default results/run.json) and, with --checkpoint-dir,
TensorFlow checkpoints from which an interrupted run resumes.
"""

import argparse
import collections
import datetime
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Hide TensorFlow's start-up chatter.

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import mnist_data  # noqa: E402
from cli import accuracy_fraction, bounded_int, positive_float  # noqa: E402
import run_log  # noqa: E402

tf.compat.v1.disable_eager_execution()

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
HIDDEN_UNITS = 128

# Exit status when the requested device is not available. Sweeps read it to record a skipped run.
EXIT_DEVICE_UNAVAILABLE = 3

GPU_INSTALL_HINT = (
    'Install GPU support with: pip install "tensorflow[and-cuda]" (Linux, NVIDIA driver '
    "required; the old package name tensorflow-gpu no longer installs anything), check that "
    "nvidia-smi lists the GPU, or run with --device cpu."
)


class DeviceUnavailableError(RuntimeError):
    """The requested device or precision cannot be used on this machine."""


# ---------------------------------------------------------------------------------------------
# The graph
# ---------------------------------------------------------------------------------------------

def inference(images, filters, kernel_size):
    """Build the network on `images` [batch, 28, 28, 1] and return logits [batch, 10].

    Variables live in the scope "model" and are reused on every call, so several copies of
    the forward pass (one per unrolled training step) share one set of weights.
    """
    # He initialisation (truncated normal, variance 2 / fan_in) suits ReLU layers. It reaches
    # 98 % validation accuracy in 3 epochs at learning rate 0.1, where Glorot-uniform needs more.
    weight_init = tf.compat.v1.variance_scaling_initializer(
        scale=2.0, mode="fan_in", distribution="truncated_normal"
    )
    bias_init = tf.compat.v1.zeros_initializer()

    def variable(name, shape, initializer):
        return tf.compat.v1.get_variable(name, shape, tf.float32, initializer=initializer)

    with tf.compat.v1.variable_scope("model", reuse=tf.compat.v1.AUTO_REUSE):
        w1 = variable("conv1/weights", [kernel_size, kernel_size, 1, filters], weight_init)
        b1 = variable("conv1/biases", [filters], bias_init)
        w2 = variable("conv2/weights", [kernel_size, kernel_size, filters, filters], weight_init)
        b2 = variable("conv2/biases", [filters], bias_init)
        w3 = variable("dense1/weights", [7 * 7 * filters, HIDDEN_UNITS], weight_init)
        b3 = variable("dense1/biases", [HIDDEN_UNITS], bias_init)
        w4 = variable("logits/weights", [HIDDEN_UNITS, NUM_CLASSES], weight_init)
        b4 = variable("logits/biases", [NUM_CLASSES], bias_init)

    pool = [1, 2, 2, 1]
    x = tf.nn.relu(tf.nn.conv2d(images, w1, strides=1, padding="SAME") + b1)  # [batch, 28, 28, F]
    x = tf.nn.max_pool2d(x, ksize=pool, strides=pool, padding="VALID")          # [batch, 14, 14, F]
    x = tf.nn.relu(tf.nn.conv2d(x, w2, strides=1, padding="SAME") + b2)        # [batch, 14, 14, F]
    x = tf.nn.max_pool2d(x, ksize=pool, strides=pool, padding="VALID")          # [batch, 7, 7, F]
    x = tf.reshape(x, [-1, 7 * 7 * filters])                                    # [batch, 49 F]
    x = tf.nn.relu(tf.matmul(x, w3) + b3)                                       # [batch, 128]
    return tf.matmul(x, w4) + b4                                                # [batch, 10]


def cross_entropy(logits, labels):
    """Return the softmax cross-entropy of integer `labels`, averaged over the batch."""
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    )


Model = collections.namedtuple(
    "Model",
    [
        "graph",
        # Placeholder path: one batch fed from NumPy, used for evaluation and single steps.
        "images", "labels", "learning_rate", "loss", "num_correct", "train_op",
        # In-graph path: the training set lives in variables and batches are gathered in the
        # graph from a permutation that is assigned once per epoch.
        "data_initializer", "train_images_input", "train_labels_input",
        "permutation_input", "set_permutation", "first_step", "train_steps",
        "steps_per_run", "train_one_step", "init", "saver",
    ],
)


def build_model(filters, kernel_size, num_train, batch_size, steps_per_run, seed, device):
    """Build a fresh graph with both the placeholder and the in-graph training paths."""
    # On a CPU, one step's ops are too small to keep even two cores busy. So every training
    # step and every evaluation batch runs as two halves side by side, one per inter-op thread,
    # as the thread defaults in build_parser arrange. On 2 cores that trains 1.5-1.6x faster at
    # 8 and 16 filters, and 1.1x at 64, than whole batches with TensorFlow's own thread counts
    # (benchmarks/RESULTS.md). A GPU spreads every op over all of its cores already, and
    # smaller ops would only add kernel launches there.
    # NOTE: two halves were measured on a 2-core CPU only; more cores may want more parts.
    on_cpu = tf.DeviceSpec.from_string(device).device_type == "CPU"
    batch_shards = 2 if on_cpu else 1

    graph = tf.Graph()
    with graph.as_default(), tf.device(device):
        tf.compat.v1.set_random_seed(seed)

        images = tf.compat.v1.placeholder(tf.float32, [None, *IMAGE_SHAPE], name="images")
        labels = tf.compat.v1.placeholder(tf.int32, [None], name="labels")
        learning_rate = tf.compat.v1.placeholder(tf.float32, [], name="learning_rate")
        optimizer = tf.compat.v1.train.GradientDescentOptimizer(learning_rate)

        logits = inference(images, filters, kernel_size)
        loss = cross_entropy(logits, labels)
        train_op = optimizer.minimize(loss)

        def predict(part):
            return tf.argmax(inference(part, filters, kernel_size), axis=1, output_type=tf.int32)

        # Evaluation predicts the two halves of a batch on their own, so that on a CPU they run
        # side by side. oneDNN's convolution rejects an empty batch, so the second half starts
        # one image early (a one-image batch would leave it empty) and drops that prediction.
        if batch_shards == 1:
            predictions = tf.argmax(logits, axis=1, output_type=tf.int32)    # [batch]
        else:
            half = (tf.shape(images)[0] + 1) // 2
            predictions = tf.concat([predict(images[:half]), predict(images[half - 1:])[1:]], 0)
        num_correct = tf.reduce_sum(tf.cast(tf.equal(predictions, labels), tf.int32))

        # The training set is copied into the graph once per run, so a step moves no image data
        # through Python. These variables are not trainable and are not checkpointed.
        train_images_input = tf.compat.v1.placeholder(tf.float32, [num_train, *IMAGE_SHAPE])
        train_labels_input = tf.compat.v1.placeholder(tf.int32, [num_train])
        permutation_input = tf.compat.v1.placeholder(tf.int32, [num_train])
        local = dict(trainable=False, collections=[])
        train_images = tf.compat.v1.Variable(train_images_input, name="train_images", **local)
        train_labels = tf.compat.v1.Variable(train_labels_input, name="train_labels", **local)
        permutation = tf.compat.v1.Variable(
            tf.zeros([num_train], tf.int32), name="permutation", **local
        )
        data_initializer = tf.group(
            train_images.initializer, train_labels.initializer, permutation.initializer
        )
        set_permutation = permutation.assign(permutation_input, read_value=False)

        first_step = tf.compat.v1.placeholder(tf.int32, [], name="first_step")
        step_inputs = (train_images, train_labels, permutation, first_step, batch_size)
        train_steps = build_unrolled_steps(
            *step_inputs, steps_per_run, optimizer, filters, kernel_size, batch_shards
        )
        train_one_step = build_unrolled_steps(
            *step_inputs, 1, optimizer, filters, kernel_size, batch_shards
        )

        init = tf.compat.v1.global_variables_initializer()
        saver = tf.compat.v1.train.Saver(tf.compat.v1.trainable_variables(), max_to_keep=2)
    graph.finalize()
    return Model(
        graph, images, labels, learning_rate, loss, num_correct, train_op,
        data_initializer, train_images_input, train_labels_input, permutation_input,
        set_permutation, first_step, train_steps, steps_per_run, train_one_step, init, saver,
    )


def build_unrolled_steps(train_images, train_labels, permutation, first_step, batch_size,
                         steps, optimizer, filters, kernel_size, batch_shards=1):
    """Chain `steps` SGD steps on consecutive batches, and return their losses [steps].

    Step k trains on the images at permutation[(first_step + k) * batch_size :][:batch_size].
    Each step reads the weights only after the previous step has updated them, so the result
    equals `steps` separate session.run calls.

    With `batch_shards` > 1, each batch is split into that many parts of (nearly) equal size,
    whose forward and backward passes have no data in common, so TensorFlow runs them at the
    same time. The loss is still the mean over the whole batch, as the sum of the parts' means
    weighted by their share of the batch, and its gradient is the whole batch's gradient. Only
    the order of the float32 additions differs from an undivided batch.
    """
    batch_shards = min(batch_shards, batch_size)
    shard_sizes = [batch_size // batch_shards + (1 if i < batch_size % batch_shards else 0)
                   for i in range(batch_shards)]
    losses = []
    previous_update = []
    for k in range(steps):
        with tf.control_dependencies(previous_update):
            offset = (first_step + k) * batch_size
            indices = tf.slice(permutation, [offset], [batch_size])
            weighted_losses = []
            for shard_indices, shard_size in zip(tf.split(indices, shard_sizes), shard_sizes):
                logits = inference(tf.gather(train_images, shard_indices), filters, kernel_size)
                shard_loss = cross_entropy(logits, tf.gather(train_labels, shard_indices))
                weight = shard_size / batch_size
                weighted_losses.append(shard_loss * weight if batch_shards > 1 else shard_loss)
            loss = tf.add_n(weighted_losses)
            previous_update = [optimizer.minimize(loss)]
        losses.append(loss)
    with tf.control_dependencies(previous_update):
        return tf.identity(tf.stack(losses))


def count_trainable_parameters(graph):
    """Return the number of trainable scalars in `graph`, read from its variables' shapes."""
    with graph.as_default():
        variables = tf.compat.v1.trainable_variables()
    return int(sum(np.prod(v.shape.as_list()) for v in variables))


# ---------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------

def epoch_permutation(seed, epoch, num_train):
    """Return the shuffled order of the training images for one epoch (1-based).

    The order depends only on the seed and the epoch number, so a run resumed from a
    checkpoint after epoch E draws exactly the orders an uninterrupted run would have drawn.
    """
    return np.random.default_rng([seed, epoch]).permutation(num_train).astype(np.int32)


def train_epoch(session, model, permutation, batch_size, learning_rate):
    """Run one epoch of SGD over `permutation`; return (mean loss, seconds of the steps).

    The images that do not fill a last batch (num_train % batch_size of them) are left out of
    this epoch. The order changes every epoch, so every image is still used over the run.
    The epoch stops early at the first non-finite loss, which then becomes the mean.
    """
    num_steps = len(permutation) // batch_size
    feed = {model.learning_rate: learning_rate}
    losses = []
    start = time.perf_counter()
    session.run(model.set_permutation, {model.permutation_input: permutation})
    step = 0
    while step < num_steps:
        if num_steps - step >= model.steps_per_run:
            ops, count = model.train_steps, model.steps_per_run
        else:
            ops, count = model.train_one_step, 1
        feed[model.first_step] = step
        step_losses = session.run(ops, feed)
        losses.extend(step_losses.tolist())
        step += count
        if not np.all(np.isfinite(step_losses)):
            break
    seconds = time.perf_counter() - start
    return float(np.mean(losses)), seconds


def evaluate(session, model, images, labels, batch_size):
    """Return the accuracy on (images, labels), computed in batches of at most `batch_size`.

    Each batch contributes its number of correct predictions, so a shorter last batch is
    weighted by its size, and memory does not grow with the number of images.
    """
    correct = 0
    for start in range(0, len(images), batch_size):
        feed = {
            model.images: images[start:start + batch_size],
            model.labels: labels[start:start + batch_size],
        }
        correct += int(session.run(model.num_correct, feed))
    return correct / len(images)


def summarize_timing(epochs, batch_size, num_train, target_accuracy):
    """Return the timing summary of a run: warm-up epoch apart from the steady state."""
    seconds = [entry["seconds"] for entry in epochs if entry["seconds"] is not None]
    steady = seconds[1:]
    images_per_epoch = (num_train // batch_size) * batch_size
    # Images per second come from the steady state, or from epoch 1 in a one-epoch run.
    if steady:
        reference = statistics.median(steady)
    elif seconds:
        reference = seconds[0]
    else:
        reference = None
    elapsed = 0.0
    seconds_to_target = None
    for entry in epochs:
        elapsed += entry["seconds"] or 0.0
        accuracy = entry["val_accuracy"]
        if target_accuracy is not None and accuracy is not None and accuracy >= target_accuracy:
            seconds_to_target = elapsed
            break
    return {
        "warmup_epoch_seconds": seconds[0] if seconds else None,
        "steady_epoch_seconds_median": statistics.median(steady) if steady else None,
        "steady_epoch_seconds_min": min(steady) if steady else None,
        "steady_epoch_seconds_max": max(steady) if steady else None,
        "images_per_second": images_per_epoch / reference if reference else None,
        "target_accuracy": target_accuracy,
        "seconds_to_target": seconds_to_target,
    }


# ---------------------------------------------------------------------------------------------
# Device, precision and environment
# ---------------------------------------------------------------------------------------------

def select_device(device):
    """Return (TensorFlow device string, GPU name or None); raise if the device is missing."""
    gpus = tf.config.list_physical_devices("GPU")
    if device == "cpu":
        if gpus:
            try:
                # Hide the GPUs so that no op and no memory of this process lands on them.
                tf.config.set_visible_devices([], "GPU")
            except RuntimeError:
                pass  # The runtime is already initialised; explicit placement still holds.
        return "/cpu:0", None
    if not gpus:
        raise DeviceUnavailableError(
            "--device gpu was requested, but TensorFlow sees no GPU on this machine. "
            + GPU_INSTALL_HINT
        )
    details = tf.config.experimental.get_device_details(gpus[0])
    return "/gpu:0", details.get("device_name", gpus[0].name)


def cpu_flags():
    """Return the set of CPU feature flags from /proc/cpuinfo, empty where it is missing."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model():
    """Return the CPU model name, or platform.processor() where /proc/cpuinfo is missing."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def session_config(device, precision, intra_op_threads, inter_op_threads):
    """Return the ConfigProto for a run: thread pools and the mixed-precision graph rewrite."""
    from tensorflow.core.protobuf import rewriter_config_pb2

    config = tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=intra_op_threads,
        inter_op_parallelism_threads=inter_op_threads,
        # Ops without a GPU kernel (none in this graph as of TF 2.21) may fall back to the CPU.
        allow_soft_placement=device.startswith("/gpu"),
    )
    if precision == "bf16":
        rewrite = config.graph_options.rewrite_options
        if device.startswith("/gpu"):
            # NOTE: on a GPU the rewrite computes in float16, and it has not been run on one here.
            rewrite.auto_mixed_precision = rewriter_config_pb2.RewriterConfig.ON
        else:
            if not cpu_flags() & {"avx512_bf16", "amx_bf16"}:
                raise DeviceUnavailableError(
                    "--precision bf16 needs a CPU with AVX512_BF16 or AMX instructions, and "
                    f"this one ({cpu_model()}) has neither. Use --precision fp32."
                )
            rewrite.auto_mixed_precision_onednn_bfloat16 = rewriter_config_pb2.RewriterConfig.ON
    return config


def git_commit():
    """Return the git commit of this code, with "-dirty" if it has local changes, or None."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_DIR, capture_output=True, text=True, timeout=10,
        )
        return commit.stdout.strip() + ("-dirty" if status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def describe_environment(gpu_name):
    """Return the software and hardware facts stored with every run."""
    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu_name": gpu_name,
        "git_commit": git_commit(),
        "hostname": platform.node(),
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

CHECKPOINT_STATE = "state.json"
# Settings that may differ between the interrupted and the resumed invocation.
RESUMABLE_CHANGES = {"epochs", "output", "checkpoint_dir", "checkpoint_every", "keep_checkpoints",
                     "data_dir", "tensorboard_dir"}


def save_checkpoint(session, model, checkpoint_dir, log):
    """Save the weights and the log so far; the epoch count is the whole shuffling state."""
    epoch = len(log["epochs"])
    os.makedirs(checkpoint_dir, exist_ok=True)
    prefix = model.saver.save(
        session, os.path.join(checkpoint_dir, "model"), global_step=epoch, write_meta_graph=False
    )
    # The state file is written after the weights, so it never names a checkpoint that is not
    # complete on disk. The saver keeps the previous checkpoint too.
    state = {"checkpoint": os.path.basename(prefix), "epoch": epoch, "log": log}
    run_log.write_json_atomic(os.path.join(checkpoint_dir, CHECKPOINT_STATE), state)


def restore_checkpoint(session, model, checkpoint_dir, config):
    """Restore weights from `checkpoint_dir` and return the log so far, or None to start anew."""
    state_path = os.path.join(checkpoint_dir, CHECKPOINT_STATE)
    if not os.path.exists(state_path):
        return None
    try:
        with open(state_path, encoding="utf-8") as state_file:
            state = json.load(state_file)
        saved = {k: v for k, v in state["log"]["config"].items() if k not in RESUMABLE_CHANGES}
        wanted = {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES}
        if saved != wanted:
            changed = sorted(k for k in wanted if saved.get(k) != wanted[k])
            print(f"warning: ignoring checkpoint in {checkpoint_dir}: settings differ ({changed})",
                  file=sys.stderr)
            return None
        model.saver.restore(session, os.path.join(checkpoint_dir, state["checkpoint"]))
    except (OSError, ValueError, KeyError, TypeError, tf.errors.OpError) as error:
        print(f"warning: ignoring unreadable checkpoint in {checkpoint_dir}: {error}",
              file=sys.stderr)
        return None
    print(f"resumed: from epoch {state['epoch']} in {checkpoint_dir}", flush=True)
    return state["log"]


def remove_checkpoints(checkpoint_dir):
    """Delete the checkpoint files this module wrote; leave anything else in the folder."""
    if not os.path.isdir(checkpoint_dir):
        return
    for name in os.listdir(checkpoint_dir):
        if name.startswith(("model-", "checkpoint", CHECKPOINT_STATE, "." + CHECKPOINT_STATE)):
            os.unlink(os.path.join(checkpoint_dir, name))
    try:
        os.rmdir(checkpoint_dir)
    except OSError:
        pass  # Not empty: it contains files this module did not write.


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------

def run(config, data=None, output=None, verbose=True):
    """Train and evaluate one network with the settings in `config`, and return its run log.

    `config` is the dictionary of command-line settings (see build_parser). `data` is an
    mnist_data.MnistSplits; by default it is loaded from config["data_dir"]. With `output`,
    the log is written there at the start, after every epoch and at the end.
    """
    run_start = time.perf_counter()
    log = run_log.new_log(config)
    tf_device, gpu_name = select_device(config["device"])
    session_settings = session_config(
        tf_device, config["precision"], config["intra_op_threads"], config["inter_op_threads"]
    )
    log["device"] = {
        "requested": config["device"],
        "tf_device": tf_device,
        "gpu_name": gpu_name,
        "visible_gpus": [d.name for d in tf.config.get_visible_devices("GPU")],
    }
    log["environment"] = describe_environment(gpu_name)

    def save_log():
        if output:
            run_log.write_log(output, log)

    try:
        # Data: the report's split, with only the first train_size training images.
        start = time.perf_counter()
        if data is None:
            data = mnist_data.load_mnist(config["data_dir"], train_size=config["train_size"])
        elif config["train_size"] is not None:
            data = data._replace(
                train_images=data.train_images[:config["train_size"]],
                train_labels=data.train_labels[:config["train_size"]],
            )
        num_train = len(data.train_images)
        log["data_seconds"] = time.perf_counter() - start

        # Graph: a fresh one per run, so nothing piles up between runs in one process.
        start = time.perf_counter()
        steps_per_run = max(1, min(config["steps_per_run"], num_train // config["batch_size"]))
        model = build_model(
            config["filters"], config["kernel_size"], num_train, config["batch_size"],
            steps_per_run, config["seed"], tf_device,
        )
        log["num_params"] = count_trainable_parameters(model.graph)
        session = tf.compat.v1.Session(graph=model.graph, config=session_settings)
        session.run(model.init)
        session.run(model.data_initializer, {
            model.train_images_input: data.train_images,
            model.train_labels_input: data.train_labels,
        })
        log["graph_build_seconds"] = time.perf_counter() - start
        log["timing"]["intra_op_threads"] = config["intra_op_threads"]
        log["timing"]["inter_op_threads"] = config["inter_op_threads"]

        checkpoint_dir = config["checkpoint_dir"]
        if checkpoint_dir:
            resumed = restore_checkpoint(session, model, checkpoint_dir, config)
            if resumed is not None:
                for key in ("epochs", "train_seconds", "eval_seconds"):
                    log[key] = resumed[key]
                log["resumed_from_epoch"] = len(log["epochs"])
        log["train_seconds"] = log["train_seconds"] or 0.0
        log["eval_seconds"] = log["eval_seconds"] or 0.0
        save_log()

        writer = None
        if config["tensorboard_dir"]:
            writer = tf.compat.v1.summary.FileWriter(config["tensorboard_dir"])
        with session:
            train_loop(session, model, data, config, log, save_log, writer)
            if writer:
                writer.close()
            if log["status"] == "running":
                # The test set is used once, after the last epoch.
                start = time.perf_counter()
                log["test_accuracy"] = evaluate(
                    session, model, data.test_images, data.test_labels, config["eval_batch_size"]
                )
                log["eval_seconds"] += time.perf_counter() - start
                log["status"] = "completed"
    except BaseException as error:
        log["status"] = "failed"
        log["error"] = "interrupted" if isinstance(error, KeyboardInterrupt) else repr(error)
        log["total_seconds"] = time.perf_counter() - run_start
        save_log()
        raise

    log["timing"].update(summarize_timing(
        log["epochs"], config["batch_size"], num_train, config["target_accuracy"]
    ))
    log["total_seconds"] = time.perf_counter() - run_start
    save_log()
    if checkpoint_dir and not config["keep_checkpoints"]:
        remove_checkpoints(checkpoint_dir)
    if verbose:
        print_summary(log)
    return log


def train_loop(session, model, data, config, log, save_log, writer=None):
    """Train from the epoch after the last one in `log` to config["epochs"].

    With a TensorBoard `writer`, the epoch's training loss and validation accuracy are
    written as scalars with the epoch as step.
    """
    for epoch in range(len(log["epochs"]) + 1, config["epochs"] + 1):
        permutation = epoch_permutation(config["seed"], epoch, len(data.train_images))
        loss, seconds = train_epoch(
            session, model, permutation, config["batch_size"], config["learning_rate"]
        )
        log["train_seconds"] += seconds

        if not math.isfinite(loss):
            log["epochs"].append(
                {"epoch": epoch, "train_loss": None, "val_accuracy": None, "seconds": seconds}
            )
            log["status"] = "diverged"
            log["diverged_at_epoch"] = epoch
            if writer:
                # TensorBoard plots the non-finite loss, so the divergence shows there too.
                writer.add_summary(tf.compat.v1.Summary(value=[
                    tf.compat.v1.Summary.Value(tag="train_loss", simple_value=loss),
                ]), epoch)
                writer.flush()
            print(f"diverged: epoch {epoch} train_loss {loss}; stopping this run", flush=True)
            return

        start = time.perf_counter()
        accuracy = evaluate(
            session, model, data.validation_images, data.validation_labels,
            config["eval_batch_size"],
        )
        log["eval_seconds"] += time.perf_counter() - start
        log["epochs"].append(
            {"epoch": epoch, "train_loss": loss, "val_accuracy": accuracy, "seconds": seconds}
        )
        if writer:
            writer.add_summary(tf.compat.v1.Summary(value=[
                tf.compat.v1.Summary.Value(tag="train_loss", simple_value=loss),
                tf.compat.v1.Summary.Value(tag="val_accuracy", simple_value=accuracy),
            ]), epoch)
            writer.flush()
        print(f"epoch: {epoch} train_loss: {loss:.6f} val_accuracy: {accuracy:.4f} "
              f"epoch_seconds: {seconds:.3f}", flush=True)

        every = config["checkpoint_every"]
        if config["checkpoint_dir"] and every and epoch % every == 0 and epoch < config["epochs"]:
            save_checkpoint(session, model, config["checkpoint_dir"], log)
        save_log()


def print_summary(log):
    """Print the run's result as key: value lines."""
    print(f"status: {log['status']}")
    if log["test_accuracy"] is not None:
        print(f"test_accuracy: {log['test_accuracy']:.4f}")
    print(f"num_params: {log['num_params']}")
    print(f"train_seconds: {log['train_seconds']:.2f}")
    print(f"total_seconds: {log['total_seconds']:.2f}", flush=True)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def build_parser():
    """Return the argument parser; every sweep passes the same flag names through."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--learning-rate", type=positive_float, default=0.1,
                        help="SGD step size (no momentum)")
    parser.add_argument("--filters", type=bounded_int(1, 4096), default=16,
                        help="number of filters in each of the two conv layers")
    parser.add_argument("--kernel-size", type=bounded_int(1, 28), default=3,
                        help="height and width of the conv kernels, in pixels")
    parser.add_argument("--epochs", type=bounded_int(1, 1_000_000), default=10,
                        help="passes over the training images (the report trained 2000)")
    parser.add_argument("--batch-size", type=bounded_int(1, mnist_data.TRAIN_SIZE), default=100,
                        help="images per SGD step; a last partial batch of each epoch is skipped")
    parser.add_argument("--seed", type=bounded_int(0, 2**31 - 1), default=0,
                        help="seed of the weight initialisation and the per-epoch shuffling")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="where the graph runs: /cpu:0 or /gpu:0 (never a silent fallback)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="float32, or bfloat16 mixed precision through the oneDNN graph "
                             "rewrite on CPUs with AVX512_BF16/AMX (float16 on a GPU)")
    parser.add_argument("--train-size", type=bounded_int(1, mnist_data.TRAIN_SIZE), default=None,
                        help="use only the first N of the 50,000 training images "
                             "(default: all)")
    parser.add_argument("--data-dir", default=None,
                        help="folder with the MNIST IDX files (default: $MNIST_DATA_DIR, "
                             "else data/mnist/ in the repository; missing files are downloaded)")
    parser.add_argument("--output", default=os.path.join("results", "run.json"),
                        help="path of the JSON run log")
    parser.add_argument("--experiment", default="single",
                        help="label stored in the log, used by plot_results.py to group runs")
    parser.add_argument("--eval-batch-size", type=bounded_int(1, 100_000), default=250,
                        help="images per evaluation batch (bounds evaluation memory)")
    parser.add_argument("--steps-per-run", type=bounded_int(1, 1000), default=10,
                        help="SGD steps chained in one session.run call")
    # Two ops at a time, each on half of the cores, because on a CPU build_model splits every
    # batch in two independent halves. On 2 cores this trains 1.3x faster than TensorFlow's
    # own thread counts (benchmarks/RESULTS.md).
    # NOTE: GPU runs get the same thread counts, which were not measured on a GPU.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser.add_argument("--intra-op-threads", type=bounded_int(0, 1024),
                        default=max(1, (cores or 2) // 2),
                        help="TensorFlow threads inside one op (0: TensorFlow decides)")
    parser.add_argument("--inter-op-threads", type=bounded_int(0, 1024), default=2,
                        help="TensorFlow ops run at the same time (0: TensorFlow decides)")
    parser.add_argument("--target-accuracy", type=accuracy_fraction, default=0.99,
                        help="validation accuracy whose first training time is logged, "
                             "as a fraction")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="folder for checkpoints; a rerun with the same settings resumes "
                             "from the last one (default: no checkpoints)")
    parser.add_argument("--checkpoint-every", type=bounded_int(1, 1_000_000), default=10,
                        help="epochs between checkpoints, with --checkpoint-dir")
    parser.add_argument("--tensorboard-dir", default=None,
                        help="write per-epoch TensorBoard scalars to this folder (default: off)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep the checkpoints after the run completes")
    return parser


def parse_config(argv=None):
    """Parse and cross-check the command line, and return the run's settings as a dict."""
    parser = build_parser()
    args = parser.parse_args(argv)
    train_size = args.train_size or mnist_data.TRAIN_SIZE
    if args.batch_size > train_size:
        parser.error(f"argument --batch-size: {args.batch_size} is larger than the training set "
                     f"({train_size} images); lower --batch-size or raise --train-size")
    return vars(args)


def find_output_problem(output):
    """Return why the run log cannot be written to `output`, or None when it can."""
    folder = os.path.dirname(os.path.abspath(output))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        return (f"cannot write the run log {output!r} in {folder!r} ({error.strerror}). "
                "Choose another --output or fix the folder's permissions.")
    return None


def main(argv=None):
    """Run one training from the command line; return the process exit status."""
    config = parse_config(argv)
    # mnist_data reports downloads through logging.
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    problem = find_output_problem(config["output"])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        log = run(config, output=config["output"])
    except DeviceUnavailableError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_DEVICE_UNAVAILABLE
    except mnist_data.MnistDataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = ("resume from the last checkpoint" if config["checkpoint_dir"]
                 else "train it again")
        print(f"interrupted: the run stopped before it finished. Run the same command again "
              f"to {again}.", file=sys.stderr)
        return 130
    print(f"log: {config['output']}")
    # A diverged run is a result, not an error: exit 0 so that a sweep carries on.
    return 0 if log["status"] in run_log.FINAL_STATUSES else 1


if __name__ == "__main__":
    sys.exit(main())
