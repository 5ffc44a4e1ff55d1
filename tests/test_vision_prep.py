"""Torch-free image and video preparation (omni_runtime.media.vision_prep) against the references.

- Images: ``preprocess_image`` equals transformers' ``Qwen2VLImageProcessor`` as the tiny
  checkpoint's ``Qwen2_5OmniProcessor`` loads it (resize, rescale, normalize, patchify), for
  drawn images of several sizes and modes given as paths, bytes, arrays and PIL images.
- Videos: ``load_video`` equals qwen-omni-utils' ``fetch_video`` (frame count and indices, sample
  fps, frame size, resize) followed by the processor's ``Qwen2VLVideoProcessor``, on videos
  written here with PyAV.
- Bad media raise InputError naming the file and a fix.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from omni_export.testkit import media
from omni_runtime.errors import InputError
from omni_runtime.media.vision_prep import (VisionConfig, load_image, load_video, preprocess_image, resize_float,
                                      resize_uint8, smart_resize, token_count)

EXACT = 1e-6  # same float32 operations; observed difference 0


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    from transformers import Qwen2_5OmniProcessor

    return Qwen2_5OmniProcessor.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def config(tiny_bundle) -> VisionConfig:
    from omni_runtime.bundle.manifest import load_manifest

    return VisionConfig.from_manifest(load_manifest(tiny_bundle).config["vision"])


def _reference_image(processor, image):
    out = processor.image_processor(images=[image], return_tensors="np")
    return out["pixel_values"], tuple(int(v) for v in out["image_grid_thw"][0])


# -- images ------------------------------------------------------------------------------------

@pytest.mark.parametrize("width,height,mode", [
    (150, 100, "RGB"),     # upscaled to 168x112
    (640, 480, "RGB"),     # downscaled to 644x476 (both directions differ)
    (333, 777, "RGBA"),    # transparency composited on white
    (40, 30, "L"),         # grayscale, below min_pixels: upscaled
    (1000, 37, "P"),       # palette, extreme aspect ratio
    (224, 224, "RGB"),     # already a multiple of 28: no resize
    (1300, 1000, "RGB"),   # large
])
def test_image_equals_processor(processor, config, width, height, mode):
    image = media.drawn_image(width, height, mode, seed=width)
    ref, grid = _reference_image(processor, image)
    got = preprocess_image(image, config)
    assert got.grid_thw == grid and got.kind == "image"
    assert got.pixel_values.dtype == np.float32 and got.pixel_values.shape == ref.shape
    assert np.abs(got.pixel_values - ref).max() <= EXACT
    assert got.token_count() == math.prod(grid) // 4


@pytest.mark.parametrize("min_pixels,max_pixels", [(3136, 50176), (200704, 401408)])
def test_image_pixel_limits(processor, min_pixels, max_pixels):
    """Other min/max pixels (a bundle's config): strong downscale (wide filter) and upscale."""
    import dataclasses

    config = dataclasses.replace(VisionConfig(), min_pixels=min_pixels, max_pixels=max_pixels)
    image = media.drawn_image(640, 480, seed=5)
    out = processor.image_processor(images=[image], size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                                    return_tensors="np")
    got = preprocess_image(image, config)
    assert got.grid_thw == tuple(int(v) for v in out["image_grid_thw"][0])
    assert np.abs(got.pixel_values - out["pixel_values"]).max() <= EXACT


def test_image_sources(processor, config, tmp_path):
    """Path (PNG, JPEG), bytes, numpy array and PIL image give the processor's result."""
    from PIL import Image

    png = media.write_image(tmp_path / "picture.png", 300, 200, seed=1)
    jpeg = media.write_image(tmp_path / "picture.jpg", 300, 200, seed=2, quality=80)
    for path in (png, jpeg):
        ref, grid = _reference_image(processor, Image.open(path))
        for source in (path, str(path), path.read_bytes(), np.asarray(Image.open(path).convert("RGB"))):
            got = preprocess_image(source, config)
            assert got.grid_thw == grid
            assert np.abs(got.pixel_values - ref).max() <= EXACT
    gray = media.drawn_image(90, 130, "L")  # a 2-D array: transformers takes it as a mode L image
    ref, _ = _reference_image(processor, gray)
    gray = np.asarray(gray)
    assert np.abs(preprocess_image(gray, config).pixel_values - ref).max() <= EXACT


def test_load_image_converts_to_rgb():
    rgba = media.drawn_image(64, 48, "RGBA")
    out = load_image(rgba)
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    assert (out[0, 0] == 255).all()  # alpha 0 at the border: white
    assert load_image(np.zeros((5, 7), np.uint8)).shape == (5, 7, 3)


@pytest.mark.parametrize("height,width", [(1, 30), (28, 28), (100, 150), (480, 640), (1080, 1920), (37, 1000),
                                          (4000, 3000), (5000, 4000), (57, 91), (29, 5000)])
@pytest.mark.parametrize("limits", [(3136, 12845056), (56 * 56, 28 * 28 * 1280), (100352, 602112)])
def test_smart_resize_equals_transformers(height, width, limits):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as reference

    assert smart_resize(height, width, 28, *limits) == reference(height, width, 28, *limits)


@pytest.mark.parametrize("shape,size", [((100, 150), (112, 168)), ((480, 640), (476, 644)), ((333, 777), (168, 392)),
                                        ((30, 20), (56, 28)), ((1000, 37), (1008, 28)), ((300, 225), (840, 630))])
def test_resize_uint8_equals_torch(shape, size):
    """Noise is the hardest case for integer rounding: bit-exact with torchvision's uint8 kernel."""
    import torch
    import torchvision.transforms.v2.functional as F

    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    ref = F.resize(torch.from_numpy(image).permute(2, 0, 1).contiguous(), list(size),
                   interpolation=F.InterpolationMode.BICUBIC, antialias=True).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(resize_uint8(image, *size), ref)


@pytest.mark.parametrize("shape,size", [((100, 150), (112, 168)), ((480, 640), (476, 644)), ((360, 640), (252, 448)),
                                        ((57, 91), (56, 84)), ((720, 1280), (336, 588))])
def test_resize_float_equals_torchvision(shape, size):
    """qwen-omni-utils' frame resize (torchvision v1: float32 resampling, round). The last bit of
    a float32 sum depends on the compiler's operation order, so a value whose exact result is a
    rounding tie (x.5) may round either way; every other value is equal."""
    import torch
    import torchvision.transforms.functional as F1
    from torchvision.transforms import InterpolationMode

    height, width = shape
    frames = np.stack([media.gradient_frame(0, *shape), media.gradient_frame(5, *shape),
                       np.asarray(media.drawn_image(width, height, seed=3)),
                       np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)])
    ref = F1.resize(torch.from_numpy(frames).permute(0, 3, 1, 2), list(size), interpolation=InterpolationMode.BICUBIC,
                    antialias=True).permute(0, 2, 3, 1).numpy().astype(int)
    got = resize_float(frames, *size).astype(int)
    values = resize_float(frames, *size, to_uint8=False)
    differ = got != ref
    assert np.abs(got - ref).max() <= 1
    assert (np.abs(values[differ] % 1 - 0.5) < 1e-3).all()  # only rounding ties differ
    assert differ.mean() < 2e-3


# -- videos ------------------------------------------------------------------------------------

VIDEOS = {  # name: (size (w, h), fps, seconds, codec, suffix)
    "392x280-10fps": ((392, 280), 10, 2.0, "mpeg4", ".mp4"),    # 28-multiples: no resize
    "200x150-25fps": ((200, 150), 25, 1.6, "mpeg4", ".mp4"),    # upscaled to the video minimum
    "320x240-7fps-h264": ((320, 240), 7, 3.0, "libx264", ".mkv"),
    "640x360-30fps": ((640, 360), 30, 1.0, "mpeg4", ".avi"),    # downscaled
    "3-frames": ((112, 112), 10, 0.3, "mpeg4", ".mp4"),         # fewer frames than min_frames
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    return {name: media.write_video(folder / f"{name}{suffix}", seconds=seconds, fps=fps, size=size, video_codec=codec)
            for name, (size, fps, seconds, codec, suffix) in VIDEOS.items()}


def _reference_video(processor, path):
    from qwen_omni_utils.v2_5.vision_process import fetch_video

    (frames, meta), sample_fps = fetch_video({"video": str(path)}, return_video_sample_fps=True,
                                             return_video_metadata=True)
    out = processor.video_processor(videos=[frames], do_sample_frames=False, return_tensors="np")
    return out, meta, sample_fps


@pytest.mark.parametrize("name", list(VIDEOS))
def test_video_equals_qwen_omni_utils(processor, config, videos, name):
    ref, meta, sample_fps = _reference_video(processor, videos[name])
    got = load_video(videos[name], config)
    assert got.kind == "video"
    assert got.grid_thw == tuple(int(v) for v in ref["video_grid_thw"][0])
    assert got.frame_indices == [int(i) for i in meta["frames_indices"]]
    assert got.total_frames == meta["total_num_frames"]
    assert got.source_fps == pytest.approx(meta["fps"], rel=1e-12)
    assert got.fps == pytest.approx(sample_fps, rel=1e-12)
    assert got.second_per_grid == pytest.approx(2 / sample_fps, rel=1e-12)
    assert got.pixel_values.shape == ref["pixel_values_videos"].shape
    assert np.abs(got.pixel_values - ref["pixel_values_videos"]).max() <= EXACT
    assert got.token_count() == math.prod(got.grid_thw) // 4


def test_video_sources(processor, config, videos):
    """Bytes and decoded frames give the file's result."""
    import av

    path = videos["392x280-10fps"]
    from_path = load_video(path, config)
    from_bytes = load_video(path.read_bytes(), config)
    np.testing.assert_array_equal(from_bytes.pixel_values, from_path.pixel_values)
    with av.open(str(path)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    from_array = load_video(frames, config, source_fps=10)
    assert from_array.frame_indices == from_path.frame_indices
    np.testing.assert_array_equal(from_array.pixel_values, from_path.pixel_values)


def test_video_options(config, videos):
    """fps and frame limits as in qwen-omni-utils: 4 fps of a 10 fps video, at most 6 frames."""
    from qwen_omni_utils.v2_5.vision_process import fetch_video

    path = videos["392x280-10fps"]
    ele = {"video": str(path), "fps": 4.0, "max_frames": 6, "max_pixels": 200704}
    (frames, meta), sample_fps = fetch_video(ele, return_video_sample_fps=True, return_video_metadata=True)
    got = load_video(path, config, fps=4.0, max_frames=6, max_pixels=200704)
    assert got.frame_indices == [int(i) for i in meta["frames_indices"]] and len(got.frame_indices) == 6
    assert got.grid_thw[1:] == (frames.shape[2] // 14, frames.shape[3] // 14)
    assert got.fps == pytest.approx(sample_fps)


# -- bad media ---------------------------------------------------------------------------------

def _error(call, *needles):
    with pytest.raises(InputError) as info:
        call()
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    assert info.value.fix
    return info.value


def test_bad_images(config, tmp_path):
    missing = tmp_path / "nope.png"
    _error(lambda: preprocess_image(missing, config), str(missing), "does not exist")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    _error(lambda: preprocess_image(garbage, config), str(garbage), "not an image")
    png = media.write_image(tmp_path / "whole.png", 200, 150)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])
    _error(lambda: preprocess_image(truncated, config), str(truncated), "truncated")
    tiny = media.write_image(tmp_path / "one.png", 1, 1)
    _error(lambda: preprocess_image(tiny, config), str(tiny), "1x1 px", "at least 28 px")
    _error(lambda: preprocess_image(np.zeros((1, 1, 3), np.uint8), config), "1x1 px")
    _error(lambda: preprocess_image(media.drawn_image(29, 6000), config), "aspect ratio")
    _error(lambda: preprocess_image(b"", config), "empty")
    _error(lambda: preprocess_image(12345, config), "unsupported image input of type int")
    _error(lambda: preprocess_image(np.zeros((8, 8, 3), np.float32), config), "uint8")
    _error(lambda: preprocess_image(tmp_path, config), "directory")
    clip = media.write_video(tmp_path / "clip.mp4", seconds=0.5)
    _error(lambda: preprocess_image(clip, config), str(clip), "video file")


def test_bad_videos(config, tmp_path):
    missing = tmp_path / "nope.mp4"
    _error(lambda: load_video(missing, config), str(missing), "does not exist")
    empty = media.write_empty_video(tmp_path / "empty.mp4")
    _error(lambda: load_video(empty, config), str(empty), "no frames")
    one = media.write_video(tmp_path / "one.mp4", seconds=0.1, fps=10)
    _error(lambda: load_video(one, config), str(one), "1 frame", "at least 2")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 20)
    _error(lambda: load_video(text, config), str(text), "not a video file")
    sound = media.write_audio(tmp_path / "sound.wav", media.tone(0.5), 16000)
    _error(lambda: load_video(sound, config), str(sound), "no video stream")
    _error(lambda: load_video(b"", config), "empty")
    _error(lambda: load_video(3.5, config), "unsupported video input of type float")
    _error(lambda: load_video(np.zeros((4, 8, 8), np.uint8), config), "uint8 [frames, height, width, 3]")
    _error(lambda: load_video(np.zeros((0, 56, 56, 3), np.uint8), config), "no frames")


def test_token_count():
    assert token_count((1, 8, 10)) == 20 and token_count((3, 12, 20), merge_size=2) == 180
    assert token_count((2, 4, 4), merge_size=1) == 32


def test_preparation_is_torch_free(tmp_path):
    """Preparing an image and a video imports neither torch nor transformers."""
    import subprocess
    import sys

    image = media.write_image(tmp_path / "a.png", 120, 90)
    video = media.write_video(tmp_path / "v.mp4", seconds=1.0, size=(96, 72))
    code = (f"import sys; from omni_runtime.media.vision_prep import preprocess_image, load_video, encoder_inputs\n"
            f"a = preprocess_image({str(image)!r}); b = load_video({str(video)!r})\n"
            f"encoder_inputs([a.grid_thw, b.grid_thw])\n"
            f"bad = [m for m in ('torch', 'transformers', 'torchvision') if m in sys.modules]\n"
            f"assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
