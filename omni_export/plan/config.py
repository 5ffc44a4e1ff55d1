"""The model's shapes read from ``config.json`` alone, torch-free (no transformers import).

``omni-export plan`` works on a directory that holds only ``config.json`` (e.g. the published
Qwen2.5-Omni-7B / -3B config): no weights, no tokenizer. transformers' ``Qwen2_5OmniConfig``
would parse it too, but importing it loads torch (seconds); this reader takes the few keys the
memory model needs, in both layouts (transformers 4.5x ``rope_scaling`` / 5.x
``rope_parameters``), and fills a missing key with the default of the transformers config class
of that section (``DEFAULTS``; ``tests/test_plan.py`` checks them against transformers' classes
and the parsed shapes against the exporters' ``*Dims.from_config`` on the same file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omni_runtime.errors import OmniError

MODEL_TYPE = "qwen2_5_omni"


class PlanError(OmniError):
    """``omni-export plan`` cannot plan: a bad model directory, recipe, size or option."""


#: transformers 5.23's config-class defaults for the keys read here (``Qwen2_5OmniTextConfig``,
#: ``...AudioEncoderConfig``, ``...VisionEncoderConfig``, ``...TalkerConfig``, ``...DiTConfig``,
#: ``...BigVGANConfig``). They are *not* all the 7B's (e.g. the talker's and the vision
#: encoder's widths): the published config.json states every one of them.
DEFAULTS = {
    "text": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "head_dim": None, "vocab_size": 152064, "max_position_embeddings": 32768,
             "tie_word_embeddings": True},
    "audio": {"num_mel_bins": 128, "d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20,
              "encoder_ffn_dim": 5120, "output_dim": 3584, "n_window": 100, "max_source_positions": 1500},
    "vision": {"depth": 32, "hidden_size": 3584, "intermediate_size": 3420, "num_heads": 16, "in_channels": 3,
               "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
               "out_hidden_size": 3584, "fullatt_block_indexes": [7, 15, 23, 31]},
    "talker": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
               "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 8448, "embedding_size": 3584,
               "max_position_embeddings": 32768},
    "dit": {"hidden_size": 1024, "num_hidden_layers": 22, "num_attention_heads": 16, "head_dim": 64, "ff_mult": 2,
            "emb_dim": 512, "mel_dim": 80, "enc_dim": 128, "enc_emb_dim": 192, "num_embeds": 8193, "repeats": 2,
            "block_size": 24},
    "bigvgan": {"mel_dim": 80, "upsample_initial_channel": 1536, "resblock_kernel_sizes": [3, 7, 11],
                "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], "upsample_rates": [5, 3, 2, 2, 2, 2],
                "upsample_kernel_sizes": [11, 7, 4, 4, 4, 4]},
}


@dataclass(frozen=True)
class Decoder:
    """A Qwen2-style decoder (the thinker's text model, the talker)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    embedding_size: int  # input width (the talker works in the thinker's space); = hidden for the thinker
    tie_word_embeddings: bool = False

    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * self.head_dim


@dataclass(frozen=True)
class Audio:
    num_mel_bins: int
    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    output_dim: int
    n_window: int
    max_source_positions: int


@dataclass(frozen=True)
class Vision:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    window_size: int
    out_hidden_size: int
    fullatt_block_indexes: tuple[int, ...]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2


@dataclass(frozen=True)
class DiT:
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

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.head_dim


@dataclass(frozen=True)
class BigVGAN:
    mel_dim: int
    upsample_initial_channel: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]

    def channels(self, stage: int) -> int:
        """Channels after upsampling stage ``stage`` (0-based), as the vocoder halves them."""
        return self.upsample_initial_channel // 2 ** (stage + 1)


@dataclass(frozen=True)
class ModelShape:
    """Everything ``plan`` needs from config.json; ``talker``/``dit``/``bigvgan`` are None for a
    checkpoint without speech output (``enable_audio_output: false`` or no such section)."""

    source: str
    text: Decoder
    audio: Audio
    vision: Vision
    talker: Decoder | None
    dit: DiT | None
    bigvgan: BigVGAN | None

    @property
    def speech(self) -> bool:
        return self.talker is not None and self.dit is not None and self.bigvgan is not None


def _section(raw: dict, key: str, where: str, path: Path) -> dict:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise PlanError(f"config.json: {where}.{key} must be an object, got {value!r}", path=path,
                        fix="restore config.json from the original checkpoint")
    return value


def _values(block: dict, defaults: dict, where: str, path: Path) -> dict:
    out = {}
    for key, default in defaults.items():
        value = block.get(key, default)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, list):
            ok = isinstance(value, list)
        elif key == "head_dim":
            ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0)
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        if not ok:
            raise PlanError(f"config.json: {where}.{key} is {value!r}, not a valid value", path=path,
                            fix="restore config.json from the original checkpoint")
        out[key] = value
    return out


def _decoder(block: dict, defaults: dict, where: str, path: Path, embedding_size: int | None = None) -> Decoder:
    v = _values(block, defaults, where, path)
    head_dim = v["head_dim"] or v["hidden_size"] // v["num_attention_heads"]
    return Decoder(v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"], v["num_attention_heads"],
                   v["num_key_value_heads"], head_dim, v["vocab_size"], v["max_position_embeddings"],
                   v.get("embedding_size", embedding_size or v["hidden_size"]),
                   bool(v.get("tie_word_embeddings", False)))


def read_model(model_dir: str | Path) -> ModelShape:
    """The shapes of ``model_dir/config.json``; PlanError for a missing or unusable file."""
    root = Path(model_dir)
    fix = ("point --model at a Qwen2.5-Omni model directory holding its config.json (e.g. a download of "
           "Qwen/Qwen2.5-Omni-7B, or just its config.json)")
    if not root.is_dir():
        raise PlanError("model directory does not exist", path=root, fix=fix)
    path = root / "config.json"
    if not path.is_file():
        raise PlanError("no config.json in the model directory", path=root, fix=fix)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(f"config.json is not valid JSON ({exc})", path=path,
                        fix="restore the file from the original checkpoint") from None
    if not isinstance(raw, dict) or raw.get("model_type") != MODEL_TYPE:
        got = raw.get("model_type") if isinstance(raw, dict) else raw
        raise PlanError(f"model_type is {got!r}, not {MODEL_TYPE!r}: omni-export plans Qwen2.5-Omni only",
                        path=path, fix=fix)
    if not isinstance(raw.get("thinker_config"), dict):
        raise PlanError("config.json has no thinker_config section", path=path, fix=fix)
    thinker = raw["thinker_config"]
    text_block = _section(thinker, "text_config", "thinker_config", path)
    text = _decoder(text_block, DEFAULTS["text"], "thinker_config.text_config", path)
    audio = Audio(**_values(_section(thinker, "audio_config", "thinker_config", path), DEFAULTS["audio"],
                            "thinker_config.audio_config", path))
    vision_values = _values(_section(thinker, "vision_config", "thinker_config", path), DEFAULTS["vision"],
                            "thinker_config.vision_config", path)
    vision_values["fullatt_block_indexes"] = tuple(int(i) for i in vision_values["fullatt_block_indexes"])
    vision = Vision(**vision_values)
    talker = dit = bigvgan = None
    speech = raw.get("enable_audio_output", True) is not False
    if speech and isinstance(raw.get("talker_config"), dict) and isinstance(raw.get("token2wav_config"), dict):
        talker = _decoder(raw["talker_config"], DEFAULTS["talker"], "talker_config", path)
        t2w = raw["token2wav_config"]
        dit = DiT(**_values(_section(t2w, "dit_config", "token2wav_config", path), DEFAULTS["dit"],
                            "token2wav_config.dit_config", path))
        b = _values(_section(t2w, "bigvgan_config", "token2wav_config", path), DEFAULTS["bigvgan"],
                    "token2wav_config.bigvgan_config", path)
        bigvgan = BigVGAN(b["mel_dim"], b["upsample_initial_channel"], tuple(b["resblock_kernel_sizes"]),
                          tuple(tuple(d) for d in b["resblock_dilation_sizes"]), tuple(b["upsample_rates"]),
                          tuple(b["upsample_kernel_sizes"]))
    return ModelShape(str(path), text, audio, vision, talker, dit, bigvgan)
