"""The vision encoder graph (images and videos), built op by op with onnx-ir.

Graph IO (docs/bundle-format.md, ``vision_encoder``)::

    pixel_values [patches, C*T*P*P] float32   flattened patches of every image / video of a request,
                                                in the image processor's order (2x2 merge blocks
                                                consecutive), concatenated
    position_ids [patches, 2] int64            (row, column) of each patch in its frame: the 2D
                                                rotary positions, in patch order
    window_index [merged] int64                the window permutation of the 2x2 merge units
    cu_seqlens [segments + 1] int64            cumulative patch counts of the frames (full
                                                attention is confined to one frame), in window order
    cu_window_seqlens [windows + 1] int64      cumulative patch counts of the 112-px windows
    -> vision_embeds [merged, out_hidden] float32   one row per LLM token, in the original order

The host computes the four index inputs from the grids (``omni_runtime.media.vision_prep.encoder_inputs``)
exactly as transformers' ``Qwen2_5OmniVisionEncoder`` does (``transformers.vision_utils``).
Inside the graph, attention is confined to segments (frames, or windows) without any per-shape
constant: from a ``cu`` vector the graph derives each segment's start, length and key mask, and a
``Loop`` attends a few segments and a chunk of their queries per iteration against the segments'
keys; ``Compress`` drops the padding rows (segments are contiguous and in order, so the kept rows
are the sequence in order). A run holds ``heads x 512 x frame patches`` scores for the
full-attention blocks (one frame, 512 queries per iteration) and ``64 x heads x 64 x 64`` for the
windowed ones, whatever the number of frames, images and videos in the call.

Conv3d patch embedding with stride = kernel is a MatMul of the flattened patches with the
kernel reshaped to ``[hidden, C*T*P*P]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from omni_runtime.bundle.names import VISION_ENCODER as GRAPH_NAME

from omni_export.export.onnx_graph import GraphBuilder, Linear
from omni_export.export.onnx_io import ExportedGraph

FILE_NAME = "vision_encoder.onnx"
F = ir.DataType.FLOAT
I64 = ir.DataType.INT64
RMS_EPS = 1e-6  # Qwen2.5-Omni's vision RMSNorms use a fixed epsilon
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "quick_gelu")
INPUT_NAMES = ("pixel_values", "position_ids", "window_index", "cu_seqlens", "cu_window_seqlens")
OUTPUT_NAME = "vision_embeds"
# Attention work per Loop iteration: full-attention blocks take one frame and FULL_CHUNK of its
# queries (scores: heads x 512 x frame patches); windowed blocks take WINDOW_GROUP whole windows.
FULL_GROUP, FULL_CHUNK = 1, 512
WINDOW_GROUP = 64


@dataclass(frozen=True)
class VisionDims:
    """The vision encoder's shape constants (from its transformers config)."""

    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    window_size: int
    fullatt_block_indexes: tuple[int, ...]
    hidden_act: str
    rope_theta: float

    @classmethod
    def from_config(cls, cfg) -> "VisionDims":
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        return cls(cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size, cfg.out_hidden_size,
                   cfg.in_channels, cfg.patch_size, cfg.temporal_patch_size, cfg.spatial_merge_size,
                   cfg.window_size, tuple(int(i) for i in cfg.fullatt_block_indexes), cfg.hidden_act, float(theta))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2


@dataclass
class VisionBlock:
    """One vision transformer block's weights."""

    norm1: np.ndarray
    norm2: np.ndarray
    q: Linear
    k: Linear
    v: Linear
    proj: Linear
    gate_proj: Linear
    up_proj: Linear
    down_proj: Linear


@dataclass
class VisionWeights:
    """Everything but the blocks (which are streamed one at a time)."""

    patch_embed: Linear      # the Conv3d (stride = kernel) as a linear [hidden, C*T*P*P], no bias
    merger_norm: np.ndarray  # [hidden]
    merger_fc1: Linear       # [hidden * unit] -> [hidden * unit]
    merger_fc2: Linear       # [hidden * unit] -> [out_hidden]


def inverse_frequencies(dims: VisionDims) -> np.ndarray:
    """The 2D rotary inverse frequencies [head_dim / 4] as transformers computes them (float32)."""
    spatial = dims.head_dim // 2
    exponent = np.arange(0, spatial, 2, dtype=np.int64).astype(np.float32) / np.float32(spatial)
    return (1.0 / (np.float32(dims.rope_theta) ** exponent)).astype(np.float32)


class _Segments:
    """The segments described by a ``cu`` vector (``cu[i]..cu[i+1]``), padded for batched work:
    starts and lengths padded with empty segments to a multiple of ``group``, and for each
    segment the gather indices and additive key mask of its (at most ``longest``) positions."""

    def __init__(self, g: GraphBuilder, cu: ir.Value, group: int):
        big = np.iinfo(np.int64).max
        starts = g.op("Slice", cu, g.const([0]), g.const([-1]), g.const([0]))
        lens = g.op("Sub", g.op("Slice", cu, g.const([1]), g.const([big]), g.const([0])), starts)   # [S]
        self.longest = g.op("ReduceMax", lens, keepdims=0)                                       # []
        count = g.op("Shape", lens)                                                              # [1]
        self.groups = _ceil_div(g, g.op("Squeeze", count, g.const([0])), group)                  # []
        pad = g.op("Sub", g.op("Mul", self.groups, g.const(group)), g.op("Squeeze", count, g.const([0])))
        pads = g.op("Unsqueeze", pad, g.const([0]))
        self.starts = g.op("Pad", starts, g.op("Concat", g.const([0]), pads, axis=0))            # [S']
        self.lens = g.op("Pad", lens, g.op("Concat", g.const([0]), pads, axis=0))                # [S']
        steps = g.op("Unsqueeze", g.op("Range", g.const(0), self.longest, g.const(1)), g.const([0]))  # [1, L]
        valid = g.op("Less", steps, g.op("Unsqueeze", self.lens, g.const([1])))                 # [S', L]
        index = g.op("Add", g.op("Unsqueeze", self.starts, g.const([1])), steps)
        self.index = g.op("Where", valid, index, g.const(0))                                     # [S', L]
        fp32 = g.fp32("softmax")  # the mask is of the type the softmax runs in
        self.bias = g.op("Where", valid, g.fconst(0.0, fp32),
                         g.fconst(np.finfo(np.float32).min, fp32))                              # [S', L]


def _ceil_div(g: GraphBuilder, x: ir.Value, d: int) -> ir.Value:
    return g.op("Div", g.op("Add", x, g.const(d - 1)), g.const(d))


class _Body:
    """Ops of a Loop body: every value and node named (subgraph names must not collide with the
    outer graph's ``val_N``), outer values and constants read from the enclosing scope."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.tape = ir.tape.Tape()
        self.count = 0

    def _name(self) -> str:
        self.count += 1
        return f"{self.prefix}/{self.count}"

    def value(self, dtype: ir.DataType, shape: tuple) -> ir.Value:
        return ir.Value(name=self._name(), type=ir.TensorType(dtype), shape=ir.Shape(shape))

    def op(self, op_type: str, *inputs, **attributes) -> ir.Value:
        out = self.tape.op(op_type, list(inputs), attributes or None, name=self._name())
        out.name = self._name()
        return out


def _attention(g: GraphBuilder, q, k, v, seg: _Segments, dims: VisionDims, group: int, chunk: int,
               name: str) -> ir.Value:
    """q, k, v [n, heads, head_dim] -> attention within each segment, [n, hidden].

    A Loop runs ``group`` segments x ``chunk`` queries at a time against the segments' keys, so
    a run materialises ``group x heads x chunk x longest`` scores, not all segments' at once."""
    chunks = _ceil_div(g, seg.longest, chunk)                                                   # []
    trips = g.op("Mul", seg.groups, chunks)
    scale = g.fconst(np.float32(dims.head_dim ** -0.5))
    softmax32 = g.half and g.fp32("softmax")

    b = _Body(f"{name}.loop")
    i = b.value(I64, ())
    cond = b.value(ir.DataType.BOOL, ())
    gi, ci = b.op("Div", i, chunks), b.op("Mod", i, chunks)
    first = b.op("Unsqueeze", b.op("Mul", gi, g.const(group)), g.const([0]))
    last = b.op("Add", first, g.const([group]))
    rows = lambda x: b.op("Slice", x, first, last, g.const([0]))  # noqa: E731
    starts, lens, keys, bias = rows(seg.starts), rows(seg.lens), rows(seg.index), rows(seg.bias)
    pos = b.op("Add", b.op("Mul", ci, g.const(chunk)), g.const(np.arange(chunk)))              # [chunk]
    valid = b.op("Less", b.op("Unsqueeze", pos, g.const([0])), b.op("Unsqueeze", lens, g.const([1])))  # [G, chunk]
    queries = b.op("Where", valid, b.op("Add", b.op("Unsqueeze", starts, g.const([1])),
                                        b.op("Unsqueeze", pos, g.const([0]))), g.const(0))
    qs = b.op("Transpose", b.op("Gather", q, queries, axis=0), perm=[0, 2, 1, 3])              # [G, H, chunk, D]
    ks = b.op("Transpose", b.op("Gather", k, keys, axis=0), perm=[0, 2, 3, 1])                 # [G, H, D, L]
    vs = b.op("Transpose", b.op("Gather", v, keys, axis=0), perm=[0, 2, 1, 3])                 # [G, H, L, D]
    scores = b.op("Mul", b.op("MatMul", qs, ks), scale)
    if softmax32:  # the Loop body holds its own Casts (GraphBuilder.softmax works on the outer graph)
        scores = b.op("Cast", scores, to=ir.DataType.FLOAT)
    scores = b.op("Add", scores, b.op("Unsqueeze", bias, g.const([1, 2])))
    probs = b.op("Softmax", scores, axis=-1)
    if softmax32:
        probs = b.op("Cast", probs, to=g.F)
    out = b.op("MatMul", probs, vs)                                                             # [G, H, chunk, D]
    out = b.op("Transpose", out, perm=[0, 2, 1, 3])                                             # [G, chunk, H, D]
    cond_out = b.op("Identity", cond)
    for value, dtype in ((cond_out, ir.DataType.BOOL), (out, g.F), (valid, ir.DataType.BOOL)):
        value.type = ir.TensorType(dtype)
    body = ir.Graph([i, cond], [cond_out, out, valid], nodes=b.tape.nodes, name=f"{name}.body")

    outs, valids = g.ops("Loop", trips, None, outputs=2, body=body)   # [T, G, chunk, H, D], [T, G, chunk]
    # iterations run (group, chunk); the sequence order is (group, segment, chunk, query)
    shape = g.op("Concat", g.op("Unsqueeze", seg.groups, g.const([0])), g.op("Unsqueeze", chunks, g.const([0])),
                 g.const([group, chunk, -1]), axis=0)
    outs = g.op("Transpose", g.op("Reshape", outs, shape), perm=[0, 2, 1, 3, 4])
    valids = g.op("Transpose", g.op("Reshape", valids, g.op("Slice", shape, g.const([0]), g.const([4]))),
                  perm=[0, 2, 1, 3])
    return g.op("Compress", g.op("Reshape", outs, g.const([-1, dims.hidden_size])),
                g.op("Reshape", valids, g.const([-1])), axis=0)


def _rotate(g: GraphBuilder, x, cos, sin, dims: VisionDims) -> ir.Value:
    """x [n, heads, head_dim] -> x * cos + rotate_half(x) * sin."""
    half = dims.head_dim // 2
    first, second = g.ops("Split", x, g.const([half, half]), outputs=2, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", g.op("Concat", g.op("Neg", second), first, axis=-1), sin))


def _activation(g: GraphBuilder, x, name: str) -> ir.Value:
    if name == "silu":
        return g.op("Mul", x, g.op("Sigmoid", x))
    if name == "gelu":
        return g.op("Gelu", x)
    if name == "gelu_pytorch_tanh":
        return g.op("Gelu", x, approximate="tanh")
    if name == "quick_gelu":
        return g.op("Mul", x, g.op("Sigmoid", g.op("Mul", x, g.fconst(np.float32(1.702)))))
    raise ValueError(f"unsupported vision hidden_act {name!r} (supported: {', '.join(ACTIVATIONS)})")


def _window_order(g: GraphBuilder, x, window_index, dims: VisionDims, width: int) -> ir.Value:
    """Rows [n, width] regrouped by merge unit and permuted by ``window_index`` (transformers'
    ``permute_input_for_window_attn``)."""
    units = g.op("Reshape", x, g.const([-1, dims.merge_unit, width]))
    return g.op("Reshape", g.op("Gather", units, window_index, axis=0), g.const([-1, width]))


def build_graph(dims: VisionDims, weights: VisionWeights, blocks, out_dir: Path,
                on_block: Callable[[int], None] | None = None, dtype: str = "float32",
                keep_fp32: tuple[str, ...] = ()) -> ExportedGraph:
    """Write ``vision_encoder.onnx`` (+ ``.data``); ``blocks`` yields the ``VisionBlock``s in order,
    each written to disk before the next is requested. ``dtype``: the float type it computes in
    (IO stays float32); ``keep_fp32``: parts of a float16 graph kept in float32 (``norm``,
    ``softmax``, ``residual``). The rotary angles are float32 in any case (positions up to
    thousands of patches times frequencies: float16 would lose them)."""
    if dims.hidden_act not in ACTIVATIONS:
        raise ValueError(f"unsupported vision hidden_act {dims.hidden_act!r}")
    g = GraphBuilder(out_dir, FILE_NAME, dtype=dtype, keep_fp32=keep_fp32)
    pixels = g.float_input("pixel_values", ("patches", dims.patch_dim))
    position_ids = g.input("position_ids", I64, ("patches", 2))
    window_index = g.input("window_index", I64, ("merged",))
    cu_seqlens = g.input("cu_seqlens", I64, ("segments_plus_1",))
    cu_window = g.input("cu_window_seqlens", I64, ("windows_plus_1",))

    x = g.linear(pixels, weights.patch_embed, "patch_embed.proj")
    x = _window_order(g, x, window_index, dims, dims.hidden_size)                    # [n, hidden]

    pos = g.op("Cast", _window_order(g, position_ids, window_index, dims, 2), to=F)  # [n, 2]
    freqs = g.op("Mul", g.op("Unsqueeze", pos, g.const([-1])),
                 g.weight("rotary_pos_emb.inv_freq", inverse_frequencies(dims)))     # [n, 2, D/4]
    freqs = g.op("Reshape", freqs, g.const([-1, dims.head_dim // 2]))
    emb = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.const([1]))     # [n, 1, D]
    cos, sin = g.to_compute(g.op("Cos", emb)), g.to_compute(g.op("Sin", emb))

    window_tokens = (dims.window_size // dims.patch_size) ** 2  # patches of a full window
    full, windows = _Segments(g, cu_seqlens, FULL_GROUP), _Segments(g, cu_window, WINDOW_GROUP)
    heads = g.const([-1, dims.num_heads, dims.head_dim])
    count = 0
    for i, block in enumerate(blocks):
        p = f"blocks.{i}"
        h = g.rms_norm(x, block.norm1, RMS_EPS, f"{p}.norm1.weight")
        q, k, v = g.linears(h, [block.q, block.k, block.v], [f"{p}.attn.{n}" for n in "qkv"])
        q = _rotate(g, g.op("Reshape", q, heads), cos, sin, dims)
        k = _rotate(g, g.op("Reshape", k, heads), cos, sin, dims)
        v = g.op("Reshape", v, heads)
        if i in dims.fullatt_block_indexes:
            attn = _attention(g, q, k, v, full, dims, FULL_GROUP, FULL_CHUNK, f"{p}.attn")
        else:
            attn = _attention(g, q, k, v, windows, dims, WINDOW_GROUP, window_tokens, f"{p}.attn")
        x = g.residual(x, g.linear(attn, block.proj, f"{p}.attn.proj"))
        h = g.rms_norm(x, block.norm2, RMS_EPS, f"{p}.norm2.weight")
        gate, up = g.linears(h, [block.gate_proj, block.up_proj], [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"])
        x = g.residual(x, g.linear(g.op("Mul", _activation(g, gate, dims.hidden_act), up), block.down_proj,
                                   f"{p}.mlp.down_proj"))
        count += 1
        if on_block is not None:
            on_block(i)
    if count != dims.depth:
        raise ValueError(f"expected {dims.depth} vision blocks, got {count}")

    h = g.rms_norm(x, weights.merger_norm, RMS_EPS, "merger.ln_q.weight")
    h = g.op("Reshape", h, g.const([-1, dims.hidden_size * dims.merge_unit]))
    h = g.op("Gelu", g.linear(h, weights.merger_fc1, "merger.mlp.0"))
    merged = g.linear(h, weights.merger_fc2, "merger.mlp.2")                         # [m, out], window order
    # back to the original order: reverse[window_index[j]] = j
    order = g.op("Range", g.const(0), g.op("Squeeze", g.op("Shape", window_index), g.const([0])), g.const(1))
    reverse = g.op("ScatterElements", g.op("ConstantOfShape", g.op("Shape", window_index),
                                           value=ir.tensor(np.zeros(1, np.int64))),
                   window_index, order, axis=0)
    out = g.op("Gather", merged, reverse, axis=0)
    g.float_output(out, OUTPUT_NAME, ("merged", dims.out_hidden_size))
    return g.save()
