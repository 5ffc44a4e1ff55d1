"""W8A8 (recipes/w8a8.yaml): int8 weights per output channel, int8 activations per token at run time.

- One W8A8 linear graph (``export.w8a8_linear``) equals its numpy reference
  (``quant.w8a8.w8a8_matmul``) EXACTLY, in every form (standard ``MatMulInteger`` and the
  ``com.microsoft.MatMulIntegerToFloat`` contrib op) with per-token scales, and with a per-tensor
  scale in the standard forms (int8 x int8, and uint8 activations with zero point 128): the int32 accumulation is exact and both compute
  ``float32(acc) * w_scale * x_scale`` in that order. (``MatMulIntegerToFloat`` with a scalar
  activation scale multiplies by ``x_scale * w_scale`` rounded once: within 1 ulp.)
- The whole thinker decoder against transformers' thinker whose quantized linears compute the
  same W8A8 math in torch (``W8A8Reference``), at two prompt lengths, within REF_TOLERANCE = 1e-5
  max abs on the logits and hidden states (|hidden| <= 3.3: ~40 float32 ulps). Not bit-exact: the
  float ops between the linears (attention, RMSNorm, SiLU) round differently in onnxruntime and
  torch (measured 7e-7 max). The bound is also below one int8 level flip (a step is absmax / 127
  ~ 0.02 of an activation, times weights ~ 0.02: ~4e-4), so it asserts that every rounding
  decision of the graph is the reference's. The W8A8 error itself (against float32
  transformers: FLOAT_TOLERANCE) is ~400x larger, so the comparison discriminates.
- The recipe's exclusions hold (lm_head and every mlp.down_proj float), the manifest records the
  quantization per graph and validates against the schema, ``omni-export verify`` reports it.
- SmoothQuant (``smooth_alpha``): the smoothed float layer computes what the original does, and
  smoothing moves planted activation outliers into the weights.
"""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml

from omni_export.build.pipeline import build_bundle
from omni_export.build.recipes import load_recipe
from omni_export.export.onnx_graph import GraphBuilder, Linear
from omni_export.export.w8a8_linear import W8A8GraphBuilder
from omni_export.quant import w8a8

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
#: W8A8 graph vs the torch reference of the same W8A8 math: max abs on logits / hidden (module docstring)
REF_TOLERANCE = 1e-5
#: W8A8 vs float32 transformers: rms(bundle - float) / rms(float) of the logits and hidden states.
#: int8 per-token rounding errs by up to half a step (absmax / 254) per element; on the tiny
#: model (2 layers, random weights) this measured 0.55-0.95 % (prompts of 12 and 37 tokens).
FLOAT_TOLERANCE = 0.015
PROMPTS = (12, 37)
EMITS = ("matmulinteger_u8", "matmulinteger", "matmulintegertofloat")


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------ one linear
def linear_graph(tmp_path, weight, bias, emit, name="lin"):
    g = W8A8GraphBuilder(tmp_path, f"{name}.onnx", emit=emit)
    x = g.float_input("x", ("batch", "sequence", weight.q.shape[1]))
    y = g.linear(x, Linear(weight, bias), "proj")
    g.float_output(y, "y", ("batch", "sequence", weight.q.shape[0]))
    g.save()
    return tmp_path / f"{name}.onnx"


@pytest.mark.parametrize("emit", EMITS)
@pytest.mark.parametrize("activations", ["per_token", "per_tensor"])
def test_one_linear_is_exactly_the_numpy_reference(tmp_path, emit, activations):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 80)).astype(np.float32)
    w[:, 5] *= 30  # an outlier input channel
    weight = w8a8.quantize_weight(w, activations)
    bias = rng.standard_normal(48).astype(np.float32)
    x = rng.standard_normal((2, 7, 80)).astype(np.float32)
    x[0, 3] *= 50  # an outlier token
    x[1, 2] = 0.0  # an all-zero token: scale ACT_EPS / 127, levels 0
    y = session(linear_graph(tmp_path, weight, bias, emit)).run(None, {"x": x})[0]
    ref = w8a8.w8a8_matmul(x, weight, bias)
    assert y.dtype == np.float32 and y.shape == ref.shape
    if emit == "matmulintegertofloat" and activations == "per_tensor":
        # a scalar a_scale goes into the kernel's per-column multiplier (x_scale * w_scale, rounded
        # once) instead of two products: the product is at most 1 ulp off, then the bias add rounds
        product = w8a8.w8a8_matmul(x, weight)
        assert np.all(np.abs(y - ref) <= np.spacing(np.abs(product)) + np.spacing(np.abs(ref)))
    else:
        assert np.array_equal(y.view(np.uint32), ref.view(np.uint32))
    # and it is W8A8, not float: it differs from the float product by the int8 rounding (large
    # here: the outlier input channel coarsens every token's levels, what smoothing addresses)
    assert 1e-4 < rel_rms(y, x @ w.T + bias) < 0.1


@pytest.mark.parametrize("emit,activation_type", [("matmulinteger_u8", onnx.TensorProto.UINT8),
                                                  ("matmulinteger", onnx.TensorProto.INT8)])
def test_standard_forms_have_only_standard_ops(tmp_path, emit, activation_type):
    weight = w8a8.quantize_weight(np.random.default_rng(1).standard_normal((16, 32)).astype(np.float32))
    model = onnx.load(linear_graph(tmp_path, weight, None, emit))
    ops = {(n.domain or "", n.op_type) for n in model.graph.node}
    assert all(domain == "" for domain, _ in ops)
    assert ("", "MatMulInteger") in ops
    types = {i.name: i.data_type for i in model.graph.initializer}
    assert types["proj.qweight"] == onnx.TensorProto.INT8
    activation = next(m.input[0] for m in model.graph.node if m.op_type == "MatMulInteger")
    cast = next(n for n in model.graph.node if n.op_type == "Cast" and n.output[0] == activation)
    assert [a.i for a in cast.attribute if a.name == "to"] == [activation_type]


def test_packed_linears_share_one_activation_quantization(tmp_path):
    rng = np.random.default_rng(2)
    ws = [w8a8.quantize_weight(rng.standard_normal((n, 32)).astype(np.float32)) for n in (16, 8, 8)]
    g = W8A8GraphBuilder(tmp_path, "qkv.onnx", emit="matmulinteger_u8")
    x = g.float_input("x", ("batch", "sequence", 32))
    outs = g.linears(x, [Linear(w) for w in ws], ["q", "k", "v"])
    for i, out in enumerate(outs):
        g.float_output(out, f"y{i}", ("batch", "sequence", ws[i].q.shape[0]))
    g.save()
    model = onnx.load(tmp_path / "qkv.onnx")
    assert [n.op_type for n in model.graph.node].count("MatMulInteger") == 1
    assert [n.op_type for n in model.graph.node].count("ReduceMax") == 1
    xs = rng.standard_normal((1, 5, 32)).astype(np.float32)
    ys = session(tmp_path / "qkv.onnx").run(None, {"x": xs})
    for y, w in zip(ys, ws):
        assert np.array_equal(y, w8a8.w8a8_matmul(xs, w))


def test_a_plain_builder_is_untouched():
    """W8A8GraphBuilder is a subclass: the plain builder's linears are not routed through it."""
    assert not issubclass(GraphBuilder, W8A8GraphBuilder)


# ------------------------------------------------------------------------------ the recipe
def test_builtin_recipe_follows_msmodelslim():
    t = load_recipe("w8a8").module("thinker")
    assert (t.weights, t.activations, t.method, t.symmetric, t.emit) == ("int8", "int8_per_token", "rtn", True,
                                                                         "matmulinteger_u8")
    cuda = load_recipe("w8a8", target="cuda").module("thinker")
    assert (cuda.emit, cuda.dtype) == ("matmulinteger", "float16")  # CUDA: int8 x int8, float16 float parts
    assert t.lm_head == "float32" and t.keep_float == ("*.mlp.down_proj",)
    assert t.keeps_float("layers.27.mlp.down_proj") and not t.keeps_float("layers.0.mlp.up_proj")


@pytest.mark.parametrize("settings,needle", [
    ({"weights": "int4", "activations": "int8_per_token"}, "needs weights int8"),
    ({"weights": "int8", "activations": "int8_per_token", "method": "awq"}, "round-to-nearest"),
    ({"weights": "int8", "activations": "int8_per_token", "emit": "qdq"}, "weight-only form"),
    ({"weights": "int8", "activations": "int8_per_token", "symmetric": False}, "symmetric"),
    ({"weights": "int4", "emit": "matmulinteger"}, "is a W8A8 form"),
    ({"weights": "int4", "smooth_alpha": 0.5}, "smooth_alpha is set"),
    ({"weights": "int8", "activations": "int8_per_token", "smooth_alpha": 1.5}, "smooth_alpha"),
])
def test_inconsistent_w8a8_settings(settings, needle):
    from omni_export.build.recipes import RecipeError, parse_recipe

    with pytest.raises(RecipeError) as info:
        parse_recipe({"schema_version": 2, "name": "x", "modules": {"thinker": settings}}, "x.yaml")
    assert needle in str(info.value)


def test_existing_recipes_record_no_w8a8_keys():
    """The manifest's recipe of the other built-in recipes is unchanged (no activations / smooth_alpha)."""
    for name in ("fp32", "awq", "int4-rtn"):
        keys = set(load_recipe(name).to_json()["modules"]["thinker"])
        assert not keys & {"activations", "smooth_alpha"}
        assert load_recipe(name).module("thinker").emit == "qdq"


# ------------------------------------------------------------------------------ the decoder
def recipe_file(tmp_path, name, **thinker):
    settings = {"weights": "int8", "activations": "int8_per_token", "method": "rtn", "keep_float": ["*.mlp.down_proj"],
                "lm_head": "float32", "embeddings": "float32", **thinker}
    data = {"schema_version": 2, "name": name, "modules": {"thinker": settings}}
    if settings.get("smooth_alpha") is not None:
        data["calibration"] = {"source": "builtin", "samples": 2, "sequence_length": 32}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def w8a8_bundles(tiny_checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("w8a8")
    return {emit: build_bundle(tiny_checkpoint, str(recipe_file(base, emit, emit=emit)), base / emit)
            for emit in EMITS}


class W8A8Reference(torch.nn.Module):
    """A torch linear computing W8A8 as the graph does: per-token int8 levels, exact integer
    products (float64 holds them exactly), then ``* w_scale * x_scale`` in float32."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        q = w8a8.quantize_weight(linear.weight.detach().numpy())
        self.q = torch.from_numpy(q.q.astype(np.float64))
        self.scales = torch.from_numpy(q.scales)
        self.bias = linear.bias

    def forward(self, x):
        absmax = x.abs().amax(dim=-1, keepdim=True)
        scale = torch.clamp(absmax, min=w8a8.ACT_EPS) / torch.tensor(w8a8.QMAX, dtype=torch.float32)
        levels = torch.clamp(torch.round(x / scale), -w8a8.QMAX, w8a8.QMAX)
        acc = (levels.double() @ self.q.T).float()
        y = acc * self.scales * scale
        return y if self.bias is None else y + self.bias


def w8a8_reference(checkpoint):
    from tests.conftest import load_reference_thinker

    thinker = load_reference_thinker(checkpoint)
    for layer in thinker.model.language_model.layers:
        for path in LINEARS:
            if path == "mlp.down_proj":
                continue  # the recipe keeps it float
            parent, leaf = path.split(".")
            module = getattr(layer, parent)
            setattr(module, leaf, W8A8Reference(getattr(module, leaf)))
    return thinker


def run_decoder(bundle, cfg, ids):
    seq = ids.shape[1]
    embeds = session(bundle / "thinker_embedding.onnx").run(None, {"input_ids": ids})[0]
    positions = np.broadcast_to(np.arange(seq), (3, 1, seq)).copy()
    feeds = {"inputs_embeds": embeds, "position_ids": positions, "seqlens_k": np.array([seq - 1], np.int32),
             "total_sequence_length": np.array(seq, np.int32)}
    for i in range(cfg["num_hidden_layers"]):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, cfg["num_key_value_heads"], 0, cfg["head_dim"]),
                                                            np.float32)
    logits, hidden, *_ = session(bundle / "thinker_decoder.onnx").run(None, feeds)
    return embeds, positions, logits, hidden


def torch_decoder(thinker, embeds, positions):
    with torch.no_grad():
        out = thinker.model.language_model(inputs_embeds=torch.from_numpy(embeds),
                                           position_ids=torch.from_numpy(positions), use_cache=False)
        return thinker.lm_head(out.last_hidden_state)[:, -1:].numpy(), out.last_hidden_state.numpy()


def rel_rms(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2)))


def prompt_ids(n):
    rng = np.random.default_rng(n)
    return rng.integers(0, 151000, size=(1, n)).astype(np.int64)


@pytest.mark.parametrize("emit", EMITS)
@pytest.mark.parametrize("length", PROMPTS)
def test_decoder_matches_the_w8a8_reference_and_float(w8a8_bundles, tiny_checkpoint, reference_thinker, emit, length):
    bundle = w8a8_bundles[emit]
    cfg = json.loads((bundle / "manifest.json").read_text())["config"]["thinker"]
    embeds, positions, logits, hidden = run_decoder(bundle, cfg, prompt_ids(length))
    ref_logits, ref_hidden = torch_decoder(w8a8_reference(tiny_checkpoint), embeds, positions)
    assert np.abs(logits - ref_logits).max() <= REF_TOLERANCE
    assert np.abs(hidden - ref_hidden).max() <= REF_TOLERANCE
    float_logits, float_hidden = torch_decoder(reference_thinker, embeds, positions)
    graph_error = rel_rms(logits, float_logits)
    assert graph_error <= FLOAT_TOLERANCE and rel_rms(hidden, float_hidden) <= FLOAT_TOLERANCE
    # the W8A8 error is far above REF_TOLERANCE, and the reference reproduces it: the comparison
    # with the reference discriminates W8A8 from float
    assert np.abs(logits - float_logits).max() > 100 * REF_TOLERANCE
    assert abs(rel_rms(ref_logits, float_logits) - graph_error) <= 0.1 * graph_error


def test_recipe_exclusions_and_manifest(w8a8_bundles, tiny_checkpoint):
    from omni_runtime.bundle.manifest import load_manifest

    bundle = w8a8_bundles["matmulinteger"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    quant = manifest["graphs"]["thinker_decoder"]["quantization"]
    assert quant == {"weights": "int8", "method": "rtn", "granularity": "channel", "symmetric": True,
                     "activations": "int8_per_token", "emit": "matmulinteger", "lm_head": "float32",
                     "keep_float": ["*.mlp.down_proj"], "smooth_alpha": None}
    assert manifest["graphs"]["thinker_embedding"]["quantization"] is None
    assert "session_config" not in manifest["graphs"]["thinker_decoder"] or \
        not manifest["graphs"]["thinker_decoder"]["session_config"]
    load_manifest(bundle)  # validates against manifest.schema.json
    model = onnx.load(bundle / "thinker_decoder.onnx", load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    layers = manifest["config"]["thinker"]["num_hidden_layers"]
    assert ops.count("MatMulInteger") == 3 * layers  # q/k/v packed, o, gate/up packed
    assert ops.count("MatMul") == layers + 1  # float: every down_proj, and the lm_head
    names = {i.name for i in model.graph.initializer}
    assert "lm_head.weight" in names
    assert not any("down_proj" in n and n.endswith("qweight") for n in names)


def test_manifest_schema_accepts_w8a8_and_old_blocks():
    import jsonschema
    from importlib import resources

    schema = json.loads((resources.files("omni_runtime.bundle") / "manifest.schema.json").read_text())
    quant = dict(schema["$defs"]["quantization"], **{"$defs": schema["$defs"]})
    for block in ({"weights": "int8", "method": "modelslim", "granularity": "channel", "symmetric": True,
                   "activations": "int8_per_token", "emit": "matmulintegertofloat", "smooth_alpha": None,
                   "source": {"format": "msmodelslim-ascendv1"}},
                  {"weights": "int4", "method": "awq", "group_size": 128, "symmetric": False, "emit": "qdq",
                   "accuracy_level": 4}):
        jsonschema.validate(block, quant)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"weights": "int8", "method": "rtn", "granularity": "channel", "symmetric": True,
                             "activations": "int4_per_token"}, quant)


def test_verify_reports_the_w8a8_bundle(w8a8_bundles, tiny_checkpoint):
    from omni_export.verify.driver import verify_bundle

    report = verify_bundle(w8a8_bundles["matmulinteger_u8"], tiny_checkpoint, prompts=2, tokens=8)
    decoder = report["graphs"]["thinker_decoder"]
    assert 0 < decoder["rel_rms"] <= FLOAT_TOLERANCE
    assert report["graphs"]["thinker_embedding"]["max_abs"] == 0
    assert report["thinker"]["top1_agreement"] >= 0.75


# ------------------------------------------------------------------------------ smoothing
def test_smoothing_keeps_the_float_function_and_flattens_outliers():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 32)).astype(np.float32)
    x[:, 3] *= 40  # an outlier channel of the activation
    norm = rng.uniform(0.5, 1.5, 32).astype(np.float32)
    ws = [rng.standard_normal((24, 32)).astype(np.float32) for _ in range(2)]
    s = w8a8.smooth_scales(np.abs(x * norm).max(axis=0), ws, 0.5)
    new_norm, new_ws = w8a8.fold_smoothing(norm, ws, s)
    for w, nw in zip(ws, new_ws):
        np.testing.assert_allclose((x * new_norm) @ nw.T, (x * norm) @ w.T, rtol=1e-4, atol=1e-3)
    before = np.abs(x * norm).max(axis=0)
    after = np.abs(x * new_norm).max(axis=0)
    assert after.max() / np.median(after) < 0.25 * before.max() / np.median(before)
    # and the W8A8 error of the smoothed pair is smaller
    def err(nrm, w):
        exact = (x * norm) @ ws[0].T
        return rel_rms(w8a8.w8a8_matmul(x * nrm, w8a8.quantize_weight(w)), exact)
    assert err(new_norm, new_ws[0]) < 0.7 * err(norm, ws[0])


def test_smooth_scales_edge_cases():
    s = w8a8.smooth_scales(np.array([0.0, 4.0, 1.0]), [np.array([[1.0, 1.0, 0.0]])], 0.5)
    assert s[0] == 1.0 and s[2] == 1.0 and s[1] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="alpha"):
        w8a8.smooth_scales(np.ones(2), [np.ones((1, 2))], 1.5)


def test_smoothed_bundle_builds_and_is_closer_on_outliers(tiny_checkpoint, tmp_path, reference_thinker):
    bundle = build_bundle(tiny_checkpoint, str(recipe_file(tmp_path, "smooth", smooth_alpha=0.5)), tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["graphs"]["thinker_decoder"]["quantization"]["smooth_alpha"] == 0.5
    stats = manifest["build"]["modules"]["thinker"]["smoothing"]
    assert len(stats) == manifest["config"]["thinker"]["num_hidden_layers"]
    cfg = manifest["config"]["thinker"]
    embeds, positions, logits, hidden = run_decoder(bundle, cfg, prompt_ids(PROMPTS[0]))
    float_logits, float_hidden = torch_decoder(reference_thinker, embeds, positions)
    assert rel_rms(logits, float_logits) <= FLOAT_TOLERANCE and rel_rms(hidden, float_hidden) <= FLOAT_TOLERANCE


def test_emit_override_keeps_forms_apart():
    """``--emit`` (Recipe.with_setting) cannot give a W8A8 section a weight-only form, nor the reverse."""
    from omni_export.build.recipes import RecipeError

    assert load_recipe("w8a8").with_setting("emit", "matmulintegertofloat").module("thinker").emit == \
        "matmulintegertofloat"
    with pytest.raises(RecipeError, match="does not fit modules.thinker"):
        load_recipe("w8a8").with_setting("emit", "matmulnbits", flag="--emit")
    with pytest.raises(RecipeError, match="does not fit modules.thinker"):
        load_recipe("int4-rtn").with_setting("emit", "matmulinteger", flag="--emit")
    assert load_recipe("int4-rtn").with_setting("emit", "matmulnbits").module("thinker").emit == "matmulnbits"
