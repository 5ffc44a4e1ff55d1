"""Token and patch counts of a planned request, by the runtime's own rules (torch-free).

A video of S seconds is what qwen-omni-utils' ``fetch_video`` makes of it at its defaults, as
``omni_runtime.media.vision_prep.load_video`` reproduces it: ``sample_frame_count`` frames (2 per
second, even), each resized by ``_Sampling.frame_size`` (at most 768 tokens of 28x28 px per frame,
0.9 x 128000 over the video), one temporal patch per 2 frames; with its audio track
(``use_audio_in_video``) interleaved as ``prompt.multimodal.video_with_audio_ids`` writes it.
Audio: 16 kHz samples -> mel frames (``audio_prep.num_frames``: at most 300 s) -> 25 tokens per
second (``audio_token_counts``). Images: ``smart_resize`` with the processor's pixel limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from omni_runtime.bundle.config import AudioConfig, VisionConfig
from omni_runtime.media.audio_prep import audio_token_counts, num_frames
from omni_runtime.media.vision_prep import _Sampling, sample_frame_count, smart_resize
from omni_runtime.prompt.multimodal import MediaTokens, video_with_audio_ids

from omni_export.plan.config import ModelShape, PlanError
from omni_export.plan.constants import PROMPT_TEXT_TOKENS

#: frame rate assumed for the source video (only the rounding of the frame count depends on it)
SOURCE_FPS = 30.0
#: markers around a media placeholder in the chat template: <|audio_bos|>..<|audio_eos|>,
#: <|vision_bos|>..<|vision_eos|>
MARKERS = 2
_TOKENS = MediaTokens(audio=1, image=2, video=3, audio_bos=4, audio_eos=5)  # ids only counted here


@dataclass(frozen=True)
class Grid:
    """One image or video for the vision encoder: ``(t, h, w)`` in 14-px patches."""

    kind: str
    t: int
    h: int
    w: int
    frame_size: tuple[int, int]  # (height, width) in pixels after resizing
    seconds_per_grid: float = 0.0

    @property
    def patches(self) -> int:
        return self.t * self.h * self.w

    @property
    def frame_patches(self) -> int:
        """Patches of one temporal step: the full-attention layers attend over these."""
        return self.h * self.w

    def tokens(self, merge: int) -> int:
        return self.patches // (merge * merge)


@dataclass(frozen=True)
class MediaPlan:
    """What the request puts before the thinker."""

    prompt_tokens: int  # the expanded prompt (text + media tokens + markers)
    audio_frames: list[int] = field(default_factory=list)  # mel frames of each audio (clip, video track)
    audio_tokens: int = 0
    grids: list[Grid] = field(default_factory=list)
    video_tokens: int = 0
    image_tokens: int = 0

    @property
    def patches(self) -> int:
        return sum(g.patches for g in self.grids)

    @property
    def largest_frame_patches(self) -> int:
        return max((g.frame_patches for g in self.grids), default=0)

    def summary(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "audio_tokens": self.audio_tokens,
                "video_tokens": self.video_tokens, "image_tokens": self.image_tokens,
                "vision_patches": self.patches,
                "video_frame_size": [list(g.frame_size) for g in self.grids if g.kind == "video"],
                "image_size": [list(g.frame_size) for g in self.grids if g.kind == "image"]}


def vision_config(shape: ModelShape) -> VisionConfig:
    v = shape.vision
    return VisionConfig(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                        spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
                        in_channels=v.in_channels, out_hidden_size=v.out_hidden_size, depth=v.depth,
                        hidden_size=v.hidden_size, num_heads=v.num_heads,
                        fullatt_block_indexes=v.fullatt_block_indexes)


def _audio_frames(seconds: float, config: AudioConfig) -> int:
    return num_frames(int(round(seconds * config.sampling_rate)), config)


def video_grid(seconds: float, size: tuple[int, int], config: VisionConfig, fps: float | None = None) -> Grid:
    """The grid of a ``seconds`` video of ``size`` = (width, height) px at ``SOURCE_FPS``."""
    width, height = size
    total = max(1, int(round(seconds * SOURCE_FPS)))
    try:
        n = sample_frame_count(total, SOURCE_FPS, config, fps)
        h, w = _Sampling(config).frame_size(height, width, n)
    except Exception as exc:  # InputError: too short, extreme aspect ratio
        raise PlanError(f"--video-seconds {seconds:g} at {width}x{height}: {getattr(exc, 'problem', exc)}",
                        fix="plan a video of at least 1 second with a usual aspect ratio") from None
    p = config.patch_size
    sample_fps = n / total * SOURCE_FPS
    return Grid("video", n // config.temporal_patch_size, h // p, w // p, (h, w),
                config.temporal_patch_size / sample_fps)


def image_grid(size: tuple[int, int], config: VisionConfig) -> Grid:
    width, height = size
    try:
        h, w = smart_resize(height, width, config.factor, config.min_pixels, config.max_pixels)
    except Exception as exc:
        raise PlanError(f"--image {width}x{height}: {getattr(exc, 'problem', exc)}",
                        fix="plan an image with a usual aspect ratio") from None
    return Grid("image", 1, h // config.patch_size, w // config.patch_size, (h, w))


def plan_media(shape: ModelShape, video_seconds: float = 0.0, video_size: tuple[int, int] = (1280, 720),
               audio_seconds: float = 0.0, images: tuple[tuple[int, int], ...] = (),
               text_tokens: int = PROMPT_TEXT_TOKENS, use_audio_in_video: bool = True) -> MediaPlan:
    """Token counts of a request: an audio clip, images, a video (with its audio track)."""
    vcfg = vision_config(shape)
    acfg = AudioConfig(num_mel_bins=shape.audio.num_mel_bins, n_window=shape.audio.n_window,
                       output_dim=shape.audio.output_dim, d_model=shape.audio.d_model)
    merge = vcfg.spatial_merge_size
    tokens = text_tokens
    frames: list[int] = []
    audio_tokens = video_tokens = image_tokens = 0
    grids: list[Grid] = []
    if audio_seconds > 0:  # the template's order: audio, images, video
        frames.append(_audio_frames(audio_seconds, acfg))
        n = audio_token_counts([frames[-1]])[0]
        audio_tokens += n
        tokens += n + MARKERS
    for size in images:
        grid = image_grid(size, vcfg)
        grids.append(grid)
        image_tokens += grid.tokens(merge)
        tokens += grid.tokens(merge) + MARKERS
    if video_seconds > 0:
        grid = video_grid(video_seconds, video_size, vcfg)
        grids.append(grid)
        video_tokens += grid.tokens(merge)
        if use_audio_in_video:
            frames.append(_audio_frames(video_seconds, acfg))
            n = audio_token_counts([frames[-1]])[0]
            audio_tokens += n
            ids = video_with_audio_ids((grid.t, grid.h, grid.w), grid.seconds_per_grid, n, _TOKENS, merge,
                                       25, 2)  # TMRoPE constants of Qwen2.5-Omni (position_id_per_seconds, chunk)
            tokens += len(ids) + MARKERS
        else:
            tokens += grid.tokens(merge) + MARKERS
    return MediaPlan(tokens, frames, audio_tokens, grids, video_tokens, image_tokens)


def audio_chunks(frames: list[int], n_window: int) -> tuple[int, int]:
    """(chunks, longest chunk frames) the audio encoder runs on (``audio_prep.encoder_inputs``)."""
    size = 2 * n_window
    chunks = sum(math.ceil(f / size) for f in frames)
    longest = min(size, max(frames, default=0))
    return chunks, longest
