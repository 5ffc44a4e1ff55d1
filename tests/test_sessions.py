"""Provider selection (with fake provider lists) and the SessionPool on a tiny ONNX graph."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile

import numpy as np
import onnx
import onnx.helper as helper
import onnx.numpy_helper
import pytest

import omni_runtime.bundle.sessions as sessions
from omni_runtime import load_manifest
from omni_runtime.errors import BundleError, InputError, OmniError
from omni_runtime.bundle.manifest import MANIFEST_NAME, SCHEMA, SCHEMA_VERSION
from omni_runtime.bundle.sessions import (
    CPU,
    CUDA,
    SessionPool,
    SessionSettings,
    available_providers,
    io_binding_enabled,
    select_providers,
)

GRAPH_IO = {
    "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]},
               {"name": "ids", "dtype": "int64", "shape": ["batch", "sequence"]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 4]},
                {"name": "n", "dtype": "int64", "shape": ["batch"]}],
}
WEIGHT = np.arange(4, dtype=np.float32)


def write_graph(root):
    """``y = x + WEIGHT`` (weight in external data) and ``n = ReduceSum(ids, axis 1)``."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"]),
         helper.make_node("Constant", [], ["axes"], value=onnx.numpy_helper.from_array(np.array([1], np.int64))),
         helper.make_node("ReduceSum", ["ids", "axes"], ["n"], keepdims=0)],
        "tiny",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("n", onnx.TensorProto.INT64, ["batch"])],
        [onnx.numpy_helper.from_array(WEIGHT, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save_model(model, root / "tiny.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="tiny.onnx.data", size_threshold=0)


def make_bundle(root, io=GRAPH_IO):
    """A complete bundle with the tiny graph as ``tiny`` (I/O as declared by ``io``)."""
    root.mkdir()
    write_graph(root)
    (root / "tokenizer.json").write_text("{}")
    (root / "chat_template.jinja").write_text("{{ messages }}")
    files = {}
    for path in sorted(root.iterdir()):
        data = path.read_bytes()
        files[path.name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    body = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "producer": {"name": "omni-export", "version": "0.1.0"},
        "model": {"family": "qwen2_5_omni", "source": "tiny", "architectures": []},
        "recipe": {"name": "fp32"},
        "files": files,
        "tokenizer": {"file": "tokenizer.json", "chat_template_file": "chat_template.jinja",
                      "default_system_prompt": ""},
        "special_tokens": {name: i for i, name in enumerate(
            ["endoftext", "im_start", "im_end", "audio", "audio_bos", "audio_eos", "vision_bos", "vision_eos",
             "image", "video", "pad"])},
        "generation": {"eos_token_ids": [2], "pad_token_id": 0, "do_sample": False, "temperature": 1.0,
                       "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "max_new_tokens": 8},
        "config": {"thinker": {"hidden_size": 4, "num_hidden_layers": 1, "num_attention_heads": 1,
                               "num_key_value_heads": 1, "head_dim": 4, "vocab_size": 8, "rms_norm_eps": 1e-6,
                               "rope_theta": 10000.0, "mrope_section": [1, 1, 0], "max_position_embeddings": 64,
                               "kv_dtype": "float32"}},
        "graphs": {"tiny": {"file": "tiny.onnx", "external_data": ["tiny.onnx.data"], "opset": 18,
                            "dtype": "float32", "quantization": None, **io}},
    }
    (root / MANIFEST_NAME).write_text(json.dumps(body))
    return root


@pytest.fixture
def manifest(tmp_path):
    return load_manifest(make_bundle(tmp_path / "bundle"))


@pytest.mark.parametrize(
    "device, available, expected",
    [
        ("auto", [CUDA, CPU], [CUDA, CPU]),
        ("auto", ["TensorrtExecutionProvider", CPU, CUDA], [CUDA, CPU]),
        ("auto", [CPU], [CPU]),
        ("auto", ["AzureExecutionProvider", CPU], [CPU]),
        ("cpu", [CUDA, CPU], [CPU]),
        ("cpu", [CPU], [CPU]),
        ("cuda", [CUDA, CPU], [CUDA, CPU]),
    ],
)
def test_select_providers(device, available, expected):
    assert select_providers(device, available) == expected


def test_cuda_unavailable():
    with pytest.raises(InputError) as info:
        select_providers("cuda", [CPU])
    assert "pip install omni-runtime[gpu]" in str(info.value)
    assert CPU in str(info.value)


def test_unknown_device():
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        select_providers("tpu", [CPU])


def test_real_providers():
    assert CPU in available_providers()
    assert select_providers("cpu") == [CPU]
    assert select_providers("auto")[-1] == CPU


@pytest.mark.parametrize(
    "providers, expected",
    [([CUDA, CPU], True), ([CPU], False), ([], False), ([CPU, CUDA], False)],
)
def test_io_binding_enabled(providers, expected):
    assert io_binding_enabled(providers) is expected


def test_missing_onnxruntime(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(OmniError) as info:
        available_providers()
    assert "pip install omni-runtime[cpu]" in str(info.value) and "[gpu]" in str(info.value)


def test_lazy_load_and_run(manifest):
    pool = SessionPool(manifest, [CPU], SessionSettings(intra_op_threads=1))
    assert pool.loaded == {} and pool.loaded_bytes == 0
    session = pool.get("tiny")
    x = np.ones((2, 4), np.float32)
    ids = np.array([[1, 2, 3], [4, 5, 6]], np.int64)
    y, n = session.run(["y", "n"], {"x": x, "ids": ids})
    np.testing.assert_array_equal(y, x + WEIGHT)
    np.testing.assert_array_equal(n, [6, 15])
    assert pool.get("tiny") is session
    assert manifest.files["tiny.onnx.data"]["bytes"] == WEIGHT.nbytes  # the weight really is external
    size = manifest.files["tiny.onnx"]["bytes"] + manifest.files["tiny.onnx.data"]["bytes"]
    assert pool.loaded == {"tiny": size} and pool.loaded_bytes == size


def test_verified_once(manifest, monkeypatch):
    checked = []
    real = sessions.verify_file
    monkeypatch.setattr(sessions, "verify_file", lambda m, rel: (checked.append(rel), real(m, rel)))
    pool = SessionPool(manifest, [CPU])
    pool.get("tiny")
    pool.release("tiny")
    pool.get("tiny")
    assert checked == ["tiny.onnx", "tiny.onnx.data"]


@pytest.mark.parametrize("relpath", ["tiny.onnx.data", "tiny.onnx"])
def test_corruption_detected_before_load(manifest, monkeypatch, relpath):
    path = manifest.root / relpath
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))

    def no_onnxruntime():
        raise AssertionError("onnxruntime must not be touched before the hashes are checked")

    monkeypatch.setattr(sessions, "import_onnxruntime", no_onnxruntime)
    pool = SessionPool(manifest, [CPU])
    with pytest.raises(BundleError) as info:
        pool.get("tiny")
    assert "corrupt: sha256 mismatch" in str(info.value)
    assert str(path) in str(info.value) and "fix:" in str(info.value)
    assert pool.loaded == {}


@pytest.mark.parametrize(
    "io, needle",
    [
        ({**GRAPH_IO, "inputs": [GRAPH_IO["inputs"][0]]}, "unexpected input 'ids'"),
        ({**GRAPH_IO, "outputs": [*GRAPH_IO["outputs"], {"name": "z", "dtype": "float32", "shape": [1]}]},
         "the manifest's output 'z' is missing"),
        ({**GRAPH_IO, "inputs": [{"name": "x", "dtype": "float16", "shape": ["batch", 4]}, GRAPH_IO["inputs"][1]]},
         "input 'x' is float32, the manifest says float16"),
        ({**GRAPH_IO, "outputs": [GRAPH_IO["outputs"][0], {"name": "n", "dtype": "int32", "shape": ["batch"]}]},
         "output 'n' is int64, the manifest says int32"),
    ],
)
def test_io_mismatch_rejected(tmp_path, io, needle):
    manifest = load_manifest(make_bundle(tmp_path / "bundle", io))
    pool = SessionPool(manifest, [CPU])
    with pytest.raises(BundleError) as info:
        pool.get("tiny")
    message = str(info.value)
    assert needle in message and "graph 'tiny' does not match the manifest" in message
    assert message.startswith(str(manifest.root / "tiny.onnx")) and "fix:" in message
    assert pool.loaded == {}


def test_release_frees(manifest):
    pool = SessionPool(manifest, [CPU])
    first = pool.get("tiny")
    pool.release("tiny")
    assert pool.loaded == {} and pool.loaded_bytes == 0
    pool.release("tiny")  # releasing an unloaded graph is a no-op
    second = pool.get("tiny")
    assert second is not first
    pool.release_all()
    assert pool.loaded == {}
    assert pool.get("tiny") is not second


def test_unknown_graph(manifest):
    with pytest.raises(BundleError, match="no graph 'talker'"):
        SessionPool(manifest, [CPU]).get("talker")


def test_bad_optimization_level(manifest):
    with pytest.raises(InputError, match="optimization level"):
        SessionPool(manifest, [CPU], SessionSettings(optimization="max")).get("tiny")


def test_unloadable_graph(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    (bundle / "tiny.onnx.data").write_bytes(b"")  # consistent with the manifest, but the weight is gone
    body = json.loads((bundle / MANIFEST_NAME).read_text())
    body["files"]["tiny.onnx.data"] = {"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()}
    (bundle / MANIFEST_NAME).write_text(json.dumps(body))
    manifest = load_manifest(bundle)
    with pytest.raises(BundleError, match="cannot load graph 'tiny'") as info:
        SessionPool(manifest, [CPU]).get("tiny")
    assert str(bundle.resolve() / "tiny.onnx") in str(info.value)


def test_dtype_names_agree_with_manifest():
    from omni_runtime.bundle.manifest import TENSOR_DTYPES

    assert set(sessions.ORT_DTYPES.values()) == TENSOR_DTYPES


def test_accuracy_level_from_manifest_reaches_session_options():
    from omni_runtime.bundle.manifest import GraphSpec
    from omni_runtime.bundle.sessions import graph_session_config

    def spec(quantization):
        return GraphSpec("g", "g.onnx", (), 21, "float32", quantization, (), ())

    assert graph_session_config(spec({"weights": "int4", "accuracy_level": 4})) == {
        "session.qdq_matmulnbits_accuracy_level": "4"}
    assert graph_session_config(spec({"weights": "int4", "accuracy_level": 0})) == {
        "session.qdq_matmulnbits_accuracy_level": "0"}
    assert graph_session_config(spec(None)) == {}
    assert graph_session_config(spec({"accuracy_level": "4"})) == {}  # not an int: ignored, not trusted


# ---------------------------------------------------------------------------------------------
# graphs built for another target: float16 on the CPU provider


def add_graph(bundle, name, model, io, target=None):
    """Save ``model`` into ``bundle`` as graph ``name`` (weights in external data) and list it."""
    onnx.save_model(model, bundle / f"{name}.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{name}.onnx.data", size_threshold=0)
    body = json.loads((bundle / MANIFEST_NAME).read_text())
    for rel in (f"{name}.onnx", f"{name}.onnx.data"):
        if (bundle / rel).exists():
            data = (bundle / rel).read_bytes()
            body["files"][rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    external = [f"{name}.onnx.data"] if (bundle / f"{name}.onnx.data").exists() else []
    body["graphs"][name] = {"file": f"{name}.onnx", "external_data": external, "opset": 21,
                            "dtype": io.get("dtype", "float16"), "quantization": None,
                            "inputs": io["inputs"], "outputs": io["outputs"]}
    if target is not None:
        body["target"] = target
    (bundle / MANIFEST_NAME).write_text(json.dumps(body))
    return load_manifest(bundle)


def half_graph(op, inputs, domain="", attrs=None, weights=()):
    """One ``op`` node on float16 ``inputs`` (name -> shape) plus float16 ``weights`` -> ``y``."""
    F16 = onnx.TensorProto.FLOAT16
    node = helper.make_node(op, [*inputs, *(w for w, _ in weights)], ["y"], domain=domain, **(attrs or {}))
    graph = helper.make_graph([node], op, [helper.make_tensor_value_info(n, F16, s) for n, s in inputs.items()],
                              [helper.make_tensor_value_info("y", F16, None)],
                              [onnx.numpy_helper.from_array(v.astype(np.float16), w) for w, v in weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    io = {"inputs": [{"name": n, "dtype": "float16", "shape": list(s)} for n, s in inputs.items()],
          "outputs": [{"name": "y", "dtype": "float16", "shape": ["batch", 8]}]}
    return model, io


def test_fp16_graph_runs_where_cpu_kernels_exist(tmp_path):
    # LayerNormalization has a float16 CPU kernel: no Cast, no error
    model, io = half_graph("LayerNormalization", {"x": ["batch", 8]}, attrs={"axis": -1},
                           weights=[("scale", np.full(8, 2.0)), ("bias", np.zeros(8))])
    manifest = add_graph(make_bundle(tmp_path / "bundle"), "norm", model, io, target="cuda")
    pool = SessionPool(manifest, [CPU])
    x = np.arange(16, dtype=np.float16).reshape(2, 8)
    (y,) = pool.get("norm").run(None, {"x": x})
    xf = x.astype(np.float32)
    expected = 2 * (xf - xf.mean(-1, keepdims=True)) / np.sqrt(xf.var(-1, keepdims=True) + 1e-5)
    assert y.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float32), expected, atol=2e-2)  # float16 output rounding
    pool.release("norm")
    assert pool.get("norm") is not None and pool.load_log[-1]["cached"] is True  # and from its copy


@pytest.mark.parametrize("cache", ["on", "off"])
def test_fp16_graph_run_through_casts_is_refused(tmp_path, monkeypatch, cache):
    # onnxruntime's CPU provider has no float16 Sin: it would insert Casts and run it in float32
    monkeypatch.setenv("OMNI_RUNTIME_OPTIMIZED_COPIES", cache)
    monkeypatch.setenv("OMNI_RUNTIME_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    model, io = half_graph("Sin", {"x": ["batch", 8]})
    manifest = add_graph(make_bundle(tmp_path / "bundle"), "waves", model, io)
    with pytest.raises(BundleError) as info:
        SessionPool(manifest, [CPU]).get("waves")
    message = str(info.value)
    assert "graph 'waves' is float16" in message and "float32 through inserted Casts" in message
    assert "omni-export build --target cpu" in info.value.fix and "--device cuda" in info.value.fix
    assert message.startswith(str(manifest.root / "waves.onnx"))
    copies = tmp_path / "cache" / "optimized"
    assert not list(copies.iterdir() if copies.exists() else []) and not list((tmp_path / "tmp").iterdir())
    # a parity test may allow the fallback explicitly
    session = SessionPool(manifest, [CPU], SessionSettings(allow_cpu_casts=True)).get("waves")
    x = np.linspace(0, 3, 16, dtype=np.float16).reshape(2, 8)
    np.testing.assert_allclose(session.run(None, {"x": x})[0].astype(np.float32), np.sin(x.astype(np.float32)),
                               atol=1e-3)
    # the copy written under allow_cpu_casts is refused as well without it
    with pytest.raises(BundleError, match="inserted Casts"):
        SessionPool(manifest, [CPU]).get("waves")


def test_fp16_graph_without_cpu_kernel(tmp_path):
    # com.microsoft.BiasAdd(X, bias, skip) has CUDA kernels only: onnxruntime says NOT_IMPLEMENTED
    F16 = onnx.TensorProto.FLOAT16
    node = helper.make_node("BiasAdd", ["x", "bias", "skip"], ["y"], domain="com.microsoft")
    graph = helper.make_graph([node], "fused", [helper.make_tensor_value_info(n, F16, [1, 2, 8]) for n in ("x", "skip")],
                              [helper.make_tensor_value_info("y", F16, [1, 2, 8])],
                              [onnx.numpy_helper.from_array(np.ones(8, np.float16), "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    io = {"inputs": [{"name": n, "dtype": "float16", "shape": [1, 2, 8]} for n in ("x", "skip")],
          "outputs": [{"name": "y", "dtype": "float16", "shape": [1, 2, 8]}]}
    manifest = add_graph(make_bundle(tmp_path / "bundle"), "fused", model, io, target="cuda")
    with pytest.raises(BundleError) as info:
        SessionPool(manifest, [CPU]).get("fused")
    message = str(info.value)
    assert "graph 'fused' has nodes onnxruntime" in message and "CPU provider has no kernel" in message
    assert "BiasAdd" in message and "--target cpu" in info.value.fix
    assert message.startswith(str(manifest.root / "fused.onnx"))


def test_graph_session_config_reaches_onnxruntime(tmp_path):
    import dataclasses

    manifest = load_manifest(make_bundle(tmp_path / "bundle"))
    manifest.graphs["tiny"] = dataclasses.replace(manifest.graphs["tiny"],
                                                  session_config={"session.intra_op.allow_spinning": "0"})
    for load in range(2):  # from the bundle, then from the optimized copy
        pool = SessionPool(manifest, [CPU])
        options = pool.get("tiny").get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert pool.load_log[-1]["cached"] is bool(load)


# ---------------------------------------------------------------------------------------------
# optimized copies (omni_runtime.bundle.ort_cache)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("OMNI_RUNTIME_CACHE_DIR", str(root))
    monkeypatch.delenv("OMNI_RUNTIME_OPTIMIZED_COPIES", raising=False)
    return root / "optimized"


def matmul_bundle(root):
    """The tiny bundle plus ``mm``: y = x @ W with W [64, 64] (16 KB: external in the copy too)."""
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 64])],
                              [onnx.numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    io = {"dtype": "float32", "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 64]}],
          "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 64]}]}
    return add_graph(make_bundle(root), "mm", model, io), w


def copies_of(cache):
    return sorted(p for p in cache.iterdir() if not p.name.startswith(".")) if cache.exists() else []


def test_optimized_copy_written_then_read(tmp_path, cache):
    manifest, w = matmul_bundle(tmp_path / "bundle")
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    first = SessionPool(manifest, [CPU])
    y0 = first.get("mm").run(None, {"x": x})[0]
    (copy,) = copies_of(cache)
    assert sorted(p.name for p in copy.iterdir()) == ["meta.json", "model.onnx", "model.onnx.data"]
    meta = json.loads((copy / "meta.json").read_text())
    assert meta["key"] == copy.name and set(meta["files"]) == {"model.onnx", "model.onnx.data"}
    assert meta["source"].startswith(str((tmp_path / "bundle" / "mm.onnx").resolve()))
    second = SessionPool(manifest, [CPU])
    y1 = second.get("mm").run(None, {"x": x})[0]
    assert [first.load_log[-1]["cached"], second.load_log[-1]["cached"]] == [False, True]
    np.testing.assert_array_equal(y0, y1)
    np.testing.assert_allclose(y1, x @ w, rtol=1e-5, atol=1e-5)
    opened = second.get("mm").get_session_options()
    assert opened.graph_optimization_level == onnxruntime_level("ORT_DISABLE_ALL")  # already optimized


def onnxruntime_level(name):
    import onnxruntime

    return getattr(onnxruntime.GraphOptimizationLevel, name)


@pytest.mark.parametrize("damage", ["flip model", "flip data", "truncate data", "no meta", "bad meta", "extra file",
                                    "other key"])
def test_damaged_copy_is_rebuilt(tmp_path, cache, damage):
    manifest, w = matmul_bundle(tmp_path / "bundle")
    SessionPool(manifest, [CPU]).get("mm")
    (copy,) = copies_of(cache)
    target = copy / ("model.onnx" if damage == "flip model" else "model.onnx.data")
    if damage.startswith("flip"):
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate data":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "no meta":
        (copy / "meta.json").unlink()
    elif damage == "bad meta":
        (copy / "meta.json").write_text("{not json")
    elif damage == "extra file":
        (copy / "stray.bin").write_bytes(b"x")
    else:
        meta = json.loads((copy / "meta.json").read_text())
        (copy / "meta.json").write_text(json.dumps({**meta, "key": "0" * 40}))
    pool = SessionPool(manifest, [CPU])
    x = np.ones((2, 64), np.float32)
    np.testing.assert_allclose(pool.get("mm").run(None, {"x": x})[0], x @ w, rtol=1e-5, atol=1e-4)
    assert pool.load_log[-1]["cached"] is False  # never trusted: rebuilt from the bundle
    again = SessionPool(manifest, [CPU])
    again.get("mm")
    assert again.load_log[-1]["cached"] is True and len(copies_of(cache)) == 1


def test_other_settings_other_copy_and_old_copies_dropped(tmp_path, cache):
    manifest, _ = matmul_bundle(tmp_path / "bundle")
    SessionPool(manifest, [CPU]).get("mm")
    (first,) = copies_of(cache)
    basic = SessionPool(manifest, [CPU], SessionSettings(optimization="basic"))
    basic.get("mm")
    assert basic.load_log[-1]["cached"] is False  # another optimization level: another key
    assert len(copies_of(cache)) == 2  # each setting keeps its copy (no thrashing between them)
    SessionPool(manifest, [CPU], SessionSettings(optimization="disable")).get("mm")  # nothing to save
    assert len(copies_of(cache)) == 2
    again = SessionPool(manifest, [CPU])
    again.get("mm")
    assert again.load_log[-1]["cached"] is True
    # the graph file changes (a rebuilt bundle at the same path): its new copy replaces the old one
    other, _ = matmul_bundle(tmp_path / "other")
    mm = tmp_path / "bundle" / "mm.onnx.data"
    mm.unlink()
    (tmp_path / "other" / "mm.onnx.data").rename(mm)
    body = json.loads((tmp_path / "bundle" / MANIFEST_NAME).read_text())
    data = mm.read_bytes()
    data = data[:-4] + bytes(4)  # another weight value
    mm.write_bytes(data)
    body["files"]["mm.onnx.data"]["sha256"] = hashlib.sha256(data).hexdigest()
    (tmp_path / "bundle" / MANIFEST_NAME).write_text(json.dumps(body))
    rebuilt = SessionPool(load_manifest(tmp_path / "bundle"), [CPU])
    rebuilt.get("mm")
    assert rebuilt.load_log[-1]["cached"] is False
    copies = copies_of(cache)
    assert len(copies) == 2 and first not in copies  # the default-settings copy was replaced


def test_changed_graph_gets_a_new_copy(tmp_path, cache):
    manifest, _ = matmul_bundle(tmp_path / "bundle")
    SessionPool(manifest, [CPU]).get("mm")
    manifest2, w2 = matmul_bundle(tmp_path / "bundle2")  # same weights, other path: same key
    pool = SessionPool(manifest2, [CPU])
    pool.get("mm")
    assert pool.load_log[-1]["cached"] is True  # keyed by content, not by path
    from omni_runtime.bundle import ort_cache

    base = {"files": ["a"], "onnxruntime": "1", "providers": [CPU], "optimization": "all", "session_config": {}}
    keys = {ort_cache.copy_key(base), ort_cache.copy_key({**base, "files": ["b"]}),
            ort_cache.copy_key({**base, "onnxruntime": "2"}), ort_cache.copy_key({**base, "providers": [CUDA, CPU]}),
            ort_cache.copy_key({**base, "session_config": {"k": "v"}})}
    assert len(keys) == 5


def test_copies_of_a_deleted_bundle_are_dropped_at_the_next_copy(tmp_path, cache):
    manifest, _ = matmul_bundle(tmp_path / "gone")
    SessionPool(manifest, [CPU]).get("mm")
    (orphan,) = copies_of(cache)
    shutil.rmtree(tmp_path / "gone")  # the user deletes the bundle: nothing can read its copy again
    other, _ = matmul_bundle(tmp_path / "kept")
    body = json.loads((tmp_path / "kept" / MANIFEST_NAME).read_text())
    data = bytearray((tmp_path / "kept" / "mm.onnx.data").read_bytes())
    data[-4:] = bytes(4)  # other weights: another key, so a new copy is written
    (tmp_path / "kept" / "mm.onnx.data").write_bytes(bytes(data))
    body["files"]["mm.onnx.data"]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (tmp_path / "kept" / MANIFEST_NAME).write_text(json.dumps(body))
    pool = SessionPool(load_manifest(tmp_path / "kept"), [CPU])
    pool.get("mm")
    assert pool.load_log[-1]["cached"] is False
    (kept,) = copies_of(cache)
    assert kept != orphan and json.loads((kept / "meta.json").read_text())["source"].startswith(
        str((tmp_path / "kept" / "mm.onnx").resolve()))


@pytest.mark.parametrize("env, value", [("OMNI_RUNTIME_OPTIMIZED_COPIES", "off"), ("OMNI_RUNTIME_CACHE_DIR", "off")])
def test_copies_turned_off(tmp_path, cache, monkeypatch, env, value):
    monkeypatch.setenv(env, value)
    manifest, w = matmul_bundle(tmp_path / "bundle")
    for _ in range(2):
        pool = SessionPool(manifest, [CPU])
        x = np.ones((1, 64), np.float32)
        np.testing.assert_allclose(pool.get("mm").run(None, {"x": x})[0], x @ w, rtol=1e-5, atol=1e-4)
        assert pool.load_log[-1]["cached"] is False
    assert copies_of(cache) == []


def test_unwritable_cache_still_loads(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("OMNI_RUNTIME_CACHE_DIR", str(blocker / "sub"))  # cannot be created
    manifest, w = matmul_bundle(tmp_path / "bundle")
    pool = SessionPool(manifest, [CPU])
    x = np.ones((1, 64), np.float32)
    np.testing.assert_allclose(pool.get("mm").run(None, {"x": x})[0], x @ w, rtol=1e-5, atol=1e-4)
