"""W8A8 maths (numpy): int8 weights per output channel, int8 activations quantized at run time.

msModelSlim's ``W8A8_DYNAMIC`` (its Qwen2.5 recipes' default): the weight of each linear is
int8, symmetric, one scale per output channel; the activation entering it is quantized at run
time, symmetric, one scale per token::

    weight:     w_scale[n] = max(absmax(w[n]), 1e-8) / 127,  q = clip(round(w / w_scale), -127, 127)
    activation: x_scale[t] = max(absmax(x[t]), ACT_EPS) / 127, xq = clip(round(x / x_scale), -127, 127)
    output:     y = float32(xq @ q.T) * w_scale * x_scale      (int32 accumulation)

``per_tensor`` takes one activation scale over the whole input instead. ``static`` (msModelSlim's
``W8A8``, :func:`quantize_weight_static`) takes one scale and offset calibrated ahead of time
(per tensor, asymmetric) and carries the bias in an int32 ``quant_bias``::

    levels = clip(round(x / input_scale + input_offset), -128, 127)
    y      = float32(levels @ q.T + quant_bias) * deq_scale Rounding is half to even
in float32, as ONNX ``Round``; the graph (``omni_export.export.w8a8_linear``) performs these very
operations in this order, so :func:`w8a8_matmul` is its exact reference for one linear.

SmoothQuant (:func:`smooth_scales`): per input channel ``s = act_absmax**alpha /
w_absmax**(1 - alpha)`` from calibration activations; the activation is divided by ``s`` (folded
into the RMSNorm weight that produces it) and the weight columns multiplied by it, so the float
layer computes the same function while the activation outliers move into the weights.
"""

from __future__ import annotations

import numpy as np

from omni_export.quant.rtn import quantize_channels
from omni_export.quant.types import W8A8_ACTIVATIONS, W8A8StaticWeight, W8A8Weight

__all__ = ["ACT_EPS", "QMAX", "fold_linear_smoothing", "fold_smoothing", "quantize_activations", "quantize_weight",
           "quantize_weight_static", "smooth_scales", "static_activation_params", "w8a8_matmul", "w8a8_static_matmul"]

#: int8 levels are symmetric: [-127, 127]
QMAX = 127.0
#: floor of an activation's absmax (an all-zero token gets scale ACT_EPS / 127, levels 0)
ACT_EPS = 1e-8
#: floor of a smoothing scale
SMOOTH_EPS = 1e-5


def quantize_weight(weight: np.ndarray, activations: str = "per_token") -> W8A8Weight:
    """A float weight [N, K] as a W8A8 linear: int8 per output channel, symmetric
    (``quant.rtn.quantize_channels``: the same levels as the int8 weight-only modules)."""
    if activations not in W8A8_ACTIVATIONS:
        raise ValueError(f"activations must be one of {W8A8_ACTIVATIONS}, got {activations!r}")
    channel = quantize_channels(np.asarray(weight))
    if channel.q.ndim != 2:
        raise ValueError(f"a W8A8 weight is 2-D [N, K], got shape {channel.q.shape}")
    return W8A8Weight(channel.q, channel.scales, activations)


def quantize_activations(x: np.ndarray, activations: str = "per_token") -> tuple[np.ndarray, np.ndarray]:
    """(int8 levels, float32 scales) of a float32 activation ``x`` [..., K]: one scale per token
    (scales [..., 1]) or per tensor (scales of ``x``'s rank, all axes 1), as the graph computes them."""
    x = np.asarray(x, dtype=np.float32)
    if activations == "per_token":
        absmax = np.abs(x).max(axis=-1, keepdims=True)
    elif activations == "per_tensor":
        absmax = np.abs(x).max(keepdims=True) if x.size else np.zeros((1,) * x.ndim, np.float32)
    else:
        raise ValueError(f"activations must be one of {W8A8_ACTIVATIONS}, got {activations!r}")
    scale = (np.maximum(absmax, np.float32(ACT_EPS)) / np.float32(QMAX)).astype(np.float32)
    levels = np.clip(np.round(x / scale), -QMAX, QMAX).astype(np.int8)
    return levels, scale


def w8a8_matmul(x: np.ndarray, weight: W8A8Weight, bias: np.ndarray | None = None) -> np.ndarray:
    """``x @ W.T (+ bias)`` of a W8A8 linear, float32 [..., N]: the graph's computation, exactly
    (int32 accumulation, then ``* w_scale * x_scale`` in float32)."""
    levels, scale = quantize_activations(x, weight.activations)
    acc = np.matmul(levels.astype(np.int32), weight.q.T.astype(np.int32))
    y = acc.astype(np.float32) * weight.scales * scale
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float32)
    return y.astype(np.float32)


def smooth_scales(act_absmax: np.ndarray, weights: list[np.ndarray], alpha: float,
                  expand: np.ndarray | None = None) -> np.ndarray:
    """SmoothQuant's per-input-channel scales ``s`` [K] for the linears ``weights`` ([N_i, K]) that
    read one activation whose per-channel absmax over the calibration tokens is ``act_absmax``:
    ``s = act_absmax**alpha / w_absmax**(1 - alpha)`` (``w_absmax`` over all rows of all
    ``weights``), at least SMOOTH_EPS; 1 for a channel the calibration never activated or whose
    weights are all zero.

    ``expand`` [K]: input column -> the channel that carries its scale (several columns share
    one, e.g. o_proj's query-head columns of one KV head's v_proj channel); both absmaxes are
    then taken over each channel's columns and ``s`` has one entry per channel."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha!r}")
    act = np.asarray(act_absmax, dtype=np.float64)
    w = np.concatenate([np.abs(np.asarray(m, dtype=np.float64)) for m in weights]).max(axis=0)
    if act.shape != w.shape:
        raise ValueError(f"activation statistics [{act.shape}] and weights [{w.shape}] differ in input channels")
    if expand is not None:
        expand = np.asarray(expand)
        if expand.shape != act.shape:
            raise ValueError(f"expand [{expand.shape}] does not map the {act.shape[0]} input columns")
        n = int(expand.max()) + 1
        act_c, w_c = np.zeros(n), np.zeros(n)
        np.maximum.at(act_c, expand, act)
        np.maximum.at(w_c, expand, w)
        act, w = act_c, w_c
    with np.errstate(divide="ignore", invalid="ignore"):
        s = act ** float(alpha) / w ** (1.0 - float(alpha))
    s = np.where((act > 0) & (w > 0) & np.isfinite(s), np.maximum(s, SMOOTH_EPS), 1.0)
    return s.astype(np.float32)


def fold_smoothing(norm_weight: np.ndarray, weights: list[np.ndarray], s: np.ndarray
                   ) -> tuple[np.ndarray, list[np.ndarray]]:
    """(norm weight / s, [w * s for each linear]): the RMSNorm's output channel ``k`` divided by
    ``s[k]`` and each reading linear's input column ``k`` multiplied by it (the same function)."""
    s = np.asarray(s, dtype=np.float32)
    return ((np.asarray(norm_weight, np.float32) / s).astype(np.float32),
            [(np.asarray(w, np.float32) * s[None, :]).astype(np.float32) for w in weights])


def fold_linear_smoothing(prev_weight: np.ndarray, prev_bias: np.ndarray | None, weight: np.ndarray,
                          s: np.ndarray, expand: np.ndarray | None = None):
    """(prev weight, prev bias, weight) with smoothing ``s`` moved from ``weight``'s input into
    the previous linear's output: its rows (and bias) divided by ``s``, ``weight``'s input
    columns multiplied by ``s[expand]`` (``s`` itself without ``expand``). The same function
    where everything between the two is linear in each channel: attention's ``softmax(QK^T) V``
    (v_proj -> o_proj) and SwiGLU's ``act(gate) * up`` (up_proj -> down_proj)."""
    s = np.asarray(s, dtype=np.float32)
    cols = s if expand is None else s[np.asarray(expand)]
    prev = (np.asarray(prev_weight, np.float32) / s[:, None]).astype(np.float32)
    bias = None if prev_bias is None else (np.asarray(prev_bias, np.float32) / s).astype(np.float32)
    return prev, bias, (np.asarray(weight, np.float32) * cols[None, :]).astype(np.float32)


def static_activation_params(x_min: float, x_max: float) -> tuple[np.ndarray, np.ndarray]:
    """(input_scale, input_offset), float32 [1] each, of an activation whose calibration range is
    [x_min, x_max]: msModelSlim's int8 per-tensor asymmetric minmax (``calculate_int_qparam``,
    Ascend/msmodelslim 3de0a3c ``msmodelslim/ir/api/impl/int_quantization.py``), in float32:
    the range widened to hold 0, ``scale = max(max / 255 - min / 255, eps)``,
    ``offset = round(-min / scale) - 128``."""
    f = np.float32
    lo = np.minimum(f(x_min), f(0.0))
    hi = np.maximum(f(x_max), f(0.0))
    scale = np.maximum(hi / f(255.0) - lo / f(255.0), f(np.finfo(np.float32).eps))
    offset = np.round(f(-1.0) * lo / scale) + f(-128.0)
    return np.array([scale], np.float32), np.array([offset], np.float32)


def quantize_weight_static(weight: np.ndarray, bias: np.ndarray | None, input_scale: np.ndarray,
                           input_offset: np.ndarray) -> W8A8StaticWeight:
    """A float linear (weight [N, K], bias [N] or None) as a static W8A8 linear for an activation
    quantized with ``input_scale`` / ``input_offset``: the weight int8 per output channel
    (the same levels as :func:`quantize_weight`), then ``deq_scale`` and ``quant_bias`` derived
    as msModelSlim's ``AscendV1Saver.on_w8a8_static`` does (``deq_scale = input_scale *
    weight_scale``; ``quant_bias = round(bias / deq_scale - sum_k(q) * input_offset)``)."""
    channel = quantize_channels(np.asarray(weight))
    q = channel.q
    if q.ndim != 2:
        raise ValueError(f"a W8A8 weight is 2-D [N, K], got shape {q.shape}")
    input_scale = np.asarray(input_scale, np.float32).reshape(1)
    input_offset = np.asarray(input_offset, np.float32).reshape(1)
    deq_scale = (input_scale * channel.scales).astype(np.float32)
    b = np.zeros(q.shape[0], np.float32) if bias is None else np.asarray(bias, np.float32)
    correction = q.astype(np.float32).sum(axis=1) * input_offset
    quant_bias = np.round(b / deq_scale - correction).astype(np.int32)
    return W8A8StaticWeight(q, input_scale, input_offset, deq_scale, quant_bias).validate()


def quantize_activations_static(x: np.ndarray, weight: W8A8StaticWeight) -> np.ndarray:
    """int8 levels of a float32 activation for a static W8A8 linear, as the graph computes them."""
    x = np.asarray(x, dtype=np.float32)
    return np.clip(np.round(x / weight.input_scale[0] + weight.input_offset[0]), -128, 127).astype(np.int8)


def w8a8_static_matmul(x: np.ndarray, weight: W8A8StaticWeight) -> np.ndarray:
    """``x @ W.T + bias`` of a static W8A8 linear, float32 [..., N]: the graph's computation,
    exactly (int32 accumulation plus ``quant_bias``, then ``* deq_scale`` in float32)."""
    levels = quantize_activations_static(x, weight)
    acc = np.matmul(levels.astype(np.int32), weight.q.T.astype(np.int32)) + weight.quant_bias
    return (acc.astype(np.float32) * weight.deq_scale).astype(np.float32)
