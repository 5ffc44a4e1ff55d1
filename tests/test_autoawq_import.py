"""An AutoAWQ GEMM checkpoint compiles without re-quantizing: bit-identical int4 in the bundle.

``omni-export tiny --awq`` writes the Qwen2.5-Omni-7B-AWQ layout (thinker decoder linears as
``qweight``/``qzeros``/``scales``). ``build --recipe awq`` detects it and imports it: for every
linear of every layer, the bundle's uint4 levels and zero points equal the checkpoint's, unpacked
by a transcription of AutoAWQ's own ``unpack_awq`` + ``reverse_awq_order`` (tests/test_quant_packing.py),
and its float32 scales equal the checkpoint's float16 scales exactly.
"""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors import safe_open

from omni_export.build.pipeline import build_bundle
from omni_export.testkit.tiny_model import write_tiny_checkpoint
from tests.test_quant_packing import autoawq_reverse_awq_order, autoawq_unpack_awq

GROUPS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "mlp": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}
PATHS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
         "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    base = tmp_path_factory.mktemp("autoawq")
    ckpt = write_tiny_checkpoint(base / "model", seed=11, awq=True)
    return ckpt, build_bundle(ckpt, "awq", base / "bundle")


def checkpoint_levels(ckpt, prefix):
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        qweight, qzeros, scales = (f.get_tensor(f"{prefix}.{n}") for n in ("qweight", "qzeros", "scales"))
    iweight, izeros = autoawq_unpack_awq(qweight, qzeros, 4)
    iweight, izeros = autoawq_reverse_awq_order(iweight, izeros, 4)
    return (torch.bitwise_and(iweight, 15).numpy().astype(np.uint8),
            torch.bitwise_and(izeros, 15).numpy().astype(np.uint8), scales)


def test_imported_int4_is_bit_identical(imported):
    ckpt, bundle = imported
    manifest = json.loads((bundle / "manifest.json").read_text())
    quant = manifest["graphs"]["thinker_decoder"]["quantization"]
    assert quant["method"] == "autoawq"
    model = onnx.load(bundle / "thinker_decoder.onnx")
    init = {t.name: t for t in model.graph.initializer}
    layers = manifest["config"]["thinker"]["num_hidden_layers"]
    checked = 0
    for i in range(layers):
        for group in (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)):
            name = "+".join(f"layers.{i}.{PATHS[g]}.{g}" for g in group)
            levels = numpy_helper.to_array(init[f"{name}.qweight"]).astype(np.uint8)      # [K, N]
            zeros = numpy_helper.to_array(init[f"{name}.zero_points"]).astype(np.uint8)   # [G, N]
            scales = numpy_helper.to_array(init[f"{name}.scales"])                        # [G, N]
            assert scales.dtype == np.float32
            col = 0
            for g in group:
                ref_levels, ref_zeros, ref_scales = checkpoint_levels(ckpt, f"thinker.model.layers.{i}.{PATHS[g]}.{g}")
                n = ref_levels.shape[1]
                np.testing.assert_array_equal(levels[:, col:col + n], ref_levels)
                np.testing.assert_array_equal(zeros[:, col:col + n], ref_zeros)
                np.testing.assert_array_equal(scales[:, col:col + n], ref_scales.float().numpy())
                col += n
                checked += 1
            assert col == levels.shape[1]
    assert checked == 7 * layers


def test_imported_bundle_runs(imported):
    from omni_runtime.runner import OmniRunner

    _, bundle = imported
    result = OmniRunner(bundle).chat("Hello", max_new_tokens=4, sampling=None)
    assert 1 <= len(result.token_ids) <= 4
