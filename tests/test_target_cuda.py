"""`omni-export build --target cuda` end to end on the tiny checkpoint, checked on the CPU.

The built-in `awq` recipe for cuda (recipes/awq.yaml `targets.cuda`): the int4 thinker with
float16 activations, float16 encoders and talker, int8 token2wav with float32 activations. Every
graph is verified against transformers through `omni-export verify` (onnxruntime's CPU provider,
float16 nodes without a CPU kernel through the Casts it inserts, reported per graph):

- float16 graphs: rel_rms <= 2e-3 (four float16 roundoffs; tests/test_precision_parity*.py);
- int8 token2wav: rel_rms <= 3e-2 (tests/test_precision_parity_speech.py);
- the int4 thinker: its int4 levels and zero points are the cpu build's, byte for byte (the
  target changes the activations, not the quantization; the float16-activation error is
  tests/test_precision_parity_thinker.py's).

On the CPU provider `run` refuses the float16 graphs with an error naming the target to rebuild
with, never a silent slow path.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import run_cli
from omni_runtime.bundle.manifest import load_manifest

FLOAT16_REL = 2e-3
INT8_REL = 3e-2
#: graph -> (dtype, precision) the awq recipe's cuda target gives it
EXPECTED = {"thinker_embedding": ("float32", "int8"), "thinker_decoder": ("float16", "int4"),
            "audio_encoder": ("float16", "float16"), "vision_encoder": ("float16", "float16"),
            "talker_embedding": ("float16", "float16"), "talker_decoder": ("float16", "float16"),
            "token2wav_dit": ("float32", "int8"), "token2wav_bigvgan": ("float32", "int8")}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("target-cuda")
    out = {}
    for target in ("cuda", "cpu"):
        out[target] = root / target
        done = run_cli("build", "--model", tiny_checkpoint, "--recipe", "awq", "--target", target, "--out", out[target])
        assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def report(bundles, tiny_checkpoint):
    done = run_cli("verify", bundles["cuda"], "--model", tiny_checkpoint, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_manifest_records_the_target_and_precisions(bundles):
    m = load_manifest(bundles["cuda"])
    assert m.target == "cuda"
    for name, (dtype, precision) in EXPECTED.items():
        spec = m.graph(name)
        weights = spec.quantization["weights"] if spec.quantization else dtype
        assert (spec.dtype, weights) == (dtype, precision), name
    assert m.config["thinker"]["kv_dtype"] == "float16"
    assert load_manifest(bundles["cpu"]).target == "cpu"


def test_every_graph_within_its_tolerance(report):
    graphs = report["graphs"]
    assert set(graphs) == set(EXPECTED)
    for name, (dtype, precision) in EXPECTED.items():
        metrics = graphs[name]
        assert metrics["dtype"] == dtype, name
        if precision == "float16":
            assert 1e-6 < metrics["rel_rms"] <= FLOAT16_REL, (name, metrics)
            assert metrics["runs_on"].startswith("onnxruntime-cpu"), metrics
        elif precision == "int8" and name.startswith("token2wav"):
            assert 1e-6 < metrics["rel_rms"] <= INT8_REL, (name, metrics)


def int4_levels(bundle) -> dict[str, np.ndarray]:
    """The thinker decoder's packed int4 levels and zero points (uint8/uint4 initializers)."""
    m = load_manifest(bundle)
    model = onnx.load(str(m.path(m.graph("thinker_decoder").file)))
    out = {}
    for init in model.graph.initializer:
        if init.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.UINT4, onnx.TensorProto.INT4):
            out[init.name] = numpy_helper.to_array(init)
    return out


def test_int4_thinker_quantization_is_the_cpu_builds(bundles):
    cuda, cpu = int4_levels(bundles["cuda"]), int4_levels(bundles["cpu"])
    assert cuda and set(cuda) == set(cpu)
    for name, levels in cuda.items():
        assert np.array_equal(levels, cpu[name]), name


def test_cpu_run_refuses_float16_graphs_naming_the_target(bundles):
    done = run_cli("run", bundles["cuda"], "--prompt", "Hello", "--max-new-tokens", "2")
    assert done.returncode == 2
    assert "float16" in done.stderr and "--target cpu" in done.stderr and "Traceback" not in done.stderr
