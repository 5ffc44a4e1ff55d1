"""The float16 thinker, and the int4 thinker with float16 activations (the cuda target's awq),
on onnxruntime's CPU provider (tiny random checkpoint, two prefill lengths).

- float16 weights and compute against transformers: hidden states and logits rel_rms <= 2e-3
  (four float16 roundoffs; measured 6e-4), teacher-forced top-1 agreement >= 0.95 over the verify
  prompts (measured 127/128: a near tie of the random model's logits).
- W8A8 with float16 float parts (the cuda target's w8a8) against transformers: at most 1.25x the
  float32 W8A8 graph's error (measured 0.96-1.07x).
- int4 + float16 activations against the same int4 weights with float32 activations (the int4
  error itself is the int4 recipes' business, tests/test_thinker_int4.py), both at MatMulNBits
  accuracy level 1: rel_rms <= 2e-3 (measured 5e-4; at level 4 each graph adds 1e-2 of int8
  activation noise of its own).
"""

from __future__ import annotations

import numpy as np
import pytest

from omni_export.build.pipeline import build_bundle
from omni_export.build.recipes import parse_recipe
from omni_export.verify.metrics import errors as rel_errors
from omni_export.verify.precision import module_errors

FLOAT16_REL = 2e-3
#: W8A8 with float16 float parts against transformers, over the float32 W8A8 graph's error: measured
#: 1.01 / 1.06 (hidden states, two prefill lengths), 0.96 / 1.07 (logits)
W8A8_FLOAT16_GROWTH = 1.25
# accuracy level 1 (float32 compute in MatMulNBits): at level 4 both graphs quantize their activations
# to int8 per block, noise of 1e-2 of its own (measured) that would hide the float16 effect
SETTINGS = {"float16": {"weights": "float16"},
            "int4": {"weights": "int4", "method": "rtn", "accuracy_level": 1},
            "int4-float16": {"weights": "int4", "method": "rtn", "dtype": "float16", "accuracy_level": 1},
            "w8a8": {"weights": "int8", "activations": "int8_per_token", "method": "rtn", "symmetric": True,
                     "emit": "matmulinteger"},
            "w8a8-float16": {"weights": "int8", "activations": "int8_per_token", "method": "rtn", "symmetric": True,
                             "emit": "matmulinteger", "dtype": "float16"}}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_checkpoint):
    return {name: build_bundle(tiny_checkpoint, parse_recipe({"schema_version": 2, "name": "t", "modules": {
        "thinker": s}}, "t.yaml"), tmp_path_factory.mktemp(name) / "bundle") for name, s in SETTINGS.items()}


@pytest.mark.parametrize("shape", [0, 1])
def test_float16_thinker_matches_transformers(bundles, tiny_checkpoint, shape):
    errors = module_errors(bundles["float16"], tiny_checkpoint, ["thinker"], shape=shape, prompts=2, tokens=8)
    for graph in ("thinker_embedding", "thinker_decoder"):
        assert 1e-6 < errors[graph]["rel_rms"] <= FLOAT16_REL, errors[graph]
    assert errors["thinker_decoder"]["logits_rel_rms"] <= FLOAT16_REL
    assert errors["thinker"]["top1_agreement"] >= 0.95


def decoder_outputs(bundle, tokens: int):
    """(last logits, hidden states) of ``bundle``'s decoder on a seeded random prefill, CPU provider."""
    from omni_runtime.bundle.manifest import load_manifest
    from omni_runtime.bundle.sessions import CPU, SessionPool, SessionSettings
    from omni_runtime.prompt.rope import text_position_ids

    from omni_export.verify.reference import run_decoder

    m = load_manifest(bundle)
    pool = SessionPool(m, [CPU], SessionSettings(allow_cpu_casts=True))
    width = int(m.config["thinker"]["hidden_size"])
    embeds = (np.random.default_rng(tokens).standard_normal((1, tokens, width)) * 0.02).astype(np.float32)
    return run_decoder(pool, "thinker_decoder", embeds, text_position_ids(np.ones((1, tokens), np.int64)))


@pytest.mark.parametrize("shape", [0, 1])
def test_w8a8_with_float16_float_parts(bundles, tiny_checkpoint, shape):
    """The cuda target's W8A8 thinker: float16 everywhere but the int8 GEMMs, whose activation is
    quantized from float32 and whose int32 sums are rescaled in float32 (a sum can exceed
    float16's range). Against transformers its error is the float32 W8A8 graph's, up to
    W8A8_FLOAT16_GROWTH (two W8A8 graphs differ from each other by ~1e-2: a float16 input moves
    some activations across a rounding boundary, a whole int8 level each)."""
    from omni_runtime.bundle.manifest import load_manifest

    ours = module_errors(bundles["w8a8-float16"], tiny_checkpoint, ["thinker"], shape=shape, prompts=2, tokens=8)
    ref = module_errors(bundles["w8a8"], tiny_checkpoint, ["thinker"], shape=shape, prompts=2, tokens=8)
    for key in ("rel_rms", "logits_rel_rms"):
        print(f"w8a8 {key}: float16 {ours['thinker_decoder'][key]:.5f} float32 {ref['thinker_decoder'][key]:.5f}")
        assert ours["thinker_decoder"][key] <= W8A8_FLOAT16_GROWTH * ref["thinker_decoder"][key]
    assert ours["thinker"]["top1_agreement"] >= 0.95
    m = load_manifest(bundles["w8a8-float16"])
    spec = m.graph("thinker_decoder")
    assert spec.dtype == "float16" and m.config["thinker"]["kv_dtype"] == "float16"
    assert spec.quantization["weights"] == "int8" and spec.quantization["activations"] == "int8_per_token"


@pytest.mark.parametrize("tokens", [5, 33])
def test_int4_with_float16_activations(bundles, tokens):
    from omni_runtime.bundle.manifest import load_manifest

    outs = {name: decoder_outputs(bundles[name], tokens) for name in ("int4", "int4-float16")}
    for ours, ref in zip(outs["int4-float16"], outs["int4"]):
        assert 1e-6 < rel_errors(ours, ref)[1] <= FLOAT16_REL
    m = load_manifest(bundles["int4-float16"])
    spec = m.graph("thinker_decoder")
    assert spec.dtype == "float16" and m.config["thinker"]["kv_dtype"] == "float16"
    assert spec.quantization["weights"] == "int4"
    assert m.graph("thinker_embedding").dtype == "float32"  # int8 rows dequantized to float32
