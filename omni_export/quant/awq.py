"""Activation-aware weight quantization (AWQ) of one Qwen2.5-Omni thinker decoder layer.

The algorithm is AutoAWQ's (casper-hansen/AutoAWQ, awq/quantize/quantizer.py and
awq/quantize/scale.py), run on CPU in float32 on one ``Qwen2_5OmniDecoderLayer`` at a time:

1. Record the inputs of the layer's seven linears on the calibration hidden states.
2. For each scaling group (AutoAWQ's ``get_layers_for_scaling`` for Qwen2 / Qwen2.5-Omni)

   ==========================  =======================  ==================================
   previous op                 scaled linears           output the loss is measured on
   ==========================  =======================  ==================================
   input_layernorm             q_proj, k_proj, v_proj   self_attn (incl. o_proj)
   v_proj (output rows)        o_proj                   o_proj
   post_attention_layernorm    gate_proj, up_proj       mlp (incl. down_proj)
   up_proj (output rows)       down_proj                down_proj
   ==========================  =======================  ==================================

   search per-input-channel scales ``s`` on a grid of ``ratio = i / grid``, ``i = 0..grid-1``
   (``_compute_best_scale``, ``duo_scaling``)::

       s = clamp(x_mean ** ratio / (w_mean ** (1 - ratio) + 1e-4), min=1e-4)
       s = s / sqrt(max(s) * min(s))

   where ``x_mean`` is the mean |activation| per input channel and ``w_mean`` the mean over
   output rows of |w| normalised by its block's max |w|; the loss is the mean squared error of
   the inspected output with ``W <- Q(W * s) / s``. Additionally ``s = 1`` (plain RTN) is a
   candidate (``AwqConfig.identity_candidate``), so the chosen scales never do worse than RTN
   on the calibration data (AutoAWQ's duo-scaling grid does not contain it).
3. Fold the scales into the float layer, in place (exact math), after all four searches ran on
   the unscaled layer (as AutoAWQ): the previous op's weight (and bias) is divided by ``s``
   (RMSNorm weight, or the previous linear's output rows), the scaled linears' input columns
   are multiplied by ``s``.
4. Search per-block clipping values for every linear except q_proj / k_proj
   (``_search_best_clip``: ``max_shrink`` 0.5, ``clip_grid`` steps), minimising
   ``mean_tokens ((Q(clamp(w)) - w) . x)^2`` per output row and block. The clips are returned,
   not applied: ``rtn.quantize(w, clip=...)`` clamps exactly as AutoAWQ's ``apply_clip``.

Grouped-query attention: Qwen2.5-Omni-7B has 28 query heads and 4 KV heads, so v_proj has 512
outputs and o_proj 3584 inputs and AutoAWQ skips the v_proj -> o_proj group. Here it is done:
v_proj output channel ``(h, d)`` feeds o_proj input ``(j, d)`` of every query head ``j`` with
``j // (heads / kv_heads) == h``, so one scale per v channel is searched (activation and weight
statistics averaged over those query heads) and o_proj's input column ``(j, d)`` is multiplied
by the scale of ``(j // group, d)``. With as many KV heads as query heads this is AutoAWQ's step.

Speed (CPU): a candidate ``Q(W * s) / s`` is evaluated as ``Q(W * s)`` applied to ``x / s``;
fake quantization runs in place on row chunks that stay in cache (bit-identical to
:func:`omni_export.quant.rtn.quantize`); the clipping loss is AutoAWQ's, computed through the
per-block input covariance ``C_g = X_g^T X_g / T``: ``err = d C_g d^T`` with ``d = Q(clamp(w)) - w``, which costs
``N * K * group_size`` per step instead of ``tokens * N * K``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from omni_export.quant.gqa import value_channel_of_column
from omni_export.quant.rtn import check_group_size
from omni_export.quant.types import SUPPORTED_BITS

__all__ = ["LINEAR_NAMES", "AwqConfig", "AwqStats", "awq_layer", "fake_quantize", "layer_kwargs_for"]

#: The linears of a decoder layer (module path inside the layer) -> the input features they see.
_FEATURE_OF = {
    "self_attn.q_proj": "attn_in",
    "self_attn.k_proj": "attn_in",
    "self_attn.v_proj": "attn_in",
    "self_attn.o_proj": "o_in",
    "mlp.gate_proj": "mlp_in",
    "mlp.up_proj": "mlp_in",
    "mlp.down_proj": "down_in",
}
LINEAR_NAMES = tuple(_FEATURE_OF)
#: Linears AutoAWQ does not clip ("due to qk bmm, it is hard to clip precisely").
NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")


@dataclass
class AwqConfig:
    """AWQ settings.

    The defaults are sized for CPU. Measured on one Qwen2.5-Omni-7B-width layer (hidden 3584,
    MLP 18944, 28 / 4 heads, random N(0, 0.02) weights, 4 x 128 calibration tokens) on this
    project's 2-core machine (AMD EPYC, AVX2, ~190 GFLOP/s fp32 matmul when idle), always while
    other engineers' jobs were running, so these are upper bounds:

    =============================  ==========================  =========================
    setting                        scale search                clip search (grid 20)
    =============================  ==========================  =========================
    grid 10 (default), load ~4     38 s wall / 54 CPU-s        11 s wall / 15 CPU-s
    grid 10 (default), load ~3     81 s wall / 92 CPU-s        27 s wall / 31 CPU-s
    grid 10 (default), load 3 -> 6 77 s wall / 77 CPU-s        111 s wall / 62 CPU-s
    grid 20 (AutoAWQ), load ~5     179 s wall / 133 CPU-s      57 s wall / 39 CPU-s
    =============================  ==========================  =========================

    The scale search is matmul-bound: each candidate runs the inspected modules (~320 GFLOP at
    512 tokens; 11 candidates with grid 10 and the s = 1 candidate, ~3.5 TFLOP, ~19 s at
    190 GFLOP/s), so its time grows with grid x tokens; the clip search costs
    N * K * group_size per step (~56 GFLOP) plus elementwise passes, independent of the token
    count. Expect ~35-50 s per 7B layer on an otherwise idle 2-core machine with the defaults.
    AutoAWQ's own defaults are grid 20, clip grid 20, 512 clip tokens.
    """

    group_size: int = 128
    bits: int = 4
    symmetric: bool = False
    grid: int = 10  # AutoAWQ: 20 (ratios 0, 1/grid, ..., (grid-1)/grid)
    clip: bool = True
    clip_grid: int = 20  # AutoAWQ: 20; max_shrink * clip_grid shrink steps are tried
    clip_tokens: int = 512  # AutoAWQ: 512 (tokens subsampled with a stride for the clip search)
    max_shrink: float = 0.5  # AutoAWQ: 0.5
    duo_scaling: bool = True  # AutoAWQ default: scales from activation and weight statistics
    identity_candidate: bool = True  # also try s = 1 (plain RTN); not in AutoAWQ
    gqa_v_to_o: bool = True  # scale v_proj -> o_proj also under grouped-query attention

    def validate(self) -> "AwqConfig":
        check_group_size(self.group_size)
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        for name in ("grid", "clip_grid", "clip_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= float(self.max_shrink) < 1.0:
            raise ValueError(f"max_shrink must be in [0, 1), got {self.max_shrink!r}")
        return self


@dataclass
class AwqStats:
    """What :func:`awq_layer` did (filled in when a stats object is passed)."""

    ratios: dict[str, float] = field(default_factory=dict)  # group -> best ratio (-1: identity)
    losses: dict[str, float] = field(default_factory=dict)  # group -> best loss
    rtn_losses: dict[str, float] = field(default_factory=dict)  # group -> loss with s = 1
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of "features", "scales", "clip"
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # process CPU time of the same phases


# ------------------------------------------------------------------------------ fake quantization

_CHUNK_ELEMENTS = 1 << 20  # rows are processed in chunks of ~4 MB so the passes stay in cache


def _block_views(t: torch.Tensor, group_size: int) -> list[torch.Tensor]:
    """Views [rows, blocks, size] of a row-major 2-D tensor's full blocks and of its partial
    last block (in-place edits of the views change ``t``)."""
    n, k = t.shape
    full = k - k % group_size
    views = []
    if full:
        views.append(t[:, :full].view(n, full // group_size, group_size))
    if k % group_size:
        views.append(t[:, full:].unsqueeze(1))
    return views


def _levels_bounds(mx, mn, bits: int, symmetric: bool, clip):
    """Per-block scale and the bounds [a, b] of ``q - zero`` for blocks with max ``mx`` and min
    ``mn`` ([rows, blocks, 1]), optionally clipped to [-clip, clip] first."""
    if clip is not None:
        mx = torch.minimum(torch.maximum(mx, -clip), clip)
        mn = torch.minimum(torch.maximum(mn, -clip), clip)
    if symmetric:
        max_int = float(2 ** (bits - 1) - 1)
        min_int = float(-(2 ** (bits - 1)))
        scales = torch.maximum(mx, -mn).clamp_(min=1e-5) / max_int
        lo = torch.full_like(scales, min_int)
        hi = torch.full_like(scales, max_int)
    else:
        max_int = float(2**bits - 1)
        scales = (mx - mn).clamp_(min=1e-5) / max_int
        zeros = torch.round(mn / scales).neg_().clamp_(0, max_int)
        lo = -zeros
        hi = max_int - zeros
    if clip is not None:
        # round(clamp(w, -c, c) / s) == clamp(round(w / s), round(-c / s), round(c / s)) (monotone),
        # and clamp(clamp(r, l1, h1), l2, h2) == clamp(r, max(l1, l2), min(h1, h2)) unless empty
        l1, h1 = torch.round(-clip / scales), torch.round(clip / scales)
        a, b = torch.maximum(l1, lo), torch.minimum(h1, hi)
        empty = a > b
        if bool(empty.any()):
            val = torch.where(h1 < lo, lo, hi)
            a = torch.where(empty, val, a)
            b = torch.where(empty, val, b)
        lo, hi = a, b
    return scales, lo, hi


def _fake_quantize_blocks_(wb: torch.Tensor, bits: int, symmetric: bool, clip=None, src=None, minmax=None) -> torch.Tensor:
    """``wb`` [rows, blocks, size] <- the quantized-dequantized values of ``src`` (default: ``wb``
    itself, in place). ``clip`` [rows, blocks, 1] or None; ``minmax`` the precomputed
    (max, min) of ``src`` per block."""
    src = wb if src is None else src
    if minmax is None:
        minmax = (src.amax(dim=-1, keepdim=True), src.amin(dim=-1, keepdim=True))
    scales, lo, hi = _levels_bounds(minmax[0], minmax[1], bits, symmetric, clip)
    # clamp(round(w / s), lo, hi) * s with cheap scalar clamps: max(r, lo) = relu(r - lo) + lo
    torch.div(src, scales, out=wb)
    wb.round_().sub_(lo).clamp_min_(0).add_(lo - hi).clamp_max_(0).add_(hi).mul_(scales)
    return wb


def fake_quantize(
    w: torch.Tensor,
    group_size: int,
    bits: int = 4,
    symmetric: bool = False,
    clip: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize ``w`` [N, K] block-wise along K, bit-identical to
    ``omni_export.quant.rtn.quantize(w, ...).dequantize()`` (AutoAWQ's ``pseudo_quantize_tensor``).

    ``clip`` [N, G] clamps each block to [-clip, clip] first; ``col_scale`` [K] quantizes
    ``w * col_scale`` instead (AWQ's ``Q(W * s)``); ``out`` receives the result (else a new
    tensor). Works on row chunks so the elementwise passes stay in cache."""
    n, k = w.shape
    if out is None:
        out = torch.empty_like(w, dtype=torch.float32)
    g = -(-k // group_size)
    rows = max(1, _CHUNK_ELEMENTS // max(k, 1))
    for r0 in range(0, n, rows):
        wc = w[r0 : r0 + rows]
        oc = out[r0 : r0 + rows]
        if col_scale is not None:
            torch.mul(wc, col_scale, out=oc)
        else:
            oc.copy_(wc)
        cc = None if clip is None else clip[r0 : r0 + rows].reshape(oc.shape[0], g, 1)
        start = 0
        for view in _block_views(oc, group_size):
            nb = view.shape[1]
            _fake_quantize_blocks_(view, bits, symmetric, None if cc is None else cc[:, start : start + nb])
            start += nb
    return out


# ------------------------------------------------------------------------------------ layer kwargs


def layer_kwargs_for(text_config, seq_len: int, dtype: torch.dtype = torch.float32,
                     position_ids: torch.Tensor | None = None) -> dict[str, Any]:
    """Keyword arguments of ``Qwen2_5OmniDecoderLayer.forward`` for a causal batch of text-only
    samples of ``seq_len`` tokens each, positions 0..seq_len-1, as
    ``Qwen2_5OmniThinkerTextModel.forward`` builds them: ``position_embeddings`` (cos, sin)
    [1, seq, head_dim] from the model's rotary embedding with the three M-RoPE position axes
    equal (text tokens), and an additive causal ``attention_mask`` [1, 1, seq, seq] (valid for
    the eager and sdpa attention implementations).

    ``position_ids`` [3, batch, seq_len] (TMRoPE, e.g. multimodal calibration samples) replace
    the text positions: cos and sin are then [batch, seq, head_dim], one row of positions per sample."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniRotaryEmbedding

    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    if position_ids is not None and (position_ids.dim() != 3 or position_ids.shape[0] != 3
                                     or position_ids.shape[2] != seq_len):
        raise ValueError(f"position_ids must be [3, batch, {seq_len}], got shape {tuple(position_ids.shape)}")
    rotary = Qwen2_5OmniRotaryEmbedding(config=text_config)
    positions = torch.arange(seq_len).view(1, 1, -1).expand(3, 1, -1) if position_ids is None else position_ids
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=dtype), positions)
    mask = torch.full((seq_len, seq_len), torch.finfo(dtype).min, dtype=dtype).triu_(1)
    return {"attention_mask": mask[None, None], "position_embeddings": (cos, sin)}


# ------------------------------------------------------------------------------------ AWQ


def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out


def _module(layer, path: str):
    m = layer
    for part in path.split("."):
        m = getattr(m, part)
    return m


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow_(2).mean())


def _w_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """AutoAWQ's w_mean: |w| / (block max |w| + 1e-6), averaged over all output rows -> [K]."""
    k = weights[0].shape[1]
    total = torch.zeros(k, dtype=torch.float32)
    rows = 0
    for w in weights:
        n = w.shape[0]
        pad = -k % group_size
        a = w.abs()
        if pad:
            a = torch.cat([a, a[:, -1:].expand(n, pad)], dim=1)
        ab = a.reshape(n, -1, group_size)
        ab = ab / (ab.amax(dim=-1, keepdim=True) + 1e-6)
        total += ab.reshape(n, -1)[:, :k].sum(dim=0)
        rows += n
    return total / rows


@dataclass
class _Group:
    name: str
    prev: str  # module path of the previous op
    linears: tuple[str, ...]
    feature: str  # key of the shared input features
    inspect: str | None  # module whose output is compared (None: the single linear itself)
    expand: torch.Tensor | None = None  # index: scale of linear input column -> searched channel


class _Searcher:
    def __init__(self, layer, feats: dict[str, torch.Tensor], shape: torch.Size, layer_kwargs: dict, cfg: AwqConfig):
        self.layer = layer
        self.feats = feats
        self.shape = shape  # [samples, seq, hidden] of the calibration batch
        self.cfg = cfg
        self.attn_kwargs = {k: v for k, v in layer_kwargs.items() if k not in ("use_cache", "past_key_values")}

    def _candidates(self, x_mean: torch.Tensor, w_mean: torch.Tensor):
        cfg = self.cfg
        if cfg.identity_candidate:
            yield -1.0, torch.ones_like(x_mean)
        for i in range(cfg.grid):
            ratio = i / cfg.grid
            if cfg.duo_scaling:
                s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
            else:
                s = x_mean.pow(ratio).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            s[torch.isinf(s)] = 1
            s[torch.isnan(s)] = 1
            yield ratio, s

    def search(self, g: _Group, stats: AwqStats | None) -> torch.Tensor:
        """Best scales for group ``g`` (on the unscaled layer). ``Q(W * s) / s`` applied to ``x``
        is evaluated as ``Q(W * s)`` applied to ``x / s`` (same math, K instead of N * K divisions)."""
        cfg = self.cfg
        layer = self.layer
        x = self.feats[g.feature]
        fcs = [_module(layer, name) for name in g.linears]
        x_mean = x.abs().mean(dim=0)
        w_mean = _w_mean([fc.weight for fc in fcs], cfg.group_size)
        if g.expand is not None:  # reduce per-column statistics to the searched channels
            n_ch = int(g.expand.max()) + 1
            count = torch.zeros(n_ch).index_add_(0, g.expand, torch.ones(len(g.expand)))
            x_mean = torch.zeros(n_ch).index_add_(0, g.expand, x_mean) / count
            w_mean = torch.zeros(n_ch).index_add_(0, g.expand, w_mean) / count

        originals = [fc.weight.data for fc in fcs]
        buffers = [torch.empty_like(w) for w in originals]
        if g.inspect is None:  # a single linear, compared without its bias (it cancels)
            ref = F.linear(x, originals[0])

            def run(xs: torch.Tensor) -> torch.Tensor:
                return F.linear(xs, buffers[0])
        else:
            module = _module(layer, g.inspect)
            kwargs = self.attn_kwargs if g.inspect == "self_attn" else {}
            n, seq = self.shape[0], self.shape[1]
            ref = _layer_output(module(x.view(n, seq, -1), **kwargs))

            def run(xs: torch.Tensor) -> torch.Tensor:
                try:
                    for fc, buf in zip(fcs, buffers):
                        fc.weight.data = buf
                    return _layer_output(module(xs.view(n, seq, -1), **kwargs))
                finally:
                    for fc, w0 in zip(fcs, originals):
                        fc.weight.data = w0

        best, best_loss, best_ratio, rtn_loss = None, math.inf, None, None
        for ratio, s in self._candidates(x_mean, w_mean):
            s_cols = s[g.expand] if g.expand is not None else s
            for w0, buf in zip(originals, buffers):
                fake_quantize(w0, cfg.group_size, cfg.bits, cfg.symmetric, col_scale=s_cols, out=buf)
            loss = _mse(run(x / s_cols), ref)
            if ratio == -1.0:
                rtn_loss = loss
            if loss < best_loss:
                best, best_loss, best_ratio = s, loss, ratio
        del buffers
        if best is None:  # every loss was NaN
            raise FloatingPointError(f"AWQ scale search for {g.name} produced no finite loss")
        if stats is not None:
            stats.ratios[g.name] = float(best_ratio)
            stats.losses[g.name] = best_loss
            if rtn_loss is not None:
                stats.rtn_losses[g.name] = rtn_loss
        return best

    def apply(self, g: _Group, s: torch.Tensor) -> None:
        layer = self.layer
        prev = _module(layer, g.prev)
        s_cols = s[g.expand] if g.expand is not None else s
        if isinstance(prev, torch.nn.Linear):  # scale_fc_fc: previous linear's output rows
            prev.weight.data.div_(s.view(-1, 1))
            if prev.bias is not None:
                prev.bias.data.div_(s)
        else:  # scale_ln_fcs: RMSNorm weight
            prev.weight.data.div_(s)
            if getattr(prev, "bias", None) is not None:
                prev.bias.data.div_(s)
        for name in g.linears:
            _module(layer, name).weight.data.mul_(s_cols.view(1, -1))
        self.feats[g.feature].div_(s_cols.view(1, -1))  # inputs as the scaled layer sees them

    def clip(self, name: str, feature: str) -> np.ndarray:
        """AutoAWQ's ``_compute_best_clip`` for one linear: per row and block, the max |w|
        (shrunk by i / clip_grid, i < max_shrink * clip_grid) with the least output error."""
        cfg = self.cfg
        gs = cfg.group_size
        w = _module(self.layer, name).weight.data
        x = self.feats[feature]
        x = x[:: max(1, x.shape[0] // cfg.clip_tokens)]
        n, k = w.shape
        g = -(-k // gs)
        pad = g * gs - k
        if pad:
            x = F.pad(x, (0, pad))
        xg = x.reshape(x.shape[0], g, gs).transpose(0, 1)  # [G, T, gs]
        cov = torch.bmm(xg.transpose(1, 2), xg).div_(x.shape[0])  # [G, gs, gs]
        del xg

        out = np.empty((n, g), dtype=np.float32)
        rows = max(1, min(n, _CHUNK_ELEMENTS // (g * gs)))
        steps = max(1, int(cfg.max_shrink * cfg.clip_grid))
        buf = torch.zeros(rows, g * gs)
        for r0 in range(0, n, rows):
            wc = w[r0 : r0 + rows]
            nc = wc.shape[0]
            d = buf[:nc]
            src_views = _block_views(wc, gs)
            dst_views = _block_views(d[:, :k], gs)
            minmax = [(v.amax(dim=-1, keepdim=True), v.amin(dim=-1, keepdim=True)) for v in src_views]
            org_max = torch.cat([torch.maximum(mx, -mn) for mx, mn in minmax], dim=1)  # [nc, G, 1]
            best = org_max.clone()
            min_err = torch.full_like(org_max, math.inf)
            dg = d.view(nc, g, gs).transpose(0, 1)  # [G, nc, gs]; padded columns stay 0
            for i in range(steps):
                max_val = org_max * (1 - i / cfg.clip_grid)
                start = 0
                for src, dst, mm in zip(src_views, dst_views, minmax):
                    nb = src.shape[1]
                    _fake_quantize_blocks_(dst, cfg.bits, cfg.symmetric, max_val[:, start : start + nb], src=src, minmax=mm)
                    dst.sub_(src)
                    start += nb
                err = (torch.bmm(dg, cov) * dg).sum(dim=-1).transpose(0, 1).unsqueeze(-1)  # [nc, G, 1]
                better = err < min_err
                min_err = torch.where(better, err, min_err)
                best = torch.where(better, max_val, best)
            out[r0 : r0 + nc] = best.squeeze(-1).numpy()
        return out


def _groups(layer, cfg: AwqConfig) -> list[_Group]:
    attn = layer.self_attn
    heads = attn.config.num_attention_heads
    kv_heads = attn.config.num_key_value_heads
    head_dim = attn.head_dim
    groups = [
        _Group("qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "attn_in", "self_attn"),
    ]
    if heads == kv_heads or cfg.gqa_v_to_o:
        expand = torch.from_numpy(value_channel_of_column(heads, kv_heads, head_dim))
        groups.append(_Group("vo", "self_attn.v_proj", ("self_attn.o_proj",), "o_in", None, expand))
    groups += [
        _Group("mlp", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp_in", "mlp"),
        _Group("down", "mlp.up_proj", ("mlp.down_proj",), "down_in", None),
    ]
    return groups


_HOOKED = {"self_attn.q_proj": "attn_in", "self_attn.o_proj": "o_in", "mlp.gate_proj": "mlp_in", "mlp.down_proj": "down_in"}


@torch.no_grad()
def awq_layer(
    layer,
    hidden: torch.Tensor,
    layer_kwargs: dict,
    config: AwqConfig | None = None,
    stats: AwqStats | None = None,
) -> dict[str, np.ndarray | None]:
    """Run AWQ on one float32 ``Qwen2_5OmniDecoderLayer`` with calibration ``hidden`` states
    [n, seq, hidden] (the layer's inputs) and ``layer_kwargs`` (see :func:`layer_kwargs_for`).

    Folds the searched scales into the layer in place (its float output is unchanged) and
    returns ``{linear path: clip [N, G] float32 or None}`` for
    ``rtn.quantize(layer.<path>.weight, group_size, clip=...)``; None for q_proj / k_proj or
    when ``config.clip`` is off. Pass an :class:`AwqStats` to get the chosen ratios and timings.
    """
    cfg = (config or AwqConfig()).validate()
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [samples, seq, hidden], got shape {tuple(hidden.shape)}")
    for name in LINEAR_NAMES:
        if _module(layer, name).weight.dtype != torch.float32:
            raise ValueError(f"awq_layer needs a float32 layer; {name} is {_module(layer, name).weight.dtype}")
    hidden = hidden.to(torch.float32)
    layer.eval()

    t0, c0 = time.perf_counter(), time.process_time()
    feats: dict[str, torch.Tensor] = {}
    handles = []

    def hook(key):
        def fn(_module_, args, _out):
            feats[key] = args[0].detach().reshape(-1, args[0].shape[-1]).clone()

        return fn

    for name, key in _HOOKED.items():
        handles.append(_module(layer, name).register_forward_hook(hook(key)))
    try:
        layer(hidden, **layer_kwargs)
    finally:
        for h in handles:
            h.remove()
    t1, c1 = time.perf_counter(), time.process_time()

    searcher = _Searcher(layer, feats, hidden.shape, layer_kwargs, cfg)
    groups = _groups(layer, cfg)
    scales = [searcher.search(g, stats) for g in groups]  # all on the unscaled layer, as AutoAWQ
    for g, s in zip(groups, scales):
        searcher.apply(g, s)
    t2, c2 = time.perf_counter(), time.process_time()

    clips: dict[str, np.ndarray | None] = {}
    for name in LINEAR_NAMES:
        if not cfg.clip or name in NO_CLIP:
            clips[name] = None
        else:
            clips[name] = searcher.clip(name, _FEATURE_OF[name])
    t3, c3 = time.perf_counter(), time.process_time()
    if stats is not None:
        stats.seconds.update(features=t1 - t0, scales=t2 - t1, clip=t3 - t2)
        stats.cpu_seconds.update(features=c1 - c0, scales=c2 - c1, clip=c3 - c2)
    return clips
