"""Next-token selection: transformers' logits processing and sampling, in numpy.

The order and semantics follow transformers' ``generate``: repetition penalty (always, when
not 1.0), then, only when sampling, temperature, top-k and top-p; then greedy argmax or a
draw from the softmax. Everything is computed in float32 as transformers does.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

from omni_runtime.errors import InputError


@dataclass(frozen=True)
class SamplingConfig:
    """Generation parameters; the defaults are greedy decoding without penalty."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def validate(self) -> None:
        """Raise InputError if a parameter is out of range (temperature only matters when sampling)."""
        fix = "use do_sample with temperature > 0, top_k >= 0 (0 = off), 0 < top_p <= 1, repetition_penalty > 0"
        if not isinstance(self.top_k, Integral) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}", fix=fix)
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, Real) or isinstance(value, bool):
                raise InputError(f"{name} must be a number, got {value!r}", fix=fix)
        if self.do_sample and not self.temperature > 0:
            raise InputError(
                f"temperature must be > 0 when sampling, got {self.temperature!r}",
                fix="use temperature > 0, or greedy decoding (do_sample off) for deterministic output",
            )
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}", fix=fix)
        if not self.repetition_penalty > 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}", fix=fix)


def process_logits(
    scores: np.ndarray,
    sequences: np.ndarray,
    cfg: SamplingConfig,
    attention_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Apply transformers' logits processors to next-token ``scores`` [batch, vocab].

    ``sequences`` [batch, length] holds every token so far (prompt and generated); all of them
    are penalised by the repetition penalty. Positions where ``attention_mask`` [batch, length]
    is 0 (left padding) are not, as transformers ignores a row's leading padding. Returns new
    float32 scores with -inf where a token is filtered out.
    """
    cfg.validate()
    scores = np.array(scores, dtype=np.float32)
    sequences = np.asarray(sequences, dtype=np.int64)
    if scores.ndim != 2 or sequences.ndim != 2 or sequences.shape[0] != scores.shape[0]:
        raise ValueError(f"expected scores [batch, vocab] and sequences [batch, length], got "
                         f"{scores.shape} and {sequences.shape}")
    if cfg.repetition_penalty != 1.0:
        scores = _repetition_penalty(scores, sequences, np.float32(cfg.repetition_penalty), attention_mask)
    if cfg.do_sample:
        if cfg.temperature != 1.0:
            scores = scores / np.float32(cfg.temperature)
        if cfg.top_k != 0:
            scores = _top_k(scores, int(cfg.top_k))
        if cfg.top_p < 1.0:
            scores = _top_p(scores, float(cfg.top_p))
    return scores


def next_tokens(
    scores: np.ndarray,
    sequences: np.ndarray,
    cfg: SamplingConfig,
    rng: np.random.Generator,
    attention_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Choose the next token of each row: [batch] int64.

    Greedy (``do_sample`` off) takes the argmax of the processed scores, ties going to the
    lowest id as torch.argmax does; sampling draws from their softmax using ``rng``.
    """
    processed = process_logits(scores, sequences, cfg, attention_mask)
    if not cfg.do_sample:
        return np.argmax(processed, axis=-1).astype(np.int64)
    cdf = np.cumsum(_softmax(processed).astype(np.float64), axis=-1)
    cdf /= cdf[:, -1:]
    draws = rng.random(processed.shape[0])
    # The first index whose cumulative probability exceeds the draw; tokens of probability 0
    # (filtered, -inf) never satisfy this, so only allowed tokens are picked.
    return np.sum(cdf <= draws[:, None], axis=-1).astype(np.int64)


def _repetition_penalty(
    scores: np.ndarray, sequences: np.ndarray, penalty: np.float32, attention_mask: np.ndarray | None
) -> np.ndarray:
    """``RepetitionPenaltyLogitsProcessor``: divide positive, multiply negative scores of seen tokens."""
    batch, vocab = scores.shape
    # Ids outside the vocabulary (and ignored padding positions) go to an extra column that is dropped.
    ids = np.minimum(sequences, vocab)
    if attention_mask is not None:
        ids = np.where(np.asarray(attention_mask) == 0, vocab, ids)
    seen = np.zeros((batch, vocab + 1), dtype=bool)
    np.put_along_axis(seen, ids, True, axis=-1)
    penalised = np.where(scores < 0, scores * penalty, scores / penalty)
    return np.where(seen[:, :vocab], penalised, scores)


def _top_k(scores: np.ndarray, top_k: int) -> np.ndarray:
    """``TopKLogitsWarper``: filter scores below the k-th largest (ties with it are kept)."""
    vocab = scores.shape[-1]
    top_k = min(top_k, vocab)
    kth = np.partition(scores, vocab - top_k, axis=-1)[:, vocab - top_k, None]
    return np.where(scores < kth, np.float32(-np.inf), scores)


def _top_p(scores: np.ndarray, top_p: float) -> np.ndarray:
    """``TopPLogitsWarper`` with min_tokens_to_keep=1.

    Sort ascending, remove tokens whose cumulative probability is <= 1 - top_p, but always keep
    the most probable one. torch accumulates the float32 cumsum in float64, so this does too.
    The sort is stable, so when equal scores straddle the cutoff the lower ids are removed;
    torch's unstable sort leaves that choice implementation-defined (CPU and CUDA differ).
    """
    order = np.argsort(scores, axis=-1, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=-1)
    cumulative = np.cumsum(_softmax(sorted_scores).astype(np.float64), axis=-1).astype(np.float32)
    remove_sorted = cumulative <= np.float32(1 - top_p)
    remove_sorted[:, -1] = False
    remove = np.empty_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, np.float32(-np.inf), scores)


def _softmax(scores: np.ndarray) -> np.ndarray:
    """float32 softmax over the last axis."""
    exp = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True, dtype=np.float32)
