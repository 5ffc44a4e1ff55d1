"""The talker as a W8A8 option (``modules.talker: {weights: int8, activations: int8_per_token}``).

- The talker decoder graph against transformers' talker whose decoder-layer linears compute the
  same W8A8 math in torch (``tests.test_w8a8.W8A8Reference``: per-token int8 activations, int8
  weights per output channel, exact integer products), ``thinker_to_talker_proj`` and the codec
  head float as the bundle keeps them, in every W8A8 form and at prefill, decode and chunk shapes:
  within REF_TOLERANCE max abs on the logits, the hidden state and every present K/V. Not
  bit-exact: the float ops between the linears (attention, RMSNorm, SiLU) round differently in
  onnxruntime and torch; the bound is below one int8 level flip (module docstring of test_w8a8).
- Against the float talker the W8A8 error is far larger (the comparison discriminates) and
  within FLOAT_TOLERANCE rel_rms.
- The bundle speaks (codes and a waveform through the runtime), the manifest records the W8A8
  block, the recipe keeps other bundles' recipe blocks unchanged, and bad settings are refused.
"""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

from conftest import run_decoder_graph
from test_talker_decoder_parity import make_inputs, reference, reference_talker  # noqa: F401 (a fixture)
from test_w8a8 import W8A8Reference

from omni_runtime.stages.sampling import SamplingConfig

from omni_export.build.pipeline import build_bundle
from omni_export.build.recipes import RecipeError, load_recipe, parse_recipe

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
EMITS = ("matmulinteger_u8", "matmulinteger", "matmulintegertofloat")
#: graph vs the torch W8A8 reference, max abs (|logits| and |hidden| of the tiny talker are O(1..5))
REF_TOLERANCE = 2e-5
#: W8A8 vs the float talker, rel_rms of the logits (int8 weight-only measured 0.022 on tiny, recipes/README.md)
FLOAT_TOLERANCE = 0.05
CASES = [(1, 7, 0, False), (2, 3, 0, False), (1, 1, 9, False), (1, 4, 5, False), (1, 9, 0, True)]


def talker_recipe(tmp_path, emit):
    data = {"schema_version": 2, "name": f"talker-{emit}",
            "modules": {"thinker": {"weights": "float32"},
                        "talker": {"weights": "int8", "activations": "int8_per_token", "emit": emit},
                        "token2wav": {"weights": "float32"}}}
    path = tmp_path / f"{emit}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def talker_bundles(tiny_checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("w8a8-talker")
    return {emit: build_bundle(tiny_checkpoint, str(talker_recipe(base, emit)), base / emit) for emit in EMITS}


@pytest.fixture(scope="module")
def w8a8_talker(reference_talker):
    import copy

    talker = copy.deepcopy(reference_talker)
    for layer in talker.model.layers:
        for path in LINEARS:
            parent, leaf = path.split(".")
            module = getattr(layer, parent)
            setattr(module, leaf, W8A8Reference(getattr(module, leaf)))
    return talker


def rel_rms(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2)))


@pytest.mark.parametrize("emit", EMITS)
@pytest.mark.parametrize("batch,sequence,past,multimodal", CASES)
def test_talker_decoder_matches_the_w8a8_reference(talker_bundles, w8a8_talker, reference_talker, emit, batch, sequence,
                                                   past, multimodal):
    session = ort.InferenceSession(str(talker_bundles[emit] / "talker_decoder.onnx"),
                                   providers=["CPUExecutionProvider"])
    embeds, positions, past_kv = make_inputs(w8a8_talker.config, batch, sequence, past, seed=sequence + past,
                                             multimodal=multimodal)
    logits, hidden, *presents = run_decoder_graph(session, embeds, positions, past_kv)
    ref_logits, ref_hidden, ref_presents = reference(w8a8_talker, embeds, positions, past_kv)
    errors = [np.abs(logits - ref_logits).max(), np.abs(hidden - ref_hidden).max()]
    errors += [np.abs(ours - ref).max() for ours, ref in zip(presents, ref_presents)]
    assert len(presents) == len(ref_presents) == 2 * w8a8_talker.config.num_hidden_layers
    assert max(errors) <= REF_TOLERANCE
    float_logits, float_hidden, _ = reference(reference_talker, embeds, positions, past_kv)
    error = rel_rms(logits, float_logits)
    print(f"{emit} {batch}x{sequence} past {past}: vs W8A8 reference {max(errors):.1e}, logits vs float "
          f"max {np.abs(logits - float_logits).max():.1e} rel_rms {error:.4f}, hidden vs float "
          f"max {np.abs(hidden - float_hidden).max():.1e}")
    assert error <= FLOAT_TOLERANCE
    # W8A8 is not float, and the reference reproduces W8A8: the comparison discriminates
    assert np.abs(hidden - float_hidden).max() > 20 * np.abs(hidden - ref_hidden).max()
    assert np.abs(logits - float_logits).max() > 10 * np.abs(logits - ref_logits).max()


def test_the_w8a8_talker_speaks_and_is_recorded(talker_bundles, tiny_checkpoint, tmp_path):
    from omni_runtime.bundle.manifest import load_manifest
    from omni_runtime.runner import OmniRunner

    bundle = talker_bundles["matmulinteger_u8"]
    manifest = load_manifest(bundle)  # validates against the schema
    quant = manifest.graph("talker_decoder").quantization
    assert quant["activations"] == "int8_per_token" and quant["emit"] == "matmulinteger_u8"
    assert quant["lm_head"] == "float32"
    assert manifest.graph("talker_embedding").quantization["weights"] == "int8"
    body = json.loads((bundle / "manifest.json").read_text())
    assert body["recipe"]["modules"]["talker"]["emit"] == "matmulinteger_u8"
    runner = OmniRunner(bundle, device="cpu")
    result = runner.chat("Say hello.", max_new_tokens=3, sampling=SamplingConfig(do_sample=False), speech=True,
                         stream=False, max_speech_seconds=0.5, noise_seed=0,
                         talker_sampling=runner.default_talker_sampling(False))
    assert len(result.codes) == 25 and result.speech_finish_reason == "seconds"
    assert result.audio.size > 0 and np.isfinite(result.audio).all() and np.abs(result.audio).max() > 0


def test_weight_only_talkers_keep_their_recipe_block():
    for name in ("fp32", "awq", "int4-rtn", "w8a8"):
        talker = load_recipe(name).to_json()["modules"]["talker"]
        assert "emit" not in talker and "activations" not in talker


@pytest.mark.parametrize("settings,needle", [
    ({"weights": "int4", "activations": "int8_per_token"}, "needs weights int8"),
    ({"weights": "int8", "activations": "int8_per_token", "emit": "qdq"}, "weight-only form"),
    ({"weights": "int8", "emit": "matmulinteger_u8"}, "is a W8A8 form"),
    ({"weights": "int8", "activations": "int8_per_token", "dtype": "float16"}, "W8A8 talker computes in float32"),
])
def test_bad_w8a8_talker_settings(settings, needle):
    with pytest.raises(RecipeError, match=needle):
        parse_recipe({"schema_version": 2, "name": "x", "modules": {"thinker": {}, "talker": settings}}, "x")


def test_an_emit_override_leaves_float_modules_alone():
    """`--recipe w8a8 --emit matmulinteger` (the CUDA form) sets the W8A8 thinker's form; the float
    talker has no linear form to set."""
    recipe = load_recipe("w8a8").with_setting("emit", "matmulinteger", flag="--emit")
    assert recipe.module("thinker").emit == "matmulinteger"
    assert "emit" not in recipe.to_json()["modules"]["talker"]
