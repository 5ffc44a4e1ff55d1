"""The ``token2wav_bigvgan`` graph against transformers' ``Qwen2_5OmniToken2WavBigVGANModel`` (fp32, 1e-4).

Mel lengths from one frame to a few hundred (the vocoder's replicate padding and trims at both
ends), rows of a batch against single-row runs, and a mel spanning the ``process_mel_spectrogram``
floor (-115 dB) and its clamp. Weights: ``token2wav_refs.loud_checkpoint`` (waveforms of about 0.3).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omni_export.testkit.token2wav_refs import graph_session, prepared, torch_threads

TOL = 1e-4


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return prepared(tmp_path_factory)


@pytest.fixture(scope="module")
def session(case):
    return graph_session(case[1], "token2wav_bigvgan")


def reference(model, mel: np.ndarray) -> np.ndarray:
    with torch.no_grad(), torch_threads():
        return model.token2wav.code2wav_bigvgan_model(torch.from_numpy(mel)).numpy().reshape(-1)


@pytest.mark.parametrize("frames", [1, 2, 7, 40, 137])
def test_bigvgan_waveform(case, session, frames):
    _, _, model = case
    mel = (np.random.default_rng(frames).standard_normal((1, 80, frames)) * 1.7 - 0.5).astype(np.float32)
    expected = reference(model, mel)
    (got,) = session.run(["waveform"], {"mel": mel})
    assert got.shape == (1, frames * 240)
    assert 0.01 < np.abs(expected).mean() < 0.9  # audible (not the ~1e-7 of 0.02-std weights), mostly unclamped
    np.testing.assert_allclose(got[0], expected, rtol=0, atol=TOL)


def test_bigvgan_batch_and_extremes(case, session):
    """Two rows in one run equal their single-row references; very low / high mel values hit the
    dB floor and the normalisation clamp."""
    _, _, model = case
    rng = np.random.default_rng(7)
    quiet = (rng.standard_normal((80, 30)) - 20).astype(np.float32)   # below 10^(-115/20)
    loud = (rng.standard_normal((80, 30)) * 4 + 6).astype(np.float32)  # above 0 dB after -20
    mel = np.stack([quiet, loud])
    (got,) = session.run(["waveform"], {"mel": mel})
    for row in range(2):
        np.testing.assert_allclose(got[row], reference(model, mel[row:row + 1]), rtol=0, atol=TOL)
