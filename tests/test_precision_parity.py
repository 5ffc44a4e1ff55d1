"""float16 and int8 graphs of the encoders against transformers (tiny random checkpoint, CPU).

Every graph runs at two input sizes (``ctx.shape`` 0 and 1 of its verify check) on onnxruntime's
CPU provider, which runs a float16 graph's MatMul / Conv / Add / Softmax ... in float32 through
Casts it inserts (float16 weights, float16 values between those regions); the float16 audio
encoder also runs through ``onnx.reference`` (every op in float16, as a GPU rounds them). The
vision encoder's Loop is beyond ``onnx.reference`` (it fails on the empty scan outputs of a
Loop that runs no iteration), so it is checked on onnxruntime only.

Tolerances (rel_rms = rms(graph - transformers) / rms(transformers); float32 graphs are exact to
1e-4, tests/test_*_parity.py):

- float16: rel_rms <= 2e-3: four times float16's unit roundoff (4.9e-4); measured 2.8e-4 (audio)
  and 5.7e-4 (vision) on onnxruntime, 6.3e-4 for audio on onnx.reference.
- int8 per output channel: rel_rms <= 3e-2: a step of absmax/127 per channel (about 4 sigma / 127
  for Gaussian rows) is an rms weight error near 1 % of sigma, compounded over the layers and
  onnxruntime's int8 activations at accuracy level 4; measured 6.8e-3 (audio), 1.6e-2 (vision).
"""

from __future__ import annotations

import pytest

from omni_export.build.pipeline import build_bundle
from omni_export.build.recipes import parse_recipe
from omni_export.verify.precision import cpu_casts, module_errors

FLOAT16_REL = 2e-3
INT8_REL = 3e-2
MODULES = ["audio", "vision"]


def build(tmp_path_factory, checkpoint, name: str, settings: dict):
    recipe = parse_recipe({"schema_version": 2, "name": name,
                           "modules": {"thinker": {}, **{m: dict(settings) for m in MODULES}}}, f"{name}.yaml")
    return build_bundle(checkpoint, recipe, tmp_path_factory.mktemp(name) / "bundle")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_checkpoint):
    return {name: build(tmp_path_factory, tiny_checkpoint, name, settings)
            for name, settings in {"float16": {"weights": "float16"}, "int8": {"weights": "int8"},
                                   "int8-float16": {"weights": "int8", "dtype": "float16"}}.items()}


@pytest.mark.parametrize("shape", [0, 1])
@pytest.mark.parametrize("precision,tolerance", [("float16", FLOAT16_REL), ("int8", INT8_REL),
                                                 ("int8-float16", INT8_REL)])
def test_encoders_match_transformers(bundles, tiny_checkpoint, precision, tolerance, shape):
    errors = module_errors(bundles[precision], tiny_checkpoint, MODULES, shape=shape)
    assert set(errors) == {"audio_encoder", "vision_encoder"}
    for graph, e in errors.items():
        assert e["rel_rms"] <= tolerance, (graph, e)
        assert e["rel_rms"] > 1e-6, (graph, e)  # the precision is really there: not a float32 graph


def test_float16_audio_through_onnx_reference(bundles, tiny_checkpoint):
    errors = module_errors(bundles["float16"], tiny_checkpoint, ["audio"], runner="reference")
    assert 1e-6 < errors["audio_encoder"]["rel_rms"] <= FLOAT16_REL, errors


def test_manifest_records_the_precision(bundles):
    from omni_runtime.bundle.manifest import load_manifest

    m = load_manifest(bundles["int8-float16"])
    spec = m.graph("audio_encoder")
    assert spec.dtype == "float16" and spec.quantization["granularity"] == "channel"
    assert spec.quantization["weights"] == "int8" and spec.quantization["symmetric"] is True
    assert spec.session_config == {"session.qdq_matmulnbits_accuracy_level": "4"}
    assert [t.dtype for t in spec.inputs] == ["float32", "int64", "int64", "int64"]  # IO stays float32
    assert spec.outputs[0].dtype == "float32"
    f16 = load_manifest(bundles["float16"]).graph("vision_encoder")
    assert f16.dtype == "float16" and f16.quantization is None and f16.session_config == {}
    assert m.target == "cpu"


def test_cpu_provider_runs_float16_ops_in_float32(bundles):
    """The honest part of 'runs on CPU': onnxruntime 1.32 has no float16 MatMul / Conv on x86."""
    from omni_runtime.bundle.manifest import load_manifest

    m = load_manifest(bundles["float16"])
    ops = cpu_casts(m.path(m.graph("audio_encoder").file))
    assert {"MatMul", "Conv"} <= set(ops)
