"""Logits processing and token choice, checked against transformers' own processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from omni_runtime.errors import InputError
from omni_runtime.stages.sampling import SamplingConfig, next_tokens, process_logits

VOCAB = 500


def reference(scores, sequences, cfg, prompt_ignore_length=None):
    """What transformers' generate does to the scores, in its order."""
    processors = []
    if cfg.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty, prompt_ignore_length))
    if cfg.do_sample:
        if cfg.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k != 0:
            processors.append(TopKLogitsWarper(cfg.top_k))
        if cfg.top_p < 1.0:
            processors.append(TopPLogitsWarper(cfg.top_p))
    ids = torch.from_numpy(sequences)
    out = torch.from_numpy(scores.copy())
    for processor in processors:
        out = processor(ids, out)
    return out.numpy()


def assert_same(actual, expected, ties=False):
    """Same -inf mask and allclose values.

    With ``ties``, tokens of exactly equal score may swap: torch's (unstable) sort orders ties
    in an implementation-defined way (CPU and CUDA differ), so when equal scores straddle the
    top-p cutoff, which of them are kept differs (the runtime removes lower ids first). Then
    the kept values must be the same multiset, and agree where both keep a token.
    """
    assert actual.dtype == np.float32
    kept, kept_expected = np.isfinite(actual), np.isfinite(expected)
    if ties:
        for row in range(actual.shape[0]):
            np.testing.assert_allclose(
                np.sort(actual[row][kept[row]]), np.sort(expected[row][kept_expected[row]]), rtol=1e-6, atol=1e-6
            )
    else:
        np.testing.assert_array_equal(kept, kept_expected)
    both = kept & kept_expected
    np.testing.assert_allclose(actual[both], expected[both], rtol=1e-6, atol=1e-6)


def random_case(seed, ties):
    """Scores [2, VOCAB] (rounded to create many equal values if ``ties``) and sequences [2, 40]."""
    rng = np.random.default_rng(seed)
    scores = (rng.standard_normal((2, VOCAB)) * 3).astype(np.float32)
    if ties:
        scores = np.round(scores, 1).astype(np.float32)
    sequences = rng.integers(0, VOCAB, size=(2, 40), dtype=np.int64)
    sequences[:, :5] = sequences[:, 5:10]  # repeated ids
    sequences[1, 3] = VOCAB + 7  # an id beyond the logits' vocab (transformers ignores it)
    return scores, sequences


CONFIGS = [
    SamplingConfig(),
    SamplingConfig(repetition_penalty=1.3),
    SamplingConfig(repetition_penalty=0.7),
    SamplingConfig(do_sample=True),
    SamplingConfig(do_sample=True, temperature=0.7),
    SamplingConfig(do_sample=True, temperature=1.6, top_k=5),
    SamplingConfig(do_sample=True, top_k=1),
    SamplingConfig(do_sample=True, top_k=VOCAB + 10),
    SamplingConfig(do_sample=True, top_p=0.9),
    SamplingConfig(do_sample=True, top_p=0.3),
    SamplingConfig(do_sample=True, top_p=0.001),
    SamplingConfig(do_sample=True, temperature=0.8, top_k=50, top_p=0.8, repetition_penalty=1.1),
    SamplingConfig(do_sample=True, temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.05),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=repr)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_matches_transformers(cfg, seed, ties):
    scores, sequences = random_case(seed, ties)
    assert_same(process_logits(scores, sequences, cfg), reference(scores, sequences, cfg), ties)


@pytest.mark.parametrize("top_p", [0.25, 0.5, 0.75, 0.6])
def test_top_p_threshold_and_ties(top_p):
    # Equal scores: probabilities are exactly 0.25 and the cumulative sums hit 1 - top_p exactly.
    scores = np.array([[2.0, 2.0, 2.0, 2.0], [1.0, 3.0, 3.0, 1.0]], dtype=np.float32)
    sequences = np.zeros((2, 1), dtype=np.int64)
    cfg = SamplingConfig(do_sample=True, top_p=top_p)
    assert_same(process_logits(scores, sequences, cfg), reference(scores, sequences, cfg))


def test_top_p_keeps_at_least_one_token():
    scores = np.array([[0.0, 0.0, 50.0]], dtype=np.float32)
    processed = process_logits(scores, np.zeros((1, 1), np.int64), SamplingConfig(do_sample=True, top_p=1e-9))
    assert np.isfinite(processed).tolist() == [[False, False, True]]


def test_top_k_keeps_ties_with_kth():
    scores = np.array([[1.0, 3.0, 2.0, 2.0, 0.5]], dtype=np.float32)
    cfg = SamplingConfig(do_sample=True, top_k=2)
    processed = process_logits(scores, np.zeros((1, 1), np.int64), cfg)
    assert np.isfinite(processed).tolist() == [[False, True, True, True, False]]
    assert_same(processed, reference(scores, np.zeros((1, 1), np.int64), cfg))


def test_repetition_penalty_ignores_left_padding():
    scores, sequences = random_case(3, ties=False)
    mask = np.ones_like(sequences)
    mask[0, :6] = 0
    cfg = SamplingConfig(repetition_penalty=1.5)
    expected = reference(scores, sequences, cfg, prompt_ignore_length=torch.tensor([6, 0]))
    assert_same(process_logits(scores, sequences, cfg, attention_mask=mask), expected)


def test_greedy_is_argmax_after_penalty():
    scores, sequences = random_case(4, ties=True)
    rng = np.random.default_rng(0)
    for cfg in (SamplingConfig(), SamplingConfig(repetition_penalty=1.4)):
        expected = torch.from_numpy(reference(scores, sequences, cfg)).argmax(-1).numpy()
        tokens = next_tokens(scores, sequences, cfg, rng)
        assert tokens.dtype == np.int64 and tokens.shape == (2,)
        np.testing.assert_array_equal(tokens, expected)


def test_greedy_ties_break_to_lowest_id():
    scores = np.array([[1.0, 5.0, 5.0, 2.0], [3.0, 3.0, 3.0, 3.0]], dtype=np.float32)
    tokens = next_tokens(scores, np.zeros((2, 1), np.int64), SamplingConfig(), np.random.default_rng(0))
    assert tokens.tolist() == [1, 0]
    assert torch.from_numpy(scores).argmax(-1).tolist() == [1, 0]


def test_sampling_is_reproducible_and_allowed():
    scores, sequences = random_case(5, ties=True)
    cfg = SamplingConfig(do_sample=True, temperature=0.8, top_k=10, top_p=0.9, repetition_penalty=1.1)
    allowed = np.isfinite(process_logits(scores, sequences, cfg))
    draws = [next_tokens(scores, sequences, cfg, np.random.default_rng(42)) for _ in range(2)]
    np.testing.assert_array_equal(draws[0], draws[1])
    rng = np.random.default_rng(7)
    picks = np.stack([next_tokens(scores, sequences, cfg, rng) for _ in range(2000)])
    for row in range(2):
        assert allowed[row, picks[:, row]].all()
        assert len(np.unique(picks[:, row])) > 1


def test_sampling_follows_the_distribution():
    scores = np.log(np.array([[0.1, 0.2, 0.7], [0.5, 0.0, 0.5]], dtype=np.float32) + 1e-30).astype(np.float32)
    rng = np.random.default_rng(0)
    picks = np.stack([next_tokens(scores, np.zeros((2, 1), np.int64), SamplingConfig(do_sample=True), rng)
                      for _ in range(4000)])
    np.testing.assert_allclose(np.bincount(picks[:, 0], minlength=3) / 4000, [0.1, 0.2, 0.7], atol=0.03)
    assert (picks[:, 1] != 1).all()


@pytest.mark.parametrize(
    "cfg",
    [
        SamplingConfig(do_sample=True, temperature=0.0),
        SamplingConfig(do_sample=True, temperature=-1.0),
        SamplingConfig(do_sample=True, temperature=float("nan")),
        SamplingConfig(top_p=0.0),
        SamplingConfig(top_p=1.5),
        SamplingConfig(top_p=-0.1),
        SamplingConfig(top_k=-1),
        SamplingConfig(top_k=2.5),
        SamplingConfig(repetition_penalty=0.0),
        SamplingConfig(repetition_penalty=-1.2),
        SamplingConfig(temperature="hot"),
    ],
    ids=repr,
)
def test_invalid_configs(cfg):
    with pytest.raises(InputError) as info:
        cfg.validate()
    assert "fix:" in str(info.value)
    with pytest.raises(InputError):
        next_tokens(np.zeros((1, 4), np.float32), np.zeros((1, 1), np.int64), cfg, np.random.default_rng(0))


def test_temperature_ignored_when_greedy():
    SamplingConfig(do_sample=False, temperature=0.0).validate()
