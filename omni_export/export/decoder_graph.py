"""A Qwen2-style decoder graph with a KV cache, built op by op with onnx-ir.

Shared by the thinker (``thinker_decoder``) and the talker (``talker_decoder``): the same
layers (RMSNorm, GQA attention with multimodal rotary positions, SwiGLU MLP), an optional
input projection (the talker's ``thinker_to_talker_proj``) and a head on the last position.

Graph IO (docs/bundle-format.md)::

    inputs_embeds [batch, sequence, input_width] float32
    position_ids [3, batch, sequence] int64          (TMRoPE axes, computed on the host)
    seqlens_k [batch] int32                           (tokens in the cache after this step, minus 1)
    total_sequence_length [] int32                    (max over the batch of seqlens_k + 1)
    past_key_values.{i}.key / .value [batch, kv_heads, past_sequence, head_dim] float32
    -> logits [batch, 1, vocab] (last position), last_hidden_state [batch, sequence, hidden],
       present.{i}.key / .value [batch, kv_heads, present_sequence, head_dim]

Attention is onnxruntime's GroupQueryAttention: causal, grouped heads, and a KV cache that
can be one preallocated buffer shared by ``past`` and ``present`` (bound to both with IO
binding, the decode step then writes one position per layer instead of copying the cache).
It never builds a [heads, prompt, prompt] tensor larger than the host's prefill chunk.

Weights arrive one decoder layer at a time (``DecoderLayer``, float or ``QuantWeight``) and are
written to external data as they come, so the builder holds one layer in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
from omni_runtime.bundle.config import DecoderConfig

from omni_export.export.decoder_weights import LINEARS
from omni_export.export.onnx_graph import MS_DOMAIN, GraphBuilder, Linear
from omni_export.export.onnx_io import ExportedGraph

F = ir.DataType.FLOAT


@dataclass(frozen=True)
class TextDims(DecoderConfig):
    """A decoder's shape constants from its transformers config: the runtime's ``DecoderConfig``
    (the manifest's ``config.thinker`` / ``config.talker`` decoder fields), float32 KV cache."""

    def manifest_config(self) -> dict:
        """The decoder's shape constants as the manifest's ``config.<module>`` block records them."""
        return {**dataclasses.asdict(self), "mrope_section": list(self.mrope_section)}

    def layer_float_bytes(self, intermediate_size: int) -> int:
        """float32 bytes of one decoder layer's linear weights (q, k, v, o and the SwiGLU MLP)."""
        attention = (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim * self.hidden_size
        attention += self.num_attention_heads * self.head_dim * self.hidden_size
        return 4 * (attention + 3 * self.hidden_size * intermediate_size)

    @classmethod
    def from_config(cls, cfg) -> "TextDims":
        rope = cfg.rope_parameters
        return cls(cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
                   head_dim(cfg), cfg.vocab_size, float(cfg.rms_norm_eps), float(rope["rope_theta"]),
                   tuple(rope.get("mrope_section", [16, 24, 24])), cfg.max_position_embeddings, "float32")


@dataclass
class DecoderLayer:
    """One decoder layer's weights: two RMSNorm weights (``decoder_weights.NORMS``) and seven linears
    (``decoder_weights.LINEARS``, which names them)."""

    input_layernorm: np.ndarray
    post_attention_layernorm: np.ndarray
    q_proj: Linear
    k_proj: Linear
    v_proj: Linear
    o_proj: Linear
    gate_proj: Linear
    up_proj: Linear
    down_proj: Linear


def head_dim(config) -> int:
    """Attention head size of a text config (explicit ``head_dim`` or hidden / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def inverse_frequencies(dims: TextDims) -> np.ndarray:
    """RoPE inverse frequencies [head_dim / 2], computed as transformers does (float32)."""
    exponent = np.arange(0, dims.head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dims.head_dim)
    return (1.0 / (np.float32(dims.rope_theta) ** exponent)).astype(np.float32)


def section_mask(dims: TextDims) -> np.ndarray:
    """[3, 1, 1, head_dim/2] one-hot: which position axis (t, h, w) drives each frequency."""
    half = dims.head_dim // 2
    owner = np.concatenate([np.full(n, i % 3) for i, n in enumerate(dims.mrope_section)])
    if owner.size != half:
        raise ValueError(f"mrope_section {dims.mrope_section} does not sum to head_dim/2 = {half}")
    return (owner[None, :] == np.arange(3)[:, None]).astype(np.float32).reshape(3, 1, 1, half)


class _Rotary:
    """cos/sin of the multimodal rotary embedding, computed once per step from position_ids
    (in float32: float16 cannot hold positions past 2048 nor their angles; cos/sin are then cast
    to the compute type)."""

    def __init__(self, g: GraphBuilder, position_ids: ir.Value, dims: TextDims):
        freqs = g.op("Mul", g.op("Unsqueeze", g.op("Cast", position_ids, to=F), g.const([-1])),
                     g.weight("rotary.inv_freq", inverse_frequencies(dims)))          # [3, B, S, D/2]
        chosen = g.op("ReduceSum", g.op("Mul", freqs, g.weight("rotary.section_mask", section_mask(dims))),
                      g.const([0]), keepdims=0)                                           # [B, S, D/2]
        emb = g.op("Unsqueeze", g.op("Concat", chosen, chosen, axis=-1), g.const([2]))  # [B, S, 1, D]
        self.cos, self.sin = g.to_compute(g.op("Cos", emb)), g.to_compute(g.op("Sin", emb))
        self.half = dims.head_dim // 2
        self.dims = dims

    def apply(self, g: GraphBuilder, x: ir.Value, heads: int) -> ir.Value:
        """x [B, S, heads * D] -> x * cos + rotate_half(x) * sin, same shape."""
        d = self.dims.head_dim
        x4 = g.op("Reshape", x, g.const([0, 0, heads, d]))
        first, second = g.ops("Split", x4, g.const([self.half, self.half]), outputs=2, axis=-1)
        rotated = g.op("Concat", g.op("Neg", second), first, axis=-1)
        out = g.op("Add", g.op("Mul", x4, self.cos), g.op("Mul", rotated, self.sin))
        return g.op("Reshape", out, g.const([0, 0, heads * d]))


def build_decoder_graph(
    file_name: str,
    dims: TextDims,
    layers: Iterable[DecoderLayer],
    final_norm: np.ndarray,
    lm_head: Callable[[], Linear],
    out_dir: Path,
    emit: str = "qdq",
    accuracy_level: int = 0,
    on_layer: Callable[[int, int], None] | None = None,
    input_proj: Linear | None = None,
    input_width: int | None = None,
    dtype: str = "float32",
    keep_fp32: tuple[str, ...] = (),
    builder: type[GraphBuilder] = GraphBuilder,
) -> ExportedGraph:
    """Write ``file_name`` (+ ``.data``) from a stream of layers; returns its IO.

    ``dtype``: the float type it computes in. A float16 decoder keeps ``inputs_embeds``,
    ``logits`` and ``last_hidden_state`` float32 (Casts inside) but its KV cache is float16
    (``dims.kv_dtype``): the cache is one buffer bound to both ``past`` and ``present`` and
    written in place, which a Cast at the boundary would turn into a copy of the whole cache per
    step. ``keep_fp32``: ``norm`` (RMSNorms and the residual stream in float32).

    ``input_proj`` (with ``input_width`` its input size) maps ``inputs_embeds`` to the decoder's
    width first, as the talker's ``thinker_to_talker_proj`` does.

    ``layers`` is consumed one at a time: each layer's weights go to disk before the next is
    requested. ``lm_head`` is called after the last layer (its weight is the largest tensor).
    ``on_layer(i, bytes_written)`` is called after each layer's weights are on disk.

    ``builder``: the ``GraphBuilder`` class that writes the linears
    (``export.w8a8_linear.W8A8GraphBuilder`` for W8A8 weights, with ``emit`` its form).
    """
    g = builder(out_dir, file_name, emit=emit, accuracy_level=accuracy_level, dtype=dtype,
                keep_fp32=keep_fp32)
    kv_type = ir.DataType.FLOAT16 if dims.kv_dtype == "float16" else F
    if kv_type != g.F:
        raise ValueError(f"{file_name}: kv_dtype {dims.kv_dtype} must be the compute type {dtype}")
    n = dims.num_hidden_layers
    kv_in = ("batch", dims.num_key_value_heads, "past_sequence", dims.head_dim)
    embeds = g.float_input("inputs_embeds", ("batch", "sequence", input_width or dims.hidden_size))
    position_ids = g.input("position_ids", ir.DataType.INT64, (3, "batch", "sequence"))
    seqlens_k = g.input("seqlens_k", ir.DataType.INT32, ("batch",))
    total = g.input("total_sequence_length", ir.DataType.INT32, ())
    past = [g.input(name, kv_type, kv_in) for name in past_names(n)]
    rotary = _Rotary(g, position_ids, dims)
    if input_proj is not None:
        embeds = g.linear(embeds, input_proj, "input_proj")
    presents = []
    residual, mlp_out = embeds, None
    count = 0
    for i, layer in enumerate(layers):
        p = f"layers.{i}"
        if mlp_out is None:
            x = g.rms_norm(residual, layer.input_layernorm, dims.rms_norm_eps, f"{p}.input_layernorm.weight")
        else:
            x, residual = g.skip_rms_norm(mlp_out, residual, layer.input_layernorm, dims.rms_norm_eps,
                                          f"{p}.input_layernorm.weight")
        q, k, v = g.linears(x, [layer.q_proj, layer.k_proj, layer.v_proj],
                            [f"{p}.{LINEARS[n]}" for n in ("q_proj", "k_proj", "v_proj")])
        q = rotary.apply(g, q, dims.num_attention_heads)
        k = rotary.apply(g, k, dims.num_key_value_heads)
        attn, key, value = g.ops("GroupQueryAttention", q, k, v, past[2 * i], past[2 * i + 1], seqlens_k, total,
                                 outputs=3, domain=MS_DOMAIN, num_heads=dims.num_attention_heads,
                                 kv_num_heads=dims.num_key_value_heads)
        presents += [key, value]
        attn = g.linear(attn, layer.o_proj, f"{p}.{LINEARS['o_proj']}")
        x, residual = g.skip_rms_norm(attn, residual, layer.post_attention_layernorm, dims.rms_norm_eps,
                                      f"{p}.post_attention_layernorm.weight")
        gate, up = g.linears(x, [layer.gate_proj, layer.up_proj],
                             [f"{p}.{LINEARS[n]}" for n in ("gate_proj", "up_proj")])
        mlp_out = g.linear(g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up), layer.down_proj,
                           f"{p}.{LINEARS['down_proj']}")
        count += 1
        if on_layer is not None:
            on_layer(i, g.weights.offset)  # bytes written so far
    if count != n:
        raise ValueError(f"expected {n} decoder layers, got {count}")
    if mlp_out is None:
        hidden = g.rms_norm(residual, final_norm, dims.rms_norm_eps, "norm.weight")
    else:
        hidden, _ = g.skip_rms_norm(mlp_out, residual, final_norm, dims.rms_norm_eps, "norm.weight")
    last = g.op("Slice", hidden, g.const([-1]), g.const([np.iinfo(np.int64).max]), g.const([1]))
    logits = g.linear(last, lm_head(), "lm_head")
    g.float_output(logits, "logits", ("batch", 1, dims.vocab_size))
    g.float_output(hidden, "last_hidden_state", ("batch", "sequence", dims.hidden_size))
    kv_out = ("batch", dims.num_key_value_heads, "present_sequence", dims.head_dim)
    for name, value in zip(present_names(n), presents):
        g.output(value, name, kv_type, kv_out)
    return g.save()
