"""Audio preparation on the host, in numpy (no torch): decode, resample, log-mel, graph inputs.

The steps reproduce what Qwen2.5-Omni's own tooling does before its audio tower runs:

* :func:`load_audio` decodes a file, bytes or array to mono float32 at 16 kHz the way
  ``qwen_omni_utils.process_audio_info`` does (``librosa.load(sr=16000)``): soundfile for the
  formats libsndfile reads (wav, flac, mp3, ogg, ...), else the audio track decoded by FFmpeg
  to 16-bit integers (qwen-omni-utils runs the ``ffmpeg`` program through audioread; here
  PyAV, the same FFmpeg libraries, converts to ``s16`` the same way), channels averaged, then
  resampled with soxr at librosa's ``soxr_hq`` quality and cut/padded to
  ``ceil(samples * 16000 / rate)`` as ``librosa.resample`` does.
* :func:`log_mel` is ``WhisperFeatureExtractor`` as ``Qwen2_5OmniProcessor`` calls it
  (``padding="max_length"``, truncation to ``chunk_length`` seconds, ``return_attention_mask``):
  the log-mel of the zero-padded waveform, clamped to 8 below its maximum, keeping only the
  frames the processor's ``feature_attention_mask`` marks (``ceil(samples / hop_length)``).
* :func:`encoder_inputs` splits the features into chunks of ``2 * n_window`` frames (2 s) and
  computes the index inputs of the ``audio_encoder`` graph; :func:`audio_token_counts` gives
  the number of ``<|AUDIO|>`` placeholders of each audio (25 per second).

Decoding needs ``soundfile``, ``soxr`` and ``av`` (``pip install omni-runtime[media]``); they are
imported when first needed. Every problem with the user's media is an :class:`InputError`
naming the file (or the argument) and the fix.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence

import numpy as np

from omni_runtime.bundle.config import AudioConfig
from omni_runtime.errors import InputError, OmniError

SAMPLING_RATE = AudioConfig.sampling_rate  # 16000

MEDIA_FIX = "pip install 'omni-runtime[media]' (soundfile, soxr, av, pillow)"
AUDIO_FIX = "pass a readable audio file (wav, flac, mp3, ogg, m4a, ...) or a video file with an audio track"


def as_config(config: AudioConfig | Mapping | None) -> AudioConfig:
    if config is None:
        return AudioConfig()
    if isinstance(config, AudioConfig):
        return config
    return AudioConfig.from_manifest(config)


# ---------------------------------------------------------------------------------------------
# decoding


def _media_module(name: str):
    try:
        return __import__(name)
    except ImportError as e:
        raise OmniError(f"reading audio needs the Python package {name!r}, which is not installed ({e})",
                        fix=MEDIA_FIX) from e


def load_audio(source, sampling_rate: int = SAMPLING_RATE, *, source_rate: int | None = None,
               start: float = 0.0, end: float | None = None, name: str | None = None) -> np.ndarray:
    """Mono float32 samples at ``sampling_rate`` Hz, decoded as qwen-omni-utils does.

    ``source`` is a path (``str``/``os.PathLike``, ``file://`` prefix allowed), the bytes of a
    file, or a 1-D numpy array of samples at ``source_rate`` Hz (default: already at
    ``sampling_rate``, as qwen-omni-utils assumes). Audio files and the audio track of video
    files are accepted. ``start``/``end`` (seconds) keep a part, as the ``audio_start`` /
    ``audio_end`` (``video_start`` / ``video_end``) keys of a Qwen message do. ``name`` labels
    bytes/arrays in error messages.
    """
    _check_span(start, end)
    if isinstance(source, np.ndarray) or (isinstance(source, (list, tuple)) and not isinstance(source, str)):
        samples = _from_array(source, name or "audio array")
        rate = sampling_rate if source_rate is None else source_rate
        # qwen-omni-utils slices an array at [int(rate * start) : int(rate * end)]
        samples = samples[int(rate * start): None if end is None else int(rate * end)]
        if samples.size == 0:
            raise InputError(f"no samples between {start} s and {end} s", path=name or "audio array",
                             fix="check audio_start / audio_end against the audio's length")
        if rate == sampling_rate:
            return samples
        if not isinstance(rate, (int, np.integer)) or isinstance(rate, bool) or rate <= 0:
            raise InputError(f"source_rate must be a positive integer, got {rate!r}", param="source_rate",
                             fix="give the sampling rate of the array in Hz, e.g. 44100")
        return _resample(samples, int(rate), sampling_rate)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = name or "audio bytes"
        if not data:
            raise InputError("the audio data is empty (0 bytes)", path=label, fix=AUDIO_FIX)
        samples, rate = _decode(lambda: io.BytesIO(data), label)
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if isinstance(path, str) and path.startswith("file://"):
            path = path[len("file://"):]
        if isinstance(path, str) and path.startswith(("http://", "https://")):
            raise InputError("audio URLs are not fetched", path=path, fix="download the file and pass its path")
        if not os.path.exists(path):
            raise InputError("audio file does not exist", path=path, fix="check the path")
        if os.path.isdir(path):
            raise InputError("this is a directory, not an audio file", path=path, fix=AUDIO_FIX)
        if os.path.getsize(path) == 0:
            raise InputError("the audio file is empty (0 bytes)", path=path, fix=AUDIO_FIX)
        samples, rate = _decode(lambda: path, path)
        label = path
    else:
        raise InputError(f"unsupported audio input of type {type(source).__name__}",
                         param="audio", fix="pass a file path, the bytes of a file or a 1-D numpy array")
    if samples.shape[-1] == 0:
        raise InputError("the audio contains no samples (empty or truncated file?)", path=label, fix=AUDIO_FIX)
    if start or end is not None:  # librosa.load's offset / duration, in samples of the file's rate
        first = int(start * rate)
        stop = None if end is None else first + int((end - start) * rate)
        samples = samples[..., first:stop]
        if samples.shape[-1] == 0:
            raise InputError(f"no audio between {start} s and {end} s", path=label,
                             fix="check audio_start / audio_end against the audio's length")
    return _resample(samples, rate, sampling_rate)


def _check_span(start, end) -> None:
    ok = isinstance(start, (int, float)) and not isinstance(start, bool) and start >= 0
    ok = ok and (end is None or (isinstance(end, (int, float)) and not isinstance(end, bool) and end > start))
    if not ok:
        raise InputError(f"bad audio span start={start!r}, end={end!r}", param="audio_start",
                         fix="use 0 <= start < end, in seconds (end may be omitted)")


def _from_array(array, label: str) -> np.ndarray:
    try:
        samples = np.asarray(array)
    except (TypeError, ValueError) as e:
        raise InputError(f"the audio array is not numeric ({e})", path=label,
                         fix="pass a 1-D float array of samples") from None
    if samples.dtype.kind not in "fiu":
        raise InputError(f"the audio array has dtype {samples.dtype}, not numbers", path=label,
                         fix="pass a 1-D float array of samples")
    if samples.ndim != 1:
        raise InputError(f"the audio array has shape {samples.shape}: only mono (1-D) arrays are supported",
                         path=label, fix="average the channels first, e.g. samples.mean(axis=0)")
    if samples.size == 0:
        raise InputError("the audio array is empty", path=label, fix="pass at least 0.03 s of samples")
    samples = samples.astype(np.float32, copy=False)
    if not np.isfinite(samples).all():
        raise InputError("the audio array contains NaN or infinite values", path=label,
                         fix="pass finite samples (normally within [-1, 1])")
    return samples


def _decode(open_source, label: str) -> tuple[np.ndarray, int]:
    """(samples [channels, n] or [n] float32, rate): soundfile first, FFmpeg (PyAV) otherwise."""
    sf = _media_module("soundfile")
    try:
        with sf.SoundFile(open_source()) as f:
            rate = f.samplerate
            samples = f.read(dtype="float32", always_2d=False).T
        return samples, rate
    except (sf.LibsndfileError, RuntimeError, TypeError):
        pass  # not a format libsndfile reads: librosa then falls back to FFmpeg too
    return _decode_ffmpeg(open_source(), label)


def _decode_ffmpeg(source, label: str) -> tuple[np.ndarray, int]:
    """The first audio stream decoded to 16-bit integers (as ``ffmpeg -f s16le``), then float32 as
    librosa's ``buf_to_float``: interleaved int16 / 32768, reshaped to [channels, n]."""
    av = _media_module("av")
    try:
        container = av.open(source, mode="r")
    except Exception as e:  # PyAV raises many error types (av.FFmpegError, ValueError, ...)
        raise InputError(f"cannot decode the audio: not an audio or video file FFmpeg reads ({_short(e)})",
                         path=label, fix=AUDIO_FIX) from None
    with container:
        streams = container.streams.audio
        if not streams:
            raise InputError("the file has no audio track", path=label,
                             fix="pass a file with sound (for a video, one with an audio track)")
        stream = streams[0]
        resampler = None
        chunks, channels, rate = [], None, None
        try:
            for frame in container.decode(stream):
                if resampler is None:
                    channels, rate = frame.layout.nb_channels, frame.sample_rate
                    resampler = av.AudioResampler(format="s16", layout=frame.layout.name, rate=rate)
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            if resampler is not None:
                for out in resampler.resample(None):
                    chunks.append(out.to_ndarray().reshape(-1))
        except Exception as e:
            if not chunks:
                raise InputError(f"cannot decode the audio track ({_short(e)})", path=label,
                                 fix=AUDIO_FIX) from None
            # a damaged tail: keep what decoded, as the ffmpeg program does
    if not chunks:
        raise InputError("the audio track contains no samples (empty or truncated file?)", path=label, fix=AUDIO_FIX)
    interleaved = np.concatenate(chunks).astype(np.int16, copy=False)
    samples = np.float32(1.0 / 32768) * interleaved.astype(np.float32)
    if channels > 1:
        samples = samples[: samples.size - samples.size % channels].reshape(-1, channels).T
    return samples, rate


def _short(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """librosa's ``to_mono`` + ``resample(res_type="soxr_hq")`` (with ``fix_length``), in float32."""
    if samples.ndim > 1:
        samples = np.mean(samples, axis=tuple(range(samples.ndim - 1)))
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if rate == target:
        return samples
    soxr = _media_module("soxr")
    n_out = int(np.ceil(samples.shape[-1] * (float(target) / rate)))
    out = soxr.resample(samples, rate, target, quality="soxr_hq")
    if out.shape[-1] > n_out:
        out = out[:n_out]
    elif out.shape[-1] < n_out:
        out = np.pad(out, (0, n_out - out.shape[-1]))
    return np.asarray(out, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# log-mel features


def _hertz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney mel scale (linear below 1 kHz, logarithmic above)."""
    mels = 3.0 * freq / 200.0
    log_region = freq >= 1000.0
    mels[log_region] = 15.0 + np.log(freq[log_region] / 1000.0) * (27.0 / np.log(6.4))
    return mels


def _mel_to_hertz(mels: np.ndarray) -> np.ndarray:
    freq = 200.0 * mels / 3.0
    log_region = mels >= 15.0
    freq[log_region] = 1000.0 * np.exp(np.log(6.4) / 27.0 * (mels[log_region] - 15.0))
    return freq


_FILTERS: dict[tuple, np.ndarray] = {}


def mel_filters(config: AudioConfig) -> np.ndarray:
    """[n_fft/2 + 1, n_mels] slaney-normalised triangular filters from 0 to 8 kHz (Whisper's)."""
    key = (config.n_fft, config.num_mel_bins, config.sampling_rate)
    if key not in _FILTERS:
        bins = 1 + config.n_fft // 2
        mel_freqs = np.linspace(_hertz_to_mel(np.array([0.0]))[0], _hertz_to_mel(np.array([8000.0]))[0],
                                config.num_mel_bins + 2)
        filter_freqs = _mel_to_hertz(mel_freqs)
        fft_freqs = np.linspace(0, config.sampling_rate // 2, bins)
        diff = np.diff(filter_freqs)
        slopes = filter_freqs[None, :] - fft_freqs[:, None]
        down = -slopes[:, :-2] / diff[:-1]
        up = slopes[:, 2:] / diff[1:]
        filters = np.maximum(0.0, np.minimum(down, up))
        filters *= 2.0 / (filter_freqs[2:] - filter_freqs[:-2])[None, :]
        _FILTERS[key] = filters
    return _FILTERS[key]


def num_frames(num_samples: int, config: AudioConfig | Mapping | None = None) -> int:
    """Mel frames of an audio of ``num_samples`` samples: the processor's ``feature_attention_mask`` sum."""
    config = as_config(config)
    return min(-(-num_samples // config.hop_length), config.n_samples // config.hop_length)


def log_mel(audio: np.ndarray, config: AudioConfig | Mapping | None = None) -> np.ndarray:
    """Whisper log-mel features [n_mels, frames] float32 of 1-D ``audio`` at the config's rate.

    Equal (within float32 rounding, <= 1e-4) to the columns ``Qwen2_5OmniProcessor`` keeps:
    ``input_features[i][:, feature_attention_mask[i].bool()]``.
    """
    config = as_config(config)
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1 or audio.size == 0:
        raise InputError(f"log_mel needs a non-empty 1-D array of samples, got shape {audio.shape}", param="audio",
                         fix="decode the audio with load_audio first")
    hop, n_fft, total = config.hop_length, config.n_fft, config.n_samples
    half = n_fft // 2
    audio = audio[:total]  # truncation=True
    length = audio.size
    frames = num_frames(length, config)
    # The processor pads every audio to `total` samples with `padding_value`, takes a centred
    # STFT (reflect padding at both ends of the padded signal), and clamps at max - 8 over all of
    # its frames. Frames past the ones computed here only see padding: they cannot raise the max.
    needed = (length + half + hop - 1) // hop + 1  # frames whose window reaches the audio, plus one
    span = min(total, (needed - 1) * hop + half)
    signal = np.full(span, config.padding_value, dtype=np.float64)
    signal[:length] = audio[:span]
    signal = np.pad(signal, (half, half), mode="reflect")
    count = min(needed, total // hop)  # the processor drops the STFT's last frame
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    filters = mel_filters(config)
    log_spec = np.empty((config.num_mel_bins, count), dtype=np.float64)
    step = 4096  # frames per block: bounds the temporary STFT to a few MB
    for start in range(0, count, step):
        stop = min(count, start + step)
        index = np.arange(start, stop)[:, None] * hop + np.arange(n_fft)[None, :]
        spectrum = np.fft.rfft(signal[index] * window, axis=-1)
        power = spectrum.real ** 2 + spectrum.imag ** 2
        log_spec[:, start:stop] = np.log10(np.maximum(filters.T @ power.T, 1e-10))
    peak = log_spec.max()
    if count < total // hop:  # frames of pure padding (if any) are part of the processor's max
        peak = max(peak, _padding_level(config, filters))
    log_spec = np.maximum(log_spec[:, :frames], peak - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


def _padding_level(config: AudioConfig, filters: np.ndarray) -> float:
    """log10 mel energy of a frame made only of ``padding_value`` (-10 for silence)."""
    if config.padding_value == 0:
        return -10.0
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(config.n_fft) / config.n_fft)
    spectrum = np.fft.rfft(np.full(config.n_fft, config.padding_value) * window)
    power = spectrum.real ** 2 + spectrum.imag ** 2
    return float(np.log10(np.maximum(filters.T @ power, 1e-10)).max())


# ---------------------------------------------------------------------------------------------
# token counts and graph inputs


def audio_token_counts(frame_counts: Sequence[int] | np.ndarray) -> list[int]:
    """``<|AUDIO|>`` tokens of audios of ``frame_counts`` mel frames (stride-2 conv, then stride-2
    pooling: the processor's ``_get_feat_extract_output_lengths``, also used by ``get_rope_index``)."""
    lengths = np.asarray(frame_counts, dtype=np.int64)
    return [int(n) for n in ((lengths - 1) // 2 + 1 - 2) // 2 + 1]


def _features(features_list, n_mels: int | None) -> list[np.ndarray]:
    if isinstance(features_list, np.ndarray):
        features_list = [features_list]
    out = []
    for i, f in enumerate(features_list):
        f = np.asarray(f, dtype=np.float32)
        if f.ndim != 2 or (n_mels is not None and f.shape[0] != n_mels):
            want = f"[{n_mels if n_mels is not None else 'n_mels'}, frames]"
            raise InputError(f"audio features {i} have shape {f.shape}, expected {want}", param="features",
                             fix="compute them with omni_runtime.media.audio_prep.log_mel")
        tokens = audio_token_counts([f.shape[1]])[0]
        if tokens < 1:
            raise InputError(f"audio {i} is too short: {f.shape[1]} mel frames give no audio token", param="audio",
                             fix="pass at least 0.03 s of audio (3 mel frames)")
        out.append(f)
    if not out:
        raise InputError("no audio features given", param="features", fix="pass at least one audio")
    return out


def encoder_inputs(features_list, n_window: int = 100, n_mels: int | None = None) -> dict[str, np.ndarray]:
    """The ``audio_encoder`` graph inputs for one or several audios' features ([n_mels, frames] each).

    Each audio is cut into chunks of ``2 * n_window`` frames (the last one shorter); the
    encoder's two convolutions and its attention run within a chunk. Returns

    * ``input_features`` [chunks, n_mels, chunk_frames]: the chunks, right-padded with zeros to
      the longest one;
    * ``chunk_lengths`` [chunks] int64: frames of each chunk before padding;
    * ``valid_indices`` [positions] int64: flat indices, in the [chunks, ceil(chunk_frames / 2)]
      grid after the stride-2 convolution, of the positions that are not padding (in order);
    * ``pool_indices`` [tokens] int64: index among those positions of the first of each pair
      the stride-2 average pooling merges into one audio token (pairs never straddle audios).

    The graph's output rows follow the order of ``features_list``; :func:`audio_token_counts`
    splits them per audio.
    """
    feats = _features(features_list, n_mels)
    size = 2 * n_window
    pieces, lengths = [], []
    for f in feats:
        for start in range(0, f.shape[1], size):
            piece = f[:, start:start + size]
            pieces.append(piece)
            lengths.append(piece.shape[1])
    chunk_lengths = np.asarray(lengths, dtype=np.int64)
    longest = int(chunk_lengths.max())
    padded = np.zeros((len(pieces), feats[0].shape[0], longest), dtype=np.float32)
    for i, piece in enumerate(pieces):
        padded[i, :, : piece.shape[1]] = piece
    after_conv = (chunk_lengths - 1) // 2 + 1
    grid = int(after_conv.max())
    valid = (np.arange(len(pieces))[:, None] * grid + np.arange(grid)[None, :])[np.arange(grid)[None, :] < after_conv[:, None]]
    pool, offset = [], 0
    for f in feats:
        positions = (f.shape[1] - 1) // 2 + 1
        pool.append(offset + 2 * np.arange((positions - 2) // 2 + 1, dtype=np.int64))
        offset += positions
    return {"input_features": padded, "chunk_lengths": chunk_lengths,
            "valid_indices": valid.astype(np.int64), "pool_indices": np.concatenate(pool)}


def audio_features(source, config: AudioConfig | Mapping | None = None, *, source_rate: int | None = None,
                   start: float = 0.0, end: float | None = None, name: str | None = None) -> np.ndarray:
    """:func:`load_audio` then :func:`log_mel`, refusing audio too short to give one token."""
    config = as_config(config)
    audio = load_audio(source, config.sampling_rate, source_rate=source_rate, start=start, end=end, name=name)
    features = log_mel(audio, config)
    if audio_token_counts([features.shape[1]])[0] < 1:
        label = name or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "audio")
        seconds = audio.size / config.sampling_rate
        raise InputError(f"the audio is too short ({seconds:.3f} s) to give one audio token", path=label,
                         fix="pass at least 0.03 s of audio")
    return features


def split_tokens(embeds: np.ndarray, frame_counts: Sequence[int]) -> list[np.ndarray]:
    """Split the encoder's concatenated output rows per audio."""
    counts = audio_token_counts(frame_counts)
    if sum(counts) != embeds.shape[0]:
        raise OmniError(f"the audio encoder returned {embeds.shape[0]} rows for {sum(counts)} audio tokens",
                        fix="rebuild the bundle (graph and runtime disagree)")
    bounds = np.cumsum([0, *counts])
    return [embeds[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


__all__ = ["AudioConfig", "SAMPLING_RATE", "audio_features", "audio_token_counts", "encoder_inputs", "load_audio",
           "log_mel", "mel_filters", "num_frames", "split_tokens"]
