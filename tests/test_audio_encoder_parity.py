"""The ``audio_encoder`` graph against transformers' audio tower (fp32, max abs diff <= 1e-4).

Inputs are made the way the model receives them: WhisperFeatureExtractor features with the
processor's attention mask, run through ``thinker.get_audio_features`` (the tower with the
lengths taken from the mask). The runtime stage (``omni_runtime.stages.audio_encoder``) prepares the
graph's index inputs on the host and splits the output per audio.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omni_export.testkit import media
from omni_runtime.stages.audio_encoder import AudioEncoder
from omni_runtime.media.audio_prep import audio_token_counts, load_audio
from omni_runtime.bundle.manifest import load_manifest
from omni_runtime.bundle.sessions import SessionPool

TOL = 1e-4


@pytest.fixture(scope="module")
def extractor(tiny_checkpoint):
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def stage(tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    pool = SessionPool(manifest, ["CPUExecutionProvider"])
    return AudioEncoder(manifest, pool), pool


def reference(thinker, extractor, audios):
    """(features per audio as the thinker sees them, the tower's output rows)."""
    batch = extractor(audios, sampling_rate=16000, padding="max_length", return_attention_mask=True,
                      return_tensors="pt")
    with torch.no_grad():
        out = thinker.get_audio_features(batch["input_features"], feature_attention_mask=batch["attention_mask"])
    masks = batch["attention_mask"].bool()
    features = [batch["input_features"][i][:, masks[i]].numpy() for i in range(len(audios))]
    return features, out.last_hidden_state.numpy()


def sound(seconds: float, seed: int = 0) -> np.ndarray:
    return media.chirp(seconds, stop=4000.0) + media.tone(seconds, freqs=(330.0,), amplitude=0.1, noise=0.05, seed=seed)


CASES = {
    "0.3 s": [0.3],
    "exactly 2 s": [2.0],  # one full chunk of 200 frames
    "7.3 s": [7.3],  # 3 full chunks and a short one
    "30 s": [30.0],
    "two audios": [0.3, 7.3],
    "three audios, one of 3 frames": [2.0, 0.0201, 4.1],
}


@pytest.mark.parametrize("case", list(CASES))
def test_audio_encoder_matches_transformers(reference_thinker, extractor, stage, case):
    encoder, pool = stage
    audios = [sound(s, seed=i) for i, s in enumerate(CASES[case])]
    features, ref = reference(reference_thinker, extractor, audios)
    out = encoder.encode(features)
    counts = audio_token_counts([f.shape[1] for f in features])
    assert [o.shape for o in out] == [(n, encoder.config.output_dim) for n in counts]
    ours = np.concatenate(out)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= TOL
    assert pool.loaded == {}  # the session is released after use


def test_speech_file_end_to_end(tiny_checkpoint, reference_thinker, extractor, stage, tmp_path):
    """A spoken WAV file: runtime decode + log-mel + graph vs the processor's features + the tower."""
    from transformers import Qwen2_5OmniProcessor

    encoder, _ = stage
    path = media.speech_wav(tmp_path / "speech.wav", "Hello there, this is a test of the audio encoder.")
    ours = encoder.encode([encoder.features(path)])[0]
    processor = Qwen2_5OmniProcessor.from_pretrained(tiny_checkpoint)
    batch = processor(text=["<|audio_bos|><|AUDIO|><|audio_eos|>"], audio=[load_audio(path)], return_tensors="pt")
    with torch.no_grad():
        ref = reference_thinker.get_audio_features(batch["input_features"],
                                                   feature_attention_mask=batch["feature_attention_mask"])
    ref = ref.last_hidden_state.numpy()
    assert ours.shape == ref.shape == (int((batch["input_ids"] == processor.audio_token_id).sum()), ref.shape[1])
    assert np.abs(ours - ref).max() <= TOL


def test_manifest_audio_block(tiny_bundle, tiny_checkpoint):
    from transformers import Qwen2_5OmniConfig, WhisperFeatureExtractor

    manifest = load_manifest(tiny_bundle)
    block = manifest.config["audio"]
    audio_cfg = Qwen2_5OmniConfig.from_pretrained(tiny_checkpoint).thinker_config.audio_config
    fe = WhisperFeatureExtractor.from_pretrained(tiny_checkpoint)
    assert block["num_mel_bins"] == fe.feature_size == audio_cfg.num_mel_bins
    assert (block["sampling_rate"], block["hop_length"], block["n_fft"]) == (fe.sampling_rate, fe.hop_length, fe.n_fft)
    assert block["chunk_length"] * block["sampling_rate"] == fe.n_samples
    assert (block["n_window"], block["output_dim"]) == (audio_cfg.n_window, audio_cfg.output_dim)
    graph = manifest.graph("audio_encoder")
    assert [t.name for t in graph.inputs] == ["input_features", "chunk_lengths", "valid_indices", "pool_indices"]
    assert graph.outputs[0].shape == ("audio_tokens", audio_cfg.output_dim)
    assert graph.quantization is None
