"""The tensors each graph of a bundle stores, from the config alone, and their bytes per precision.

One function per module (``INVENTORIES``, keyed by module name as ``omni_export.modules.REGISTRY``)
lists, per graph, every initializer the graph builder writes (``omni_export/export/*.py``), with
its shape, its role and whether it is a checkpoint parameter (``param``; graph-derived tensors
such as rotary tables, LayerNorm constants or anti-aliasing filters are not). The roles decide
how a recipe stores the tensor:

- ``linear``: a weight ``[out, in]`` that the module's ``weights`` precision applies to
  (float32 / float16 / int8 weight-only / int4 block-quantized; ``keep_float`` keeps it float);
- ``outer``: the talker's linears around its layers (input projection, codec head): as ``linear``,
  but int8 per output channel in an int4 talker;
- ``lm_head`` / ``embeddings``: the thinker's tables, stored as the recipe's ``lm_head`` /
  ``embeddings`` say;
- ``conv`` / ``table``: a convolution's weight, an embedding table (one row per code): int8 per
  output channel (row) in an int8 module (the table also in an int4 one), else float;
- ``norm``: norm weights and biases: float32 when the recipe's ``keep_fp32`` has ``norm``;
- ``fp32``: always float32 (rotary and sinusoid frequencies: angles float16 cannot carry);
- ``float``: everything else (biases, tables, constants), in the module's float type
  (``dtype``: float16 for ``weights: float16`` or a float16 ``dtype``, else float32).

Bytes per stored element are in ``constants.PRECISIONS``. Graphs pack q/k/v (and gate/up) of the
same kind into one tensor; the bytes are the same as separate tensors, so they are listed
separately here. Graph-builder constants (``const_*``: shape vectors, an ``arange``) are not
listed: a few KB per graph.

What could move into the module classes: each module's ``graph_tensors(shape) -> {graph: [...]}``
(the inventory below) next to its builder, and ``Module.weight_bytes(precision)`` over it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from omni_runtime.bundle.names import MODULE_GRAPHS

from omni_export.plan.config import BigVGAN, Decoder, DiT, ModelShape
from omni_export.plan.constants import PRECISIONS, TABLE_PRECISIONS

DECODER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Tensor:
    """One stored tensor: ``shape`` as the checkpoint holds it (``[out, in]`` for a linear)."""

    name: str
    shape: tuple[int, ...]
    role: str = "float"  # linear | outer | conv | table | lm_head | embeddings | norm | fp32 | float
    param: bool = True  # a checkpoint parameter (False: computed by the graph builder)
    linear: str | None = None  # the recipe's name of a linear (``keep_float`` matches it)
    channels: int | None = None  # output channels of a conv (a ConvTranspose's are its axis 1)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _lin(name: str, out: int, inp: int, bias: bool, role: str = "linear", linear: str | None = None
         ) -> list[Tensor]:
    items = [Tensor(f"{name}.weight", (out, inp), role, linear=linear)]
    if bias:
        items.append(Tensor(f"{name}.bias", (out,)))
    return items


def _decoder(d: Decoder, head_name: str, head_role: str, input_proj: bool) -> list[Tensor]:
    """``decoder_graph.build_decoder_graph``: rotary tables, [input_proj], layers, final norm, head."""
    h = d.hidden_size
    out = [Tensor("rotary.inv_freq", (d.head_dim // 2,), "fp32", param=False),
           Tensor("rotary.section_mask", (3, 1, 1, d.head_dim // 2), "fp32", param=False)]
    if input_proj:  # the talker's thinker_to_talker_proj, stored as its codec head
        out += _lin("input_proj", h, d.embedding_size, True, role="outer", linear="thinker_to_talker_proj")
    widths = {"self_attn.q_proj": (d.q_width, h, True), "self_attn.k_proj": (d.kv_width, h, True),
              "self_attn.v_proj": (d.kv_width, h, True), "self_attn.o_proj": (h, d.q_width, False),
              "mlp.gate_proj": (d.intermediate_size, h, False), "mlp.up_proj": (d.intermediate_size, h, False),
              "mlp.down_proj": (h, d.intermediate_size, False)}
    for i in range(d.num_hidden_layers):
        p = f"layers.{i}"
        out.append(Tensor(f"{p}.input_layernorm.weight", (h,), "norm"))
        for path in DECODER_LINEARS:
            if path == "mlp.gate_proj":
                out.append(Tensor(f"{p}.post_attention_layernorm.weight", (h,), "norm"))
            n, k, bias = widths[path]
            out += _lin(f"{p}.{path}", n, k, bias, linear=f"{p}.{path}")
    out.append(Tensor("norm.weight", (h,), "norm"))
    out += _lin(head_name, d.vocab_size, h, False, role=head_role, linear=head_name)
    return out


def thinker(shape: ModelShape) -> dict[str, list[Tensor]]:
    d = shape.text
    return {"thinker_embedding": [Tensor("embed_tokens.weight", (d.vocab_size, d.hidden_size), "embeddings")],
            "thinker_decoder": _decoder(d, "lm_head", "lm_head", input_proj=False)}


def talker(shape: ModelShape) -> dict[str, list[Tensor]]:
    d = shape.talker
    # The talker's linears include thinker_to_talker_proj and codec_head; its codec table is float.
    return {"talker_embedding": [Tensor("embed_tokens.weight", (d.vocab_size, d.embedding_size), "table")],
            "talker_decoder": _decoder(d, "codec_head", "outer", input_proj=True)}


def audio(shape: ModelShape) -> dict[str, list[Tensor]]:
    """``audio_encoder.build_graph``: convolutions, positions, layers, ln_post, proj."""
    a = shape.audio
    d = a.d_model
    out = [Tensor("conv1.weight", (d, a.num_mel_bins, 3), "conv"), Tensor("conv1.bias", (d,)),
           Tensor("conv2.weight", (d, d, 3), "conv"), Tensor("conv2.bias", (d,)),
           # SinusoidsPositionEmbedding: a buffer of the tower, not in checkpoints
           Tensor("positional_embedding", (a.max_source_positions, d), param=False)]
    for i in range(a.encoder_layers):
        p = f"layers.{i}"
        out += [Tensor(f"{p}.self_attn_layer_norm.weight", (d,), "norm"),
                Tensor(f"{p}.self_attn_layer_norm.bias", (d,), "norm")]
        for path, bias in (("self_attn.q_proj", True), ("self_attn.k_proj", False), ("self_attn.v_proj", True),
                           ("self_attn.out_proj", True)):
            out += _lin(f"{p}.{path}", d, d, bias, linear=f"{p}.{path}")
        out += [Tensor(f"{p}.final_layer_norm.weight", (d,), "norm"),
                Tensor(f"{p}.final_layer_norm.bias", (d,), "norm")]
        out += _lin(f"{p}.fc1", a.encoder_ffn_dim, d, True, linear=f"{p}.fc1")
        out += _lin(f"{p}.fc2", d, a.encoder_ffn_dim, True, linear=f"{p}.fc2")
    out += [Tensor("ln_post.weight", (d,), "norm"), Tensor("ln_post.bias", (d,), "norm")]
    out += _lin("proj", a.output_dim, d, True, linear="proj")
    return {"audio_encoder": out}


def vision(shape: ModelShape) -> dict[str, list[Tensor]]:
    """``vision_encoder.build_graph``: patch embedding (a MatMul), rotary table, blocks, merger."""
    v = shape.vision
    h, unit = v.hidden_size, v.merge_unit
    out = [Tensor("patch_embed.proj.weight", (h, v.patch_dim), "linear", linear="patch_embed.proj"),
           Tensor("rotary_pos_emb.inv_freq", (v.head_dim // 4,), "fp32", param=False)]
    for i in range(v.depth):
        p = f"blocks.{i}"
        out.append(Tensor(f"{p}.norm1.weight", (h,), "norm"))
        for path in ("attn.q", "attn.k", "attn.v", "attn.proj"):
            out += _lin(f"{p}.{path}", h, h, True, linear=f"{p}.{path}")
        out.append(Tensor(f"{p}.norm2.weight", (h,), "norm"))
        out += _lin(f"{p}.mlp.gate_proj", v.intermediate_size, h, True, linear=f"{p}.mlp.gate_proj")
        out += _lin(f"{p}.mlp.up_proj", v.intermediate_size, h, True, linear=f"{p}.mlp.up_proj")
        out += _lin(f"{p}.mlp.down_proj", h, v.intermediate_size, True, linear=f"{p}.mlp.down_proj")
    out.append(Tensor("merger.ln_q.weight", (h,), "norm"))
    out += _lin("merger.mlp.0", h * unit, h * unit, True, linear="merger.mlp.0")
    out += _lin("merger.mlp.2", v.out_hidden_size, h * unit, True, linear="merger.mlp.2")
    return {"vision_encoder": out}


def _dit(d: DiT) -> list[Tensor]:
    """``token2wav_dit.build_graph`` (the speaker encoder runs at build time: not in the graph)."""
    h = d.hidden_size
    out = [Tensor("layer_norm.ones", (h,), "norm", param=False), Tensor("layer_norm.zeros", (h,), "norm", param=False),
           Tensor("time_embed.frequencies", (1, 128), "fp32", param=False)]
    out += _lin("time_embed.time_mlp.0", h, 256, True, linear="time_embed.time_mlp.0")
    out += _lin("time_embed.time_mlp.2", h, h, True, linear="time_embed.time_mlp.2")
    out.append(Tensor("text_embed.codec_embed.weight", (d.num_embeds + 1, d.emb_dim)))  # float in every precision
    out += _lin("input_embed.proj", h, d.mel_dim + d.enc_dim + d.emb_dim + d.enc_emb_dim, True,
                linear="input_embed.proj")
    out.append(Tensor("rotary.inv_freq", (1, d.head_dim // 2), "fp32", param=False))
    for i in range(d.num_hidden_layers):
        p = f"transformer_blocks.{i}"
        out += _lin(f"{p}.attn_norm.linear", 6 * h, h, True, linear=f"{p}.attn_norm.linear")
        for path in ("attn.to_q", "attn.to_k", "attn.to_v"):
            out += _lin(f"{p}.{path}", d.inner_dim, h, True, linear=f"{p}.{path}")
        out += _lin(f"{p}.attn.to_out.0", h, d.inner_dim, True, linear=f"{p}.attn.to_out.0")
        out += _lin(f"{p}.ff.ff.0", h * d.ff_mult, h, True, linear=f"{p}.ff.ff.0")
        out += _lin(f"{p}.ff.ff.3", h, h * d.ff_mult, True, linear=f"{p}.ff.ff.3")
    out += _lin("norm_out.linear", 2 * h, h, True, linear="norm_out.linear")
    out += _lin("proj_out", d.mel_dim, h, True, linear="proj_out")
    return out


#: taps of the anti-aliased activation's filters (token2wav_bigvgan: UP_TAPS, AA_KERNEL)
_UP_TAPS, _DOWN_TAPS = 7, 12


def _bigvgan(v: BigVGAN) -> list[Tensor]:
    """``token2wav_bigvgan.build_graph``: convolutions (weight + bias), SnakeBeta constants
    (``exp(alpha)``, ``1 / exp(beta)``: one value per channel each, stored [C, 1, 1]) and the
    anti-aliasing filters, one set per distinct channel count."""
    out = [Tensor("conv_pre.weight", (v.upsample_initial_channel, v.mel_dim, 7), "conv"),
           Tensor("conv_pre.bias", (v.upsample_initial_channel,))]
    filters: set[int] = set()

    def snake(name: str, c: int) -> list[Tensor]:
        items = []
        if c not in filters:
            items += [Tensor(f"aa_up_even_filter_{c}", (c, 1, 1, _UP_TAPS), param=False),
                      Tensor(f"aa_up_odd_filter_{c}", (c, 1, 1, _UP_TAPS), param=False)]
        items += [Tensor(f"{name}.exp_alpha", (c, 1, 1)), Tensor(f"{name}.inv_beta", (c, 1, 1))]
        if c not in filters:
            items.append(Tensor(f"aa_down_filter_{c}", (c, 1, 1, _DOWN_TAPS), param=False))
            filters.add(c)
        return items

    kernels = v.resblock_kernel_sizes
    for stage, (rate, k) in enumerate(zip(v.upsample_rates, v.upsample_kernel_sizes)):
        c_in = v.upsample_initial_channel // 2 ** stage
        c = v.channels(stage)
        out += [Tensor(f"ups.{stage}.0.weight", (c_in, c, k), "conv", channels=c), Tensor(f"ups.{stage}.0.bias", (c,))]
        for j, kernel in enumerate(kernels):
            r = f"resblocks.{stage * len(kernels) + j}"
            for i in range(3):
                out += snake(f"{r}.activations.{2 * i}", c)
                out += [Tensor(f"{r}.convs1.{i}.weight", (c, c, kernel), "conv"), Tensor(f"{r}.convs1.{i}.bias", (c,))]
                out += snake(f"{r}.activations.{2 * i + 1}", c)
                out += [Tensor(f"{r}.convs2.{i}.weight", (c, c, kernel), "conv"), Tensor(f"{r}.convs2.{i}.bias", (c,))]
    last = v.channels(len(v.upsample_rates) - 1)
    out += snake("activation_post", last)
    out.append(Tensor("conv_post.weight", (1, last, 7), "conv"))  # no bias (transformers: bias=False)
    return out


def token2wav(shape: ModelShape) -> dict[str, list[Tensor]]:
    return {"token2wav_dit": _dit(shape.dit), "token2wav_bigvgan": _bigvgan(shape.bigvgan)}


#: module name -> its graphs' tensors (the registry's names; ``tests/test_plan.py`` checks the keys)
INVENTORIES: dict[str, Callable[[ModelShape], dict[str, list[Tensor]]]] = {
    "thinker": thinker, "audio": audio, "vision": vision, "talker": talker, "token2wav": token2wav}


def inventory(module: str, shape: ModelShape) -> dict[str, list[Tensor]]:
    """The tensors of ``module``'s graphs, graph by graph (``MODULE_GRAPHS[module]`` order)."""
    graphs = INVENTORIES[module](shape)
    return {name: graphs[name] for name in MODULE_GRAPHS[module]}


def parameter_count(module: str, shape: ModelShape) -> int:
    """Checkpoint parameters the module's graphs hold (graph-derived tensors excluded; the thinker's
    lm_head counted once more when the config ties it to the embedding, as the bundle stores it)."""
    return sum(t.numel for tensors in inventory(module, shape).values() for t in tensors if t.param)


# ---------------------------------------------------------------------------------------------
# bytes


@dataclass(frozen=True)
class Storage:
    """How one module's tensors are stored: the recipe section's values that decide bytes."""

    weights: str  # the ``weights`` precision of its linears
    float_dtype: str  # float32 or float16: its other tensors (and scales)
    group_size: int = 128
    emit: str = "qdq"
    lm_head: str | None = None  # thinker: float32 | int8 | int4 (float32 means the float type)
    embeddings: str | None = None
    keep_float: tuple[str, ...] = ()
    keep_fp32: tuple[str, ...] = ()  # parts of a float16 graph kept in float32 (``norm``: norm weights)

    def keeps_float(self, linear: str | None) -> bool:
        import fnmatch

        return linear is not None and any(fnmatch.fnmatchcase(linear, p) for p in self.keep_float)


def tensor_bytes(t: Tensor, s: Storage) -> int:
    """Bytes of ``t`` stored as ``s`` says (``constants.PRECISIONS`` for the formulas)."""
    float_bytes = int(PRECISIONS[s.float_dtype].bytes_per_param)
    if t.role == "fp32" or (t.role == "norm" and "norm" in s.keep_fp32):
        return t.numel * 4
    if t.role in ("float", "norm"):
        return t.numel * float_bytes
    if t.role in ("conv", "table"):
        # int8 modules quantize their convolutions per output channel and their tables per row;
        # an int4 module (the talker) keeps its table int8 per row
        quantized = PRECISIONS[s.weights].scheme == "channel" or (t.role == "table" and s.weights == "int4")
        if not quantized:
            return t.numel * float_bytes
        return t.numel + (t.channels or t.shape[0]) * float_bytes
    if t.role in ("linear", "outer"):
        weights = "int8" if t.role == "outer" and s.weights == "int4" else s.weights
        precision = PRECISIONS["float32" if s.keeps_float(t.linear) else weights]
    else:  # the thinker's tables: block-wise int8/int4 (embeddings along the hidden axis), or float
        value = getattr(s, t.role) or "float32"
        precision = TABLE_PRECISIONS.get(value, PRECISIONS["float32"])
    if precision.scheme == "float":
        # float32 means "the module's float type" (float16 on the cuda target)
        name = s.float_dtype if precision.name == "float32" else precision.name
        return t.numel * int(PRECISIONS[name].bytes_per_param)
    out, inp = t.shape
    emit = "qdq" if t.role == "embeddings" else s.emit  # the embedding graph gathers DequantizeLinear rows
    return precision.matrix_bytes(out, inp, group_size=s.group_size, emit=emit, scale_bytes=float_bytes)


def graph_bytes(tensors: list[Tensor], s: Storage) -> int:
    return sum(tensor_bytes(t, s) for t in tensors)
