"""The talker module: codec embedding graph + KV-cached talker decoder (speech codes from the thinker).

Recipe section ``modules.talker``: ``weights: float32`` (the only choice for now). The decoder
layers are read one at a time and written to the graph's external data.

A checkpoint without a talker, i.e. ``enable_audio_output: false`` in config.json or no
``talker.*`` tensors at all, builds a text-only bundle: ``skip_reason()`` says why and ``build``
leaves the module out (no graphs, no ``config.talker``). A talker whose tensors are only partly
present is an error.

The manifest's ``config.talker`` block holds what ``omni_runtime.stages.talker`` needs besides the
graphs: the decoder's shapes, the codec ids (bos/eos/pad/mask), the thinker-vocabulary ids of
the talker's text stream (eos/pad), the stop and suppressed codes, and transformers'
``Qwen2_5OmniForConditionalGeneration.generate`` sampling defaults for the talker.
"""

from __future__ import annotations

from omni_export.checkpoint.reader import CheckpointError
from omni_export.export import talker_decoder
from omni_export.export.talker_decoder import TalkerWeights, talker_dims
from omni_export.build.recipes import RecipeError
from omni_export.modules.base import BuildContext, Module

#: ``Qwen2_5OmniForConditionalGeneration.generate``'s talker defaults (transformers 5,
#: modeling_qwen2_5_omni.py): talker_do_sample, talker_top_k, talker_top_p, talker_temperature,
#: talker_repetition_penalty, talker_max_new_tokens. Its talker_eos_token_id [8292, 8294] is
#: [codec pad, codec eos], and it suppresses the codec bos.
SAMPLING_DEFAULTS = {"do_sample": True, "top_k": 40, "top_p": 0.8, "temperature": 0.9,
                     "repetition_penalty": 1.05, "max_new_tokens": 4096}


class TalkerModule(Module):
    name = "talker"
    graphs = (talker_decoder.EMBEDDING_GRAPH_NAME, talker_decoder.GRAPH_NAME)

    def _config(self):
        return self.ckpt.config.talker_config

    def skip_reason(self) -> str | None:
        """Why this checkpoint has no talker to export (the bundle is then text-only), or None."""
        if not self.ckpt.raw_config.get("enable_audio_output", True):
            return "enable_audio_output is false in config.json"
        if not isinstance(self.ckpt.raw_config.get("talker_config"), dict):
            return "config.json has no talker_config"
        if not any(name.startswith(talker_decoder.PREFIX) for name in self.ckpt.weight_map):
            return "the checkpoint has no talker weights (talker.*)"
        return None

    def check(self) -> None:
        s = self.settings
        if s.weights != "float32":
            raise RecipeError(f"modules.talker.weights {s.weights}: the talker is exported in float32 only for now",
                              path=s.name, fix="set modules.talker.weights: float32 (method: none)")
        if self.skip_reason() is not None:
            return
        missing = TalkerWeights(self.ckpt).missing()
        if missing:
            raise CheckpointError(f"talker weights are missing: {', '.join('talker.' + t for t in missing[:3])}"
                                  + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""),
                                  path=self.ckpt.root,
                                  fix="the checkpoint is incomplete: download all weight shards, or set "
                                      "enable_audio_output: false in config.json for a text-only bundle")
        cfg = self._config()
        if cfg.embedding_size != self.ckpt.text_config().hidden_size:
            raise CheckpointError(f"talker_config.embedding_size {cfg.embedding_size} differs from the thinker's "
                                  f"hidden_size {self.ckpt.text_config().hidden_size}",
                                  path=self.ckpt.root / "config.json",
                                  fix="the talker does not belong to this thinker: use the original config.json")

    def memory_estimate(self) -> int:
        """The codec table and one decoder layer in float32 a few times over, plus a margin."""
        if self.skip_reason() is not None:
            return 0
        cfg = self._config()
        d = talker_dims(cfg)
        layer = d.layer_float_bytes(cfg.intermediate_size)
        table = 4 * d.vocab_size * max(cfg.embedding_size, d.hidden_size)
        return int(3 * max(layer, table) + 1.0e9)

    def config(self) -> dict:
        cfg = self._config()
        d = talker_dims(cfg)
        codec = {"bos": int(cfg.tts_codec_start_token_id), "eos": int(cfg.tts_codec_end_token_id),
                 "pad": int(cfg.tts_codec_pad_token_id), "mask": int(cfg.tts_codec_mask_token_id)}
        return {
            "enable_audio_output": True,
            **d.manifest_config(),
            "embedding_size": int(cfg.embedding_size),
            "codec": codec,
            # thinker-vocabulary ids of the talker's text stream (embedded with thinker_embedding)
            "text": {"bos": int(cfg.tts_text_start_token_id), "eos": int(cfg.tts_text_end_token_id),
                     "pad": int(cfg.tts_text_pad_token_id)},
            "eos_token_ids": [codec["pad"], codec["eos"]],
            "suppress_tokens": [codec["bos"]],
            "sampling": dict(SAMPLING_DEFAULTS),
        }

    def build(self, ctx: BuildContext) -> dict:
        weights = TalkerWeights(self.ckpt)
        dims = talker_dims(self._config())
        total = dims.num_hidden_layers + 2
        ctx.progress("talker codec embedding", 0, total)
        embedding = talker_decoder.build_embedding_graph(weights.codec_embedding(), ctx.out_dir)
        ctx.progress("talker decoder layer 1", 1, total)

        def on_layer(i: int, offset: int) -> None:
            ctx.progress(f"talker decoder layer {i + 2}" if i + 1 < dims.num_hidden_layers else "talker codec head",
                         i + 2, total)

        decoder = talker_decoder.build_graph(dims, weights.float_layers(), weights.final_norm(), weights.codec_head,
                                             ctx.out_dir, on_layer=on_layer, input_proj=weights.input_proj(),
                                             input_width=int(self._config().embedding_size))
        ctx.progress("talker done", total, total)
        return {talker_decoder.EMBEDDING_GRAPH_NAME: (embedding, None), talker_decoder.GRAPH_NAME: (decoder, None)}
