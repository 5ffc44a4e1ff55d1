"""Test media made here, never downloaded: speech (espeak-ng), tones, audio files in several
formats (soundfile), videos with or without an audio track (PyAV).

Shared by the audio and vision tests; makers for images and frames live in their own section
below. espeak-ng is a Debian package (.ci/run installs it with ffmpeg); a missing tool is an
error that names the install command, not a skip.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

APT_FIX = "apt-get update && apt-get install -y ffmpeg espeak-ng"


def require_tool(name: str) -> str:
    """The path of program ``name``; RuntimeError naming the install command if it is missing."""
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"the test media need the program {name!r}: {APT_FIX}")
    return path


# ---------------------------------------------------------------------------------------------
# audio


def speech_wav(path: str | Path, text: str = "The quick brown fox jumps over the lazy dog.",
               voice: str = "en", words_per_minute: int = 175) -> Path:
    """Speak ``text`` with espeak-ng into ``path``: a 22050 Hz mono 16-bit WAV file."""
    path = Path(path)
    subprocess.run([require_tool("espeak-ng"), "-v", voice, "-s", str(words_per_minute), "-w", str(path), text],
                   check=True, capture_output=True)
    return path


def speech(text: str = "The quick brown fox jumps over the lazy dog.", tmp_dir: str | Path | None = None,
           **kwargs) -> tuple[np.ndarray, int]:
    """(samples float32 [n], rate) of espeak-ng speaking ``text``."""
    import tempfile

    import soundfile

    with tempfile.TemporaryDirectory(dir=tmp_dir) as d:
        samples, rate = soundfile.read(speech_wav(Path(d) / "speech.wav", text, **kwargs), dtype="float32")
    return samples, rate


def tone(seconds: float, rate: int = 16000, freqs: Sequence[float] = (440.0,), amplitude: float = 0.3,
         noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """float32 sine tones, one channel per frequency: [n] for one, [n, channels] for several;
    ``noise`` adds Gaussian noise of that standard deviation."""
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    channels = [amplitude * np.sin(2 * np.pi * f * t) for f in freqs]
    out = np.stack(channels, axis=1) if len(channels) > 1 else channels[0]
    if noise:
        out = out + noise * np.random.default_rng(seed).standard_normal(out.shape)
    return out.astype(np.float32)


def chirp(seconds: float, rate: int = 16000, start: float = 200.0, stop: float = 3000.0,
          amplitude: float = 0.3) -> np.ndarray:
    """A float32 linear sweep from ``start`` to ``stop`` Hz (rich in mel bands)."""
    t = np.arange(int(round(seconds * rate))) / rate
    phase = 2 * np.pi * (start * t + (stop - start) * t * t / (2 * max(seconds, 1e-9)))
    return (amplitude * np.sin(phase)).astype(np.float32)


def write_audio(path: str | Path, samples: np.ndarray, rate: int, format: str | None = None,
                subtype: str | None = None) -> Path:
    """Write ``samples`` ([n] or [n, channels]) with soundfile; the format follows the suffix
    (``.wav``, ``.flac``, ``.mp3``, ``.ogg``) unless given."""
    import soundfile

    path = Path(path)
    if format is None and path.suffix.lower() == ".mp3":
        format = "MP3"
    soundfile.write(path, samples, rate, format=format, subtype=subtype)
    return path


# ---------------------------------------------------------------------------------------------
# video (with or without an audio track)


def gradient_frame(index: int, height: int, width: int) -> np.ndarray:
    """An RGB uint8 frame [height, width, 3] that changes with ``index`` (moving gradient + square)."""
    y, x = np.mgrid[0:height, 0:width]
    frame = np.stack([(x * 255 // max(width - 1, 1) + 12 * index) % 256,
                      (y * 255 // max(height - 1, 1) + 7 * index) % 256,
                      np.full_like(x, (40 * index) % 256)], axis=-1).astype(np.uint8)
    size = max(2, min(height, width) // 4)
    top, left = (3 * index) % max(height - size, 1), (5 * index) % max(width - size, 1)
    frame[top:top + size, left:left + size] = 255
    return frame


def write_video(path: str | Path, seconds: float = 2.0, fps: float = 10, size: tuple[int, int] = (64, 48),
                frames: Callable[[int], np.ndarray] | Sequence[np.ndarray] | None = None,
                audio: np.ndarray | None = None, audio_rate: int = 16000, audio_codec: str = "aac",
                video_codec: str = "mpeg4") -> Path:
    """Write a video with PyAV: ``size`` = (width, height); ``frames`` is a function of the frame
    index returning an RGB uint8 [height, width, 3] array, or a sequence of them (default:
    :func:`gradient_frame`, ``seconds * fps`` frames). ``audio`` ([n] mono or [n, channels] float32
    at ``audio_rate``) becomes the audio track; without it the video has none. The container
    follows the suffix (``.mp4``, ``.mkv``, ``.avi``, ...)."""
    import av
    from fractions import Fraction

    path = Path(path)
    width, height = size
    if frames is None:
        count = int(round(seconds * fps))
        frames = [gradient_frame(i, height, width) for i in range(count)]
    elif callable(frames):
        frames = [frames(i) for i in range(int(round(seconds * fps)))]
    with av.open(str(path), mode="w") as container:
        video = container.add_stream(video_codec, rate=Fraction(fps).limit_denominator(1000))
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        track = None
        if audio is not None:
            audio = np.asarray(audio, dtype=np.float32)
            planar = np.ascontiguousarray(audio[None, :] if audio.ndim == 1 else audio.T)
            layout = {1: "mono", 2: "stereo"}[planar.shape[0]]
            track = container.add_stream(audio_codec, rate=audio_rate)
            track.layout = layout
        for frame in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(np.asarray(frame, np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
        if track is not None:
            # PyAV converts to the encoder's sample format and frame size itself
            frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout=layout)
            frame.sample_rate = audio_rate
            for packet in track.encode(frame):
                container.mux(packet)
            for packet in track.encode(None):
                container.mux(packet)
    return path


def ffmpeg_s16(path: str | Path) -> np.ndarray:
    """The audio track as the ``ffmpeg`` program decodes it for audioread (``-f s16le``), int16
    interleaved: what qwen-omni-utils reads from a video."""
    out = subprocess.run([require_tool("ffmpeg"), "-nostdin", "-loglevel", "error", "-i", str(path), "-f", "s16le",
                          "-"], check=True, capture_output=True).stdout
    return np.frombuffer(out, dtype="<i2")


# ---------------------------------------------------------------------------------------------
# images and frames (vision tests add their makers below)


def drawn_image(width: int, height: int, mode: str = "RGB", seed: int = 0):
    """A PIL image drawn here: a colored background, ellipses, a line and text (edges and flat
    areas, like a picture). ``mode`` RGBA adds a transparent border (alpha 0 outside a rectangle,
    200 inside); other modes (L, P, ...) are converted from RGB."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    color = lambda: tuple(int(v) for v in rng.integers(0, 256, 3))  # noqa: E731
    image = Image.new("RGB", (width, height), color())
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        draw.ellipse((x0, y0, x0 + max(width // 3, 1), y0 + max(height // 3, 1)), fill=color())
    draw.line((0, 0, width, height), fill=color(), width=max(1, min(width, height) // 30))
    draw.text((width // 10, height // 2), "Omni", fill=(255, 255, 255))
    if mode == "RGBA":
        alpha = Image.new("L", (width, height), 0)
        ImageDraw.Draw(alpha).rectangle((width // 4, height // 4, width * 3 // 4, height * 3 // 4), fill=200)
        image = image.convert("RGBA")
        image.putalpha(alpha)
    elif mode != "RGB":
        image = image.convert(mode)
    return image


def write_image(path: str | Path, width: int = 160, height: int = 120, mode: str = "RGB", seed: int = 0,
                **save_options) -> Path:
    """Save :func:`drawn_image` to ``path``; the format follows the suffix (.png, .jpg, .webp, ...)."""
    path = Path(path)
    drawn_image(width, height, mode, seed).save(path, **save_options)
    return path


def write_empty_video(path: str | Path, size: tuple[int, int] = (64, 48)) -> Path:
    """An MP4 whose video stream got no frame: FFmpeg writes a header without any stream."""
    import av

    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        container.start_encoding()
    return path
