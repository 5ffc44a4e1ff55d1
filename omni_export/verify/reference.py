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
        decoder = KVDecoder(pool.get(name), pool.manifest.graph(name), import_onnxruntime())
        return decoder.step(decoder.new_cache(embeds.shape[1]), embeds, positions, want_hidden=True)
    finally:
        if release:
            pool.release(name)
