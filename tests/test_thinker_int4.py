"""The int4 thinker decoder: standard ONNX that onnxruntime fuses, and parity with transformers.

- Every thinker linear is a blocked DequantizeLinear (uint4, [K, N], axis 0) feeding MatMul;
  the optimized model onnxruntime saves must have fused each into MatMulNBits (no
  DequantizeLinear left in the decoder).
- The graph computes what transformers' thinker computes with the dequantized weights: the
  reference is transformers' model with its linears replaced by ``QuantWeight.dequantize()``
  of the same round-to-nearest quantization (fp32 compute: accuracy level 0), max abs diff on
  logits <= 1e-4. ``emit: matmulnbits`` (the contrib op written directly) gives the same.
- Any input width works: the tiny model's widths (64, 128) are below the 128 group size, so
  every block is partial.
"""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml

from omni_export.build.pipeline import build_bundle
from omni_export.quant import rtn

TOLERANCE = 1e-4
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def recipe_file(tmp_path, emit):
    data = {"schema_version": 2, "name": f"int4-{emit}",
            "modules": {"thinker": {"weights": "int4", "method": "rtn", "group_size": 128, "symmetric": False,
                                    "accuracy_level": 0, "lm_head": "int8", "embeddings": "int8", "emit": emit}}}
    path = tmp_path / f"{emit}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def int4_bundles(tiny_checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("int4")
    return {emit: build_bundle(tiny_checkpoint, str(recipe_file(base, emit)), base / emit)
            for emit in ("qdq", "matmulnbits")}


def session(path, accuracy_level=0, optimized=None):
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_every_linear_fuses_into_matmulnbits(int4_bundles, tmp_path):
    bundle = int4_bundles["qdq"]
    graph = onnx.load(bundle / "thinker_decoder.onnx", load_external_data=False)
    dq = [n for n in graph.graph.node if n.op_type == "DequantizeLinear"]
    layers = json.loads((bundle / "manifest.json").read_text())["config"]["thinker"]["num_hidden_layers"]
    # q/k/v and gate/up are packed: 4 MatMuls per layer, plus lm_head
    assert len(dq) == 4 * layers + 1
    assert all(a.i == 0 for n in dq for a in n.attribute if a.name == "axis")
    session(bundle / "thinker_decoder.onnx", 4, tmp_path / "optimized.onnx")
    optimized = onnx.load(tmp_path / "optimized.onnx", load_external_data=False)
    ops = [n.op_type for n in optimized.graph.node]
    assert "DequantizeLinear" not in ops
    assert ops.count("MatMulNBits") == 4 * layers + 1
    assert "MatMul" not in ops


def dequantized_reference(checkpoint, manifest):
    """transformers' thinker with every linear (and lm_head, embeddings) replaced by its RTN-dequantized weight."""
    from tests.conftest import load_reference_thinker

    thinker = load_reference_thinker(checkpoint)
    q = manifest["recipe"]["modules"]["thinker"]
    text = thinker.model.language_model

    def dq(weight, bits):
        return torch.from_numpy(rtn.quantize(weight.detach().numpy(), q["group_size"], bits=bits,
                                             symmetric=q["symmetric"]).dequantize())

    with torch.no_grad():
        for layer in text.layers:
            for path in LINEARS:
                module = layer.get_submodule(path)
                module.weight.copy_(dq(module.weight, 4))
        thinker.lm_head.weight.copy_(dq(thinker.lm_head.weight, 8))
        text.embed_tokens.weight.copy_(dq(text.embed_tokens.weight, 8))
    return thinker


@pytest.mark.parametrize("emit", ["qdq", "matmulnbits"])
def test_int4_decoder_matches_dequantized_transformers(int4_bundles, tiny_checkpoint, emit):
    bundle = int4_bundles[emit]
    manifest = json.loads((bundle / "manifest.json").read_text())
    thinker = dequantized_reference(tiny_checkpoint, manifest)
    cfg = manifest["config"]["thinker"]
    ids = np.array([[151644, 872, 198, 9707, 11, 1879, 0, 151645, 198, 151644, 77091, 198]], dtype=np.int64)
    seq = ids.shape[1]
    embeds = session(bundle / "thinker_embedding.onnx").run(None, {"input_ids": ids})[0]
    with torch.no_grad():
        ref_embeds = thinker.model.language_model.embed_tokens(torch.from_numpy(ids))
        assert np.abs(embeds - ref_embeds.numpy()).max() <= TOLERANCE
        positions = torch.arange(seq).view(1, 1, -1).expand(3, 1, -1)
        out = thinker.model.language_model(inputs_embeds=ref_embeds, position_ids=positions, use_cache=False)
        ref_logits = thinker.lm_head(out.last_hidden_state)[:, -1:].numpy()
    feeds = {"inputs_embeds": embeds, "position_ids": positions.numpy().copy(),
             "seqlens_k": np.array([seq - 1], np.int32), "total_sequence_length": np.array(seq, np.int32)}
    for i in range(cfg["num_hidden_layers"]):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, cfg["num_key_value_heads"], 0, cfg["head_dim"]),
                                                            np.float32)
    logits, hidden, *_ = session(bundle / "thinker_decoder.onnx").run(None, feeds)
    assert np.abs(logits - ref_logits).max() <= TOLERANCE
    assert np.abs(hidden - out.last_hidden_state.numpy()).max() <= TOLERANCE


def test_quantized_bundle_is_smaller_and_records_its_recipe(int4_bundles, tiny_bundle):
    manifest = json.loads((int4_bundles["qdq"] / "manifest.json").read_text())
    quant = manifest["graphs"]["thinker_decoder"]["quantization"]
    assert quant["weights"] == "int4" and quant["method"] == "rtn" and quant["accuracy_level"] == 0
    sizes = {}
    for name, root in (("fp32", tiny_bundle), ("int4", int4_bundles["qdq"])):
        files = json.loads((root / "manifest.json").read_text())["files"]
        sizes[name] = sum(f["bytes"] for n, f in files.items() if n.startswith("thinker_"))
    assert sizes["int4"] < 0.35 * sizes["fp32"]
