"""The audio encoder graph (the thinker's ``audio_tower``), built op by op with onnx-ir.

Graph IO (docs/bundle-format.md, ``audio_encoder``)::

    input_features [audio_chunks, n_mels, chunk_frames] float32   log-mel chunks of <= 2 s, zero-padded
    chunk_lengths  [audio_chunks] int64                             frames of each chunk before padding
    valid_indices  [audio_positions] int64                          flat indices of the non-padding
                                                                    positions after the stride-2 conv
    pool_indices   [audio_tokens] int64                             first position of each pooled pair
    -> audio_embeds [audio_tokens, output_dim] float32              one row per audio token (25 / s)

Everything that depends on the audio lengths (chunking, padding, the indices) is computed on
the host (``omni_runtime.media.audio_prep.encoder_inputs``); the graph has no shape-specific
constant. The encoder keeps the chunks on a batch axis: its two convolutions, the sinusoidal
positions (restarting in each chunk) and self-attention all work within a chunk, as in
transformers (whose attention splits the packed sequence at ``cu_seqlens`` = the chunk
boundaries). Padded key positions are masked from the chunk's own length, so attention costs
``chunks x heads x 100 x 100`` scores, linear in the audio length. After the layers the valid
positions are gathered in order, averaged in pairs (``pool_indices``), normalised and projected
to the thinker's width.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from omni_runtime.bundle.names import AUDIO_ENCODER as GRAPH_NAME

from omni_export.export.onnx_graph import GraphBuilder, Linear
from omni_export.export.onnx_io import ExportedGraph

FILE_NAME = "audio_encoder.onnx"
F = ir.DataType.FLOAT
I64 = ir.DataType.INT64
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, used by every norm of the audio tower


@dataclass(frozen=True)
class AudioDims:
    """Shape constants of the audio tower (``thinker_config.audio_config``)."""

    num_mel_bins: int
    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    output_dim: int
    n_window: int
    max_source_positions: int
    activation_function: str = "gelu"

    @classmethod
    def from_config(cls, cfg) -> AudioDims:
        return cls(cfg.num_mel_bins, cfg.d_model, cfg.encoder_layers, cfg.encoder_attention_heads,
                   cfg.encoder_ffn_dim, cfg.output_dim, cfg.n_window, cfg.max_source_positions,
                   cfg.activation_function)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads


@dataclass
class AudioLayer:
    """One encoder layer: pre-norm self-attention (k_proj has no bias) and a GELU MLP."""

    self_attn_layer_norm: tuple[np.ndarray, np.ndarray]  # (weight, bias)
    q_proj: Linear
    k_proj: Linear
    v_proj: Linear
    out_proj: Linear
    final_layer_norm: tuple[np.ndarray, np.ndarray]
    fc1: Linear
    fc2: Linear


@dataclass
class AudioStem:
    """The weights around the layers: convolutions, positions, final norm and projection."""

    conv1: Linear  # weight [d_model, n_mels, 3]
    conv2: Linear  # weight [d_model, d_model, 3]
    positional_embedding: np.ndarray  # [rows >= n_window, d_model]
    ln_post: tuple[np.ndarray, np.ndarray]
    proj: Linear


def _layer_norm(g: GraphBuilder, x: ir.Value, norm: tuple[np.ndarray, np.ndarray], name: str) -> ir.Value:
    weight, bias = norm
    return g.layer_norm(x, weight, bias, LAYER_NORM_EPS, name)


def _gelu(g: GraphBuilder, x: ir.Value, activation: str) -> ir.Value:
    if activation == "gelu":
        return g.op("Gelu", x)  # exact (erf) GELU, as torch's nn.functional.gelu
    if activation in ("gelu_new", "gelu_pytorch_tanh"):
        return g.op("Gelu", x, approximate="tanh")
    raise ValueError(f"unsupported audio activation {activation!r}")


def _conv(g: GraphBuilder, x: ir.Value, conv: Linear, name: str, stride: int) -> ir.Value:
    return g.op("Conv", x, g.conv_weight(f"{name}.weight", conv.weight), g.fweight(f"{name}.bias", conv.bias),
                kernel_shape=[3], pads=[1, 1], strides=[stride])


def build_graph(dims: AudioDims, stem: AudioStem, layers: Iterable[AudioLayer], out_dir: Path,
                on_layer: Callable[[int, int], None] | None = None, dtype: str = "float32",
                keep_fp32: tuple[str, ...] = ()) -> ExportedGraph:
    """Write ``audio_encoder.onnx`` (+ ``.data``); ``layers`` is consumed one layer at a time.
    ``dtype``: the float type it computes in (IO stays float32); ``keep_fp32``: parts of a
    float16 graph kept in float32 (``norm``, ``softmax``, ``residual``; ``GraphBuilder``)."""
    g = GraphBuilder(out_dir, FILE_NAME, dtype=dtype, keep_fp32=keep_fp32)
    d, heads, hd = dims.d_model, dims.encoder_attention_heads, dims.head_dim
    feats = g.float_input("input_features", ("audio_chunks", dims.num_mel_bins, "chunk_frames"))
    chunk_lengths = g.input("chunk_lengths", I64, ("audio_chunks",))
    valid_indices = g.input("valid_indices", I64, ("audio_positions",))
    pool_indices = g.input("pool_indices", I64, ("audio_tokens",))

    zero, one = g.const(0), g.const(1)
    lengths = g.op("Unsqueeze", chunk_lengths, g.const([1]))                                  # [C, 1]

    def positions_below(count: ir.Value, size: ir.Value) -> ir.Value:
        """[C, size] bool: position < count[c]."""
        return g.op("Less", g.op("Range", zero, size, one), count)

    # conv1 -> GELU, zeroed past each chunk's length (the padding must not leak into conv2)
    frames = g.op("Gather", g.op("Shape", feats), g.const(2), axis=0)
    frame_mask = g.op("Cast", g.op("Unsqueeze", positions_below(lengths, frames), g.const([1])), to=g.F)  # [C, 1, T]
    x = g.op("Mul", _gelu(g, _conv(g, feats, stem.conv1, "conv1", 1), dims.activation_function), frame_mask)
    x = _gelu(g, _conv(g, x, stem.conv2, "conv2", 2), dims.activation_function)                # [C, d, T2]
    x = g.op("Transpose", x, perm=[0, 2, 1])                                                    # [C, T2, d]
    positions = g.op("Gather", g.op("Shape", x), g.const(1), axis=0)
    table = g.fweight("positional_embedding", stem.positional_embedding)
    x = g.op("Add", x, g.op("Slice", table, g.const([0]), g.op("Unsqueeze", positions, g.const([0])), g.const([0])))

    # keys past a chunk's length after the conv ((len - 1) // 2 + 1) are masked
    after_conv = g.op("Add", g.op("Div", g.op("Sub", lengths, one), g.const(2)), one)            # [C, 1]
    key_valid = g.op("Unsqueeze", positions_below(after_conv, positions), g.const([1, 2]))       # [C, 1, 1, T2]
    softmax32 = g.fp32("softmax")
    key_bias = g.op("Where", key_valid, g.fconst(0.0, softmax32), g.fconst(-np.inf, softmax32))

    def split_heads(t: ir.Value) -> ir.Value:
        return g.op("Transpose", g.op("Reshape", t, g.const([0, 0, heads, hd])), perm=[0, 2, 1, 3])

    scale = g.fconst(hd ** -0.5)
    count = 0
    for i, layer in enumerate(layers):
        p = f"layers.{i}"
        h = _layer_norm(g, x, layer.self_attn_layer_norm, f"{p}.self_attn_layer_norm")
        q = split_heads(g.linear(h, layer.q_proj, f"{p}.self_attn.q_proj"))
        k = split_heads(g.linear(h, layer.k_proj, f"{p}.self_attn.k_proj"))
        v = split_heads(g.linear(h, layer.v_proj, f"{p}.self_attn.v_proj"))
        scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), scale)
        attn = g.op("MatMul", g.softmax(scores, key_bias), v)                                    # [C, H, T2, hd]
        attn = g.op("Reshape", g.op("Transpose", attn, perm=[0, 2, 1, 3]), g.const([0, 0, d]))
        x = g.residual(x, g.linear(attn, layer.out_proj, f"{p}.self_attn.out_proj"))
        h = _layer_norm(g, x, layer.final_layer_norm, f"{p}.final_layer_norm")
        h = g.linear(_gelu(g, g.linear(h, layer.fc1, f"{p}.fc1"), dims.activation_function), layer.fc2, f"{p}.fc2")
        x = g.residual(x, h)
        count += 1
        if on_layer is not None:
            on_layer(i, g.weights.offset)
    if count != dims.encoder_layers:
        raise ValueError(f"expected {dims.encoder_layers} audio encoder layers, got {count}")

    hidden = g.op("Gather", g.op("Reshape", g.stream(x), g.const([-1, d])), valid_indices, axis=0)  # [N, d]
    pooled = g.op("Div", g.op("Add", g.op("Gather", hidden, pool_indices, axis=0),
                              g.op("Gather", hidden, g.op("Add", pool_indices, one), axis=0)),
                  g.fconst(2.0))
    out = g.linear(_layer_norm(g, pooled, stem.ln_post, "ln_post"), stem.proj, "proj")
    g.float_output(out, "audio_embeds", ("audio_tokens", dims.output_dim))
    return g.save()
