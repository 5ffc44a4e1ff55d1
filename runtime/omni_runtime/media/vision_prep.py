"""Host-side image and video preparation for the vision encoder graph, in numpy (no torch).

Images (``load_image`` + ``preprocess_image``) follow transformers' ``Qwen2VLImageProcessor`` as
``Qwen2_5OmniProcessor`` uses it: RGB conversion (transparency composited on white), Qwen2-VL's
``smart_resize`` (sides multiples of ``patch_size * merge_size``, pixel count within
``min_pixels``/``max_pixels``), torch's antialiased bicubic resize of uint8 images (which
torchvision runs natively in integer arithmetic, reproduced here exactly), rescale + normalize
(``(x - 255 * mean) / (255 * std)`` in float32) and patchify (each image is one frame repeated
``temporal_patch_size`` times).

Videos (``load_video``) follow qwen-omni-utils (``v2_5/vision_process.py``, ``fetch_video``):
decoded with PyAV, ``nframes`` from the frame rate (2 frames per second by default, even, within
``min_frames``/``max_frames`` and the frame count), frames sampled at
``round(linspace(0, total - 1, nframes))``, frames resized with its ``smart_resize`` under the
video pixel limits (per frame 128..768 tokens of 28x28 px, and ``0.9 * 128000`` tokens over the
whole video) with torchvision's float antialiased bicubic resize (reproduced up to the last bit
of float32 sums: a value that is an exact rounding tie may land one level apart), then
normalized and patchified with temporal patch 2 as transformers' ``Qwen2VLVideoProcessor`` does.

``encoder_inputs`` computes the index inputs of the ``vision_encoder`` graph from the grids,
exactly as transformers' ``Qwen2_5OmniVisionEncoder`` computes them (``transformers.vision_utils``):
2D rotary position ids, the window permutation, and the cumulative frame / window lengths.

Bad media raise ``InputError`` naming the file (or argument) and the fix.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omni_runtime.bundle.config import VisionConfig
from omni_runtime.errors import InputError

# -- configuration ----------------------------------------------------------------------------

MAX_RATIO = 200  # Qwen2-VL refuses more extreme aspect ratios
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".gif", ".flv", ".wmv")


def _config(config) -> VisionConfig:
    if config is None:
        return VisionConfig()
    if isinstance(config, VisionConfig):
        return config
    return VisionConfig.from_manifest(config)


@dataclass
class VisionInput:
    """Patches of one image or video, ready for the ``vision_encoder`` graph."""

    pixel_values: np.ndarray  # [patches, C * T * P * P] float32
    grid_thw: tuple[int, int, int]  # (t, h, w) in patches
    kind: str = "image"  # "image" or "video"
    second_per_grid: float | None = None  # videos: seconds covered by one temporal patch
    fps: float | None = None  # videos: sampled frames per second
    frame_indices: list[int] | None = None  # videos: the decoded frames used
    source_fps: float | None = None  # videos: the file's frame rate
    total_frames: int | None = None  # videos: frames in the file

    def token_count(self, merge_size: int = 2) -> int:
        return token_count(self.grid_thw, merge_size)


def token_count(grid_thw: Sequence[int], merge_size: int = 2) -> int:
    """LLM tokens of one image/video: ``t * h * w / merge_size**2``."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // (merge_size * merge_size)


# -- image loading ----------------------------------------------------------------------------

def _describe(source) -> str | None:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else None


def load_image(source) -> np.ndarray:
    """An RGB uint8 image ``[height, width, 3]`` from a path, bytes, a numpy array or a PIL image.

    Transparency (RGBA, LA, palette with transparency) is composited on white, grayscale is
    repeated to three channels, as transformers' image processors do.
    """
    from PIL import Image

    path = _describe(source)
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise InputError("the image bytes are empty", fix="pass the content of an image file (PNG, JPEG, ...)")
        image = _open_image(io.BytesIO(bytes(source)), None)
    elif path is not None:
        p = Path(path)
        if not p.exists():
            raise InputError("image file does not exist", path=p, fix="check the path of the image")
        if p.is_dir():
            raise InputError("this is a directory, not an image file", path=p,
                             fix="pass an image file (PNG, JPEG, ...)")
        if p.suffix.lower() in VIDEO_SUFFIXES:
            raise InputError("this is a video file, not an image", path=p, fix="pass it as a video (--video)")
        image = _open_image(p, p)
    else:
        raise InputError(f"unsupported image input of type {type(source).__name__}",
                         fix="pass a file path, the file's bytes, a uint8 numpy array [H, W, 3] or a PIL image")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"the image cannot be decoded ({exc}): truncated or damaged file", path=path,
                         fix="re-export or re-download the image") from None
    return _pil_to_rgb(image)


def _open_image(fp, path):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(fp)
    except UnidentifiedImageError:
        raise InputError("not an image file Pillow can read (unsupported type or damaged file)", path=path,
                         fix="use a PNG, JPEG, WebP, BMP, GIF or TIFF image") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the image ({exc})", path=path,
                         fix="check the file and its permissions") from None


def _pil_to_rgb(image) -> np.ndarray:
    """transformers' ``convert_to_rgb`` for PIL images, as a uint8 array."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    else:
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8).copy()


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    from PIL import Image

    if array.dtype != np.uint8:
        raise InputError(f"image arrays must be uint8, got {array.dtype}",
                         fix="convert with (array * 255).round().astype(np.uint8) for [0, 1] floats")
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        if array.shape[2] == 1:
            return np.repeat(array, 3, axis=2)
        if array.shape[2] == 3:
            return np.ascontiguousarray(array)
        return _pil_to_rgb(Image.fromarray(np.ascontiguousarray(array), mode="RGBA"))
    raise InputError(f"image arrays must be [height, width] or [height, width, 1|3|4], got shape {list(array.shape)}",
                     fix="pass a channels-last RGB array")


# -- resizing -----------------------------------------------------------------------------------

def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """Qwen2-VL's size rule (transformers' ``smart_resize``): sides multiples of ``factor``,
    ``min_pixels <= h * w <= max_pixels``, aspect ratio kept as closely as possible."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise InputError(f"the aspect ratio {max(height, width) / min(height, width):.0f}:1 ({width}x{height} px) "
                         f"is more extreme than {MAX_RATIO}:1", fix="crop or pad the image closer to a square")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _video_smart_resize(height: int, width: int, factor: int, min_pixels: float, max_pixels: float) -> tuple[int, int]:
    """qwen-omni-utils' variant of ``smart_resize`` (used for video frames)."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise InputError(f"the video's aspect ratio {max(height, width) / min(height, width):.0f}:1 "
                         f"({width}x{height} px) is more extreme than {MAX_RATIO}:1",
                         fix="crop or pad the video closer to a square")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _cubic_f64(x: np.ndarray) -> np.ndarray:
    """Keys cubic (a = -0.5, as Pillow and torch's antialiased bicubic) in float64."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _taps(in_size: int, support: float, center: np.ndarray):
    """Pillow / torch antialiased filter bounds: (xmin [out], xsize [out], kmax)."""
    kmax = int(math.ceil(support)) * 2 + 1
    xmin = np.maximum(np.trunc(center.astype(np.float64) - support + 0.5).astype(np.int64), 0)
    xsize = np.minimum(np.trunc(center.astype(np.float64) + support + 0.5).astype(np.int64), in_size) - xmin
    return xmin, np.clip(xsize, 0, kmax), kmax


def _uint8_axis(in_size: int, out_size: int):
    """torch's ``_compute_index_ranges_int16_weights`` (bicubic, antialias, align_corners False)."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    xmin, xsize, kmax = _taps(in_size, support, center)
    j = np.arange(kmax)
    w = _cubic_f64((j[None, :] + xmin[:, None] - center[:, None] + 0.5) * invscale)
    w = np.where(j[None, :] < xsize[:, None], w, 0.0)
    total = np.cumsum(w, axis=1)[:, -1:]  # sequential sum, as the C loop
    w = np.where(total != 0.0, w / np.where(total == 0.0, 1.0, total), w)
    w_max = float(w.max())
    precision = 0
    while precision < 22 and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    v = w * (1 << precision)
    weights = np.where(v < 0, np.trunc(-0.5 + v), np.trunc(0.5 + v)).astype(np.int32)
    return xmin, xsize, weights, precision, kmax


def _int_rows(x: np.ndarray, out_size: int) -> np.ndarray:
    """One uint8 resampling pass along axis 0 of a contiguous int32 ``[in, columns]`` array."""
    xmin, xsize, weights, precision, kmax = _uint8_axis(x.shape[0], out_size)
    acc = np.full((out_size, x.shape[1]), 1 << (precision - 1), dtype=np.int32)
    last = x.shape[0] - 1
    for k in range(kmax):
        wk = np.where(k < xsize, weights[:, k], 0).astype(np.int32)[:, None]
        acc += x[np.minimum(xmin + k, last)] * wk
    np.right_shift(acc, precision, out=acc)
    return np.clip(acc, 0, 255, out=acc)


def resize_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bicubic resize of a uint8 ``[H, W, C]`` image, bit-exact with torch's uint8
    kernel (what torchvision, hence transformers' image processor, runs on CPU): int16 weights,
    horizontal pass then vertical pass, each rounded and clamped to uint8."""
    h, w, c = image.shape
    x = image
    if w != width:  # rows of the pass: image columns
        cols = np.ascontiguousarray(x.transpose(1, 0, 2), dtype=np.int32).reshape(w, h * c)
        x = _int_rows(cols, width).reshape(width, h, c).transpose(1, 0, 2)
    if h != height:
        rows = np.ascontiguousarray(x, dtype=np.int32).reshape(h, -1)
        x = _int_rows(rows, height).reshape(height, width, c)
    return np.ascontiguousarray(x, dtype=np.uint8)


_F32 = np.float32


def _fma(a, b, c) -> np.ndarray:
    """float32 fused multiply-add (exact product, one rounding), as torch's compiled kernels do."""
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(np.float32)


def _float_axis(in_size: int, out_size: int):
    """torch's ``_compute_index_ranges_weights<float>`` (bicubic, antialias), float32 arithmetic."""
    scale = _F32(_F32(in_size) / _F32(out_size))
    support = _F32(_F32(2.0) * scale) if scale >= 1.0 else _F32(2.0)
    invscale = _F32(1.0 / float(scale)) if scale >= 1.0 else _F32(1.0)
    center = (float(scale) * (np.arange(out_size, dtype=np.float64) + 0.5)).astype(np.float32)
    xmin = np.maximum(np.trunc((center - support).astype(np.float64) + 0.5).astype(np.int64), 0)
    kmax = int(math.ceil(float(support))) * 2 + 1
    xsize = np.clip(np.minimum(np.trunc((center + support).astype(np.float64) + 0.5).astype(np.int64), in_size)
                    - xmin, 0, kmax)
    j = np.arange(kmax)
    offset = ((j[None, :] + xmin[:, None]).astype(np.float32) - center[:, None]).astype(np.float32)
    x = np.abs(((offset.astype(np.float64) + 0.5) * float(invscale)).astype(np.float32))
    a = _F32(-0.5)
    full = lambda v: np.full_like(x, _F32(v))  # noqa: E731
    near = _fma((_fma(full(a + 2), x, full(-(a + 3))) * x).astype(np.float32), x, full(1))
    far = _fma(_fma(_fma(full(a), x, full(-5 * a)), x, full(8 * a)), x, full(-4 * a))
    w = np.where(x < 1, near, np.where(x < 2, far, _F32(0))).astype(np.float32)
    w = np.where(j[None, :] < xsize[:, None], w, _F32(0))
    total = np.cumsum(w, axis=1, dtype=np.float32)[:, -1:]
    w = np.where(total != 0, w / np.where(total == 0, _F32(1), total), w).astype(np.float32)
    return xmin, xsize, w, kmax


def _float_rows(x: np.ndarray, out_size: int) -> np.ndarray:
    """One float32 resampling pass along axis 0 of a contiguous ``[in, columns]`` array, each
    multiply-add fused (one rounding) as in torch's compiled loop."""
    xmin, xsize, w, kmax = _float_axis(x.shape[0], out_size)
    last = x.shape[0] - 1
    acc = x[np.minimum(xmin, last)] * w[:, :1]
    wide = np.empty(acc.shape, np.float64)
    for k in range(1, kmax):
        wk = np.where(k < xsize, w[:, k], _F32(0)).astype(np.float64)[:, None]
        np.multiply(x[np.minimum(xmin + k, last)], wk, out=wide)  # exact: 24-bit x 24-bit
        wide += acc
        acc = wide.astype(np.float32)
    return acc


def resize_float(frames: np.ndarray, height: int, width: int, to_uint8: bool = True) -> np.ndarray:
    """torchvision's ``transforms.functional.resize`` of uint8 frames ``[T, H, W, C]`` (bicubic,
    antialias): float32 resampling, clamp to [0, 255], round, back to uint8 (qwen-omni-utils'
    video resize); ``to_uint8=False`` returns the float32 values before clamping and rounding.

    Equal to torch's float kernel up to the last bit of float32 sums, whose rounding order
    is the compiler's: a value that is a rounding tie (x.5) may round the other way."""
    t, h, w, c = frames.shape
    x = frames.astype(np.float32)
    if w != width:
        cols = np.ascontiguousarray(x.transpose(2, 0, 1, 3)).reshape(w, -1)
        x = _float_rows(cols, width).reshape(width, t, h, c).transpose(1, 2, 0, 3)
    if h != height:
        rows = np.ascontiguousarray(x.transpose(1, 0, 2, 3)).reshape(h, -1)
        x = _float_rows(rows, height).reshape(height, t, width, c).transpose(1, 0, 2, 3)
    if not to_uint8:
        return np.ascontiguousarray(x, dtype=np.float32)
    return np.round(np.clip(x, 0, 255)).astype(np.uint8)


# -- normalize and patchify -------------------------------------------------------------------

def normalize(frames: np.ndarray, config: VisionConfig) -> np.ndarray:
    """uint8 (or integral float) ``[..., H, W, C]`` -> float32 ``[..., C, H, W]``:
    ``(x - mean / rescale) / (std / rescale)``, transformers' fused rescale + normalize."""
    scale = _F32(1.0 / config.rescale_factor)
    mean = np.asarray(config.image_mean, np.float32) * scale
    std = np.asarray(config.image_std, np.float32) * scale
    x = (frames.astype(np.float32) - mean) / std
    return np.moveaxis(x, -1, -3).astype(np.float32, copy=False)


def patchify(frames: np.ndarray, config: VisionConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Normalized frames ``[T, C, H, W]`` -> (patches ``[t*h*w, C*T'*P*P]``, (t, h, w)).

    ``T`` is padded with copies of the last frame to a multiple of the temporal patch; patches
    come in 2x2 merge blocks, as transformers' image and video processors lay them out."""
    p, m, tp = config.patch_size, config.spatial_merge_size, config.temporal_patch_size
    if frames.shape[0] % tp:
        pad = tp - frames.shape[0] % tp
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
    n, c, height, width = frames.shape
    gt, gh, gw = n // tp, height // p, width // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, bh, bw, mh, mw, C, T, P, P
    return np.ascontiguousarray(x.reshape(gt * gh * gw, c * tp * p * p), dtype=np.float32), (gt, gh, gw)


def preprocess_image(source, config=None) -> VisionInput:
    """One image (path, bytes, array or PIL image) -> its patches and grid."""
    cfg = _config(config)
    image = load_image(source)
    height, width = image.shape[:2]
    if min(height, width) < cfg.factor:
        raise InputError(f"the image is {width}x{height} px, smaller than the {cfg.factor}x{cfg.factor} px "
                         "of one vision token", path=_describe(source),
                         fix=f"use an image at least {cfg.factor} px on each side")
    h, w = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    resized = resize_uint8(image, h, w)
    frames = np.repeat(normalize(resized, cfg)[None], cfg.temporal_patch_size, axis=0)
    pixels, grid = patchify(frames, cfg)
    return VisionInput(pixels, grid, "image")


# -- video ------------------------------------------------------------------------------------

def _ceil_by(x: float, f: int) -> int:
    return math.ceil(x / f) * f


def _floor_by(x: float, f: int) -> int:
    return math.floor(x / f) * f


def _linspace_f32(start: int, end: int, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` in float32 (the CPU kernel: from the start for the
    first half, from the end for the second), rounded half to even as ``Tensor.round``."""
    if steps == 1:
        return np.array([start], dtype=np.int64)
    step = _F32((_F32(end) - _F32(start)) / _F32(steps - 1))
    idx = np.arange(steps)
    half = steps // 2
    values = np.where(idx < half, _F32(start) + step * idx.astype(np.float32),
                      _F32(end) - step * (steps - idx - 1).astype(np.float32)).astype(np.float32)
    return np.round(values).astype(np.int64)


def sample_frame_count(total_frames: int, video_fps: float, config: VisionConfig, fps: float | None = None,
                       min_frames: int | None = None, max_frames: int | None = None, path=None) -> int:
    """qwen-omni-utils' ``smart_nframes``: frames to sample from a video."""
    f = config.frame_factor
    fps = config.fps if fps is None else fps
    lo = _ceil_by(config.min_frames if min_frames is None else min_frames, f)
    hi = _floor_by(min(config.max_frames if max_frames is None else max_frames, total_frames), f)
    n = total_frames / video_fps * fps
    n = min(min(max(n, lo), hi), total_frames)
    n = _floor_by(n, f)
    if not (f <= n <= total_frames):
        raise InputError(f"the video has {total_frames} frame{'s' if total_frames != 1 else ''}; "
                         f"at least {f} are needed", path=path, fix="use a longer video")
    return n


@dataclass
class _Sampling:
    """The frame sampling and frame size of one video (qwen-omni-utils' rules)."""

    config: VisionConfig
    min_pixels: float | None = None
    max_pixels: float | None = None
    total_pixels: float | None = None
    path: str | None = None
    size: tuple[int, int] | None = None  # (height, width) after resizing, set by the first frame
    source_shape: tuple[int, int] | None = None  # (height, width) of the decoded frames

    def frame_size(self, height: int, width: int, nframes: int) -> tuple[int, int]:
        cfg, factor = self.config, self.config.factor
        lo = cfg.video_min_tokens * factor * factor if self.min_pixels is None else self.min_pixels
        total = cfg.model_seq_len * factor * factor * 0.9 if self.total_pixels is None else self.total_pixels
        hi = max(min(cfg.video_max_tokens * factor * factor, total / nframes * cfg.frame_factor), int(lo * 1.05))
        if self.max_pixels is not None:
            hi = min(self.max_pixels, hi)
        return _video_smart_resize(height, width, factor, lo, hi)

    def convert(self, frame: np.ndarray, nframes: int) -> np.ndarray:
        """One sampled RGB uint8 frame, resized as ``fetch_video`` resizes it."""
        if self.size is None:
            self.size = self.frame_size(frame.shape[0], frame.shape[1], nframes)
        elif frame.shape[:2] != self.source_shape:
            raise InputError(f"the video's frame size changes ({self.source_shape[1]}x{self.source_shape[0]} -> "
                             f"{frame.shape[1]}x{frame.shape[0]})", path=self.path,
                             fix="re-encode the video at one frame size (e.g. with ffmpeg)")
        self.source_shape = frame.shape[:2]
        if self.size != frame.shape[:2]:
            frame = resize_float(frame[None], *self.size)[0]
        return frame


def _open_container(source, path):
    import av

    try:
        return av.open(io.BytesIO(bytes(source)) if path is None else str(path))
    except av.FFmpegError as exc:
        raise InputError(f"not a video file FFmpeg can read ({exc.strerror or exc})", path=path,
                         fix="use an MP4, MKV, WebM, MOV or AVI video") from None
    except OSError as exc:
        raise InputError(f"cannot read the video ({exc})", path=path,
                         fix="check the file and its permissions") from None


def _scan(container, stream, path) -> tuple[int, float]:
    """Frame count and average frame rate as torchcodec's exact mode reports them: packets of the
    stream, ``count / (max(pts + duration) - min(pts))``, header rate if that span is zero."""
    import av

    count, begin, end = 0, None, None
    try:
        for packet in container.demux(stream):
            if packet.size == 0 or packet.is_discard:
                continue
            pts = packet.pts if packet.pts is not None else packet.dts
            if pts is None:
                continue
            count += 1
            begin = pts if begin is None else min(begin, pts)
            end = pts + (packet.duration or 0) if end is None else max(end, pts + (packet.duration or 0))
    except av.FFmpegError as exc:
        raise InputError(f"the video cannot be read ({exc.strerror or exc}): truncated or damaged file", path=path,
                         fix="re-export or re-download the video") from None
    fps = None
    if count and end is not None and end != begin:
        fps = count / float((end - begin) * stream.time_base)
    if fps is None and stream.average_rate:
        fps = float(stream.average_rate)
    return count, fps or 0.0


def _decode(source, sampling: _Sampling, fps, min_frames, max_frames):
    """(resized sampled frames, their indices, frames in the file, its frame rate)."""
    import av

    path, config = sampling.path, sampling.config
    container = _open_container(source, path)
    with container:
        if not container.streams.video:
            if container.streams.audio:
                raise InputError("the file has no video stream, only audio", path=path,
                                 fix="pass a video with pictures (an audio file goes to --audio)")
            raise InputError("the video has no frames (the file holds no stream)", path=path,
                             fix="use a video with at least 2 frames")
        stream = container.streams.video[0]
        total, video_fps = _scan(container, stream, path)
        if total == 0:
            raise InputError("the video has no frames", path=path, fix="use a video with at least 2 frames")
        if video_fps <= 0:
            raise InputError("the video has no frame rate", path=path, fix="re-encode the video (e.g. with ffmpeg)")
        n = sample_frame_count(total, video_fps, config, fps, min_frames, max_frames, path)
        wanted = [int(i) for i in _linspace_f32(0, total - 1, n)]
        container.seek(0, stream=stream)
        frames: dict[int, np.ndarray] = {}
        decoded = 0
        try:
            for frame in container.decode(stream):
                if decoded in wanted:
                    frames[decoded] = sampling.convert(frame.to_ndarray(format="rgb24"), n)
                decoded += 1
                if decoded > wanted[-1]:
                    break
        except av.FFmpegError as exc:
            raise InputError(f"the video cannot be decoded ({exc.strerror or exc}): truncated or damaged file",
                             path=path, fix="re-export or re-download the video") from None
    if not frames:
        raise InputError("the video has no decodable frames", path=path, fix="re-export or re-download the video")
    last = frames[max(frames)]  # packets that decode to no picture: repeat the last picture
    return [frames.get(i, last) for i in wanted], wanted, total, video_fps


def load_video(source, config=None, fps: float | None = None, min_frames: int | None = None,
               max_frames: int | None = None, min_pixels: int | None = None, max_pixels: int | None = None,
               total_pixels: float | None = None, source_fps: float | None = None) -> VisionInput:
    """A video (path, bytes, or uint8 frames ``[T, H, W, 3]``) -> patches, grid and timing.

    Sampling, sizes and limits follow qwen-omni-utils' ``fetch_video``; ``source_fps`` is the frame
    rate of a frames array (default: ``fps``, i.e. every frame is kept)."""
    cfg = _config(config)
    path = _describe(source)
    sampling = _Sampling(cfg, min_pixels, max_pixels, total_pixels, path)
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 4 or source.shape[-1] != 3:
            raise InputError(f"video arrays must be uint8 [frames, height, width, 3], got {source.dtype} "
                             f"{list(source.shape)}", fix="pass decoded RGB frames, or the video file")
        if source.shape[0] == 0:
            raise InputError("the video array has no frames", fix="pass at least 2 frames")
        total, video_fps = source.shape[0], float(source_fps or (fps or cfg.fps))
        n = sample_frame_count(total, video_fps, cfg, fps, min_frames, max_frames)
        indices = [int(i) for i in _linspace_f32(0, total - 1, n)]
        frames = [sampling.convert(source[i], n) for i in indices]
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise InputError("the video bytes are empty", fix="pass the content of a video file")
        frames, indices, total, video_fps = _decode(source, sampling, fps, min_frames, max_frames)
    elif path is not None:
        p = Path(path)
        if not p.exists():
            raise InputError("video file does not exist", path=p, fix="check the path of the video")
        if p.is_dir():
            raise InputError("this is a directory, not a video file", path=p, fix="pass a video file (MP4, MKV, ...)")
        frames, indices, total, video_fps = _decode(p, sampling, fps, min_frames, max_frames)
    else:
        raise InputError(f"unsupported video input of type {type(source).__name__}",
                         fix="pass a file path, the file's bytes or a uint8 array [frames, height, width, 3]")
    if min(sampling.size) < cfg.factor:
        raise InputError(f"the video's frames would be {sampling.size[1]}x{sampling.size[0]} px, smaller than one "
                         f"{cfg.factor}x{cfg.factor} px token", path=path, fix="use a larger video")
    pixels, grid = patchify(normalize(np.stack(frames), cfg), cfg)
    sample_fps = len(indices) / max(total, 1e-6) * video_fps
    return VisionInput(pixels, grid, "video", second_per_grid=cfg.temporal_patch_size / sample_fps, fps=sample_fps,
                       frame_indices=indices, source_fps=video_fps, total_frames=total)


# -- encoder index inputs ---------------------------------------------------------------------

def _grids(grid_thw_list) -> list[tuple[int, int, int]]:
    grids = [tuple(int(v) for v in g) for g in np.asarray(grid_thw_list, dtype=np.int64).reshape(-1, 3)]
    if not grids:
        raise InputError("no image or video grid given", fix="pass at least one (t, h, w) grid")
    for grid in grids:
        if min(grid) < 1:
            raise InputError(f"grid {grid} is empty", fix="pass (t, h, w) grids of positive sizes")
    return grids


def encoder_inputs(grid_thw_list, config=None) -> dict[str, np.ndarray]:
    """The ``vision_encoder`` graph's index inputs for the concatenated grids, exactly as
    transformers computes them (``get_vision_position_ids``, ``get_vision_attention_seqlens``,
    ``get_vision_window_index``): ``position_ids [patches, 2]``, ``window_index [merged]``,
    ``cu_seqlens [frames + 1]`` and ``cu_window_seqlens [windows + 1]`` (int64)."""
    cfg = _config(config)
    m = cfg.spatial_merge_size
    unit = m * m
    window = cfg.window_size // m // cfg.patch_size  # windows side, in merged tokens
    positions, windows, cu_window, seqlens = [], [], [0], []
    offset = 0
    for t, h, w in _grids(grid_thw_list):
        if h % m or w % m:
            raise InputError(f"grid ({t}, {h}, {w}) is not a multiple of the merge size {m}",
                             fix="prepare the image with vision_prep.preprocess_image")
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)  # noqa: E731
        positions.append(np.tile(np.stack([block(hpos), block(wpos)], axis=-1), (t, 1)))
        seqlens += [h * w] * t

        lh, lw = h // m, w // m
        pad_h, pad_w = window - lh % window, window - lw % window
        nh, nw = (lh + pad_h) // window, (lw + pad_w) // window
        index = np.full((t, lh + pad_h, lw + pad_w), -100, dtype=np.int64)
        index[:, :lh, :lw] = np.arange(t * lh * lw).reshape(t, lh, lw)
        index = index.reshape(t, nh, window, nw, window).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, window * window)
        counts = (index != -100).sum(axis=2).reshape(-1)
        flat = index.reshape(-1)
        windows.append(flat[flat != -100] + offset)
        cu_window.extend((np.cumsum(counts) * unit + cu_window[-1]).tolist())
        offset += t * lh * lw
    cu_window = np.asarray(cu_window, dtype=np.int64)
    keep = np.concatenate([[True], cu_window[1:] != cu_window[:-1]])  # unique_consecutive
    return {
        "position_ids": np.concatenate(positions).astype(np.int64),
        "window_index": np.concatenate(windows).astype(np.int64),
        "cu_seqlens": np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int64),
        "cu_window_seqlens": cu_window[keep],
    }


def concat_inputs(items: Sequence[VisionInput]) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Patches of several images/videos concatenated (one encoder call), and their grids."""
    if not items:
        raise InputError("no image or video to encode", fix="pass at least one")
    return np.concatenate([i.pixel_values for i in items]), [i.grid_thw for i in items]
