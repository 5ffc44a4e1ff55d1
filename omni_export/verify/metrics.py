"""The numbers ``verify`` reports (numpy, float64)."""

from __future__ import annotations

import numpy as np


def errors(actual: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(max |a - r|, rms(a - r) / rms(r)) in float64."""
    a, r = np.asarray(actual, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    diff = a - r
    rms_ref = np.sqrt(np.mean(r * r))
    rel = float(np.sqrt(np.mean(diff * diff)) / rms_ref) if rms_ref > 0 else float(np.sqrt(np.mean(diff * diff)))
    return float(np.abs(diff).max()), rel


def metrics(actual, reference) -> dict:
    """``{"max_abs", "rel_rms"}`` of ``actual`` against ``reference``."""
    max_abs, rel = errors(actual, reference)
    return {"max_abs": max_abs, "rel_rms": rel}


def decoder_metrics(hidden, ref_hidden, logits, ref_logits) -> dict:
    """A decoder graph's ``{"max_abs", "rel_rms"}`` of its hidden states plus ``logits_max_abs``,
    ``logits_rel_rms`` of its logits."""
    logits_max_abs, logits_rel = errors(logits, ref_logits)
    return {**metrics(hidden, ref_hidden), "logits_max_abs": logits_max_abs, "logits_rel_rms": logits_rel}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """KL(softmax(reference) || softmax(other)) per row of [positions, vocab] logits, float64."""
    p_log, q_log = log_softmax(reference), log_softmax(other)
    return np.maximum((np.exp(p_log) * (p_log - q_log)).sum(axis=-1), 0.0)
