"""Host-side multimodal rope (mrope) position ids, in numpy.

All data-dependent index preparation for the thinker lives here; the decoder graph takes
``position_ids [3, batch, sequence]`` as an input. Text tokens use the same position on the
three axes (temporal, height, width). Audio/image/video index rules join this module with
the multimodal inputs.
"""

from __future__ import annotations

import numpy as np


def text_position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """Positions for a left-padded text prompt, as transformers' ``get_rope_index`` computes them.

    ``attention_mask`` is ``[batch, sequence]`` (1 = token, 0 = padding). Returns
    ``[3, batch, sequence]`` int64: ``cumsum(mask) - 1`` per row, padding set to 1.
    """
    mask = np.asarray(attention_mask, dtype=np.int64)
    positions = np.cumsum(mask, axis=-1) - 1
    positions = np.where(mask == 0, 1, positions)
    return np.broadcast_to(positions[None], (3, *positions.shape)).astype(np.int64, copy=True)


def next_position_ids(last_positions: np.ndarray, steps: int = 1) -> np.ndarray:
    """Positions of the next ``steps`` tokens after each row's ``last_positions [3, batch]``."""
    last = np.asarray(last_positions, dtype=np.int64)
    offsets = np.arange(1, steps + 1, dtype=np.int64)
    return (last[..., None] + offsets).astype(np.int64)
