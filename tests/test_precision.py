"""Tests for --precision bf16: the graph rewrite it turns on, and its error on an unsuitable CPU.

The CPU's feature flags are replaced through cnn_mnist.cpu_flags, so every case runs on any
machine and builds no graph.
"""

import pytest
from tensorflow.core.protobuf import rewriter_config_pb2

import cnn_mnist

ON = rewriter_config_pb2.RewriterConfig.ON


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    """Pretend the CPU has AVX-512 but neither AVX512_BF16 nor AMX."""
    monkeypatch.setattr(cnn_mnist, "cpu_flags", lambda: {"avx2", "avx512f", "fma"})


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_bf16_rewrite_on_capable_cpu(monkeypatch, flag):
    monkeypatch.setattr(cnn_mnist, "cpu_flags", lambda: {"avx2", flag})
    config = cnn_mnist.session_config("/cpu:0", "bf16", 0, 0)
    rewrite = config.graph_options.rewrite_options
    assert rewrite.auto_mixed_precision_onednn_bfloat16 == ON
    assert rewrite.auto_mixed_precision != ON


def test_bf16_on_unsupported_cpu_raises(cpu_without_bf16):
    with pytest.raises(cnn_mnist.DeviceUnavailableError) as raised:
        cnn_mnist.session_config("/cpu:0", "bf16", 0, 0)
    message = str(raised.value)
    assert "AVX512_BF16 or AMX" in message
    assert "--precision fp32" in message


def test_fp32_ignores_cpu_flags(cpu_without_bf16):
    rewrite = cnn_mnist.session_config("/cpu:0", "fp32", 0, 0).graph_options.rewrite_options
    assert rewrite.auto_mixed_precision_onednn_bfloat16 != ON
    assert rewrite.auto_mixed_precision != ON


def test_bf16_on_gpu_uses_float16_rewrite(cpu_without_bf16):
    # On a GPU the CPU's flags do not matter, and the rewrite there computes in float16.
    rewrite = cnn_mnist.session_config("/gpu:0", "bf16", 0, 0).graph_options.rewrite_options
    assert rewrite.auto_mixed_precision == ON
    assert rewrite.auto_mixed_precision_onednn_bfloat16 != ON


def test_main_exits_with_device_status(cpu_without_bf16, tmp_path, capsys):
    output = tmp_path / "run.json"
    status = cnn_mnist.main(["--precision", "bf16", "--device", "cpu", "--epochs", "1",
                             "--output", str(output)])
    assert status == cnn_mnist.EXIT_DEVICE_UNAVAILABLE
    error = capsys.readouterr().err
    assert error.startswith("error: --precision bf16 needs a CPU with AVX512_BF16 or AMX")
    assert not output.exists()
