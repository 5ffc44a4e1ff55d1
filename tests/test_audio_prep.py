"""Torch-free audio preparation (omni_runtime.media.audio_prep) against its references.

- Decoding + resampling equals qwen-omni-utils' ``process_audio_info`` (librosa.load at 16 kHz) on
  generated wav, flac, mp3 files (bit-exact: same decoder, same soxr resampler and quality) and
  on the audio track of mp4 videos (AAC; qwen-omni-utils runs the ``ffmpeg`` program, the
  runtime PyAV: the int16 samples differ by at most one step where two FFmpeg versions round
  the AAC decoder's floats differently, so the 16 kHz result is within 2 int16 steps).
- Log-mel features equal ``WhisperFeatureExtractor`` called as ``Qwen2_5OmniProcessor`` calls it
  (max_length padding, attention mask) within 1e-4, including truncation.
- Token counts and features equal the processor's (``<|AUDIO|>`` count in input_ids).
- The encoder's index inputs equal transformers' own chunking helpers.
- Bad media are InputErrors naming the file.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from omni_export.testkit import media
from omni_runtime.media import audio_prep
from omni_runtime.media.audio_prep import AudioConfig, audio_features, audio_token_counts, encoder_inputs, load_audio, log_mel
from omni_runtime.errors import InputError

INT16_STEP = 2.0 ** -15
LOG_MEL_TOL = 1e-4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio-media")
    speech_path = media.speech_wav(d / "speech.wav", "Testing one two three. The audio encoder hears this.")
    speech, rate = _read(speech_path)
    stereo = media.tone(1.7, 44100, freqs=(440.0, 660.0), noise=0.01)
    out = {
        "speech.wav": speech_path,  # espeak-ng: 22050 Hz mono int16
        "stereo.flac": media.write_audio(d / "stereo.flac", stereo, 44100),
        "speech.mp3": media.write_audio(d / "speech.mp3", speech, rate),
        "float48k.wav": media.write_audio(d / "float48k.wav", media.chirp(1.3, 48000), 48000, subtype="FLOAT"),
        "clip.mp4": media.write_video(d / "clip.mp4", 1.5, audio=stereo, audio_rate=44100),
        "speech.mp4": media.write_video(d / "speech.mp4", 1.0, audio=speech, audio_rate=rate),
        "silent.mp4": media.write_video(d / "silent.mp4", 1.0),
    }
    return out


def _read(path):
    import soundfile

    return soundfile.read(path, dtype="float32")


def reference_audio(path, video: bool = False) -> np.ndarray:
    from qwen_omni_utils import process_audio_info

    item = {"type": "video", "video": str(path)} if video else {"type": "audio", "audio": str(path)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (audio,) = process_audio_info([{"role": "user", "content": [item]}], use_audio_in_video=video)
    return audio


@pytest.mark.parametrize("name", ["speech.wav", "stereo.flac", "speech.mp3", "float48k.wav"])
def test_audio_files_match_qwen_omni_utils(files, name):
    ours = load_audio(files[name])
    ref = reference_audio(files[name])
    assert ours.dtype == np.float32 and ours.ndim == 1
    np.testing.assert_array_equal(ours, ref)  # same decoder (libsndfile) and resampler (soxr HQ)


@pytest.mark.parametrize("name", ["clip.mp4", "speech.mp4"])
def test_video_audio_track_matches_qwen_omni_utils(files, name):
    samples, _ = audio_prep._decode(lambda: str(files[name]), name)
    ours_s16 = np.round(np.asarray(samples, np.float64).T.reshape(-1) * 32768).astype(np.int32)
    ffmpeg_s16 = media.ffmpeg_s16(files[name]).astype(np.int32)
    assert ours_s16.shape == ffmpeg_s16.shape
    assert np.abs(ours_s16 - ffmpeg_s16).max() <= 1  # AAC decoder rounding across FFmpeg versions
    ours = load_audio(files[name])
    ref = reference_audio(files[name], video=True)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 2 * INT16_STEP


@pytest.mark.parametrize("name, start, end", [("speech.wav", 0.25, 1.1), ("stereo.flac", 0.5, None),
                                               ("clip.mp4", 0.2, 1.0)])
def test_audio_span_matches_qwen_omni_utils(files, name, start, end):
    from qwen_omni_utils import process_audio_info

    video = name.endswith(".mp4")
    kind = "video" if video else "audio"
    item = {"type": kind, kind: str(files[name]), f"{kind}_start": start}
    if end is not None:
        item[f"{kind}_end"] = end
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (ref,) = process_audio_info([{"role": "user", "content": [item]}], use_audio_in_video=video)
    ours = load_audio(files[name], start=start, end=end)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= (2 * INT16_STEP if video else 0)
    tone = media.tone(1.0)
    array_item = {"type": "audio", "audio": tone, "audio_start": 0.1, "audio_end": 0.55}
    (ref,) = process_audio_info([{"role": "user", "content": [array_item]}], use_audio_in_video=False)
    np.testing.assert_array_equal(load_audio(tone, start=0.1, end=0.55), ref)


def test_bytes_and_arrays(files):
    path = files["speech.wav"]
    np.testing.assert_array_equal(load_audio(path.read_bytes()), load_audio(path))
    np.testing.assert_array_equal(load_audio(f"file://{path}"), load_audio(path))
    tone = media.tone(0.5, 16000)
    # qwen-omni-utils takes a 1-D array as 16 kHz samples, unchanged
    from qwen_omni_utils import process_audio_info

    (ref,) = process_audio_info([{"role": "user", "content": [{"type": "audio", "audio": tone}]}], False)
    np.testing.assert_array_equal(load_audio(tone), ref)
    # another rate is resampled as librosa.resample(res_type="soxr_hq") does
    import librosa

    tone22 = media.tone(0.5, 22050)
    np.testing.assert_array_equal(load_audio(tone22, source_rate=22050),
                                  librosa.resample(tone22, orig_sr=22050, target_sr=16000, res_type="soxr_hq"))


# ---------------------------------------------------------------------------------------------
# log-mel


def whisper_columns(extractor, audios: list[np.ndarray]) -> list[np.ndarray]:
    """The feature columns Qwen2_5OmniProcessor keeps: max_length padding, attention mask."""
    out = extractor(audios, sampling_rate=extractor.sampling_rate, padding="max_length",
                    return_attention_mask=True, return_tensors="np")
    masks = out["attention_mask"].astype(bool)
    return [out["input_features"][i][:, masks[i]] for i in range(len(audios))]


@pytest.fixture(scope="module")
def extractor(tiny_checkpoint):
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor.from_pretrained(tiny_checkpoint)


def _test_audios(files) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    click = (1e-5 * rng.standard_normal(16000)).astype(np.float32)
    click[-1] = 1.0  # loudest in the frame centred just past the end: part of the processor's max
    return {
        "speech": load_audio(files["speech.wav"]),
        "0.3s": media.chirp(0.3),
        "2s": media.tone(2.0, noise=0.05),
        "7.3s": media.chirp(7.3, stop=7000.0),
        "odd length": media.tone(1.0, noise=0.2)[:16000 - 37],
        "silence": np.zeros(8000, np.float32),
        "click at end": click,
        "3 frames": media.tone(0.02, noise=0.1)[:321],
    }


def test_log_mel_matches_whisper_feature_extractor(files, extractor):
    audios = _test_audios(files)
    refs = whisper_columns(extractor, list(audios.values()))  # one batch, as the processor does
    config = AudioConfig.from_manifest({"num_mel_bins": extractor.feature_size})
    for (name, audio), ref in zip(audios.items(), refs):
        ours = log_mel(audio, config)
        assert ours.shape == ref.shape, name
        assert ours.shape[1] == audio_prep.num_frames(audio.size, config)
        assert np.abs(ours - ref).max() <= LOG_MEL_TOL, name


@pytest.mark.parametrize("seconds", [0.6, 0.99, 1.0, 1.5])
def test_log_mel_truncates_like_the_processor(seconds):
    from transformers import WhisperFeatureExtractor

    # a 1 s window instead of 300 s: the same truncation and end-of-window handling, quickly
    extractor = WhisperFeatureExtractor(feature_size=128, chunk_length=1, return_attention_mask=True)
    audio = media.chirp(seconds, stop=5000.0)
    (ref,) = whisper_columns(extractor, [audio])
    ours = log_mel(audio, AudioConfig(chunk_length=1))
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= LOG_MEL_TOL


def test_token_counts_and_features_match_the_processor(tiny_checkpoint, files):
    from transformers import Qwen2_5OmniProcessor

    processor = Qwen2_5OmniProcessor.from_pretrained(tiny_checkpoint)
    audios = [load_audio(files["speech.wav"]), media.chirp(0.3), media.tone(2.0, noise=0.1), media.tone(0.02)[:321]]
    text = "".join(f"Audio {i}: <|audio_bos|><|AUDIO|><|audio_eos|>" for i in range(len(audios))) + " What is it?"
    out = processor(text=[text], audio=audios, return_tensors="np")
    ids = out["input_ids"][0]
    bos = np.flatnonzero(ids == processor.tokenizer.convert_tokens_to_ids("<|audio_bos|>"))
    eos = np.flatnonzero(ids == processor.tokenizer.convert_tokens_to_ids("<|audio_eos|>"))
    placeholder_counts = [int((ids[b + 1:e] == processor.audio_token_id).sum()) for b, e in zip(bos, eos)]
    features = [log_mel(a) for a in audios]
    assert audio_token_counts([f.shape[1] for f in features]) == placeholder_counts
    masks = out["feature_attention_mask"].astype(bool)
    for i, f in enumerate(features):
        assert masks[i].sum() == f.shape[1]
        assert np.abs(out["input_features"][i][:, masks[i]] - f).max() <= LOG_MEL_TOL


@pytest.mark.parametrize("frames", [[30], [200], [730], [3000], [30, 730], [200, 5, 3000], [3, 401, 199]])
def test_encoder_inputs_match_transformers(frames):
    import torch
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as m

    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((128, n)).astype(np.float32) for n in frames]
    ours = encoder_inputs(feats, n_window=100)
    lens = torch.tensor(frames)
    padded, chunk_lengths = m.chunk_and_pad_features(torch.from_numpy(np.concatenate(feats, axis=1)), lens, 100)
    np.testing.assert_array_equal(ours["input_features"], padded.numpy())
    np.testing.assert_array_equal(ours["chunk_lengths"], chunk_lengths.numpy())
    np.testing.assert_array_equal(ours["valid_indices"], m.get_valid_indices(chunk_lengths).numpy())
    np.testing.assert_array_equal(ours["pool_indices"], m.get_pool_indices(lens).numpy())
    assert sum(audio_token_counts(frames)) == ours["pool_indices"].size
    for name in ("chunk_lengths", "valid_indices", "pool_indices"):
        assert ours[name].dtype == np.int64


# ---------------------------------------------------------------------------------------------
# bad media


def _bad_cases(files, d):
    wav = files["speech.wav"].read_bytes()
    (d / "empty.wav").write_bytes(b"")
    (d / "cut.wav").write_bytes(wav[:30])  # truncated inside the header
    import soundfile

    soundfile.write(d / "no-samples.wav", np.zeros(0, np.float32), 16000)
    (d / "notes.wav").write_text("this is not audio\n" * 20)
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(d / "red.png")
    return {
        "missing file": (d / "nope.wav", "does not exist"),
        "empty file": (d / "empty.wav", "empty"),
        "truncated header": (d / "cut.wav", "cannot decode"),
        "no samples": (d / "no-samples.wav", "no samples"),
        "text file": (d / "notes.wav", "cannot decode"),
        "image": (d / "red.png", "no audio track"),
        "video without audio": (files["silent.mp4"], "no audio track"),
        "directory": (d, "directory"),
    }


@pytest.mark.parametrize("case", ["missing file", "empty file", "truncated header", "no samples", "text file",
                                  "image", "video without audio", "directory"])
def test_bad_media_files(files, tmp_path, case):
    path, message = _bad_cases(files, tmp_path)[case]
    with pytest.raises(InputError, match=message) as info:
        load_audio(path)
    assert info.value.path == str(path)
    assert info.value.fix


@pytest.mark.parametrize("source, message", [
    (np.zeros((2, 100), np.float32), "mono"),
    (np.zeros(0, np.float32), "empty"),
    (np.array([0.0, np.nan], np.float32), "NaN"),
    (np.array(["a", "b"]), "not numbers"),
    (b"", "empty"),
    (b"\x00\x01garbage" * 10, "cannot decode"),
    (12345, "unsupported audio input"),
])
def test_bad_audio_values(source, message):
    with pytest.raises(InputError, match=message):
        load_audio(source)


def test_bad_spans(files):
    with pytest.raises(InputError, match="no audio between"):
        load_audio(files["speech.wav"], start=60.0)
    with pytest.raises(InputError, match="bad audio span"):
        load_audio(files["speech.wav"], start=1.0, end=0.5)
    with pytest.raises(InputError, match="source_rate"):
        load_audio(np.zeros(100, np.float32), source_rate=-5)


def test_too_short_audio(files):
    with pytest.raises(InputError, match="too short") as info:
        audio_features(np.zeros(320, np.float32), name="tiny clip")  # 2 frames: no audio token
    assert info.value.path == "tiny clip"
    with pytest.raises(InputError, match="too short"):
        encoder_inputs([np.zeros((128, 2), np.float32)])
    assert audio_features(np.zeros(321, np.float32)).shape == (128, 3)  # 3 frames: one token


def test_preparation_is_torch_free(files, tmp_path):
    """Decoding (soundfile, PyAV), resampling, log-mel and graph inputs import no torch/transformers/librosa."""
    import json
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import importlib.abc, json, sys
        import numpy as np

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("torch", "transformers", "torchvision", "librosa", "omni_export"):
                    raise ImportError("blocked in this test: " + name)
                return None

        sys.meta_path.insert(0, Block())
        from omni_runtime.media.audio_prep import audio_features, encoder_inputs
        feats = [audio_features(p) for p in {[str(files["speech.mp3"]), str(files["clip.mp4"])]!r}]
        inputs = encoder_inputs(feats)
        np.save({str(tmp_path / "f0.npy")!r}, feats[0])
        print(json.dumps({{k: list(v.shape) for k, v in inputs.items()}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    shapes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert shapes["input_features"][1] == 128
    np.testing.assert_array_equal(np.load(tmp_path / "f0.npy"), audio_features(files["speech.mp3"]))
