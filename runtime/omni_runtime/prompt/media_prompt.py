"""Multimodal prompts: Qwen-style messages with audio, images and video -> thinker inputs, in numpy.

The steps ``OmniRunner.chat(messages=...)`` takes, as ``Qwen2_5OmniProcessor`` and the thinker do
them in transformers:

1. :func:`normalize_messages` checks the messages (``{"role": ..., "content": str | [parts]}``,
   parts ``{"type": "text", "text": ...}``, ``{"type": "audio", "audio": ...}``, ``{"type":
   "image", "image": ...}``, ``{"type": "video", "video": ...}``) and adds the default system
   message; the chat template renders one ``<|AUDIO|>``, ``<|IMAGE|>`` or ``<|VIDEO|>`` per part.
2. :func:`prepare_media` decodes every media part in prompt order (``audio_prep``, ``vision_prep``)
   and, with ``use_audio_in_video``, each video's audio track: the feature counts are then known,
   so the placeholders can be expanded and the context budget checked before any graph runs.
3. :func:`encode_media` runs the audio and vision encoders (only for the modalities present; each
   encoder is done with its session right after) and :func:`rope_inputs` gives ``rope_index`` its arguments.

Audio sources are paths, file bytes or 1-D float arrays at 16 kHz; images paths, bytes, uint8
arrays or PIL images; videos paths, bytes or uint8 frames ``[T, H, W, 3]`` (frames have no audio
track). Every problem is an InputError naming the message part or file and the fix.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from numbers import Integral, Real

import numpy as np

from omni_runtime.media.audio_prep import AudioConfig, audio_features, audio_token_counts
from omni_runtime.errors import BundleError, InputError
from omni_runtime.bundle.manifest import REBUILD_FIX
from omni_runtime.prompt.multimodal import Placeholders
from omni_runtime.prompt.rope import RopeConfig
from omni_runtime.media.vision_prep import VisionConfig, VisionInput, load_video, preprocess_image

ROLES = ("system", "user", "assistant")
MEDIA_KINDS = ("audio", "image", "video")
# Optional keys of a media part (qwen-omni-utils' names), besides "type" and the source itself.
PART_OPTIONS = {
    "text": (),
    "audio": ("audio_start", "audio_end"),
    "image": ("min_pixels", "max_pixels"),
    "video": ("fps", "min_frames", "max_frames", "min_pixels", "max_pixels", "total_pixels"),
}
_INTEGER_OPTIONS = ("min_frames", "max_frames", "min_pixels", "max_pixels")
NO_TRACK_FIX = "pass a video with an audio track, or leave out use_audio_in_video"


@dataclass
class MediaItem:
    """One audio, image or video part of the messages, in prompt order."""

    kind: str  # "audio", "image" or "video"
    source: object  # path, bytes, array (PIL image for images)
    options: dict = field(default_factory=dict)
    where: str = ""  # "messages[1].content[0]", for error messages


def _bad(where: str, problem: str, fix: str) -> InputError:
    return InputError(f"{where}: {problem}", fix=fix, param="messages")


def _check_text(value, where: str) -> str:
    if not isinstance(value, str):
        raise _bad(where, f"text must be a string, got {type(value).__name__}", "pass the text as a str")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _bad(where, f"the text is not valid: character {exc.start} is an unpaired surrogate",
                   "pass UTF-8 text") from None
    return value


def _check_part(part, where: str) -> dict:
    if not isinstance(part, Mapping):
        raise _bad(where, f"a content part must be a dict, got {type(part).__name__}",
                   "write parts as {'type': 'text', 'text': ...} or {'type': 'audio'|'image'|'video', "
                   "'audio'|'image'|'video': source}")
    kind = part.get("type")
    if kind not in PART_OPTIONS:
        raise _bad(where, f"unknown content type {kind!r}", f"use 'type' one of {', '.join(PART_OPTIONS)}")
    if kind not in part or part[kind] is None:
        raise _bad(where, f"a {kind!r} part needs its {kind!r} key", f"write {{'type': {kind!r}, {kind!r}: ...}}")
    extra = sorted(set(part) - {"type", kind, *PART_OPTIONS[kind]})
    if extra:
        allowed = ", ".join(PART_OPTIONS[kind]) or "none"
        raise _bad(where, f"unsupported key(s) {', '.join(map(repr, extra))} in a {kind!r} part",
                   f"remove them (optional keys of a {kind!r} part: {allowed})")
    if kind == "text":
        _check_text(part["text"], f"{where}.text")
    for name in PART_OPTIONS[kind]:
        if name in part:
            _check_option(part[name], name, f"{where}.{name}")
    return dict(part)


def _check_option(value, name: str, where: str) -> None:
    if name in ("audio_start", "audio_end"):
        ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
        want = "a number of seconds >= 0"
    elif name in _INTEGER_OPTIONS:
        ok = isinstance(value, Integral) and not isinstance(value, bool) and value >= 1
        want = "an integer >= 1"
    else:  # fps, total_pixels
        ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        want = "a number > 0"
    if not ok:
        raise _bad(where, f"{name} must be {want}, got {value!r}", f"pass {name} as {want}")


def normalize_messages(messages, system: str | None, default_system: str) -> list[dict]:
    """A checked copy of Qwen-style ``messages``, starting with a system message.

    Without a system message in ``messages``, one is added with ``system`` (or ``default_system``
    when ``system`` is None); ``system`` together with a system message is an InputError.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts",
                         fix="pass e.g. [{'role': 'user', 'content': [{'type': 'text', 'text': 'Hello'}]}]",
                         param="messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise _bad(where, f"a message must be a dict, got {type(message).__name__}",
                       "write each message as {'role': ..., 'content': ...}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise _bad(where, f"role {role!r} is not one of {', '.join(ROLES)}", "give each message a role")
        if isinstance(content, str):
            _check_text(content, f"{where}.content")
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, Sequence) or isinstance(content, (bytes, bytearray)) or not content:
            raise _bad(where, "content must be a string or a non-empty list of parts",
                       "write content as text or as [{'type': 'text', 'text': ...}, ...]")
        out.append({"role": role, "content": [_check_part(p, f"{where}.content[{j}]") for j, p in enumerate(content)]})
    if out[0]["role"] == "system":
        if system is not None:
            raise InputError("system was given and the messages start with a system message",
                             fix="pass the system prompt in one place: as system or as the first message",
                             param="system")
    else:
        text = default_system if system is None else _check_text(system, "system")
        out.insert(0, {"role": "system", "content": [{"type": "text", "text": text}]})
    if not any(m["role"] == "user" for m in out):
        raise InputError("the messages have no user message", fix="add a {'role': 'user', ...} message",
                         param="messages")
    return out


def media_items(messages: list[dict]) -> list[MediaItem]:
    """The media parts of checked ``messages``, in the order the chat template renders them."""
    items = []
    for i, message in enumerate(messages):
        if isinstance(message["content"], str):
            continue
        for j, part in enumerate(message["content"]):
            kind = part["type"]
            if kind in MEDIA_KINDS:
                options = {k: v for k, v in part.items() if k not in ("type", kind)}
                items.append(MediaItem(kind, part[kind], options, f"messages[{i}].content[{j}]"))
    return items


# ---------------------------------------------------------------------------------------------
# decoding and feature counts


@dataclass
class PreparedMedia:
    """Decoded media of one prompt, in prompt order; no graph has run yet."""

    items: list[MediaItem]
    audio: list[np.ndarray] = field(default_factory=list)  # log-mel per <|AUDIO|> run: standalone + video tracks
    images: list[VisionInput] = field(default_factory=list)
    videos: list[VisionInput] = field(default_factory=list)
    audio_tokens: list[int] = field(default_factory=list)  # per standalone audio
    video_audio_tokens: list[int | None] = field(default_factory=list)  # per video: its track's tokens
    use_audio_in_video: bool = False
    merge_size: int = 2

    @property
    def has_audio(self) -> bool:
        return bool(self.audio)

    @property
    def has_vision(self) -> bool:
        return bool(self.images or self.videos)

    def placeholders(self) -> Placeholders:
        return Placeholders(audio=list(self.audio_tokens),
                            image=[v.token_count(self.merge_size) for v in self.images],
                            video=[np.asarray(v.grid_thw) for v in self.videos],
                            video_seconds=[float(v.second_per_grid) for v in self.videos],
                            video_audio=list(self.video_audio_tokens))

    def summary(self) -> dict:
        """Media token counts for the result (``ChatResult.media``)."""
        out = {"audio_tokens": list(self.audio_tokens),
               "image_tokens": [v.token_count(self.merge_size) for v in self.images],
               "video_tokens": [v.token_count(self.merge_size) for v in self.videos]}
        if self.use_audio_in_video and self.videos:
            out["video_audio_tokens"] = list(self.video_audio_tokens)
        return out


def _label(source, where: str) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else where


def _has_audio_track(source) -> bool | None:
    """Whether a video file/bytes has an audio stream (None: FFmpeg cannot tell, let decoding report it)."""
    try:
        import av
    except ImportError:
        return None
    try:
        target = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else os.fspath(source)
        with av.open(target) as container:
            return bool(container.streams.audio)
    except Exception:  # noqa: BLE001 - PyAV raises many types; decoding reports the problem properly
        return None


def _video_track(item: MediaItem, config: AudioConfig) -> np.ndarray:
    """Log-mel features of a video's audio track (``use_audio_in_video``)."""
    source = item.source
    if isinstance(source, np.ndarray):
        raise InputError(f"{item.where}: a video given as decoded frames has no audio track",
                         fix=NO_TRACK_FIX + " (pass the video file instead of frames)", param="use_audio_in_video")
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        source = path[len("file://"):] if path.startswith("file://") else path
    if _has_audio_track(source) is False:
        raise InputError("the video has no audio track, so use_audio_in_video cannot use it",
                         path=_label(source, item.where), fix=NO_TRACK_FIX, param="use_audio_in_video")
    return audio_features(source, config, name=None if isinstance(source, (str, os.PathLike)) else item.where)


def prepare_media(items: list[MediaItem], audio_config: AudioConfig | None, vision_config: VisionConfig | None,
                  use_audio_in_video: bool = False, video_fps: float | None = None) -> PreparedMedia:
    """Decode every item (and the videos' audio tracks with ``use_audio_in_video``), in order."""
    merge = vision_config.spatial_merge_size if vision_config is not None else 2
    out = PreparedMedia(items, use_audio_in_video=use_audio_in_video, merge_size=merge)
    for item in items:
        opts = item.options
        if item.kind == "audio":
            features = audio_features(item.source, audio_config, start=opts.get("audio_start", 0.0),
                                      end=opts.get("audio_end"),
                                      name=None if isinstance(item.source, (str, os.PathLike)) else item.where)
            out.audio.append(features)
            out.audio_tokens.append(audio_token_counts([features.shape[1]])[0])
        elif item.kind == "image":
            config = vision_config
            if "min_pixels" in opts or "max_pixels" in opts:
                config = replace(config, min_pixels=opts.get("min_pixels", config.min_pixels),
                                 max_pixels=opts.get("max_pixels", config.max_pixels))
            out.images.append(preprocess_image(item.source, config))
        else:
            fps = opts.get("fps", video_fps)
            out.videos.append(load_video(item.source, vision_config, fps=fps, min_frames=opts.get("min_frames"),
                                         max_frames=opts.get("max_frames"), min_pixels=opts.get("min_pixels"),
                                         max_pixels=opts.get("max_pixels"), total_pixels=opts.get("total_pixels")))
            if use_audio_in_video:
                features = _video_track(item, audio_config)
                out.audio.append(features)
                out.video_audio_tokens.append(audio_token_counts([features.shape[1]])[0])
            else:
                out.video_audio_tokens.append(None)
    return out


# ---------------------------------------------------------------------------------------------
# encoders and positions


def encode_media(prepared: PreparedMedia, manifest, pool) -> dict[str, np.ndarray | None]:
    """Encoder rows per modality (``{"audio", "image", "video"}`` -> ``[rows, hidden]`` or None).

    Each encoder session is created only if its modality is present; right after, the pool is told
    the encoder is done with it (the ``lazy`` policy frees it before the thinker decodes)."""
    from omni_runtime.stages.audio_encoder import AudioEncoder
    from omni_runtime.stages.vision_encoder import VisionEncoder

    out: dict[str, np.ndarray | None] = {"audio": None, "image": None, "video": None}
    if prepared.has_audio:
        rows = AudioEncoder(manifest, pool).encode(prepared.audio, release=True)
        out["audio"] = np.concatenate(rows)
    if prepared.has_vision:
        encoder = VisionEncoder(manifest, pool)
        rows = encoder.encode_inputs([*prepared.images, *prepared.videos])  # done with its session after
        n = len(prepared.images)
        if n:
            out["image"] = np.concatenate(rows[:n])
        if prepared.videos:
            out["video"] = np.concatenate(rows[n:])
    return out


def rope_config(manifest) -> RopeConfig:
    """The TMRoPE constants of ``config.thinker`` and the media token ids, for ``rope.rope_index``."""
    special, tmrope = manifest.configs.special_tokens, manifest.configs.thinker.tmrope
    if tmrope is None:  # the schema requires the constants with config.audio or config.vision
        raise BundleError("config.thinker has no TMRoPE constants (position_id_per_seconds, seconds_per_chunk, "
                          "spatial_merge_size): this bundle has no audio or vision encoder",
                          path=manifest.manifest_path, fix=REBUILD_FIX + " with a recipe that lists `audio` or `vision`")
    return RopeConfig(image_token_id=special.image, video_token_id=special.video, audio_token_id=special.audio,
                      vision_start_token_id=special.vision_bos, audio_start_token_id=special.audio_bos,
                      spatial_merge_size=tmrope.spatial_merge_size,
                      position_id_per_seconds=tmrope.position_id_per_seconds,
                      seconds_per_chunk=tmrope.seconds_per_chunk)


def rope_inputs(prepared: PreparedMedia) -> dict:
    """Keyword arguments of ``rope.rope_index`` for the prepared media (prompt order)."""
    return {
        "image_grid_thw": np.asarray([v.grid_thw for v in prepared.images], np.int64) if prepared.images else None,
        "video_grid_thw": np.asarray([v.grid_thw for v in prepared.videos], np.int64) if prepared.videos else None,
        "use_audio_in_video": bool(prepared.use_audio_in_video and prepared.videos),
        "audio_seqlens": np.asarray([f.shape[1] for f in prepared.audio], np.int64) if prepared.audio else None,
        "second_per_grids": (np.asarray([v.second_per_grid for v in prepared.videos], np.float32)
                             if prepared.videos else None),
    }
