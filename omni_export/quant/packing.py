"""On-disk and in-graph layouts of a :class:`~omni_export.quant.types.QuantWeight`.

* :func:`to_matmulnbits`: ONNX Runtime's contrib op ``com.microsoft.MatMulNBits``
  (onnxruntime docs/ContribOperators.md): ``B`` uint8 [N, n_blocks, blob_size] with
  blob_size = block_size * bits / 8, K zero-padded to n_blocks * block_size and the levels
  bit-packed along K low bits first (4 bits: element 2j in the low nibble of byte j); ``scales``
  [N * n_blocks]; ``zero_points`` uint8 [N * ceil(n_blocks * bits / 8)], packed the same way
  with each row padded to a whole byte.
* :func:`to_blocked_dq` + :func:`uint4_tensor`: standard ONNX ``DequantizeLinear`` (opset 21+,
  ``axis=0``, ``block_size``) on a [K, N] weight feeding ``MatMul(x, W)``.
* :func:`unpack_autoawq` / :func:`pack_autoawq`: AutoAWQ's GEMM checkpoint format
  (``WQLinear_GEMM``: ``qweight`` int32 [K, N/8], ``qzeros`` int32 [K/group, N/8], ``scales``
  float16 [K/group, N]); eight 4-bit values per int32 along N, value ``i`` of an int32 (bits
  4i..4i+3) holding column ``8c + AWQ_ORDER[i]`` (awq/modules/linear/gemm.py ``from_linear``,
  awq/utils/packing_utils.py).
"""

from __future__ import annotations

import numpy as np

from omni_export.quant.types import QuantWeight, n_blocks

__all__ = [
    "AWQ_ORDER",
    "AWQ_REVERSE_ORDER",
    "pack_autoawq",
    "pack_bits",
    "to_blocked_dq",
    "to_matmulnbits",
    "uint4_tensor",
    "unpack_autoawq",
]

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def pack_bits(levels: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-wide levels along the last axis into bytes, low bits first.

    [..., L] -> [..., ceil(L * bits / 8)] uint8; the last byte of each row is zero-padded.
    """
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
    levels = np.asarray(levels, dtype=np.uint8)
    if bits == 8:
        return levels.copy()
    per = 8 // bits
    length = levels.shape[-1]
    pad = -length % per
    if pad:
        levels = np.concatenate([levels, np.zeros(levels.shape[:-1] + (pad,), np.uint8)], axis=-1)
    grouped = levels.reshape(levels.shape[:-1] + (-1, per)).astype(np.uint16)
    out = np.zeros(grouped.shape[:-1], dtype=np.uint16)
    for i in range(per):
        out |= grouped[..., i] << (bits * i)
    return out.astype(np.uint8)


def to_matmulnbits(w: QuantWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B uint8 [N, n_blocks, blob_size], scales float32 [N * n_blocks],
    zero_points uint8 [N * ceil(n_blocks * bits / 8)]) for ``com.microsoft.MatMulNBits`` with
    attributes K, N, bits=w.bits, block_size=w.group_size."""
    w.validate()
    if w.group_size & (w.group_size - 1):
        raise ValueError(f"MatMulNBits needs a power-of-two block size >= 16, got {w.group_size}")
    n, k = w.q.shape
    nb = n_blocks(k, w.group_size)
    padded = np.zeros((n, nb * w.group_size), dtype=np.uint8)
    padded[:, :k] = w.q
    b = pack_bits(padded.reshape(n, nb, w.group_size), w.bits)
    scales = np.ascontiguousarray(w.scales, dtype=np.float32).reshape(-1)
    zero_points = pack_bits(w.zeros, w.bits).reshape(-1)
    return b, scales, zero_points


def to_blocked_dq(w: QuantWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(levels [K, N] uint8, scale float32 [G, N], zero_point uint8 [G, N]) for
    ``DequantizeLinear(levels, scale, zero_point, axis=0, block_size=w.group_size)`` whose
    output is the [K, N] right-hand side of ``MatMul(x, W)`` (x [.., K]).

    For 4 bits the levels and zero points are 0..15 and must be stored as ONNX uint4
    (:func:`uint4_tensor`); for 8 bits as uint8 (``onnx.numpy_helper.from_array``)."""
    w.validate()
    if w.bits not in (4, 8):
        raise ValueError(f"blocked DequantizeLinear supports 4 or 8 bits here, got {w.bits}")
    levels = np.ascontiguousarray(w.q.T)
    scale = np.ascontiguousarray(w.scales.T, dtype=np.float32)
    zero_point = np.ascontiguousarray(w.zeros.T)
    return levels, scale, zero_point


def uint4_tensor(name: str, levels: np.ndarray):
    """An ONNX ``TensorProto`` of type UINT4 with ``levels``' shape (values 0..15, given as
    uint8), packed two per byte in row-major order, first element in the low nibble."""
    from onnx import TensorProto, helper

    levels = np.asarray(levels)
    if levels.size and (levels.min() < 0 or levels.max() > 15):
        raise ValueError("uint4 values must be in 0..15")
    flat = levels.astype(np.uint8).reshape(-1)
    raw = pack_bits(flat, 4).tobytes()
    return helper.make_tensor(name, TensorProto.UINT4, list(levels.shape), raw, raw=True)


# ------------------------------------------------------------------------------------ AutoAWQ


def _as_uint32(a, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype != np.int32:
        raise ValueError(f"AutoAWQ {name} must be int32, got {arr.dtype}")
    return np.ascontiguousarray(arr).view(np.uint32)


def unpack_autoawq(qweight, qzeros, scales, group_size: int) -> QuantWeight:
    """AutoAWQ GEMM tensors -> QuantWeight ([N, K] levels, float32 scales, uint8 zeros).

    ``qweight`` int32 [K, N/8], ``qzeros`` int32 [G, N/8], ``scales`` float16 [G, N] with
    G = K / group_size. Dequantized weight ``W[n, k] = (q - z) * s`` as AutoAWQ's
    ``dequantize_gemm`` (which returns its transpose [K, N])."""
    qw = _as_uint32(qweight, "qweight")
    qz = _as_uint32(qzeros, "qzeros")
    sc = np.asarray(scales)
    if qw.ndim != 2 or qz.ndim != 2 or sc.ndim != 2:
        raise ValueError("AutoAWQ qweight, qzeros and scales must be 2-D")
    k, n8 = qw.shape
    g, n = sc.shape
    if n != n8 * 8 or qz.shape != (g, n8):
        raise ValueError(
            f"inconsistent AutoAWQ shapes: qweight {qw.shape}, qzeros {qz.shape}, scales {sc.shape} "
            "(expected [K, N/8], [G, N/8], [G, N])"
        )
    if group_size <= 0 or k != g * group_size:
        raise ValueError(f"AutoAWQ K={k} is not {g} groups of {group_size}")

    shifts = np.arange(0, 32, 4, dtype=np.uint32)

    def unpack(packed: np.ndarray) -> np.ndarray:
        nib = ((packed[:, :, None] >> shifts) & 0xF).astype(np.uint8)  # [R, N/8, 8] value i
        return nib[:, :, list(AWQ_REVERSE_ORDER)].reshape(packed.shape[0], -1)  # column order

    q = np.ascontiguousarray(unpack(qw).T)
    zeros = np.ascontiguousarray(unpack(qz).T)
    return QuantWeight(
        q=q,
        scales=np.ascontiguousarray(sc.astype(np.float32).T),
        zeros=zeros,
        group_size=int(group_size),
        bits=4,
    )


def pack_autoawq(w: QuantWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """QuantWeight -> (qweight int32 [K, N/8], qzeros int32 [G, N/8], scales float16 [G, N]).

    Needs 4 bits, N % 8 == 0 and K % group_size == 0 (AutoAWQ's WQLinear_GEMM constraints).
    The scales are rounded to float16 (as AutoAWQ stores them)."""
    w.validate()
    if w.bits != 4:
        raise ValueError(f"AutoAWQ GEMM stores 4-bit weights only, got {w.bits} bits")
    n, k = w.q.shape
    if n % 8:
        raise ValueError(f"AutoAWQ GEMM needs out_features divisible by 8, got {n}")
    if k % w.group_size:
        raise ValueError(f"AutoAWQ GEMM needs in_features ({k}) divisible by group_size ({w.group_size})")

    shifts = np.arange(0, 32, 4, dtype=np.uint32)

    def pack(cols: np.ndarray) -> np.ndarray:  # [R, N] levels -> [R, N/8] int32
        r = cols.shape[0]
        vals = cols.reshape(r, -1, 8)[:, :, list(AWQ_ORDER)].astype(np.uint32)  # value i = column ORDER[i]
        packed = np.bitwise_or.reduce(vals << shifts, axis=-1).astype(np.uint32)
        return packed.view(np.int32)

    qweight = pack(np.ascontiguousarray(w.q.T))
    qzeros = pack(np.ascontiguousarray(w.zeros.T))
    scales = np.ascontiguousarray(w.scales.T).astype(np.float16)
    return qweight, qzeros, scales
