"""AutoAWQ GEMM checkpoints: the tiny ``awq=True`` kit checkpoint and reading it back.

The float checkpoint of the same seed is the reference: its thinker decoder linears, RTN
quantized (group 32, scales stored as float16), must come back bit for bit, and AutoAWQ's own
``dequantize_gemm`` (transcribed in test_quant_packing.py) must agree with the dequantized
weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_quant_packing import autoawq_dequantize_gemm

from omni_export.checkpoint.reader import Checkpoint
from omni_export.quant import rtn
from omni_export.checkpoint.autoawq import AutoAwqError, detect_autoawq, is_autoawq_linear, read_autoawq_linear
from omni_export.testkit.tiny_model import write_tiny_checkpoint

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PREFIXES = [f"thinker.model.layers.{i}.{name}" for i in range(2) for name in LINEARS]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("awq-kit")
    return write_tiny_checkpoint(base / "float", seed=0), write_tiny_checkpoint(base / "awq", seed=0, awq=True)


def tensors(path):
    with safe_open(path / "model.safetensors", "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_config(ckpts):
    float_dir, awq_dir = ckpts
    raw = json.loads((awq_dir / "config.json").read_text())
    assert raw["quantization_config"] == {
        "bits": 4, "group_size": 32, "modules_to_not_convert": ["visual"],
        "quant_method": "awq", "version": "gemm", "zero_point": True,
    }
    rest = {k: v for k, v in raw.items() if k != "quantization_config"}
    assert rest == json.loads((float_dir / "config.json").read_text())
    assert detect_autoawq(raw) == {
        "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 32, "zero_point": True,
        "modules_to_not_convert": ["visual"],
    }
    assert detect_autoawq(rest) is None


def test_tensor_layout(ckpts):
    float_dir, awq_dir = ckpts
    fl, aw = tensors(float_dir), tensors(awq_dir)
    weights = {f"{p}.weight" for p in PREFIXES}
    assert weights <= set(fl)
    expected = (set(fl) - weights) | {f"{p}.{part}" for p in PREFIXES for part in ("qweight", "qzeros", "scales")}
    assert set(aw) == expected
    for p in PREFIXES:
        n, k = fl[f"{p}.weight"].shape
        assert aw[f"{p}.qweight"].dtype == torch.int32 and aw[f"{p}.qweight"].shape == (k, n // 8)
        assert aw[f"{p}.qzeros"].dtype == torch.int32 and aw[f"{p}.qzeros"].shape == (k // 32, n // 8)
        assert aw[f"{p}.scales"].dtype == torch.float16 and aw[f"{p}.scales"].shape == (k // 32, n)
        if f"{p}.bias" in fl:  # q, k, v: float16 bias as in WQLinear_GEMM
            assert aw[f"{p}.bias"].dtype == torch.float16
            assert torch.equal(aw[f"{p}.bias"], fl[f"{p}.bias"].half())
    for name in set(aw) & set(fl) - {f"{p}.bias" for p in PREFIXES}:
        assert aw[name].dtype == fl[name].dtype and torch.equal(aw[name], fl[name]), name


def test_read_back_is_the_packed_quant_weight(ckpts):
    float_dir, awq_dir = ckpts
    fl, aw = tensors(float_dir), tensors(awq_dir)
    ckpt = Checkpoint.open(awq_dir)
    for p in PREFIXES:
        assert is_autoawq_linear(ckpt, p)
        expected = rtn.quantize(fl[f"{p}.weight"].numpy(), 32)
        expected.scales = expected.scales.astype(np.float16).astype(np.float32)
        got = read_autoawq_linear(ckpt, p)
        assert got.equals(expected), p
        autoawq = autoawq_dequantize_gemm(aw[f"{p}.qweight"], aw[f"{p}.qzeros"], aw[f"{p}.scales"].float(), 4, 32)
        np.testing.assert_array_equal(got.dequantize(), autoawq.numpy().T)
    assert not is_autoawq_linear(ckpt, "thinker.lm_head")
    with pytest.raises(AutoAwqError, match="missing"):
        read_autoawq_linear(ckpt, "thinker.lm_head")


def test_default_checkpoint_has_no_quantization(ckpts):
    float_dir, _ = ckpts
    ckpt = Checkpoint.open(float_dir)
    assert detect_autoawq(ckpt.raw_config) is None
    assert not is_autoawq_linear(ckpt, PREFIXES[0])


GOOD = {"bits": 4, "group_size": 128, "modules_to_not_convert": ["visual"], "quant_method": "awq",
        "version": "gemm", "zero_point": True}


@pytest.mark.parametrize(
    "change,match",
    [
        ({"quant_method": "gptq"}, "quant_method"),
        ({"version": "gemv"}, "version"),
        ({"version": "marlin"}, "version"),
        ({"bits": 8}, "bits"),
        ({"zero_point": False}, "zero_point"),
        ({"group_size": -1}, "group_size"),
        ({"group_size": 100}, "group_size"),
        ({"modules_to_not_convert": "visual"}, "modules_to_not_convert"),
    ],
)
def test_detect_rejects_other_quantization(change, match):
    with pytest.raises(AutoAwqError, match=match) as err:
        detect_autoawq({"quantization_config": {**GOOD, **change}})
    assert isinstance(err.value, ValueError) and err.value.fix


def test_detect_accepts_variants():
    # transformers 5 writes "format" for "version"; some exports put the config in thinker_config
    tf5 = {k: v for k, v in GOOD.items() if k != "version"} | {"format": "GEMM"}
    assert detect_autoawq({"quantization_config": tf5})["version"] == "gemm"
    assert detect_autoawq({"thinker_config": {"quantization_config": GOOD}})["group_size"] == 128
    assert detect_autoawq({"quantization_config": {**GOOD, "modules_to_not_convert": None}})["modules_to_not_convert"] == []
    with pytest.raises(AutoAwqError, match="not an object"):
        detect_autoawq({"quantization_config": "awq"})
