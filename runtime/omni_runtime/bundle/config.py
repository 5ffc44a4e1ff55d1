"""Typed, frozen views of a manifest's blocks, parsed once when the manifest is loaded.

``load_manifest`` validates ``manifest.json`` against ``manifest.schema.json`` and the checks
the schema cannot express, then ``Manifest`` parses every block here into ``manifest.configs``
(:class:`Configs`). The stages take these objects as they are: nothing is re-checked after
load. A module's block is ``None`` when the bundle lacks it (a text-only bundle has no
``configs.talker``).

=========================  ==========================  ==========================================
manifest block             ``manifest.configs.``       class
=========================  ==========================  ==========================================
``tokenizer``              ``tokenizer``               :class:`TokenizerConfig`
``special_tokens``         ``special_tokens``          :class:`SpecialTokens`
``generation``             ``generation``              :class:`GenerationConfig`
``config.thinker``         ``thinker``                 :class:`ThinkerConfig` (+ :class:`TMRoPEConfig`)
``config.audio``           ``audio``                   :class:`AudioConfig`
``config.vision``          ``vision``                  :class:`VisionConfig` (``image`` and ``video`` flattened)
``config.talker``          ``talker``                  :class:`TalkerConfig`
``config.token2wav``       ``token2wav``               :class:`Token2WavConfig` (+ ode, stream, speakers)
=========================  ==========================  ==========================================

``AudioConfig`` and ``VisionConfig`` also serve the media preparation on their own, so they
keep defaults (Qwen2.5-Omni-7B's) and a lenient ``from_manifest(block)`` for partial blocks;
the manifest's blocks are complete (the schema requires every key).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType

from omni_runtime.stages.sampling import SamplingConfig


def _take(cls, block: Mapping, **given):
    """``cls`` from the keys of ``block`` named like its fields (lists become tuples), ``given`` first."""
    values = dict(given)
    for f in fields(cls):
        if f.init and f.name not in values and f.name in block:
            value = block[f.name]
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def _sampling(block: Mapping) -> SamplingConfig:
    return SamplingConfig(do_sample=block["do_sample"], temperature=float(block["temperature"]),
                          top_k=block["top_k"], top_p=float(block["top_p"]),
                          repetition_penalty=float(block["repetition_penalty"]))


@dataclass(frozen=True)
class TokenizerConfig:
    """``tokenizer``: the tokenizer and chat template files (bundle-relative) and the default system prompt."""

    file: str
    chat_template_file: str
    default_system_prompt: str


@dataclass(frozen=True)
class SpecialTokens:
    """``special_tokens``: the ids of the special tokens the runtime uses."""

    endoftext: int
    im_start: int
    im_end: int
    audio: int
    audio_bos: int
    audio_eos: int
    vision_bos: int
    vision_eos: int
    image: int
    video: int
    pad: int


@dataclass(frozen=True)
class GenerationConfig:
    """``generation``: the thinker's generation defaults."""

    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    sampling: SamplingConfig
    max_new_tokens: int


@dataclass(frozen=True)
class DecoderConfig:
    """The shape constants of a GQA decoder block (``config.thinker``, ``config.talker``)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    max_position_embeddings: int
    kv_dtype: str


@dataclass(frozen=True)
class TMRoPEConfig:
    """The thinker's TMRoPE constants that place audio and video tokens (``omni_runtime.prompt.rope``)."""

    position_id_per_seconds: int
    seconds_per_chunk: int
    spatial_merge_size: int


@dataclass(frozen=True)
class ThinkerConfig(DecoderConfig):
    """``config.thinker``; ``tmrope`` is None only in a bundle without audio and vision (the schema
    requires the constants with ``config.audio`` or ``config.vision``)."""

    tmrope: TMRoPEConfig | None


@dataclass(frozen=True)
class AudioConfig:
    """The constants of the audio path: the manifest's ``config.audio`` block.

    Feature values come from the checkpoint's ``preprocessor_config.json`` (Whisper feature
    extractor), the rest from its ``audio_config``. The defaults are Qwen2.5-Omni-7B's.
    """

    num_mel_bins: int = 128
    sampling_rate: int = 16000
    hop_length: int = 160
    n_fft: int = 400
    chunk_length: int = 300  # seconds: longer audio is truncated, as the processor does
    padding_value: float = 0.0
    n_window: int = 100  # the encoder attends within chunks of 2 * n_window mel frames
    output_dim: int = 3584  # width of one audio token (the thinker's hidden size)
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20

    @property
    def n_samples(self) -> int:
        """Samples kept per audio (``chunk_length`` seconds); WhisperFeatureExtractor computes it so."""
        return self.chunk_length * self.sampling_rate

    @property
    def chunk_frames(self) -> int:
        return 2 * self.n_window

    @classmethod
    def from_manifest(cls, block: Mapping) -> AudioConfig:
        """The config from a ``config.audio`` block (unknown keys ignored, missing keys at their defaults)."""
        return _take(cls, block)


@dataclass(frozen=True)
class VisionConfig:
    """The manifest's ``config.vision`` block: encoder shapes and preprocessing constants, with the
    ``image`` and ``video`` sub-blocks flattened (``video.min_tokens`` is ``video_min_tokens``).

    The defaults are Qwen2.5-Omni's (``preprocessor_config.json`` and qwen-omni-utils).
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    in_channels: int = 3
    out_hidden_size: int = 3584
    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    # image (preprocessor_config.json)
    min_pixels: int = 3136
    max_pixels: int = 12845056
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1 / 255
    resample: int = 3
    # video sampling (qwen-omni-utils)
    fps: float = 2.0
    frame_factor: int = 2
    min_frames: int = 4
    max_frames: int = 768
    video_min_tokens: int = 128
    video_max_tokens: int = 768
    model_seq_len: int = 128000
    extra: dict = field(default_factory=dict, compare=False, repr=False)  # the raw block

    @classmethod
    def from_manifest(cls, config: Mapping) -> VisionConfig:
        """From a ``config.vision`` block (or a Manifest's whole ``config``); missing keys at their defaults."""
        block = config.get("vision", config)
        video = block.get("video", {})
        return _take(cls, {**block, **block.get("image", {}), **video,
                           **{f"video_{key}": video[key] for key in ("min_tokens", "max_tokens") if key in video}},
                     extra=dict(block))

    @property
    def factor(self) -> int:
        """Side multiple of resized images: one merged token covers factor x factor pixels."""
        return self.patch_size * self.spatial_merge_size


@dataclass(frozen=True)
class TalkerConfig(DecoderConfig):
    """``config.talker``: the talker decoder's shape and the values its host logic uses."""

    enable_audio_output: bool
    embedding_size: int
    codec_bos: int
    codec_eos: int
    codec_pad: int
    codec_mask: int
    text_bos: int
    text_eos: int
    text_pad: int
    eos_token_ids: tuple[int, ...]
    suppress_tokens: tuple[int, ...]
    sampling: SamplingConfig
    max_new_tokens: int


@dataclass(frozen=True)
class OdeConfig:
    """``config.token2wav.ode``: the ODE solved on the host."""

    solver: str
    stream_solver: str
    steps: int
    guidance_scale: float
    sway_coefficient: float | None


@dataclass(frozen=True)
class StreamConfig:
    """``config.token2wav.stream``: the official low-VRAM chunking of streamed speech."""

    dit_chunk_codes: int
    dit_left_context_codes: int
    dit_right_context_codes: int
    vocoder_left_context_frames: int
    vocoder_right_context_frames: int


@dataclass(frozen=True)
class SpeakerFiles:
    """One entry of ``config.token2wav.speakers``: a token id and three listed ``.npy`` files."""

    bos_token: int
    speaker_embedding: str
    reference_embedding: str
    null_reference_embedding: str


@dataclass(frozen=True)
class Token2WavConfig:
    """``config.token2wav``; ``speakers`` is a read-only name -> SpeakerFiles map in spk_dict.pt order."""

    sample_rate: int
    mel_dim: int
    mel_per_code: int
    hop_length: int
    num_embeds: int
    block_size: int
    max_mel_frames: int
    enc_dim: int
    enc_emb_dim: int
    ode: OdeConfig
    stream: StreamConfig
    default_speaker: str
    speakers: Mapping[str, SpeakerFiles]


@dataclass(frozen=True)
class Configs:
    """Every block of a manifest, typed (``manifest.configs``); a module's block is None when absent."""

    tokenizer: TokenizerConfig
    special_tokens: SpecialTokens
    generation: GenerationConfig
    thinker: ThinkerConfig
    audio: AudioConfig | None
    vision: VisionConfig | None
    talker: TalkerConfig | None
    token2wav: Token2WavConfig | None


def _thinker(block: Mapping) -> ThinkerConfig:
    tmrope = None
    if all(key in block for key in ("position_id_per_seconds", "seconds_per_chunk", "spatial_merge_size")):
        tmrope = _take(TMRoPEConfig, block)
    return _take(ThinkerConfig, block, rms_norm_eps=float(block["rms_norm_eps"]),
                 rope_theta=float(block["rope_theta"]), tmrope=tmrope)


def _talker(block: Mapping) -> TalkerConfig:
    codec, text = block["codec"], block["text"]
    return _take(TalkerConfig, block, rms_norm_eps=float(block["rms_norm_eps"]), rope_theta=float(block["rope_theta"]),
                 codec_bos=codec["bos"], codec_eos=codec["eos"], codec_pad=codec["pad"], codec_mask=codec["mask"],
                 text_bos=text["bos"], text_eos=text["eos"], text_pad=text["pad"],
                 sampling=_sampling(block["sampling"]), max_new_tokens=block["sampling"]["max_new_tokens"])


def _token2wav(block: Mapping) -> Token2WavConfig:
    ode = block["ode"]
    sway = ode["sway_coefficient"]
    speakers = {name: _take(SpeakerFiles, entry) for name, entry in block["speakers"].items()}
    return _take(Token2WavConfig, block,
                 ode=_take(OdeConfig, ode, guidance_scale=float(ode["guidance_scale"]),
                           sway_coefficient=None if sway is None else float(sway)),
                 stream=_take(StreamConfig, block["stream"]), speakers=MappingProxyType(speakers))


def parse_configs(data: Mapping) -> Configs:
    """Every block of a validated manifest (``load_manifest`` checked it), typed."""
    config, generation = data["config"], data["generation"]

    def block(name, parse):
        return parse(config[name]) if name in config else None

    return Configs(
        tokenizer=_take(TokenizerConfig, data["tokenizer"]),
        special_tokens=_take(SpecialTokens, data["special_tokens"]),
        generation=GenerationConfig(eos_token_ids=tuple(generation["eos_token_ids"]),
                                    pad_token_id=generation["pad_token_id"], sampling=_sampling(generation),
                                    max_new_tokens=generation["max_new_tokens"]),
        thinker=_thinker(config["thinker"]),
        audio=block("audio", AudioConfig.from_manifest),
        vision=block("vision", VisionConfig.from_manifest),
        talker=block("talker", _talker),
        token2wav=block("token2wav", _token2wav),
    )
