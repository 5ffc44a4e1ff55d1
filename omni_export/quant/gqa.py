"""Grouped-query attention's channel map between v_proj and o_proj.

Under GQA (Qwen2.5-Omni-7B: 28 query heads, 4 KV heads) query head ``j`` attends with KV head
``j // (heads / kv_heads)``, so o_proj's input column ``(j, d)`` reads v_proj's output channel
``(j // rep, d)``. A scale moved from o_proj's input into v_proj's output rows (AWQ's v -> o
group, W8A8 smoothing) is therefore one per v channel, shared by its query heads' columns.
"""

from __future__ import annotations

import numpy as np

__all__ = ["value_channel_of_column"]


def value_channel_of_column(heads: int, kv_heads: int, head_dim: int) -> np.ndarray:
    """int64 [heads * head_dim]: for each o_proj input column, the v_proj output channel it reads."""
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not split into {kv_heads} KV heads")
    rep = heads // kv_heads
    return ((np.arange(heads) // rep)[:, None] * head_dim + np.arange(head_dim)[None, :]).reshape(-1).astype(np.int64)
