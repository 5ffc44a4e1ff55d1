"""The talker module: codec embedding graph + KV-cached talker decoder (speech codes from the thinker).

Recipe section ``modules.talker``: ``weights: float32 | float16 | int8 | int4`` with ``dtype``
(activations: float32 | float16; a float16 decoder has a float16 KV cache, ``config.talker.kv_dtype``)
and ``keep_fp32`` (``norm``). int8: every linear symmetric per output channel, the codec table
int8 per row. int4: the decoder layers' linears block-wise round-to-nearest (``method: rtn``,
``group_size``, ``symmetric``, ``keep_float`` as the thinker's), ``thinker_to_talker_proj``, the
codec head and the codec table int8 per channel (the head picks every code: measured in
recipes/README.md). W8A8 (``weights: int8, activations: int8_per_token | int8_per_tensor``,
``emit`` a W8A8 form, ``keep_float``): the decoder layers' linears as the thinker's W8A8 (int8
per output channel, activations quantized in the graph at run time, no smoothing: the talker has
no calibration), ``thinker_to_talker_proj`` and the codec head float32, the codec table int8 per
row. The decoder layers are read one at a time and written to the graph's external data.

A checkpoint without a talker, i.e. ``enable_audio_output: false`` in config.json or no
``talker.*`` tensors at all, builds a text-only bundle: ``skip_reason()`` says why and ``build``
leaves the module out (no graphs, no ``config.talker``). A talker whose tensors are only partly
present is an error.

The manifest's ``config.talker`` block holds what ``omni_runtime.stages.talker`` needs besides the
graphs: the decoder's shapes, the codec ids (bos/eos/pad/mask), the thinker-vocabulary ids of
the talker's text stream (eos/pad), the stop and suppressed codes, and transformers'
``Qwen2_5OmniForConditionalGeneration.generate`` sampling defaults for the talker.

Checkpoint names (under ``talker.``, the same in transformers 4.5x and 5): the decoder's layers
under ``model.layers``, and the tensors of ``TENSORS`` around them.
"""

from __future__ import annotations

import numpy as np

from omni_runtime.bundle.names import MODULE_GRAPHS

from omni_export.checkpoint.reader import CheckpointError
from omni_export.export.decoder_weights import LINEARS, DecoderWeights
from omni_export.modules.base import BuildContext, Module, ModuleBuild, channel_quantization, quantize_linear

#: ``Qwen2_5OmniForConditionalGeneration.generate``'s talker defaults (transformers 5,
#: modeling_qwen2_5_omni.py): talker_do_sample, talker_top_k, talker_top_p, talker_temperature,
#: talker_repetition_penalty, talker_max_new_tokens. Its talker_eos_token_id [8292, 8294] is
#: [codec pad, codec eos], and it suppresses the codec bos.
SAMPLING_DEFAULTS = {"do_sample": True, "top_k": 40, "top_p": 0.8, "temperature": 0.9,
                     "repetition_penalty": 1.05, "max_new_tokens": 4096}

#: The talker's tensors around its decoder layers (local names): graph part -> tensor or linear.
TENSORS = {"codec_embedding": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
           "input_proj": "thinker_to_talker_proj", "codec_head": "codec_head"}
NO_TALKER_FIX = ("the checkpoint is incomplete: download all weight shards, or set enable_audio_output: false "
                 "in config.json for a text-only bundle")


class TalkerModule(Module):
    name = "talker"
    description = "the talker (speech codec tokens from the thinker's states), with its codec embeddings"
    graphs = MODULE_GRAPHS[name]
    prefixes = ("talker.",)
    layer_prefix = "model.layers"
    linears = tuple(LINEARS.values())
    missing_fix = NO_TALKER_FIX
    recipe_keys = ("weights", "dtype", "keep_fp32", "method", "group_size", "symmetric", "keep_float", "activations",
                   "emit")
    optional_recipe_keys = {"emit": "qdq"}  # emit chooses a W8A8 form; weight-only talkers have one
    precisions = ("float32", "float16", "int8", "int4")
    fp32_parts = ("norm",)

    def _config(self):
        return self.ckpt.config.talker_config

    def skip_reason(self) -> str | None:
        """Why this checkpoint has no talker to export (the bundle is then text-only), or None."""
        return no_speech_reason(self, "talker_config")

    def weights(self) -> TalkerWeights:
        return TalkerWeights(self.ckpt)

    def required_tensors(self) -> list[str]:
        """Every tensor the talker graphs need; biases are optional."""
        return [TENSORS["codec_embedding"], TENSORS["final_norm"], f"{TENSORS['input_proj']}.weight",
                f"{TENSORS['codec_head']}.weight", *self.weights().required()]

    def check(self) -> None:
        if self.skip_reason() is not None:
            return
        super().check()
        cfg = self._config()
        if cfg.embedding_size != self.ckpt.text_config().hidden_size:
            raise CheckpointError(f"talker_config.embedding_size {cfg.embedding_size} differs from the thinker's "
                                  f"hidden_size {self.ckpt.text_config().hidden_size}",
                                  path=self.ckpt.root / "config.json",
                                  fix="the talker does not belong to this thinker: use the original config.json")

    def dims(self):
        import dataclasses

        from omni_export.export.talker_decoder import talker_dims

        # a float16 decoder's KV cache is float16 (decoder_graph.build_decoder_graph)
        return dataclasses.replace(talker_dims(self._config()), kv_dtype=self.settings.dtype)

    def memory_estimate(self) -> int:
        """The codec table and one decoder layer in float32 a few times over, plus a margin."""
        if self.skip_reason() is not None:
            return 0
        cfg = self._config()
        d = self.dims()
        layer = d.layer_float_bytes(cfg.intermediate_size)
        table = 4 * d.vocab_size * max(cfg.embedding_size, d.hidden_size)
        return int(3 * max(layer, table) + 1.0e9)

    def config(self) -> dict:
        cfg = self._config()
        codec = {"bos": int(cfg.tts_codec_start_token_id), "eos": int(cfg.tts_codec_end_token_id),
                 "pad": int(cfg.tts_codec_pad_token_id), "mask": int(cfg.tts_codec_mask_token_id)}
        return {
            "enable_audio_output": True,
            **self.dims().manifest_config(),
            "embedding_size": int(cfg.embedding_size),
            "codec": codec,
            # thinker-vocabulary ids of the talker's text stream (embedded with thinker_embedding)
            "text": {"bos": int(cfg.tts_text_start_token_id), "eos": int(cfg.tts_text_end_token_id),
                     "pad": int(cfg.tts_text_pad_token_id)},
            "eos_token_ids": [codec["pad"], codec["eos"]],
            "suppress_tokens": [codec["bos"]],
            "sampling": dict(SAMPLING_DEFAULTS),
        }

    def _int8(self, linear):
        """A linear outside the decoder layers (codec_head, thinker_to_talker_proj): int8 per output
        channel when the weights are int, float beside W8A8 layers (42 MB at 7B size: not worth
        int8 activations' error on the codes)."""
        s = self.settings
        if s.w8a8:
            return linear
        return quantize_linear(linear, s) if s.weights == "int8" else \
            quantize_linear(linear, _INT8) if s.weights == "int4" else linear

    def _layer(self, i: int, layer):
        """Decoder layer ``i`` as the recipe stores it (float, int8 per channel or int4 blocks)."""
        from omni_export.export.onnx_graph import Linear
        from omni_export.quant import rtn

        s = self.settings
        for field, path in LINEARS.items():
            linear = getattr(layer, field)
            if s.w8a8:  # int8 activations per token / tensor at run time (as the thinker's w8a8, no smoothing)
                from omni_export.quant.w8a8 import quantize_weight

                if not s.keeps_float(f"{self.layer_prefix}.{i}.{path}"):
                    setattr(layer, field, Linear(quantize_weight(linear.weight, s.activations.removeprefix("int8_")),
                                                 linear.bias))
            elif s.weights == "int8":
                setattr(layer, field, quantize_linear(linear, s))
            elif s.weights == "int4" and not s.keeps_float(f"{self.layer_prefix}.{i}.{path}"):
                setattr(layer, field, Linear(rtn.quantize_rows(linear.weight, s.group_size, bits=4,
                                                               symmetric=s.symmetric), linear.bias))
        return layer

    def quantization(self) -> dict | None:
        """The decoder graph's manifest ``quantization`` block (None for float weights)."""
        s = self.settings
        if s.w8a8:
            return {"weights": "int8", "method": "rtn", "granularity": "channel", "symmetric": True,
                    "activations": s.activations, "emit": s.emit, "lm_head": "float32",
                    "keep_float": list(s.keep_float), "smooth_alpha": None}
        if s.weights == "int4":
            return {"weights": "int4", "method": s.method, "granularity": "block", "group_size": s.group_size,
                    "symmetric": s.symmetric, "accuracy_level": INT4_ACCURACY_LEVEL, "emit": "qdq",
                    "lm_head": "int8", "keep_float": list(s.keep_float)}
        return channel_quantization(s)

    def write(self, ctx: BuildContext) -> ModuleBuild:
        from omni_export.export import talker_decoder
        from omni_export.quant.rtn import quantize_channels

        s = self.settings
        weights = self.weights()
        dims = self.dims()
        total = dims.num_hidden_layers + 2
        ctx.progress("talker codec embedding", 0, total)
        table = weights.codec_embedding()
        embedding = talker_decoder.build_embedding_graph(quantize_channels(table) if s.quantized else table,
                                                         ctx.out_dir, dtype=s.dtype)
        del table
        ctx.progress("talker decoder layer 1", 1, total)

        def on_layer(i: int, offset: int) -> None:
            ctx.progress(f"talker decoder layer {i + 2}" if i + 1 < dims.num_hidden_layers else "talker codec head",
                         i + 2, total)

        layers = (self._layer(i, weights.float_layer(i)) for i in range(weights.num_layers))
        w8a8 = {}
        if s.w8a8:
            from omni_export.export.w8a8_linear import W8A8GraphBuilder

            w8a8 = {"builder": W8A8GraphBuilder, "emit": s.emit}
        decoder = talker_decoder.build_graph(dims, layers, weights.final_norm(),
                                             lambda: self._int8(weights.codec_head()), ctx.out_dir,
                                             accuracy_level=INT4_ACCURACY_LEVEL, on_layer=on_layer,
                                             input_proj=self._int8(weights.input_proj()),
                                             input_width=int(self._config().embedding_size), dtype=s.dtype,
                                             keep_fp32=s.keep_fp32, **w8a8)
        ctx.progress("talker done", total, total)
        embed_quant = None if not s.quantized else {"weights": "int8", "method": "rtn", "granularity": "channel",
                                                    "symmetric": True}
        return ModuleBuild({talker_decoder.EMBEDDING_GRAPH_NAME: (embedding, embed_quant),
                            talker_decoder.GRAPH_NAME: (decoder, self.quantization())})

    def verify(self, ctx):
        from omni_export.verify.checks import talker
        return talker.verify(self, ctx)


#: MatMulNBits accuracy level of the int4 talker (the thinker's int4 recipes use 4 too)
INT4_ACCURACY_LEVEL = 4


class _Int8:
    """The settings ``quantize_linear`` reads, for the int8 linears of an int4 talker."""

    weights = "int8"


_INT8 = _Int8()


class TalkerWeights(DecoderWeights):
    """Lazy float32 access to the talker's tensors (``talker.*``), one decoder layer at a time."""

    def __init__(self, ckpt):
        super().__init__(ckpt, TalkerModule.prefixes, ckpt.config.talker_config.num_hidden_layers,
                         layer_prefix=TalkerModule.layer_prefix, fix=NO_TALKER_FIX)

    def final_norm(self) -> np.ndarray:
        return self.read([TENSORS["final_norm"]])[TENSORS["final_norm"]]

    def input_proj(self):
        return self.linear(TENSORS["input_proj"])

    def codec_head(self):
        return self.linear(TENSORS["codec_head"])

    def codec_embedding(self) -> np.ndarray:
        return self.read([TENSORS["codec_embedding"]])[TENSORS["codec_embedding"]]


def no_speech_reason(module: Module, config_key: str) -> str | None:
    """Why a speech module (the talker, token2wav) has nothing to export, or None: audio output is
    off, config.json has no ``config_key`` section, or the checkpoint has none of its tensors."""
    raw = module.ckpt.raw_config
    if not raw.get("enable_audio_output", True):
        return "enable_audio_output is false in config.json"
    if not isinstance(raw.get(config_key), dict):
        return f"config.json has no {config_key}"
    return module.no_weights()
