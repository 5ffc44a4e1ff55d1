"""The token2wav DiT graph: one velocity evaluation of the flow-matching ODE, built op by op.

Graph IO (docs/bundle-format.md, ``token2wav_dit``)::

    x [batch, frames, mel_dim] float32                 the ODE state (noisy mel) at time ``time``
    codes [batch, codes] int64                         codec codes, frames = codes * repeats
    time [batch] float32                               the ODE time of each row
    speaker_embedding [batch, enc_emb_dim] float32     the speaker's x-vector (spk_dict ``cond``)
    reference_embedding [batch, enc_dim] float32       the speaker encoder's output for the reference mel
    -> velocity [batch, frames, mel_dim] float32

This is ``Qwen2_5OmniToken2WavDiTModel.forward`` with ``apply_cfg=False``, for any batch.
Classifier-free guidance runs on the host exactly as transformers batches it: row 0 is the
conditioned input (codes, the speaker's x-vector, the encoder output of its reference mel), row 1
the unconditioned one (codes 0, x-vector 0, the encoder output of a zero mel), and the velocity
is ``cond + (cond - uncond) * guidance_scale`` (``omni_runtime.stages.token2wav``).

The speaker encoder (ECAPA-TDNN, ``input_embed.spk_encoder``) only ever sees a speaker's
reference mel or zeros, so it runs at build time, once per speaker (``omni_export.modules.
token2wav``); its outputs are stored in the bundle and fed as ``reference_embedding``.

Attention is the DiT's block attention: frames are cut into blocks of ``block_size`` (24) from the
start of the call, and a layer lets a block see ``look_backward`` blocks before it and
``look_ahead`` after it (0 or 1 each). transformers builds a [frames, frames] mask; this graph
gathers for each query block only its window of key blocks, so memory and work grow linearly
with the frames (``heads x frames x 3 x block_size`` scores at most) and the masked-out scores,
which are exactly zero after the softmax in both, are never computed. As in the checkpoint's
training, only the first head gets the rotary embedding, with interleaved pairs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from omni_runtime.bundle.names import TOKEN2WAV_DIT as GRAPH_NAME

from omni_export.export.onnx_graph import GraphBuilder, Linear
from omni_export.export.onnx_io import ExportedGraph

FILE_NAME = "token2wav_dit.onnx"
F = ir.DataType.FLOAT
I64 = ir.DataType.INT64
LN_EPS = 1e-6  # the DiT's LayerNorms (AdaLayerNormZero, ff_norm, norm_out)
TIME_FREQ_DIM = 256  # DiTTimestepEmbedding's sinusoidal width
TIME_SCALE = 1000.0  # SinusPositionEmbedding's scale
INPUT_NAMES = ("x", "codes", "time", "speaker_embedding", "reference_embedding")
OUTPUT_NAME = "velocity"


@dataclass(frozen=True)
class DiTDims:
    """The DiT's shape constants (from its transformers ``Qwen2_5OmniDiTConfig``)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    ff_mult: int
    emb_dim: int
    mel_dim: int
    enc_dim: int
    enc_emb_dim: int
    num_embeds: int
    repeats: int
    block_size: int
    look_ahead_layers: tuple[int, ...]
    look_backward_layers: tuple[int, ...]
    rope_theta: float
    max_position_embeddings: int

    @classmethod
    def from_config(cls, cfg) -> "DiTDims":
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        return cls(cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim, cfg.ff_mult,
                   cfg.emb_dim, cfg.mel_dim, cfg.enc_dim, cfg.enc_emb_dim, cfg.num_embeds, cfg.repeats,
                   cfg.block_size, tuple(int(i) for i in cfg.look_ahead_layers),
                   tuple(int(i) for i in cfg.look_backward_layers), float(theta), cfg.max_position_embeddings)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    def window(self, layer: int) -> tuple[int, int]:
        """(blocks looked back, blocks looked ahead) of decoder layer ``layer``."""
        return int(layer in self.look_backward_layers), int(layer in self.look_ahead_layers)


@dataclass
class DiTLayer:
    """One DiT decoder layer's weights."""

    attn_norm: Linear  # AdaLayerNormZero linear [6 * hidden, hidden]
    to_q: Linear
    to_k: Linear
    to_v: Linear
    to_out: Linear
    ff_in: Linear      # [hidden * ff_mult, hidden]
    ff_out: Linear     # [hidden, hidden * ff_mult]


@dataclass
class DiTWeights:
    """Everything but the decoder layers (which are streamed one at a time)."""

    time_mlp_in: Linear    # [hidden, 256]
    time_mlp_out: Linear   # [hidden, hidden]
    codec_embed: np.ndarray  # [num_embeds + 1, emb_dim]
    input_proj: Linear     # [hidden, mel + enc_dim + emb_dim + enc_emb_dim]
    norm_out: Linear       # [2 * hidden, hidden]
    proj_out: Linear       # [mel, hidden]


def time_frequencies() -> np.ndarray:
    """SinusPositionEmbedding's frequencies [128] (float32, as transformers computes them)."""
    half = TIME_FREQ_DIM // 2
    step = math.log(10000) / (half - 1)
    return np.exp(np.arange(half, dtype=np.float32) * np.float32(-step)).astype(np.float32)


def inverse_frequencies(dims: DiTDims) -> np.ndarray:
    """The rotary inverse frequencies [head_dim / 2] as transformers computes them (float32)."""
    exponent = np.arange(0, dims.head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dims.head_dim)
    return (1.0 / (np.float32(dims.rope_theta) ** exponent)).astype(np.float32)


class _Graph:
    """Helpers over one GraphBuilder: linears, LayerNorm, modulation, block attention."""

    def __init__(self, g: GraphBuilder, dims: DiTDims):
        self.g = g
        self.dims = dims
        h = dims.hidden_size
        norm32 = g.half and g.fp32("norm")  # the norm's affine constants are of the type it runs in
        self.ones = g.fweight("layer_norm.ones", np.ones(h, np.float32), norm32)
        self.zeros = g.fweight("layer_norm.zeros", np.zeros(h, np.float32), norm32)

    def silu(self, x: ir.Value) -> ir.Value:
        return self.g.op("Mul", x, self.g.op("Sigmoid", x))

    def layer_norm(self, x: ir.Value) -> ir.Value:
        return self.g.layer_norm(x, self.ones, self.zeros, LN_EPS)

    def modulate(self, x: ir.Value, scale: ir.Value, shift: ir.Value) -> ir.Value:
        """norm(x) * (1 + scale[:, None]) + shift[:, None]."""
        g = self.g
        one_plus = g.op("Add", g.fconst(1.0), g.op("Unsqueeze", scale, g.const([1])))
        return g.op("Add", g.op("Mul", self.layer_norm(x), one_plus), g.op("Unsqueeze", shift, g.const([1])))


def build_graph(dims: DiTDims, weights: DiTWeights, layers: Iterable[DiTLayer], out_dir: Path,
                on_layer=None, dtype: str = "float32", keep_fp32: tuple[str, ...] = ()) -> ExportedGraph:
    """Write ``token2wav_dit.onnx`` (+ ``.data``); ``layers`` is consumed one layer at a time.
    ``dtype``: the float type it computes in (IO stays float32); the time sinusoids and rotary
    angles are float32 in any case (1000 * t and frame positions: float16 would lose them);
    ``keep_fp32``: ``norm``, ``softmax``, ``residual`` of a float16 graph kept in float32."""
    g = GraphBuilder(out_dir, FILE_NAME, dtype=dtype, keep_fp32=keep_fp32)
    h, heads, hd, bs = dims.hidden_size, dims.num_attention_heads, dims.head_dim, dims.block_size
    x_in = g.input("x", F, ("batch", "frames", dims.mel_dim))
    x = g.to_compute(x_in)
    codes = g.input("codes", I64, ("batch", "codes"))
    time = g.input("time", F, ("batch",))
    spk = g.float_input("speaker_embedding", ("batch", dims.enc_emb_dim))
    ref = g.float_input("reference_embedding", ("batch", dims.enc_dim))
    m = _Graph(g, dims)

    # time embedding: sinusoids of 1000 * t, then Linear-SiLU-Linear; every layer modulates with SiLU of it
    scaled = g.op("Mul", g.op("Mul", g.const(TIME_SCALE, np.float32), g.op("Unsqueeze", time, g.const([1]))),
                  g.weight("time_embed.frequencies", time_frequencies()[None, :]))
    sinus = g.to_compute(g.op("Concat", g.op("Sin", scaled), g.op("Cos", scaled), axis=-1))
    t_emb = g.linear(m.silu(g.linear(sinus, weights.time_mlp_in, "time_embed.time_mlp.0")), weights.time_mlp_out,
                     "time_embed.time_mlp.2")
    t_silu = m.silu(t_emb)

    # input embedding: [x, reference embedding, code embedding repeated, x-vector] -> hidden
    code_emb = g.op("Gather", g.fweight("text_embed.codec_embed.weight", weights.codec_embed),
                    codes, axis=0)                                                             # [B, N, E]
    code_emb = g.op("Expand", g.op("Unsqueeze", code_emb, g.const([2])), g.const([1, 1, dims.repeats, 1]))
    code_emb = g.op("Reshape", code_emb, g.const([0, -1, dims.emb_dim]))                       # [B, N*R, E]
    x_shape = g.op("Shape", x_in)
    batch_frames = g.op("Slice", x_shape, g.const([0]), g.const([2]))

    def per_frame(v: ir.Value, width: int) -> ir.Value:
        return g.op("Expand", g.op("Unsqueeze", v, g.const([1])),
                    g.op("Concat", batch_frames, g.const([width]), axis=0))

    hidden = g.linear(g.op("Concat", x, per_frame(ref, dims.enc_dim), code_emb, per_frame(spk, dims.enc_emb_dim),
                           axis=-1), weights.input_proj, "input_embed.proj")

    # rotary cos/sin [frames, head_dim] for positions 0..frames-1 (first head only)
    frames = g.op("Gather", x_shape, g.const(1), axis=0)                                       # scalar
    positions = g.op("Cast", g.op("Range", g.const(0), frames, g.const(1)), to=F)
    freqs = g.op("Mul", g.op("Unsqueeze", positions, g.const([1])),
                 g.weight("rotary.inv_freq", inverse_frequencies(dims)[None, :]))
    emb = g.op("Concat", freqs, freqs, axis=-1)
    cos, sin = g.to_compute(g.op("Cos", emb)), g.to_compute(g.op("Sin", emb))
    deinterleave = np.concatenate([np.arange(0, hd, 2), np.arange(1, hd, 2)]).astype(np.int64)

    def rope_first_head(v: ir.Value) -> ir.Value:
        """v [B, heads, T, hd]: head 0 de-interleaved and rotated, the other heads unchanged."""
        first = g.op("Slice", v, g.const([0]), g.const([1]), g.const([1]))
        rest = g.op("Slice", v, g.const([1]), g.const([heads]), g.const([1]))
        first = g.op("Gather", first, g.const(deinterleave), axis=-1)
        lo, hi = g.ops("Split", first, g.const([hd // 2, hd // 2]), outputs=2, axis=-1)
        rotated = g.op("Concat", g.op("Neg", hi), lo, axis=-1)
        first = g.op("Add", g.op("Mul", first, cos), g.op("Mul", rotated, sin))
        return g.op("Concat", first, rest, axis=1)

    # block geometry, shared by the layers: blocks = ceil(frames / block_size), padded frames
    frames_1d = g.op("Reshape", frames, g.const([1]))
    n_blocks = g.op("Div", g.op("Add", frames_1d, g.const([bs - 1])), g.const([bs]))          # [1]
    pad = g.op("Sub", g.op("Mul", n_blocks, g.const([bs])), frames_1d)                         # [1]
    pad_frames = g.op("Concat", g.const([0, 0, 0, 0, 0, 0]), pad, g.const([0]), axis=0)       # pads of [B,H,T,hd]
    block_ids = g.op("Unsqueeze", g.op("Range", g.const(0), g.op("Squeeze", n_blocks, g.const([0])), g.const(1)),
                     g.const([1]))                                                             # [nb, 1]
    masks: dict[tuple[int, int], ir.Value] = {}

    def window_mask(back: int, ahead: int) -> ir.Value:
        """[nb, 1, w*bs] additive mask: 0 for real key frames of the window, -max for padding."""
        if (back, ahead) not in masks:
            width = (back + 1 + ahead) * bs
            offsets = np.array([(j // bs - back) * bs + j % bs for j in range(width)], np.int64)
            key_pos = g.op("Add", g.op("Mul", block_ids, g.const([bs])), g.const(offsets[None, :]))  # [nb, w*bs]
            valid = g.op("And", g.op("GreaterOrEqual", key_pos, g.const([0])), g.op("Less", key_pos, frames_1d))
            fp32 = g.fp32("softmax")  # the mask is of the type the softmax runs in
            bias = g.op("Where", valid, g.fconst(0.0, fp32), g.fconst(np.finfo(np.float32).min, fp32))
            masks[(back, ahead)] = g.op("Unsqueeze", bias, g.const([1]))
        return masks[(back, ahead)]

    def windows(v: ir.Value, back: int, ahead: int) -> ir.Value:
        """v [B, H, nb, bs, hd] -> [B, H, nb, w*bs, hd]: each block's window of blocks."""
        if back == 0 and ahead == 0:
            return v
        padded = g.op("Pad", v, g.const([0, 0, back, 0, 0, 0, 0, ahead, 0, 0]))
        parts = []
        for o in range(-back, ahead + 1):
            start, stop_from_end = o + back, ahead - o
            end = -stop_from_end if stop_from_end else np.iinfo(np.int64).max
            parts.append(g.op("Slice", padded, g.const([start]), g.const([end]), g.const([2])))
        return g.op("Concat", *parts, axis=3)

    def attention(q: ir.Value, k: ir.Value, v: ir.Value, back: int, ahead: int) -> ir.Value:
        """q, k, v [B, H, T, hd] -> [B, T, H*hd], attention within each block's window."""
        blocks = [g.op("Reshape", g.op("Pad", t, pad_frames), g.const([0, 0, -1, bs, hd])) for t in (q, k, v)]
        qb, kb, vb = blocks
        kw, vw = windows(kb, back, ahead), windows(vb, back, ahead)
        scores = g.op("MatMul", qb, g.op("Transpose", kw, perm=[0, 1, 2, 4, 3]))
        scores = g.op("Mul", scores, g.fconst(1.0 / math.sqrt(hd)))
        out = g.op("MatMul", g.softmax(scores, window_mask(back, ahead)), vw)                   # [B, H, nb, bs, hd]
        out = g.op("Slice", g.op("Reshape", out, g.const([0, 0, -1, hd])), g.const([0]), frames_1d, g.const([2]))
        return g.op("Reshape", g.op("Transpose", out, perm=[0, 2, 1, 3]), g.const([0, 0, heads * hd]))

    def split_heads(t: ir.Value) -> ir.Value:
        return g.op("Transpose", g.op("Reshape", t, g.const([0, 0, heads, hd])), perm=[0, 2, 1, 3])

    count = 0
    for i, layer in enumerate(layers):
        p = f"transformer_blocks.{i}"
        back, ahead = dims.window(i)
        mod = g.linear(t_silu, layer.attn_norm, f"{p}.attn_norm.linear")
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = g.ops("Split", mod, g.const([h] * 6),
                                                                             outputs=6, axis=1)
        norm = m.modulate(hidden, scale_msa, shift_msa)
        q, k, v = g.linears(norm, [layer.to_q, layer.to_k, layer.to_v], [f"{p}.attn.to_{n}" for n in "qkv"])
        q, k, v = rope_first_head(split_heads(q)), rope_first_head(split_heads(k)), split_heads(v)
        attn = g.linear(attention(q, k, v, back, ahead), layer.to_out, f"{p}.attn.to_out.0")
        hidden = g.residual(hidden, g.op("Mul", g.op("Unsqueeze", gate_msa, g.const([1])), attn))
        norm = m.modulate(hidden, scale_mlp, shift_mlp)
        ff = g.linear(g.op("Gelu", g.linear(norm, layer.ff_in, f"{p}.ff.ff.0"), approximate="tanh"), layer.ff_out,
                      f"{p}.ff.ff.3")
        hidden = g.residual(hidden, g.op("Mul", g.op("Unsqueeze", gate_mlp, g.const([1])), ff))
        count += 1
        if on_layer is not None:
            on_layer(i, g.weights.offset)
    if count != dims.num_hidden_layers:
        raise ValueError(f"expected {dims.num_hidden_layers} DiT layers, got {count}")

    final = g.linear(t_silu, weights.norm_out, "norm_out.linear")
    scale, shift = g.ops("Split", final, g.const([h, h]), outputs=2, axis=1)
    out = g.linear(m.modulate(hidden, scale, shift), weights.proj_out, "proj_out")
    g.float_output(out, OUTPUT_NAME, ("batch", "frames", dims.mel_dim))
    return g.save()
