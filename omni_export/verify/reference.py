"""The two sides of a check: a transformers module holding only its checkpoint tensors, and a
bundle graph run once."""

from __future__ import annotations

import numpy as np

from omni_export.checkpoint.reader import Checkpoint


def reference_module(ckpt: Checkpoint, cls, config, prefixes: tuple[str, ...]):
    """transformers ``cls(config)`` (fp32, eval, sdpa) holding the checkpoint's tensors under ``prefixes``
    (``Checkpoint.tensors``: by local name, loaded strictly), built without initialising weights:
    only this module is read."""
    import copy

    import torch
    from transformers.initialization import no_init_weights

    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"
    with no_init_weights():
        module = cls(config)
    module.load_state_dict(ckpt.tensors(prefixes, dtype=torch.float32), strict=True, assign=True)
    return module.float().eval()


def run_graph(pool, name: str, feeds: dict) -> list[np.ndarray]:
    """Run graph ``name`` once and release its session."""
    try:
        return pool.get(name).run(None, feeds)
    finally:
        pool.release(name)


def run_decoder(pool, name: str, embeds: np.ndarray, positions: np.ndarray,
                release: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One prefill of ``embeds`` [1, S, hidden] at ``positions`` [3, 1, S] through the KV decoder graph
    ``name`` (empty cache): (the last position's logits, the post-norm hidden states [1, S, hidden]);
    the session is released unless ``release`` is False."""
    from omni_runtime.bundle.sessions import import_onnxruntime
    from omni_runtime.stages.kv_decoder import KVDecoder

    try:
        session = pool.get(name)
        if not hasattr(session, "io_binding"):  # onnx.reference (omni_export.verify.precision): plain feeds
            return _run_decoder_feeds(session, pool.manifest.graph(name), embeds, positions)
        decoder = KVDecoder(session, pool.manifest.graph(name), import_onnxruntime())
        return decoder.step(decoder.new_cache(embeds.shape[1]), embeds, positions, want_hidden=True)
    finally:
        if release:
            pool.release(name)


def _run_decoder_feeds(session, spec, embeds: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One prefill through a KV decoder graph with empty past arrays (a session without IO binding)."""
    seq = embeds.shape[1]
    feeds = {"inputs_embeds": embeds, "position_ids": positions,
             "seqlens_k": np.array([seq - 1], np.int32), "total_sequence_length": np.array(seq, np.int32)}
    for t in spec.inputs:
        if t.name.startswith("past_key_values."):
            feeds[t.name] = np.zeros((1, int(t.shape[1]), 0, int(t.shape[3])), dtype=np.dtype(t.dtype))
    outputs = dict(zip([t.name for t in spec.outputs], session.run(None, feeds)))
    return outputs["logits"][0, -1], outputs["last_hidden_state"]
