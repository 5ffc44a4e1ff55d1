"""Round-to-nearest block quantization (numpy), AutoAWQ's formulas.

Asymmetric (zero point), per row and per block of ``group_size`` input features, as AutoAWQ's
``AwqQuantizer.pseudo_quantize_tensor`` with ``zero_point=True``::

    scale = max(max - min, 1e-5) / (2**bits - 1)
    zero  = clamp(round(-min / scale), 0, 2**bits - 1)
    q     = clamp(round(w / scale) + zero, 0, 2**bits - 1)

Symmetric (absmax), as ``zero_point=False``, stored with the implicit zero point
``2**(bits-1)`` of ONNX Runtime's MatMulNBits::

    scale = max(absmax, 1e-5) / (2**(bits-1) - 1)
    q     = clamp(round(w / scale), -2**(bits-1), 2**(bits-1) - 1) + 2**(bits-1)

All arithmetic is float32 with round-half-to-even, like torch, so the levels equal AutoAWQ's
bit for bit. ``clip`` ([N, G] max-abs values from AWQ's clipping search) clamps each block to
``[-clip, clip]`` before the min/max are taken, as AutoAWQ's ``apply_clip``.
"""

from __future__ import annotations

import numpy as np

from omni_export.quant.types import SUPPORTED_BITS, ChannelQuantWeight, QuantWeight, n_blocks

__all__ = ["check_group_size", "quantize", "quantize_channels", "quantize_rows"]

#: Rows quantized at a time by :func:`quantize_rows`.
ROWS_PER_SLICE = 8192


def check_group_size(group_size: int) -> int:
    """``group_size`` as int; ValueError unless it is a positive multiple of 16."""
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise ValueError(f"group_size must be an integer, got {group_size!r}")
    if group_size <= 0 or group_size % 16:
        raise ValueError(f"group_size must be a positive multiple of 16 (16, 32, 64, 128, ...), got {group_size}")
    return int(group_size)


def _blocks(w: np.ndarray, group_size: int) -> np.ndarray:
    """[N, K] -> [N, G, group_size]; a partial last block is padded with its own last value
    (so the padding changes neither min, max nor absmax of that block)."""
    n, k = w.shape
    pad = n_blocks(k, group_size) * group_size - k
    if pad:
        w = np.pad(w, ((0, 0), (0, pad)), mode="edge")
    return w.reshape(n, -1, group_size)


def quantize(
    weight: np.ndarray,
    group_size: int,
    bits: int = 4,
    symmetric: bool = False,
    clip: np.ndarray | None = None,
) -> QuantWeight:
    """Quantize a float weight [N, K] (rows = output features) block-wise along K."""
    group_size = check_group_size(group_size)
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    w = np.asarray(weight)
    if w.ndim != 2 or 0 in w.shape:
        raise ValueError(f"weight must be a non-empty 2-D array [N, K], got shape {w.shape}")
    w = w.astype(np.float32, copy=False)
    if not np.isfinite(w).all():
        raise ValueError("weight contains NaN or infinity")
    n, k = w.shape
    g = n_blocks(k, group_size)
    wb = _blocks(w, group_size)
    if clip is not None:
        clip = np.asarray(clip, dtype=np.float32)
        if clip.shape != (n, g):
            raise ValueError(f"clip must have shape [{n}, {g}] (rows x blocks), got {clip.shape}")
        if not np.isfinite(clip).all() or (clip < 0).any():
            raise ValueError("clip values must be finite and non-negative")
        c = clip[..., None]
        wb = np.clip(wb, -c, c)

    if symmetric:
        max_int = (1 << (bits - 1)) - 1
        min_int = -(1 << (bits - 1))
        absmax = np.maximum(np.abs(wb).max(axis=-1), np.float32(1e-5))
        scales = (absmax / np.float32(max_int)).astype(np.float32)
        q = np.clip(np.round(wb / scales[..., None]), min_int, max_int) - min_int
        zeros = np.full((n, g), -min_int, dtype=np.uint8)
    else:
        max_int = (1 << bits) - 1
        mx = wb.max(axis=-1)
        mn = wb.min(axis=-1)
        scales = (np.maximum(mx - mn, np.float32(1e-5)) / np.float32(max_int)).astype(np.float32)
        zf = np.clip(-np.round(mn / scales), 0, max_int)
        q = np.clip(np.round(wb / scales[..., None]) + zf[..., None], 0, max_int)
        zeros = zf.astype(np.uint8)
    q = q.reshape(n, g * group_size)[:, :k].astype(np.uint8)
    return QuantWeight(q=q, scales=scales, zeros=zeros, group_size=group_size, bits=bits)


def quantize_rows(weight: np.ndarray, group_size: int, bits: int = 4, symmetric: bool = False,
                  clip: np.ndarray | None = None, rows: int = ROWS_PER_SLICE) -> QuantWeight:
    """:func:`quantize`, ``rows`` rows at a time: rows are independent, so the result is the same
    while the temporaries stay small next to a large table (an embedding table or lm_head,
    152064 x 3584 floats for the real 7B)."""
    parts = [quantize(weight[r:r + rows], group_size, bits=bits, symmetric=symmetric,
                      clip=None if clip is None else clip[r:r + rows])
             for r in range(0, weight.shape[0], rows)]
    if len(parts) == 1:
        return parts[0]
    return QuantWeight(np.concatenate([p.q for p in parts]), np.concatenate([p.scales for p in parts]),
                       np.concatenate([p.zeros for p in parts]), parts[0].group_size, bits)


def quantize_channels(weight: np.ndarray, bits: int = 8) -> ChannelQuantWeight:
    """Symmetric round-to-nearest per output channel (axis 0), weight-only int8.

    ``scale[n] = max(absmax(w[n]), 1e-8) / (2**(bits-1) - 1)``, ``q = round(w / scale)`` (half to
    even, float32), so ``q`` is in ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``: the range is
    symmetric and the zero point is 0. Works for any rank >= 2 (linears [N, K], convolutions
    [out, in, k])."""
    if bits != 8:
        raise ValueError(f"per-channel quantization stores int8 levels, got bits={bits!r}")
    w = np.asarray(weight)
    if w.ndim < 2 or 0 in w.shape:
        raise ValueError(f"weight must be a non-empty array of rank >= 2 [out, ...], got shape {w.shape}")
    w = w.astype(np.float32, copy=False)
    if not np.isfinite(w).all():
        raise ValueError("weight contains NaN or infinity")
    top = (1 << (bits - 1)) - 1
    absmax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    scales = (np.maximum(absmax, np.float32(1e-8)) / np.float32(top)).astype(np.float32)
    q = np.clip(np.round(w / scales.reshape((-1,) + (1,) * (w.ndim - 1))), -top, top).astype(np.int8)
    return ChannelQuantWeight(q=q, scales=scales, bits=bits)
