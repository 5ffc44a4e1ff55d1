"""The audio module: the thinker's audio encoder (``audio_tower``) as the ``audio_encoder`` graph.

Recipe section ``modules.audio`` (omni_export/build/recipes.py): ``weights: float32`` (the only choice
for now). The manifest's ``config.audio`` block holds every constant the host needs to turn a
waveform into the graph's inputs (``omni_runtime.media.audio_prep``): the Whisper feature extractor
settings of ``preprocessor_config.json``, the chunk size (``n_window``) and the width of an
audio token (``output_dim``, the thinker's hidden size).

Weights are read one encoder layer at a time and streamed to the graph's external data.
"""

from __future__ import annotations

import numpy as np

from omni_export.checkpoint.reader import CheckpointError
from omni_export.export import audio_encoder
from omni_export.export.audio_encoder import AudioDims, AudioLayer, AudioStem
from omni_export.export.onnx_graph import Linear
from omni_export.build.recipes import RecipeError
from omni_export.modules.base import BuildContext, Module

PREFIXES = ("thinker.audio_tower.", "thinker.model.audio_tower.")  # transformers 4.5x, 5.x names
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


class AudioModule(Module):
    name = "audio"
    graphs = (audio_encoder.GRAPH_NAME,)

    def __init__(self, ckpt, settings, **kwargs):
        super().__init__(ckpt, settings, **kwargs)
        self._names: dict[str, str] | None = None

    # -- checks -----------------------------------------------------------------------------
    def check(self) -> None:
        if self.settings.weights != "float32":
            raise RecipeError(f"modules.audio.weights {self.settings.weights} is not built yet",
                              path=self.settings.name, fix="use weights: float32 for the audio encoder")
        names = self.tensor_names()
        if not names:
            raise CheckpointError("the checkpoint has no audio encoder weights (thinker.audio_tower.*)",
                                  path=self.ckpt.root,
                                  fix="use a complete Qwen2.5-Omni checkpoint, or drop `audio` from the recipe's modules")
        dims = self.dims()
        needed = ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "ln_post.weight", "ln_post.bias",
                  "proj.weight", "proj.bias"]
        needed += [f"layers.{i}.{n}" for i in range(dims.encoder_layers) for n in _LAYER_TENSORS]
        missing = [n for n in needed if n not in names]
        if missing:
            raise CheckpointError(f"audio encoder weights are missing: {', '.join(missing[:3])}"
                                  + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""),
                                  path=self.ckpt.root, fix="the checkpoint is incomplete: download all weight shards")
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

    def tensor_names(self) -> dict[str, str]:
        """Audio tower tensor name (module's own, e.g. ``conv1.weight``) -> checkpoint name."""
        if self._names is None:
            names = {}
            for name in self.ckpt.weight_map:
                for prefix in PREFIXES:
                    if name.startswith(prefix):
                        names[name[len(prefix):]] = name
            self._names = names
        return self._names

    def audio_config(self):
        return self.ckpt.config.thinker_config.audio_config

    def dims(self) -> AudioDims:
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
        thinker = self.ckpt.config.thinker_config
        features = self.features()
        return {
            **{k: v for k, v in features.items() if k != "dither"},
            "n_window": d.n_window,
            "output_dim": d.output_dim,
            "d_model": d.d_model,
            "encoder_layers": d.encoder_layers,
            "encoder_attention_heads": d.encoder_attention_heads,
            "position_id_per_seconds": getattr(thinker, "position_id_per_seconds", 25),
            "seconds_per_chunk": getattr(thinker, "seconds_per_chunk", 2),
        }

    # -- weights ----------------------------------------------------------------------------
    def read(self, targets: list[str]) -> dict[str, np.ndarray]:
        import torch

        names = self.tensor_names()
        tensors = self.ckpt.read({names[t]: t for t in targets}, torch.float32)
        return {t: tensors[t].numpy() for t in targets}

    def stem(self) -> AudioStem:
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import SinusoidsPositionEmbedding

        t = self.read(["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "ln_post.weight", "ln_post.bias",
                       "proj.weight", "proj.bias"])
        d = self.dims()
        # The tower's buffer (not stored in checkpoints), computed by transformers' own code.
        positions = SinusoidsPositionEmbedding(d.max_source_positions, d.d_model).positional_embedding.numpy()
        return AudioStem(Linear(t["conv1.weight"], t["conv1.bias"]), Linear(t["conv2.weight"], t["conv2.bias"]),
                         positions, (t["ln_post.weight"], t["ln_post.bias"]), Linear(t["proj.weight"], t["proj.bias"]))

    def layer(self, i: int) -> AudioLayer:
        p = f"layers.{i}."
        names = [f"{p}{n}" for n in _LAYER_TENSORS]
        if f"{p}self_attn.k_proj.bias" in self.tensor_names():
            names.append(f"{p}self_attn.k_proj.bias")
        t = self.read(names)

        def linear(n: str) -> Linear:
            return Linear(t[f"{p}{n}.weight"], t.get(f"{p}{n}.bias"))

        return AudioLayer((t[f"{p}self_attn_layer_norm.weight"], t[f"{p}self_attn_layer_norm.bias"]),
                          linear("self_attn.q_proj"), linear("self_attn.k_proj"), linear("self_attn.v_proj"),
                          linear("self_attn.out_proj"),
                          (t[f"{p}final_layer_norm.weight"], t[f"{p}final_layer_norm.bias"]),
                          linear("fc1"), linear("fc2"))

    # -- build ------------------------------------------------------------------------------
    def build(self, ctx: BuildContext) -> dict:
        dims = self.dims()
        total = dims.encoder_layers + 1
        ctx.progress("audio encoder", 0, total)

        def on_layer(i: int, offset: int) -> None:
            ctx.progress(f"audio encoder layer {i + 1}", i + 1, total)

        graph = audio_encoder.build_graph(dims, self.stem(), (self.layer(i) for i in range(dims.encoder_layers)),
                                          ctx.out_dir, on_layer=on_layer)
        ctx.progress("audio encoder done", total, total)
        return {audio_encoder.GRAPH_NAME: (graph, None)}


_LAYER_TENSORS = (
    "self_attn_layer_norm.weight", "self_attn_layer_norm.bias",
    "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
    "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias",
    "final_layer_norm.weight", "final_layer_norm.bias",
    "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
)
