"""The canonical block-quantized weight shared by RTN, AWQ, AutoAWQ import and the graph builder."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Bit widths a :class:`QuantWeight` may have (levels stored one per uint8).
SUPPORTED_BITS = (2, 4, 8)


def n_blocks(k: int, group_size: int) -> int:
    """Number of quantization blocks along K: ``ceil(k / group_size)``."""
    return -(-int(k) // int(group_size))


@dataclass
class QuantWeight:
    """Block-wise quantized linear or embedding weight.

    ``q`` uint8 [N, K] integer levels (0..15 for 4 bits, 0..255 for 8), ``scales`` float32 [N, G]
    and ``zeros`` uint8 [N, G] with G = ceil(K / group_size) (the last block may be partial).
    Row ``n`` is output feature ``n`` (a torch ``nn.Linear.weight`` row), column ``k`` input
    feature ``k``; blocks run along K.
    """

    q: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    group_size: int
    bits: int = 4

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the float weight."""
        return tuple(self.q.shape)  # type: ignore[return-value]

    @property
    def n_blocks(self) -> int:
        return n_blocks(self.q.shape[1], self.group_size)

    @property
    def nbytes(self) -> int:
        """Bytes once stored: ``bits`` per level, plus the scales and zero points."""
        return int(self.q.size * self.bits // 8 + self.scales.nbytes + self.zeros.nbytes)

    def validate(self) -> "QuantWeight":
        """Check dtypes, shapes and level ranges; returns self (raises ValueError)."""
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.q.dtype != np.uint8 or self.zeros.dtype != np.uint8 or self.scales.dtype != np.float32:
            raise ValueError(
                f"QuantWeight dtypes must be q uint8, scales float32, zeros uint8; got "
                f"{self.q.dtype}, {self.scales.dtype}, {self.zeros.dtype}"
            )
        if self.q.ndim != 2:
            raise ValueError(f"q must be 2-D [N, K], got shape {self.q.shape}")
        n, k = self.q.shape
        g = n_blocks(k, self.group_size)
        if self.scales.shape != (n, g) or self.zeros.shape != (n, g):
            raise ValueError(
                f"scales/zeros must be [{n}, {g}] for K={k}, group_size={self.group_size}; got "
                f"{self.scales.shape} and {self.zeros.shape}"
            )
        top = (1 << self.bits) - 1
        if (self.q.size and int(self.q.max()) > top) or (self.zeros.size and int(self.zeros.max()) > top):
            raise ValueError(f"levels above {top} in a {self.bits}-bit QuantWeight")
        return self

    def dequantize(self) -> np.ndarray:
        """float32 [N, K]: (q - zeros[:, k // gs]) * scales[:, k // gs]."""
        k = self.q.shape[1]
        zeros = np.repeat(self.zeros.astype(np.float32), self.group_size, axis=1)[:, :k]
        scales = np.repeat(self.scales.astype(np.float32), self.group_size, axis=1)[:, :k]
        return (self.q.astype(np.float32) - zeros) * scales

    def equals(self, other: "QuantWeight") -> bool:
        """Bit-for-bit equality of levels, scales, zero points, group size and bits."""
        return (
            self.group_size == other.group_size
            and self.bits == other.bits
            and self.q.dtype == other.q.dtype
            and self.scales.dtype == other.scales.dtype
            and self.zeros.dtype == other.zeros.dtype
            and np.array_equal(self.q, other.q)
            and np.array_equal(self.zeros, other.zeros)
            and self.scales.shape == other.scales.shape
            and np.array_equal(self.scales.view(np.uint32), other.scales.view(np.uint32))
        )


@dataclass
class ChannelQuantWeight:
    """Symmetric per-output-channel quantized weight (int8 weight-only).

    ``q`` int8 with the float weight's shape (axis 0 = output channel: a ``nn.Linear.weight``
    [N, K] or a convolution's [out, in, k]), ``scales`` float32 [N]: ``w = q * scales[n]``, no zero
    point (ONNX ``DequantizeLinear`` with an int8 input and per-axis scale)."""

    q: np.ndarray
    scales: np.ndarray
    bits: int = 8

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes + self.scales.nbytes)

    def dequantize(self) -> np.ndarray:
        """float32 weight of the same shape: ``q * scales`` broadcast along axis 0."""
        return self.q.astype(np.float32) * self.scales.reshape((-1,) + (1,) * (self.q.ndim - 1))


#: activation quantization of a W8A8 linear: int8 symmetric, scale computed at run time per token
#: (msModelSlim's W8A8_DYNAMIC) or per tensor (one scale for the whole input)
W8A8_ACTIVATIONS = ("per_token", "per_tensor")


@dataclass
class W8A8Weight:
    """A W8A8 linear: int8 weight per output channel, symmetric, and int8 activations quantized
    at run time (``activations``: per token or per tensor, symmetric absmax / 127).

    ``q`` int8 [N, K] (a ``nn.Linear.weight`` layout), ``scales`` float32 [N]:
    ``y = (xq @ q.T) * scales * x_scale``. SmoothQuant scales, when used, are already folded into
    ``q`` and the preceding norm (``omni_export.quant.w8a8``)."""

    q: np.ndarray
    scales: np.ndarray
    activations: str = "per_token"
    bits: int = 8

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes + self.scales.nbytes)

    def validate(self) -> "W8A8Weight":
        """Check dtypes, shapes and the activation mode; returns self (raises ValueError)."""
        if self.q.dtype != np.int8 or self.q.ndim != 2:
            raise ValueError(f"W8A8 weight levels must be int8 [N, K], got {self.q.dtype} {self.q.shape}")
        if self.scales.dtype != np.float32 or self.scales.shape != (self.q.shape[0],):
            raise ValueError(f"W8A8 weight scales must be float32 [{self.q.shape[0]}], got "
                             f"{self.scales.dtype} {self.scales.shape}")
        if self.activations not in W8A8_ACTIVATIONS:
            raise ValueError(f"W8A8 activations must be one of {W8A8_ACTIVATIONS}, got {self.activations!r}")
        return self

    def dequantize(self) -> np.ndarray:
        """float32 [N, K]: ``q * scales[n]`` (what the weight means without the activation rounding)."""
        return self.q.astype(np.float32) * self.scales[:, None]


@dataclass
class W8A8StaticWeight:
    """A W8A8 linear with static activations (msModelSlim's ``W8A8``): int8 weight per output
    channel, symmetric; the activation quantized with one calibrated scale and offset for the
    whole input (per tensor, asymmetric), as msModelSlim's ``AscendV1Saver.on_w8a8_static`` writes
    it::

        levels = clip(round(x / input_scale + input_offset), -128, 127)
        y      = float32(levels @ q.T + quant_bias) * deq_scale

    ``q`` int8 [N, K], ``input_scale`` / ``input_offset`` float32 [1] (the offset an integer),
    ``deq_scale`` float32 [N] (``input_scale * weight_scale``), ``quant_bias`` int32 [N]
    (``round(bias / deq_scale - sum_k(q[n, k]) * input_offset)``: the float bias and the
    offset's correction, so the linear has no separate bias)."""

    q: np.ndarray
    input_scale: np.ndarray
    input_offset: np.ndarray
    deq_scale: np.ndarray
    quant_bias: np.ndarray
    activations: str = "static"
    bits: int = 8

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes + self.deq_scale.nbytes + self.quant_bias.nbytes + 8)

    def validate(self) -> "W8A8StaticWeight":
        """Check dtypes and shapes; returns self (raises ValueError)."""
        n = self.q.shape[0] if self.q.ndim == 2 else None
        if self.q.dtype != np.int8 or n is None:
            raise ValueError(f"W8A8 weight levels must be int8 [N, K], got {self.q.dtype} {self.q.shape}")
        for name, dtype, shape in (("input_scale", np.float32, (1,)), ("input_offset", np.float32, (1,)),
                                   ("deq_scale", np.float32, (n,)), ("quant_bias", np.int32, (n,))):
            value = getattr(self, name)
            if value.dtype != dtype or value.shape != shape:
                raise ValueError(f"static W8A8 {name} must be {np.dtype(dtype).name} {list(shape)}, got "
                                 f"{value.dtype} {list(value.shape)}")
        if not (np.isfinite(self.input_scale).all() and self.input_scale[0] > 0):
            raise ValueError(f"static W8A8 input_scale must be positive, got {self.input_scale[0]}")
        if self.input_offset[0] != np.round(self.input_offset[0]) or not -128 <= self.input_offset[0] <= 127:
            raise ValueError(f"static W8A8 input_offset must be an integer in [-128, 127], got {self.input_offset[0]}")
        if self.activations != "static":
            raise ValueError(f"a W8A8StaticWeight's activations are 'static', got {self.activations!r}")
        return self

    @property
    def activation_key(self) -> tuple[float, float]:
        """What linears reading the same input must share to share its quantized levels."""
        return float(self.input_scale[0]), float(self.input_offset[0])

    def dequantize(self) -> np.ndarray:
        """float32 [N, K]: ``q * weight_scale[n]`` with ``weight_scale = deq_scale / input_scale``."""
        return self.q.astype(np.float32) * (self.deq_scale / self.input_scale[0])[:, None]

    def float_bias(self) -> np.ndarray:
        """float32 [N]: the bias ``quant_bias`` carries, without the offset's correction."""
        correction = self.q.astype(np.float32).sum(axis=1) * self.input_offset[0]
        return ((self.quant_bias.astype(np.float32) + correction) * self.deq_scale).astype(np.float32)
