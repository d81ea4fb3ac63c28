"""Tests for the benchmark: its FLOP counts, spec parsing and report file, and that the loops it
compares compute the same SGD step."""

import numpy as np
import pytest

import benchmark_training as bench


@pytest.mark.parametrize("filters, flops", [(8, 1_211_904), (16, 3_770_880), (64, 47_574_528)])
def test_training_flops_per_image(filters, flops):
    assert bench.training_flops_per_image(filters) == flops


def test_forward_flops_of_16_filters():
    layers = bench.forward_flops_per_image(16)
    assert layers == {"conv1": 225_792, "conv2": 903_168, "dense1": 200_704, "logits": 2_560}


def test_parse_spec_splits_options_and_environment():
    base, options, environment = bench.parse_spec(
        "project,steps-per-run=50,TF_ENABLE_ONEDNN_OPTS=0")
    assert base == "project"
    assert options == {"steps-per-run": 50}
    assert environment == {"TF_ENABLE_ONEDNN_OPTS": "0"}


@pytest.mark.parametrize("spec, message", [
    ("jax", "unknown base 'jax'"),
    ("keras,steps-per-run=5", "keras has no option 'steps-per-run'"),
    ("project,steps-per-run", "is not KEY=VALUE"),
    ("project,steps-per-run=many", "steps-per-run='many' is invalid"),
])
def test_parse_spec_rejects_invalid_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        bench.parse_spec(spec)


def test_roles_of_default_implementations():
    roles = [bench.role(spec) for spec in bench.DEFAULT_IMPLEMENTATIONS]
    assert roles == ["project", "baseline", "peer", "peer", "peer"]
    assert bench.role("project,steps-per-run=1") == "variant"


def test_ratios_compare_with_baseline_and_fastest_peer():
    rows = {
        "project": {"status": "ok", "median": 2.0},
        "feed-dict": {"status": "ok", "median": 2.5},
        "keras": {"status": "ok", "median": 4.0},
        "pytorch": {"status": "ok", "median": 3.0},
        "keras,steps-per-execution=50": {"status": "skipped", "message": ""},
    }
    bench.add_ratios(rows)
    assert rows["project"]["vs_baseline"] == pytest.approx(1.25)
    assert rows["project"]["vs_fastest_peer"] == pytest.approx(1.5)
    assert rows["keras"]["vs_fastest_peer"] == pytest.approx(0.75)


def test_report_keeps_text_around_markers(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(f"# Title\n\nintro\n\n{bench.REPORT_BEGIN}\nold\n{bench.REPORT_END}\n\n"
                    "## Notes\nkept\n")
    bench.write_report(str(path), f"{bench.REPORT_BEGIN}\nnew\n{bench.REPORT_END}\n")
    text = path.read_text()
    assert text.startswith("# Title\n\nintro\n\n")
    assert "new" in text
    assert "old" not in text
    assert text.endswith("## Notes\nkept\n")


def test_report_creates_missing_file(tmp_path):
    path = tmp_path / "out" / "RESULTS.md"
    bench.write_report(str(path), f"{bench.REPORT_BEGIN}\nnew\n{bench.REPORT_END}\n")
    assert path.read_text().startswith("# Training-loop benchmark\n")


def test_project_step_equals_feed_dict_step():
    """The in-graph step (batch split in halves on a CPU) gives the feed_dict step's weights."""
    import tensorflow as tf
    import cnn_mnist

    rng = np.random.default_rng(0)
    images = rng.random((300, 28, 28, 1), dtype=np.float32)
    labels = rng.integers(0, 10, 300).astype(np.int32)
    permutation = cnn_mnist.epoch_permutation(0, 1, 300)
    batch = permutation[:100]

    weights = []
    for path in ("in-graph", "feed_dict"):
        model = cnn_mnist.build_model(8, 3, 300, 100, 1, 0, "/cpu:0")
        with tf.compat.v1.Session(graph=model.graph) as session:
            session.run(model.init)
            if path == "in-graph":
                session.run(model.data_initializer, {model.train_images_input: images,
                                                     model.train_labels_input: labels})
                session.run(model.set_permutation, {model.permutation_input: permutation})
                session.run(model.train_one_step, {model.first_step: 0,
                                                   model.learning_rate: 0.1})
            else:
                session.run(model.train_op, {model.images: images[batch],
                                             model.labels: labels[batch],
                                             model.learning_rate: 0.1})
            with model.graph.as_default():
                weights.append(session.run(tf.compat.v1.trainable_variables()))
    for in_graph, fed in zip(*weights):
        np.testing.assert_allclose(in_graph, fed, rtol=1e-5, atol=1e-6)


def test_evaluate_counts_batches_smaller_than_parts():
    """On a CPU, evaluation predicts each batch in two halves. Odd and one-image batches count
    every image once."""
    import tensorflow as tf
    import cnn_mnist

    rng = np.random.default_rng(1)
    images = rng.random((7, 28, 28, 1), dtype=np.float32)
    labels = rng.integers(0, 10, 7).astype(np.int32)
    model = cnn_mnist.build_model(8, 3, 100, 100, 1, 0, "/cpu:0")
    with tf.compat.v1.Session(graph=model.graph) as session:
        session.run(model.init)
        whole = cnn_mnist.evaluate(session, model, images, labels, 7)
        single = cnn_mnist.evaluate(session, model, images, labels, 1)
        uneven = cnn_mnist.evaluate(session, model, images, labels, 3)
    assert single == pytest.approx(whole, abs=1e-12)
    assert uneven == pytest.approx(whole, abs=1e-12)


def test_pytorch_skipped_when_not_installed(monkeypatch):
    real_find_spec = bench.importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec",
                        lambda name: None if name == "torch" else real_find_spec(name))
    with pytest.raises(bench.Skipped, match="PyTorch is not installed"):
        bench.train_pytorch({"device": "cpu"}, {})


def test_skipped_row_in_report_table():
    table = bench.results_table({"pytorch": {"status": "skipped",
                                             "message": "PyTorch is not installed"}})
    assert "| `pytorch` | skipped: PyTorch is not installed |" in table
