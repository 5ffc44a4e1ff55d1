"""Random-weight Qwen2.5-Omni checkpoints in the real on-disk layout, for tests and demos.

Nothing can come from a model hub here, so this module writes a complete checkpoint directory
the way ``Qwen/Qwen2.5-Omni-7B`` is published (transformers 4.5x style), built with
transformers' own classes:

* ``config.json``: thinker (audio, vision, text), talker and token2wav (DiT, BigVGAN) configs,
  with ``"architectures": ["Qwen2_5OmniModel"]``, ``"torch_dtype"`` and, in the text and talker
  configs, ``rope_theta`` + ``rope_scaling`` (with ``mrope_section``) instead of transformers 5's
  ``rope_parameters``;
* ``model.safetensors``: the legacy tensor names (``thinker.model.layers.0...``,
  ``thinker.audio_tower...``, ``thinker.visual...``, ``talker...``, ``token2wav...``), written
  tensor by tensor so the weights are never held twice in memory;
* ``generation_config.json``, ``preprocessor_config.json`` (Whisper features with 128 mel bins +
  Qwen2-VL image processor), the tokenizer files of :mod:`omni_export.testkit.tokenizer_kit` and
  ``spk_dict.pt`` (speakers ``Chelsie`` and ``Ethan``).

Weights are transformers' initialization for the seed, with two exceptions: the talker's codec head
rows past token2wav's codebook are zeroed (``_speak_the_codebook``: a random talker would emit codes
token2wav cannot voice) and the special embedding rows of the talker's prefill (codec pad / bos / eos /
mask, the speakers' bos) are drawn at the thinker states' scale (:func:`special_rows`).
No embedding row is zeroed: the configs set no ``pad_token_id``, so no ``padding_idx`` row is zeroed
at initialization.

Presets:

``tiny``
    a few MB of float32 weights, built in seconds, valid in every stack (thinker, audio and
    vision encoders, talker, DiT, BigVGAN) with the real vocabulary and special ids.
``7b-shape``
    the real Qwen2.5-Omni-7B widths everywhere but only a few layers per stack (thinker
    ``layers``, default 4; audio encoder, vision encoder, talker and DiT 2 each), bfloat16 by
    default: about 2.3 B parameters, 4.6 GB on disk.

The directory is built next to ``out_dir`` under a hidden ``.<name>.partial-<pid>-<random>`` name
and renamed into place at the end, so an interrupted run never leaves a half-written checkpoint
(a failure or, under :func:`omni_export.build.bundle_writer.exit_on_signals`, SIGINT/SIGTERM removes it; one
left by a killed process is removed by the next run once that process is gone).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omni_export.testkit import tokenizer_kit

if TYPE_CHECKING:  # pragma: no cover
    import torch
    import transformers

    from omni_export.testkit.outliers import OutlierSpec

__all__ = [
    "AWQ_GROUP_SIZE",
    "CHECKPOINT_FILES",
    "PRESETS",
    "SPEAKERS",
    "SPECIAL_ROW_STD",
    "awq_quantization_config",
    "build_config",
    "legacy_config_dict",
    "special_rows",
    "talker_text_rows",
    "write_tiny_checkpoint",
]

PRESETS = ("tiny", "7b-shape")

#: Files every checkpoint written here contains.
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "spk_dict.pt",
    *tokenizer_kit.TOKENIZER_FILES,
)

#: Speaker name -> the thinker-vocabulary token the talker's text stream starts with (``bos_token``
#: in ``spk_dict.pt``; ``generate`` embeds it with the thinker's embedding table). These are the
#: values of the published spk_dict.pt.
SPEAKERS = {"Chelsie": 151872, "Ethan": 151870}

#: Length (mel frames) of the reference mel stored for each speaker, as in the published file.
_REF_MEL_FRAMES = 400

_DEFAULT_DTYPE = {"tiny": "float32", "7b-shape": "bfloat16"}
_DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}

# Special ids of the real checkpoint (thinker_config).
_THINKER_IDS = {
    "audio_token_index": 151646,
    "image_token_index": 151655,
    "video_token_index": 151656,
    "audio_start_token_id": 151647,
    "audio_end_token_id": 151648,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "user_token_id": 872,
    "bos_token_id": 151644,
    "eos_token_id": 151645,
    "pad_token_id": 151643,
    "position_id_per_seconds": 25,
    "seconds_per_chunk": 2,
}

_PREPROCESSOR_CONFIG = {
    # Whisper feature extractor (128 mel bins, 16 kHz, 30 s windows of 100 frames/s, 300 s max)
    "feature_extractor_type": "WhisperFeatureExtractor",
    "feature_size": 128,
    "sampling_rate": 16000,
    "hop_length": 160,
    "n_fft": 400,
    "chunk_length": 300,
    "n_samples": 4800000,
    "nb_max_frames": 30000,
    "padding_value": 0.0,
    "padding_side": "right",
    "return_attention_mask": True,
    "dither": 0.0,
    # Qwen2-VL image processor
    "image_processor_type": "Qwen2VLImageProcessor",
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "rescale_factor": 1 / 255,
    "resample": 3,
    "processor_class": "Qwen2_5OmniProcessor",
}


# --------------------------------------------------------------------------------------------
# configs


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")


def _resolve_dtype(preset: str, dtype: str | None) -> str:
    if dtype is None:
        return _DEFAULT_DTYPE[preset]
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPE_ALIASES:
        raise ValueError(f"unsupported dtype {dtype!r}: choose float32, bfloat16 or float16")
    return _DTYPE_ALIASES[key]


#: the widest tiny thinker: a tiny checkpoint is written in seconds (the thinker's weights grow with
#: hidden squared; real widths are the 7b-shape preset's)
MAX_TINY_HIDDEN = 1024


def _check_hidden(preset: str, hidden: int | None) -> None:
    if hidden is None:
        return
    if preset != "tiny":
        raise ValueError(f"hidden can only be set for the tiny preset, not {preset!r}")
    if not isinstance(hidden, int) or isinstance(hidden, bool) or not 32 <= hidden <= MAX_TINY_HIDDEN or hidden % 16:
        raise ValueError(f"hidden must be a multiple of 16 from 32 to {MAX_TINY_HIDDEN} (real widths: the "
                         f"7b-shape preset), got {hidden!r}")


def _mrope_section(head_dim: int) -> list[int]:
    """Temporal, height, width rotary sections summing to ``head_dim / 2`` (tiny 16: [2, 3, 3])."""
    half = head_dim // 2
    return [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]


def _preset_dicts(preset: str, layers: int | None, hidden: int | None = None) -> dict[str, Any]:
    """Keyword dicts for the sub-configs of ``preset``; ``hidden`` overrides the tiny thinker's
    width (MLP twice as wide, 4 query and 2 KV heads of hidden / 4)."""
    if layers is not None and (not isinstance(layers, int) or isinstance(layers, bool) or layers < 1):
        raise ValueError(f"layers must be a positive integer, got {layers!r}")
    _check_hidden(preset, hidden)
    if preset == "tiny":
        n = layers or 2
        hidden = hidden or 64
        text = dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=n,
            num_attention_heads=4,
            num_key_value_heads=2,  # head_dim hidden / 4 (16)
            mrope_section=_mrope_section(hidden // 4),  # sums to head_dim / 2
        )
        audio = dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64)
        vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, fullatt_block_indexes=[1])
        talker = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            mrope_section=[2, 3, 3],
        )
        dit = dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            head_dim=16,
            emb_dim=32,
            enc_dim=16,
            enc_channels=[32, 32, 32, 32, 96],  # last = 3 x middle (multi-layer feature aggregation)
            enc_attention_channels=16,
            enc_se_channels=16,
            look_ahead_layers=[1],
            look_backward_layers=[0],
        )
        # channels halve at each of the 6 upsampling stages: 128 -> 2 at the last one
        bigvgan = dict(upsample_initial_channel=128)
    else:  # "7b-shape": real Qwen2.5-Omni-7B widths, few layers in every stack
        n = layers or 4
        hidden = 3584
        text = dict(
            hidden_size=hidden,
            intermediate_size=18944,
            num_hidden_layers=n,
            num_attention_heads=28,
            num_key_value_heads=4,  # head_dim 128
            mrope_section=[16, 24, 24],
        )
        audio = dict(d_model=1280, encoder_layers=2, encoder_attention_heads=20, encoder_ffn_dim=5120)
        vision = dict(depth=2, hidden_size=1280, num_heads=16, intermediate_size=3420, fullatt_block_indexes=[1])
        talker = dict(
            hidden_size=896,
            intermediate_size=18944,
            num_hidden_layers=2,
            num_attention_heads=12,
            num_key_value_heads=4,
            head_dim=128,
            mrope_section=[16, 24, 24],
        )
        dit = dict(
            hidden_size=1024,
            num_hidden_layers=2,
            num_attention_heads=16,
            head_dim=64,
            look_ahead_layers=[1],
            look_backward_layers=[0],
        )
        bigvgan = dict(upsample_initial_channel=1536)

    text_mrope = text.pop("mrope_section")
    text.update(
        vocab_size=152064,
        max_position_embeddings=32768,
        max_window_layers=text["num_hidden_layers"],
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_sliding_window=False,
        sliding_window=32768,
        rope_parameters={"rope_type": "default", "mrope_section": text_mrope, "rope_theta": 1000000.0},
    )
    audio.update(num_mel_bins=128, output_dim=hidden, n_window=100, max_source_positions=1500)
    vision.update(
        out_hidden_size=hidden,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        in_channels=3,
    )
    talker_mrope = talker.pop("mrope_section")
    talker.update(
        embedding_size=hidden,
        vocab_size=8448,
        max_position_embeddings=32768,
        max_window_layers=talker["num_hidden_layers"],
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_sliding_window=False,
        sliding_window=32768,
        rope_parameters={"rope_type": "default", "mrope_section": talker_mrope, "rope_theta": 1000000.0},
    )
    dit.update(mel_dim=80, num_embeds=8193, repeats=2, block_size=24, enc_emb_dim=192)
    bigvgan.update(mel_dim=80)
    return dict(text=text, audio=audio, vision=vision, talker=talker, dit=dit, bigvgan=bigvgan)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' info/warning logs (e.g. the talker's thinker-vocabulary ids)."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def build_config(preset: str = "tiny", layers: int | None = None,
                 hidden: int | None = None) -> "transformers.Qwen2_5OmniConfig":
    """The ``Qwen2_5OmniConfig`` of a preset; ``layers`` overrides the thinker text layer count,
    ``hidden`` the tiny thinker's width."""
    _check_preset(preset)
    from transformers import Qwen2_5OmniConfig

    d = _preset_dicts(preset, layers, hidden)
    thinker = dict(
        text_config=d["text"],
        audio_config=d["audio"],
        vision_config=d["vision"],
        tie_word_embeddings=False,
        **_THINKER_IDS,
    )
    with _quiet_transformers():
        return Qwen2_5OmniConfig(
            thinker_config=thinker,
            talker_config=d["talker"],
            token2wav_config={"dit_config": d["dit"], "bigvgan_config": d["bigvgan"]},
            enable_audio_output=True,
        )


def _legacy_rope(sub: dict) -> None:
    """Replace transformers 5 ``rope_parameters`` by 4.5x ``rope_theta`` (+ ``rope_scaling``)."""
    rope = sub.pop("rope_parameters", None) or {}
    theta = rope.get("rope_theta")
    if theta is not None:
        sub["rope_theta"] = float(theta)
    if "mrope_section" in rope:
        sub["rope_scaling"] = {
            "mrope_section": list(rope["mrope_section"]),
            "rope_type": "default",
            "type": "default",
        }


# Generic ``PreTrainedConfig`` attributes that transformers 5 serializes with their defaults;
# they carry nothing for this model and are left out of config.json (key -> default value).
_GENERIC_DEFAULTS = {
    "_name_or_path": "",
    "architectures": None,
    "chunk_size_feed_forward": 0,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "is_encoder_decoder": False,
    "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "output_attentions": False,
    "output_hidden_states": False,
    "problem_type": None,
    "return_dict": True,
}


def _clean_config(d: dict) -> None:
    """Drop ``dtype`` and generic default attributes from a config dict and its sub-configs."""
    d.pop("dtype", None)
    d.pop("torch_dtype", None)
    for key, default in _GENERIC_DEFAULTS.items():
        if key in d and json.loads(json.dumps(d[key])) == default:
            del d[key]
    for v in d.values():
        if isinstance(v, dict) and "model_type" in v:
            _clean_config(v)


def legacy_config_dict(config: "transformers.Qwen2_5OmniConfig", dtype: str) -> dict:
    """``config`` as the dict written to ``config.json`` (transformers 4.5x style)."""
    import transformers

    d = config.to_dict()
    _clean_config(d)
    thinker = d["thinker_config"]
    _legacy_rope(thinker["text_config"])
    _legacy_rope(thinker["vision_config"])
    _legacy_rope(d["talker_config"])
    _legacy_rope(d["token2wav_config"]["dit_config"])
    out = {
        "architectures": ["Qwen2_5OmniModel"],
        "enable_audio_output": True,
        "model_type": "qwen2_5_omni",
    }
    out.update({k: v for k, v in d.items() if k not in ("architectures", "transformers_version")})
    out["torch_dtype"] = dtype
    out["transformers_version"] = transformers.__version__
    return out


# --------------------------------------------------------------------------------------------
# weights


def _legacy_name(name: str) -> str:
    """transformers 5 module name -> tensor name in the published (4.5x) checkpoints."""
    for new, old in (
        ("thinker.model.language_model.", "thinker.model."),
        ("thinker.model.audio_tower.", "thinker.audio_tower."),
        ("thinker.model.visual.", "thinker.visual."),
    ):
        if name.startswith(new):
            return old + name[len(new):]
    return name


_ST_DTYPES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def _write_safetensors(
    path: Path,
    tensors: list[tuple[str, "torch.Tensor"]],
    target: "torch.dtype",
    metadata: dict[str, str],
    progress: bool,
    keep_dtype: frozenset[str] = frozenset(),
) -> None:
    """Stream ``tensors`` into a safetensors file, casting floating tensors to ``target``
    (except the names in ``keep_dtype``).

    ``safetensors.torch.save_file`` first copies every tensor into a Python ``bytes`` object,
    which would double the peak memory of a multi-GB model; this writes one tensor at a time.
    """
    import torch

    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    plan = []
    for name, t in tensors:
        dt = target if t.is_floating_point() and name not in keep_dtype else t.dtype
        nbytes = t.numel() * torch.empty((), dtype=dt).element_size()
        header[name] = {
            "dtype": _ST_DTYPES[str(dt).removeprefix("torch.")],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        plan.append((name, t, dt, nbytes))
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)

    bar = _progress_bar(total=offset, desc="model.safetensors", unit="B", enabled=progress)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, t, dt, nbytes in plan:
            if nbytes:
                data = t.detach().to(device="cpu", dtype=dt).contiguous().reshape(-1)
                f.write(memoryview(data.view(torch.uint8).numpy()))
                del data
            bar.update(nbytes)
        f.flush()
        os.fsync(f.fileno())
    bar.close()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, desc: str, unit: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024, file=sys.stderr)


def _say(enabled: bool, msg: str) -> None:
    if enabled:
        print(f"[omni-export tiny] {msg}", file=sys.stderr, flush=True)


def _speaker_dict(config: "transformers.Qwen2_5OmniConfig", seed: int) -> dict[str, dict[str, Any]]:
    """``spk_dict.pt`` content: per speaker ``cond`` [1, enc_emb_dim], ``ref_mel`` [1, T, mel_dim]
    (float32) and ``bos_token`` (int), as ``Qwen2_5OmniForConditionalGeneration.generate`` reads them."""
    import torch

    dit = config.token2wav_config.dit_config
    gen = torch.Generator().manual_seed(seed + 1)
    out = {}
    for name, bos in SPEAKERS.items():
        out[name] = {
            "bos_token": int(bos),
            "cond": torch.randn(1, dit.enc_emb_dim, generator=gen, dtype=torch.float32),
            # log-mel-like values around -4 with unit spread
            "ref_mel": torch.randn(1, _REF_MEL_FRAMES, dit.mel_dim, generator=gen, dtype=torch.float32) - 4.0,
        }
    return out


def _generation_config() -> dict:
    import transformers

    return {
        "bos_token_id": 151643,
        "do_sample": False,
        "eos_token_id": [151645, 151643],
        "pad_token_id": 151643,
        "transformers_version": transformers.__version__,
    }


def _dump_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


#: AutoAWQ group size of the ``awq=True`` checkpoints: the real 128 where the widths allow it;
#: the tiny preset's in-features (64, 128) get 32 so every row has several groups.
AWQ_GROUP_SIZE = {"tiny": 32, "7b-shape": 128}

#: ``modules_to_not_convert`` AutoAWQ writes for Qwen2.5-Omni
#: (``Qwen2_5_OmniAWQForConditionalGeneration.modules_to_not_convert``); only the thinker text
#: decoder layers are quantized (its ``get_model_layers`` is ``thinker.model.layers``).
AWQ_MODULES_TO_NOT_CONVERT = ["visual"]

_AWQ_LINEAR = re.compile(r"^(thinker\.model\.layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj))\.(weight|bias)$")


def awq_quantization_config(preset: str) -> dict:
    """The ``quantization_config`` written to config.json by ``write_tiny_checkpoint(awq=True)``."""
    _check_preset(preset)
    return {
        "bits": 4,
        "group_size": AWQ_GROUP_SIZE[preset],
        "modules_to_not_convert": list(AWQ_MODULES_TO_NOT_CONVERT),
        "quant_method": "awq",
        "version": "gemm",
        "zero_point": True,
    }


def _awq_tensors(tensors: list[tuple[str, "torch.Tensor"]], group_size: int) -> tuple[list, frozenset[str]]:
    """Replace every thinker decoder linear ``.weight`` by AutoAWQ GEMM ``.qweight`` / ``.qzeros``
    (int32) / ``.scales`` (float16), RTN-quantized with ``group_size``; their biases become
    float16 as in AutoAWQ's ``WQLinear_GEMM``. Returns the tensors and the names whose dtype
    must be kept."""
    import numpy as np
    import torch

    from omni_export.quant import rtn
    from omni_export.quant.packing import pack_autoawq

    out: list[tuple[str, torch.Tensor]] = []
    keep: set[str] = set()
    for name, t in tensors:
        m = _AWQ_LINEAR.match(name)
        if m is None:
            out.append((name, t))
            continue
        prefix, kind = m.group(1), m.group(2)
        if kind == "bias":
            out.append((name, t.detach().to(torch.float16)))
            keep.add(name)
            continue
        qw = rtn.quantize(t.detach().to(torch.float32).numpy(), group_size, bits=4)
        qw.scales = qw.scales.astype(np.float16).astype(np.float32)  # what float16 storage keeps
        qweight, qzeros, scales = pack_autoawq(qw)
        for part, arr in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
            out.append((f"{prefix}.{part}", torch.from_numpy(arr)))
            keep.add(f"{prefix}.{part}")
    out.sort(key=lambda item: item[0])
    return out, frozenset(keep)


def _speak_the_codebook(model, config) -> None:
    """Zero the talker's codec-head rows past token2wav's codebook (except its stop codes).

    A trained talker never emits them; a random one would, and token2wav (transformers' and
    ours) cannot turn those codes into sound. With the rows zeroed the random model speaks."""
    import torch

    talker = getattr(model, "talker", None)
    if talker is None:
        return
    codebook = int(config.token2wav_config.dit_config.num_embeds)
    stops = {int(config.talker_config.tts_codec_end_token_id), int(config.talker_config.tts_codec_pad_token_id)}
    with torch.no_grad():
        head = talker.codec_head.weight
        for row in range(codebook + 1, head.shape[0]):
            if row not in stops:
                head[row].zero_()


#: Standard deviation of the special rows :func:`_draw_special_rows` draws: the scale of the thinker
#: states they are added to (post-norm hidden states, RMSNorm weight 1: RMS 1).
SPECIAL_ROW_STD = 1.0


def special_rows(config) -> dict[str, list[int]]:
    """The embedding rows redrawn at :data:`SPECIAL_ROW_STD`, per weight: the codec pad / bos / eos /
    mask rows of the talker's codec embedding and the speakers' bos rows of the thinker's embedding.

    The talker's prefill ends with ``speaker bos + codec pad`` and ``state(r0) + codec bos``: at the
    initializer's 0.02 the codec rows were 2% of the thinker state beside them, so a talker that
    skipped them (transformers 5's generate on an unpadded prompt) kept the codes of one that adds
    them for 33 codes of the tiny model; at the states' scale its first code differs. The codec eos
    and mask rows are never embedded by a correct talker; at this scale a talker that did would show.
    The talker's text pad / eos rows (:func:`talker_text_rows`) keep the initializer's scale: after the
    reply every step feeds ``codec(code) + text pad``, with codes at that scale too, and a unit-scale
    pad drowned the talker's own codes (greedy codes then loop over 15 values in 120)."""
    talker = config.talker_config
    return {
        "talker.model.embed_tokens.weight": [
            int(talker.tts_codec_pad_token_id), int(talker.tts_codec_start_token_id),
            int(talker.tts_codec_end_token_id), int(talker.tts_codec_mask_token_id)],
        "thinker.model.embed_tokens.weight": sorted(SPEAKERS.values()),
    }


def talker_text_rows(config) -> list[int]:
    """The thinker-vocabulary rows only the talker embeds besides the speakers' (text pad, bos, eos):
    random at the initializer's scale, like the codec codes they are summed with."""
    talker = config.talker_config
    return [int(talker.tts_text_pad_token_id), int(talker.tts_text_start_token_id), int(talker.tts_text_end_token_id)]


def _draw_special_rows(model, config, seed: int) -> None:
    """Redraw :func:`special_rows` at random with :data:`SPECIAL_ROW_STD`; a generator of their own
    leaves every other weight as the seed draws it."""
    import torch

    talker = getattr(model, "talker", None)
    if talker is None:
        return
    gen = torch.Generator().manual_seed(seed + 2)  # + 1 draws the speakers (_speaker_dict)
    weights = {"talker.model.embed_tokens.weight": talker.get_input_embeddings().weight,
               "thinker.model.embed_tokens.weight": model.thinker.get_input_embeddings().weight}
    with torch.no_grad():
        for name, rows in special_rows(config).items():
            weight = weights[name]
            for row in rows:
                weight[row] = torch.randn(weight.shape[1], generator=gen) * SPECIAL_ROW_STD


def _write_into(
    tmp: Path, preset: str, seed: int, layers: int | None, dtype_name: str, progress: bool, awq: bool = False,
    hidden: int | None = None, outliers: "OutlierSpec | None" = None,
) -> None:
    import torch
    from transformers import Qwen2_5OmniForConditionalGeneration

    target = getattr(torch, dtype_name)
    config = build_config(preset, layers, hidden)

    t0 = time.monotonic()
    _say(progress, f"building {preset} model ({dtype_name}, seed {seed})")
    torch.manual_seed(seed)
    with _quiet_transformers():
        model = Qwen2_5OmniForConditionalGeneration._from_config(config, dtype=target)
    model.eval()
    _speak_the_codebook(model, config)
    _draw_special_rows(model, config, seed)
    if outliers is not None:
        from omni_export.testkit.outliers import plant_outliers

        plant_outliers(model.thinker.model.language_model, seed, outliers)
    n_params = sum(p.numel() for p in model.parameters())
    _say(progress, f"initialized {n_params / 1e6:.1f} M parameters in {time.monotonic() - t0:.1f} s")

    state = model.state_dict()
    seen: dict[int, str] = {}
    tensors: list[tuple[str, torch.Tensor]] = []
    for name in sorted(state, key=_legacy_name):
        t = state[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:  # tied weights: none expected (tie_word_embeddings false)
            raise RuntimeError(f"{name} shares storage with {seen[key]}")
        if key is not None:
            seen[key] = name
        tensors.append((_legacy_name(name), t))
    del state
    keep: frozenset[str] = frozenset()
    if awq:
        _say(progress, f"quantizing the thinker decoder linears to AutoAWQ GEMM int4 (group {AWQ_GROUP_SIZE[preset]})")
        tensors, keep = _awq_tensors(tensors, AWQ_GROUP_SIZE[preset])
    _write_safetensors(tmp / "model.safetensors", tensors, target, {"format": "pt"}, progress, keep_dtype=keep)
    del tensors, model

    _say(progress, "writing config, tokenizer, processor and speaker files")
    config_dict = legacy_config_dict(config, dtype_name)
    if awq:
        config_dict["quantization_config"] = awq_quantization_config(preset)
    _dump_json(tmp / "config.json", config_dict)
    _dump_json(tmp / "generation_config.json", _generation_config())
    _dump_json(tmp / "preprocessor_config.json", _PREPROCESSOR_CONFIG)
    tokenizer_kit.write_tokenizer(tmp)
    torch.save(_speaker_dict(config, seed), tmp / "spk_dict.pt")
    _say(progress, f"done in {time.monotonic() - t0:.1f} s")


def _is_nonempty(path: Path) -> bool:
    if not path.exists() and not path.is_symlink():
        return False
    if not path.is_dir() or path.is_symlink():
        return True
    return any(path.iterdir())


def write_tiny_checkpoint(
    out_dir: Path,
    preset: str = "tiny",
    seed: int = 0,
    layers: int | None = None,
    dtype: str | None = None,
    progress: bool = False,
    awq: bool = False,
    hidden: int | None = None,
    outliers: "OutlierSpec | None" = None,
) -> Path:
    """Write a random-weight Qwen2.5-Omni checkpoint of ``preset`` into ``out_dir``.

    The same ``seed`` gives the same weights. ``layers`` overrides the thinker's text layer
    count; ``dtype`` (float32, bfloat16, float16) the weight dtype (default float32 for ``tiny``,
    bfloat16 for ``7b-shape``). Raises ``FileExistsError`` if ``out_dir`` exists and is not an
    empty directory. Returns ``out_dir``.

    ``awq=True`` writes an AutoAWQ GEMM checkpoint like ``Qwen/Qwen2.5-Omni-7B-AWQ``: every
    thinker text decoder linear (q, k, v, o, gate, up, down) is stored as ``.qweight`` /
    ``.qzeros`` int32 and ``.scales`` float16 (RTN int4 of the same random weights, group size
    :data:`AWQ_GROUP_SIZE`), its bias as float16, and config.json gets the
    ``quantization_config`` of :func:`awq_quantization_config`; everything else is unchanged.

    ``hidden`` sets the tiny thinker's width; ``outliers`` (an
    :class:`omni_export.testkit.outliers.OutlierSpec`) plants outlier hidden channels and massive
    activations in the thinker (:func:`omni_export.testkit.outliers.plant_outliers`).
    """
    _check_preset(preset)
    dtype_name = _resolve_dtype(preset, dtype)
    _preset_dicts(preset, layers, hidden)  # validate `layers` and `hidden` before touching the disk
    out_dir = Path(out_dir)
    if _is_nonempty(out_dir):
        raise FileExistsError(
            f"{out_dir} already exists and is not empty; choose a new directory or remove it first"
        )
    from omni_export.build.bundle_writer import (clean_stale_partials, make_parents, partial_prefix, remove_created,
                                    signals_deferred, track_temporary, untrack_temporary)

    clean_stale_partials(out_dir)
    made = make_parents(Path(os.path.abspath(out_dir)).parent)
    tmp = out_dir.parent / f"{partial_prefix(out_dir)}{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
    except BaseException:
        remove_created(made)
        raise
    track_temporary(tmp, made)
    try:
        _write_into(tmp, preset, seed, layers, dtype_name, progress, awq=bool(awq), hidden=hidden, outliers=outliers)
        if _is_nonempty(out_dir):
            raise FileExistsError(
                f"{out_dir} appeared while the checkpoint was being written; it was left untouched"
            )
        with signals_deferred():
            try:
                os.rename(tmp, out_dir)  # replaces an empty directory atomically on POSIX
            except OSError as err:
                raise FileExistsError(f"cannot move the new checkpoint into {out_dir}: {err}") from err
            untrack_temporary(tmp)
    except BaseException:
        with signals_deferred():
            shutil.rmtree(tmp, ignore_errors=True)
            untrack_temporary(tmp)
            remove_created(made)
        raise
    return out_dir
