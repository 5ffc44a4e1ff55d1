"""How onnxruntime's CPU provider runs a float16 graph, and float16 graphs through ``onnx.reference``.

onnxruntime 1.32's CPU provider has float16 kernels for few ops on x86 (LayerNormalization,
SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization, GroupQueryAttention,
MatMulNBits, DequantizeLinear and the data-movement ops); for the others (MatMul, Conv, Add, Mul,
Softmax, Gelu, ...) it inserts Casts and runs them in float32. A float16 graph therefore runs on
the CPU, but not with float16 arithmetic between the ops: :func:`cpu_casts` says which ops run
in float32, and :func:`reference_session` runs a graph with ``onnx.reference.ReferenceEvaluator``
(numpy, every op in the graph's own types: float16 results rounded after each op, as a GPU
computes them), with the few onnxruntime contrib ops of the bundle's graphs implemented in numpy.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

#: the name onnxruntime gives the Casts it inserts (onnxruntime/core/optimizer/insert_cast_transformer.cc)
INSERTED_CAST = "InsertedPrecisionFreeCast_"


def cpu_casts(model: str | Path) -> list[str]:
    """The op types onnxruntime's CPU provider runs in float32 through inserted Casts in ``model``
    (sorted, empty if it runs every node in the graph's own types). Creates one session with basic
    optimizations and reads the graph onnxruntime saves (its weights go to a temporary file)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="omni-export-casts-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.log_severity_level = 3
        options.optimized_model_filepath = str(Path(tmp) / "model.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        saved = onnx.load(str(Path(tmp) / "model.onnx"), load_external_data=False)
    ops = set()
    for graph in _graphs(saved.graph):
        cast_outputs = {out for node in graph.node if node.op_type == "Cast" and node.name.startswith(INSERTED_CAST)
                        for out in node.output}
        ops.update(node.op_type for node in graph.node
                   if node.op_type != "Cast" and any(i in cast_outputs for i in node.input))
    return sorted(ops)


def _graphs(graph):
    """``graph`` and every subgraph (Loop bodies) in it."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from _graphs(attr.g)


# ------------------------------------------------------------------------------ onnx.reference


def reference_session(model: str | Path):
    """An ``onnx.reference.ReferenceEvaluator`` over ``model`` (external data loaded) that knows the
    contrib ops of the bundle's graphs; ``.run(None, feeds)`` as an onnxruntime session."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    proto = onnx.load(str(model))
    return ReferenceEvaluator(proto, new_ops=_contrib_ops())


def _contrib_ops():
    from onnx.reference.op_run import OpRun

    def rms(x, weight, eps):
        x32 = x.astype(np.float32)
        normed = x32 / np.sqrt((x32 * x32).mean(axis=-1, keepdims=True) + np.float32(eps))
        return (normed.astype(x.dtype) * weight).astype(x.dtype)

    class SimplifiedLayerNormalization(OpRun):
        op_domain = ""

        def _run(self, x, scale, axis=-1, epsilon=1e-5, stash_type=1):
            return (rms(x, scale, epsilon),)

    class SkipSimplifiedLayerNormalization(OpRun):
        op_domain = "com.microsoft"

        def _run(self, x, skip, gamma, epsilon=1e-5):
            summed = (x.astype(np.float32) + skip.astype(np.float32)).astype(skip.dtype)
            empty = np.zeros(0, np.float32)  # mean / inv_std_var: not read by the bundle's graphs
            return rms(summed, gamma, epsilon), empty, empty, summed

    class GroupQueryAttention(OpRun):
        """Causal grouped-query attention over ``past`` + the new keys (as onnxruntime's, for
        a batch whose rows all have ``seqlens_k + 1`` tokens); scores and softmax in float32."""

        op_domain = "com.microsoft"

        def _run(self, q, k, v, past_key, past_value, seqlens_k, total_sequence_length, *rest, num_heads=None,
                 kv_num_heads=None, scale=None, **_):
            b, s, _ = q.shape
            hd = q.shape[-1] // num_heads
            split = lambda t, h: t.reshape(b, s, h, hd).transpose(0, 2, 1, 3)  # noqa: E731
            key = np.concatenate([past_key, split(k, kv_num_heads)], axis=2)
            value = np.concatenate([past_value, split(v, kv_num_heads)], axis=2)
            group = num_heads // kv_num_heads
            qh = split(q, num_heads).astype(np.float32)
            kh = np.repeat(key, group, axis=1).astype(np.float32)
            vh = np.repeat(value, group, axis=1).astype(np.float32)
            total = key.shape[2]
            scores = qh @ kh.transpose(0, 1, 3, 2) * np.float32(scale or hd ** -0.5)
            past = total - s
            causal = np.arange(total)[None, :] <= (past + np.arange(s))[:, None]
            scores = np.where(causal, scores, -np.inf)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs = (scores / scores.sum(axis=-1, keepdims=True)).astype(q.dtype)
            out = (probs.astype(np.float32) @ vh).astype(q.dtype)
            return out.transpose(0, 2, 1, 3).reshape(b, s, num_heads * hd), key, value

    class MatMulNBits(OpRun):
        op_domain = "com.microsoft"

        def _run(self, a, b, scales, zero_points=None, *rest, K=None, N=None, bits=4, block_size=32, **_):
            blocks = b.shape[1]
            if bits == 4:
                levels = np.stack([b & 0xF, b >> 4], axis=-1).reshape(N, blocks, block_size)
            else:
                levels = b.reshape(N, blocks, block_size)
            zp = np.full((N, blocks), 1 << (bits - 1), np.float32) if zero_points is None else \
                _unpack_zeros(zero_points, N, blocks, bits)
            w = (levels.astype(np.float32) - zp[..., None]) * scales.reshape(N, blocks, 1).astype(np.float32)
            w = w.reshape(N, -1)[:, :K]
            return ((a.astype(np.float32) @ w.T).astype(a.dtype),)

    return [SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization, GroupQueryAttention, MatMulNBits]


def _unpack_zeros(zero_points: np.ndarray, n: int, blocks: int, bits: int) -> np.ndarray:
    z = zero_points.reshape(n, -1)
    if bits == 4:
        z = np.stack([z & 0xF, z >> 4], axis=-1).reshape(n, -1)
    return z[:, :blocks].astype(np.float32)


class ReferencePool:
    """A stand-in for the runtime's ``SessionPool`` whose sessions are ``onnx.reference`` evaluators
    (:func:`reference_session`): a module's verify check then runs the bundle's graphs with float16
    arithmetic between the ops. Decoder graphs run one prefill from an empty cache
    (``verify.reference.run_decoder``)."""

    def __init__(self, manifest):
        self.manifest = manifest
        self._sessions = {}

    def get(self, name: str):
        if name not in self._sessions:
            self._sessions[name] = reference_session(self.manifest.path(self.manifest.graph(name).file))
        return self._sessions[name]

    def release(self, name: str) -> None:
        self._sessions.pop(name, None)

    def release_all(self) -> None:
        self._sessions.clear()


def module_errors(bundle: str | Path, model: str | Path, modules: list[str], shape: int = 0,
                  prompts: int | None = None, tokens: int | None = None, runner: str = "onnxruntime") -> dict:
    """``{graph: {"max_abs", "rel_rms", ...}}`` of the named modules' graphs in ``bundle`` against
    transformers on the checkpoint ``model`` (each module's verify check, input size ``shape``:
    0 is verify's, 1 a second one); the thinker's summary under ``"thinker"`` when ``prompts`` is
    given. ``runner``: ``onnxruntime`` (CPU provider; a float16 graph with its inserted Casts) or
    ``reference`` (``onnx.reference``: every op in the graph's own types; slow, small inputs)."""
    import gc

    from omni_runtime.bundle.manifest import load_manifest
    from omni_runtime.bundle.sessions import CPU, SessionPool, SessionSettings

    from omni_export.checkpoint.reader import Checkpoint
    from omni_export.modules import REGISTRY
    from omni_export.verify.context import SEED, VerifyContext, embedding_scale

    manifest = load_manifest(bundle)
    ckpt = Checkpoint.open(model)
    if runner == "reference":
        pool = ReferencePool(manifest)
    else:
        pool = SessionPool(manifest, [CPU], SessionSettings(allow_cpu_casts=True))
    ctx = VerifyContext(manifest, ckpt, pool, embedding_scale(ckpt), SEED, prompts, tokens, shape=shape)
    out = {}
    try:
        for name in modules:
            report = REGISTRY[name].reference(ckpt).verify(ctx)
            pool.release_all()
            gc.collect()
            out.update(report.graphs)
            if report.summary is not None:
                out[name] = report.summary
    finally:
        pool.release_all()
    return out


def talker_codes(bundle: str | Path, steps: int, seed: int = 0, forced: list[int] | None = None) -> dict:
    """Greedy talker codes of a bundle's ``talker_embedding`` + ``talker_decoder`` on onnxruntime's
    CPU provider: a seeded prefill of ``PREFILL`` random thinker-space vectors (scaled like the
    thinker's embeddings, ``config.talker`` width), then ``steps`` codes, each step's input the
    previous code's embedding plus a seeded random thinker-side vector (the stand-in for the text
    stream the runtime adds). With ``forced`` (another bundle's codes) the inputs are those codes
    (teacher forcing) and ``argmax`` is this bundle's choice at each step.

    Returns ``{"codes": [...], "argmax": [...]}`` (``argmax`` equals ``codes`` when not forced)."""
    import onnxruntime as ort

    from omni_runtime.bundle.manifest import load_manifest
    from omni_runtime.bundle.names import TALKER_DECODER, TALKER_EMBEDDING
    from omni_runtime.stages.kv_decoder import KVDecoder

    manifest = load_manifest(bundle)
    cfg = manifest.config["talker"]
    width = int(cfg["embedding_size"])
    rng = np.random.default_rng(seed)
    prefill = (rng.standard_normal((1, PREFILL, width)) * TALKER_INPUT_SCALE).astype(np.float32)
    side = (rng.standard_normal((steps, width)) * TALKER_INPUT_SCALE).astype(np.float32)
    sessions = {}
    for name in (TALKER_EMBEDDING, TALKER_DECODER):
        spec = manifest.graph(name)
        options_for = ort.SessionOptions()
        options_for.log_severity_level = 3
        for key, value in spec.session_config.items():
            options_for.add_session_config_entry(key, value)
        sessions[name] = ort.InferenceSession(str(manifest.path(spec.file)), options_for,
                                              providers=["CPUExecutionProvider"])
    decoder = KVDecoder(sessions[TALKER_DECODER], manifest.graph(TALKER_DECODER), ort)
    cache = decoder.new_cache(PREFILL + steps)

    def positions(start: int, count: int) -> np.ndarray:
        return np.broadcast_to(np.arange(start, start + count, dtype=np.int64), (3, 1, count)).copy()

    logits, _ = decoder.step(cache, prefill, positions(0, PREFILL))
    codes, argmax = [], []
    for t in range(steps):
        best = int(np.argmax(logits))
        argmax.append(best)
        code = best if forced is None else int(forced[t])
        codes.append(code)
        if t == steps - 1:
            break
        row = sessions[TALKER_EMBEDDING].run(None, {"input_ids": np.array([[code]], np.int64)})[0]
        logits, _ = decoder.step(cache, row + side[t][None, None], positions(PREFILL + t, 1))
    return {"codes": codes, "argmax": argmax}


def code_agreement(bundle: str | Path, reference: str | Path, steps: int = 64, seed: int = 0) -> dict:
    """The talker of ``bundle`` against the talker of ``reference`` (its float32 build) on the same
    seeded inputs (:func:`talker_codes`): ``teacher_forced`` = the fraction of steps where this
    bundle's greedy code equals the reference's when both are fed the reference's codes;
    ``free_running`` = the fraction of the free-running greedy codes equal to the reference's up
    to the first difference (1.0: all ``steps`` equal); ``first_difference`` its step (None)."""
    ref = talker_codes(reference, steps, seed)
    ours = talker_codes(bundle, steps, seed)
    forced = talker_codes(bundle, steps, seed, forced=ref["codes"])
    same = [a == b for a, b in zip(ours["codes"], ref["codes"])]
    first = same.index(False) if False in same else None
    return {"teacher_forced": float(np.mean([a == b for a, b in zip(forced["argmax"], ref["codes"])])),
            "free_running": 1.0 if first is None else first / steps, "first_difference": first, "steps": steps}


#: prefill length and input scale of :func:`talker_codes` (the thinker's embeddings' std in the
#: 7B checkpoint is about 0.015; tiny checkpoints draw theirs at 0.02)
PREFILL = 12
TALKER_INPUT_SCALE = 0.02


def graph_ops(model: str | Path) -> list[str]:
    """Distinct op types of ``model`` and its subgraphs (weights not loaded)."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    return sorted({node.op_type for graph in _graphs(proto.graph) for node in graph.node})


__all__ = ["INSERTED_CAST", "cpu_casts", "graph_ops", "reference_session"]
