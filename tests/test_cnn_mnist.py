"""Tests for cnn_mnist: the graph's facts, one SGD step, the flags and whole runs on real MNIST."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import cnn_mnist
import run_log
from conftest import REPO_DIR

# Trainable parameters of the 3x3 network, as the lab report lists them.
REPORT_PARAMETERS = {8: 52_258, 16: 104_250, 32: 211_690, 64: 440_394, 128: 953_098,
                     256: 2_199_690}


def build(filters=16, kernel_size=3, num_train=200, batch_size=100, steps_per_run=1, seed=0):
    return cnn_mnist.build_model(filters, kernel_size, num_train, batch_size, steps_per_run, seed,
                                 "/cpu:0")


def config(tmp_path, *flags):
    return cnn_mnist.parse_config([*flags, "--output", str(tmp_path / "run.json")])


@pytest.mark.parametrize("filters", sorted(REPORT_PARAMETERS))
def test_parameter_count_matches_report(filters):
    model = build(filters)
    assert cnn_mnist.count_trainable_parameters(model.graph) == REPORT_PARAMETERS[filters]


def test_parameter_count_5x5_kernels():
    filters = 16
    conv1 = 5 * 5 * 1 * filters + filters          # 416
    conv2 = 5 * 5 * filters * filters + filters    # 6,416
    dense = 7 * 7 * filters * 128 + 128            # 100,480
    logits = 128 * 10 + 10                          # 1,290
    model = build(filters, kernel_size=5)
    assert cnn_mnist.count_trainable_parameters(model.graph) == conv1 + conv2 + dense + logits
    assert conv1 + conv2 + dense + logits == 108_602


def test_runs_do_not_share_variables():
    first = build(8)
    second = build(8)
    assert first.graph is not second.graph
    assert cnn_mnist.count_trainable_parameters(second.graph) == REPORT_PARAMETERS[8]


def test_sgd_step_lowers_loss(mnist):
    model = build()
    images, labels = mnist.train_images[:100], mnist.train_labels[:100]
    feed = {model.images: images, model.labels: labels, model.learning_rate: 0.1}
    with tf.compat.v1.Session(graph=model.graph) as session:
        session.run(model.init)
        before = session.run(model.loss, feed)
        session.run(model.train_op, feed)
        after = session.run(model.loss, feed)
    assert after < before


def test_unrolled_steps_equal_single_steps(mnist):
    """Five steps chained in one session.run give the weights of five separate calls."""
    images, labels = mnist.train_images[:500], mnist.train_labels[:500]
    permutation = cnn_mnist.epoch_permutation(3, 1, 500)
    weights = []
    for steps_per_run in (1, 5):
        model = build(num_train=500, steps_per_run=steps_per_run)
        with tf.compat.v1.Session(graph=model.graph) as session:
            session.run(model.init)
            session.run(model.data_initializer, {model.train_images_input: images,
                                                 model.train_labels_input: labels})
            cnn_mnist.train_epoch(session, model, permutation, 100, 0.1)
            with model.graph.as_default():
                weights.append(session.run(tf.compat.v1.trainable_variables()))
    for single, unrolled in zip(*weights):
        np.testing.assert_allclose(single, unrolled, rtol=1e-4, atol=1e-6)


def test_epoch_permutation_depends_on_seed_and_epoch():
    first = cnn_mnist.epoch_permutation(0, 1, 1000)
    assert sorted(first.tolist()) == list(range(1000))
    assert np.array_equal(first, cnn_mnist.epoch_permutation(0, 1, 1000))
    assert not np.array_equal(first, cnn_mnist.epoch_permutation(0, 2, 1000))
    assert not np.array_equal(first, cnn_mnist.epoch_permutation(1, 1, 1000))


def test_evaluate_weights_short_last_batch(mnist):
    """Accuracy in batches of 300 over 1,000 images equals the accuracy in one batch."""
    model = build()
    images, labels = mnist.validation_images[:1000], mnist.validation_labels[:1000]
    with tf.compat.v1.Session(graph=model.graph) as session:
        session.run(model.init)
        whole = cnn_mnist.evaluate(session, model, images, labels, 1000)
        batched = cnn_mnist.evaluate(session, model, images, labels, 300)
    assert batched == pytest.approx(whole, abs=1e-12)


@pytest.mark.parametrize("flags, flag_name", [
    (["--learning-rate", "0"], "--learning-rate"),
    (["--learning-rate", "-0.1"], "--learning-rate"),
    (["--learning-rate", "nan"], "--learning-rate"),
    (["--filters", "0"], "--filters"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "60000"], "--batch-size"),
    (["--batch-size", "3000", "--train-size", "2000"], "--batch-size"),
    (["--train-size", "50001"], "--train-size"),
    (["--device", "tpu"], "--device"),
    (["--target-accuracy", "1.5"], "--target-accuracy"),
])
def test_parser_rejects_invalid_values(flags, flag_name, capsys):
    with pytest.raises(SystemExit) as raised:
        cnn_mnist.parse_config(flags)
    assert raised.value.code == 2
    assert flag_name in capsys.readouterr().err


def test_run_end_to_end_on_mnist(mnist_dir, tmp_path, capsys):
    output = tmp_path / "logs" / "run.json"
    status = cnn_mnist.main(["--epochs", "2", "--train-size", "5000", "--learning-rate", "0.1",
                             "--data-dir", str(mnist_dir), "--output", str(output)])
    assert status == 0

    # Strict JSON: no NaN or Infinity tokens anywhere.
    log = json.loads(output.read_text(), parse_constant=lambda name: pytest.fail(name))
    assert run_log.find_shape_problem(log) is None
    assert log["status"] == "completed"
    assert log["num_params"] == REPORT_PARAMETERS[16]
    assert [entry["epoch"] for entry in log["epochs"]] == [1, 2]
    assert log["epochs"][-1]["val_accuracy"] > 0.85
    assert log["test_accuracy"] > 0.85
    for key in ("learning_rate", "filters", "kernel_size", "epochs", "batch_size", "seed",
                "device", "train_size", "data_dir", "output", "precision"):
        assert key in log["config"], key
    for key in ("graph_build_seconds", "train_seconds", "eval_seconds", "total_seconds"):
        assert log[key] > 0, key
    assert log["train_seconds"] == pytest.approx(sum(e["seconds"] for e in log["epochs"]))
    for key in ("python", "tensorflow", "numpy", "cpu_model", "gpu_name", "git_commit",
                "started_utc"):
        assert key in log["environment"], key
    assert log["device"]["tf_device"] == "/cpu:0"
    assert log["timing"]["warmup_epoch_seconds"] == log["epochs"][0]["seconds"]

    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch: ")]
    assert len(lines) == 2
    assert lines[0].split()[::2] == ["epoch:", "train_loss:", "val_accuracy:", "epoch_seconds:"]
    assert not list(output.parent.glob("*.tmp"))


def test_diverging_run_is_recorded(mnist, tmp_path):
    # At learning rate 1e38 the first update pushes weights past the float32 range, and an
    # infinite weight times a zero pixel is NaN. Smaller rates (up to 1e30 tried) only kill the
    # ReLUs, and the stable cross-entropy then stays finite.
    settings = config(tmp_path, "--learning-rate", "1e38", "--epochs", "3", "--train-size", "1000")
    log = cnn_mnist.run(settings, data=mnist, output=settings["output"])
    assert log["status"] == "diverged"
    assert log["diverged_at_epoch"] == 1
    assert log["test_accuracy"] is None
    saved = run_log.read_log(settings["output"])
    assert saved["status"] == "diverged"
    assert saved["epochs"][0]["train_loss"] is None


def test_diverged_run_exits_zero(mnist_dir, tmp_path):
    output = tmp_path / "run.json"
    status = cnn_mnist.main(["--learning-rate", "1e38", "--epochs", "1", "--train-size", "500",
                             "--data-dir", str(mnist_dir), "--output", str(output)])
    assert status == 0
    assert run_log.read_log(output)["status"] == "diverged"


def test_checkpoint_resume_matches_uninterrupted_run(mnist, tmp_path):
    common = ["--epochs", "3", "--train-size", "1000", "--learning-rate", "0.05"]
    whole = cnn_mnist.run(config(tmp_path / "whole", *common), data=mnist, verbose=False)

    checkpoints = str(tmp_path / "checkpoints")
    first = config(tmp_path / "part", "--epochs", "2", "--train-size", "1000", "--learning-rate",
                   "0.05", "--checkpoint-dir", checkpoints, "--checkpoint-every", "1",
                   "--keep-checkpoints")
    # With --epochs 2 the last checkpoint is taken after epoch 1, so the resumed run redoes
    # epoch 2 and continues to epoch 3.
    cnn_mnist.run(first, data=mnist, verbose=False)
    resumed = cnn_mnist.run(
        config(tmp_path / "part", *common, "--checkpoint-dir", checkpoints), data=mnist,
        verbose=False,
    )
    assert resumed["resumed_from_epoch"] == 1
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2, 3]
    for a, b in zip(whole["epochs"], resumed["epochs"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["val_accuracy"] == pytest.approx(a["val_accuracy"], abs=1e-4)
    assert resumed["test_accuracy"] == pytest.approx(whole["test_accuracy"], abs=1e-4)
    assert not os.path.exists(checkpoints)


def test_gpu_request_without_gpu_fails(mnist_dir, tmp_path):
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    output = tmp_path / "run.json"
    result = subprocess.run(
        [sys.executable, str(REPO_DIR / "cnn_mnist.py"), "--device", "gpu", "--epochs", "1",
         "--data-dir", str(mnist_dir), "--output", str(output)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == cnn_mnist.EXIT_DEVICE_UNAVAILABLE
    assert "TensorFlow sees no GPU" in result.stderr
    assert 'pip install "tensorflow[and-cuda]"' in result.stderr
    assert not output.exists()
    assert "epoch:" not in result.stdout
