"""The audio module: the thinker's audio encoder (``audio_tower``) as the ``audio_encoder`` graph.

Recipe section ``modules.audio``: ``weights: float32 | float16 | int8`` (int8: every linear and
convolution symmetric per output channel, activations ``dtype: float32 | float16``),
``keep_fp32`` for a float16 graph (``norm``, ``softmax``, ``residual``). The manifest's
``config.audio`` block holds every constant the host needs to turn a waveform into the graph's
inputs (``omni_runtime.media.audio_prep``): the Whisper feature extractor settings of
``preprocessor_config.json``, the chunk size (``n_window``) and the width of an audio token
(``output_dim``, the thinker's hidden size). The TMRoPE constants are the thinker's
(``config.thinker``).

Weights are read one encoder layer at a time and streamed to the graph's external data.
Checkpoint names: ``STEM`` and ``layers.<i>.`` + ``LAYER_NORMS`` / ``LAYER_LINEARS`` under ``PREFIXES``.
"""

from __future__ import annotations

from omni_runtime.bundle.names import MODULE_GRAPHS

from omni_export.checkpoint.reader import CheckpointError
from omni_export.modules.base import (BuildContext, Module, ModuleBuild, channel_quantization, linear,
                                      quantize_linear, weight_and_bias)

PREFIXES = ("thinker.audio_tower.", "thinker.model.audio_tower.")  # transformers 4.5x, 5.x names
#: AudioStem field -> checkpoint path (weight and bias each)
STEM = {"conv1": "conv1", "conv2": "conv2", "ln_post": "ln_post", "proj": "proj"}
#: AudioLayer field -> path inside ``layers.<i>.``: the layer norms (weight, bias) and the linears
LAYER_NORMS = {"self_attn_layer_norm": "self_attn_layer_norm", "final_layer_norm": "final_layer_norm"}
LAYER_LINEARS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                 "out_proj": "self_attn.out_proj", "fc1": "fc1", "fc2": "fc2"}
WITHOUT_BIAS = ("self_attn.k_proj",)  # Whisper's key projection (a checkpoint's bias, if any, is read)
#: preprocessor_config.json key -> (config.audio key, default: WhisperFeatureExtractor's for Qwen2.5-Omni)
FEATURE_KEYS = {
    "feature_size": ("num_mel_bins", 128),
    "sampling_rate": ("sampling_rate", 16000),
    "hop_length": ("hop_length", 160),
    "n_fft": ("n_fft", 400),
    "chunk_length": ("chunk_length", 300),
    "padding_value": ("padding_value", 0.0),
    "dither": ("dither", 0.0),
}
LAYER_TENSORS = weight_and_bias([*LAYER_NORMS.values(), *LAYER_LINEARS.values()], WITHOUT_BIAS)


class AudioModule(Module):
    name = "audio"
    description = "the thinker's audio encoder (log-mel features -> one embedding per 40 ms)"
    graphs = MODULE_GRAPHS[name]
    prefixes = PREFIXES
    linears = tuple(LAYER_LINEARS.values())
    recipe_keys = ("weights", "dtype", "keep_fp32")
    precisions = ("float32", "float16", "int8")
    fp32_parts = ("norm", "softmax", "residual")

    # -- checks -----------------------------------------------------------------------------
    def required_tensors(self) -> list[str]:
        layers = [f"layers.{i}.{n}" for i in range(self.dims().encoder_layers) for n in LAYER_TENSORS]
        return weight_and_bias(STEM.values()) + layers

    def check(self) -> None:
        super().check()
        dims = self.dims()
        features = self.features()
        if features["num_mel_bins"] != dims.num_mel_bins:
            raise CheckpointError(f"preprocessor_config.json has feature_size {features['num_mel_bins']} but the audio "
                                  f"encoder takes {dims.num_mel_bins} mel bins",
                                  path=self.ckpt.root / "preprocessor_config.json",
                                  fix="restore preprocessor_config.json from the original checkpoint")
        if features["dither"] != 0:
            raise CheckpointError(f"preprocessor_config.json sets dither {features['dither']}: random dithering "
                                  "cannot be reproduced by the runtime", path=self.ckpt.root / "preprocessor_config.json",
                                  fix="set dither to 0.0 (Qwen2.5-Omni's value)")

    def audio_config(self):
        return self.ckpt.config.thinker_config.audio_config

    def dims(self):
        from omni_export.export.audio_encoder import AudioDims

        return AudioDims.from_config(self.audio_config())

    def features(self) -> dict:
        """Whisper feature settings from preprocessor_config.json (Qwen2.5-Omni's defaults if absent)."""
        raw = self.ckpt.json_file("preprocessor_config.json") or {}
        out = {}
        for key, (target, default) in FEATURE_KEYS.items():
            value = raw.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise CheckpointError(f"preprocessor_config.json: {key} must be a number, got {value!r}",
                                      path=self.ckpt.root / "preprocessor_config.json",
                                      fix="restore the file from the original checkpoint")
            out[target] = value
        return out

    def memory_estimate(self) -> int:
        """The stem (convolutions, positions, projection) and one layer, a few times over."""
        d = self.dims()
        layer = 4 * (4 * d.d_model * d.d_model + 2 * d.d_model * d.encoder_ffn_dim)
        stem = 4 * (3 * d.d_model * (d.num_mel_bins + d.d_model) + d.max_source_positions * d.d_model
                    + d.d_model * d.output_dim)
        return int(4 * (layer + stem) + 1.0e9)

    def config(self) -> dict:
        d = self.dims()
        features = self.features()
        return {
            **{k: v for k, v in features.items() if k != "dither"},
            "n_window": d.n_window,
            "output_dim": d.output_dim,
            "d_model": d.d_model,
            "encoder_layers": d.encoder_layers,
            "encoder_attention_heads": d.encoder_attention_heads,
        }

    # -- weights ----------------------------------------------------------------------------
    def stem(self):
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import SinusoidsPositionEmbedding

        from omni_export.export.audio_encoder import AudioStem

        t = self.arrays(weight_and_bias(STEM.values()))
        d = self.dims()
        # The tower's buffer (not stored in checkpoints), computed by transformers' own code.
        positions = SinusoidsPositionEmbedding(d.max_source_positions, d.d_model).positional_embedding.numpy()
        q = lambda path: quantize_linear(linear(t, path), self.settings)  # noqa: E731
        return AudioStem(q(STEM["conv1"]), q(STEM["conv2"]), positions,
                         (t[f"{STEM['ln_post']}.weight"], t[f"{STEM['ln_post']}.bias"]), q(STEM["proj"]))

    def layer(self, i: int):
        from omni_export.export.audio_encoder import AudioLayer

        p = f"layers.{i}."
        names = [f"{p}{n}" for n in LAYER_TENSORS]
        names += [f"{p}{path}.bias" for path in WITHOUT_BIAS
                  if f"{p}{path}.bias" in self.ckpt.tensor_names(self.prefixes)]
        t = self.arrays(names)
        norms = {field: (t[f"{p}{path}.weight"], t[f"{p}{path}.bias"]) for field, path in LAYER_NORMS.items()}
        return AudioLayer(**norms, **{field: quantize_linear(linear(t, p + path), self.settings)
                                      for field, path in LAYER_LINEARS.items()})

    # -- build and verify -------------------------------------------------------------------
    def write(self, ctx: BuildContext) -> ModuleBuild:
        from omni_export.export import audio_encoder

        dims = self.dims()
        total = dims.encoder_layers + 1
        ctx.progress("audio encoder", 0, total)

        def on_layer(i: int, offset: int) -> None:
            ctx.progress(f"audio encoder layer {i + 1}", i + 1, total)

        s = self.settings
        graph = audio_encoder.build_graph(dims, self.stem(), (self.layer(i) for i in range(dims.encoder_layers)),
                                          ctx.out_dir, on_layer=on_layer, dtype=s.dtype, keep_fp32=s.keep_fp32)
        ctx.progress("audio encoder done", total, total)
        return ModuleBuild({audio_encoder.GRAPH_NAME: (graph, channel_quantization(s))})

    def verify(self, ctx):
        from omni_export.verify.checks import audio
        return audio.verify(self, ctx)
