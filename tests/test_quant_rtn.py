"""Round-to-nearest block quantization against AutoAWQ's quantizer.

The reference below is transcribed from AutoAWQ (casper-hansen/AutoAWQ,
awq/quantize/quantizer.py ``AwqQuantizer.pseudo_quantize_tensor`` and awq/quantize/scale.py
``apply_clip``), in torch, float32. AutoAWQ needs K to be a multiple of the group size; a
partial last block is checked as its own group.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omni_export.quant import rtn
from omni_export.quant.types import QuantWeight


def autoawq_pseudo_quantize(w: torch.Tensor, group_size: int, w_bit: int, zero_point: bool):
    """AutoAWQ ``pseudo_quantize_tensor`` (returns dequantized w, scales [N, G], zeros [N, G])."""
    org_w_shape = w.shape
    w = w.reshape(-1, group_size)
    if zero_point:
        max_val = w.amax(dim=1, keepdim=True)
        min_val = w.amin(dim=1, keepdim=True)
        max_int = 2**w_bit - 1
        min_int = 0
        scales = (max_val - min_val).clamp(min=1e-5) / max_int
        zeros = (-torch.round(min_val / scales)).clamp_(min_int, max_int)
        w = (torch.clamp(torch.round(w / scales) + zeros, min_int, max_int) - zeros) * scales
        zeros = zeros.view(org_w_shape[0], -1)
    else:
        max_val = w.abs().amax(dim=1, keepdim=True)
        max_val = max_val.clamp(min=1e-5)
        max_int = 2 ** (w_bit - 1) - 1
        min_int = -(2 ** (w_bit - 1))
        scales = max_val / max_int
        zeros = None
        w = torch.clamp(torch.round(w / scales), min_int, max_int) * scales
    scales = scales.view(org_w_shape[0], -1)
    return w.reshape(org_w_shape), scales, zeros


def autoawq_apply_clip(w: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """AutoAWQ ``apply_clip`` on one weight: max_val [N, G] (their [N, G, 1] squeezed)."""
    org_shape = w.shape
    max_val = max_val.unsqueeze(-1)
    w = w.reshape(*max_val.shape[:2], -1)
    w = torch.clamp(w, -max_val, max_val)
    return w.reshape(org_shape)


def reference(w: np.ndarray, group_size: int, bits: int, symmetric: bool, clip=None):
    """(dequantized, scales, zeros or None) by AutoAWQ, block by block for a partial last block."""
    t = torch.from_numpy(w)
    k = w.shape[1]
    full = k - k % group_size
    parts = [(0, full, group_size)] if full else []
    if k % group_size:
        parts.append((full, k, k - full))
    deq, scales, zeros = [], [], []
    g0 = 0
    for start, stop, gs in parts:
        block = t[:, start:stop]
        ng = (stop - start) // gs
        if clip is not None:
            block = autoawq_apply_clip(block, torch.from_numpy(clip[:, g0 : g0 + ng]))
        d, s, z = autoawq_pseudo_quantize(block, gs, bits, zero_point=not symmetric)
        deq.append(d)
        scales.append(s)
        zeros.append(z)
        g0 += ng
    return (
        torch.cat(deq, 1).numpy(),
        torch.cat(scales, 1).numpy(),
        None if symmetric else torch.cat(zeros, 1).numpy(),
    )


def weights(n: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.02, (n, k)).astype(np.float32)
    w[0] = np.abs(w[0]) + 0.01  # all-positive row (zero point clamps to 0)
    w[1] = -np.abs(w[1]) - 0.01  # all-negative row
    w[2] = 0.25  # constant row (max == min: the 1e-5 floor)
    w[3, :3] = [1.0, -2.0, 3.0]  # big outliers
    return w


def assert_same_bits(a: np.ndarray, b: np.ndarray) -> None:
    """Equal float32 values (bit for bit, except that AutoAWQ may produce -0.0 where (q - z) * s
    gives +0.0)."""
    assert a.dtype == b.dtype == np.float32
    a = np.where(a == 0, np.float32(0), a)
    b = np.where(b == 0, np.float32(0), b)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("bits", [4, 8, 2])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("k,group_size", [(256, 128), (256, 32), (96, 64), (160, 128), (48, 16), (100, 64)])
def test_matches_autoawq_bit_for_bit(k, group_size, symmetric, bits):
    w = weights(24, k)
    qw = rtn.quantize(w, group_size, bits=bits, symmetric=symmetric)
    deq, scales, zeros = reference(w, group_size, bits, symmetric)
    g = -(-k // group_size)
    assert qw.q.shape == (24, k) and qw.q.dtype == np.uint8
    assert qw.scales.shape == (24, g) and qw.zeros.shape == (24, g)
    assert (qw.group_size, qw.bits) == (group_size, bits)
    assert int(qw.q.max()) <= 2**bits - 1
    assert_same_bits(qw.scales, scales)
    if symmetric:
        assert (qw.zeros == 2 ** (bits - 1)).all()
    else:
        assert np.array_equal(qw.zeros.astype(np.float32), zeros)
    assert_same_bits(qw.dequantize(), deq)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("k,group_size", [(256, 64), (160, 128)])
def test_clip_matches_autoawq_apply_clip(k, group_size, symmetric):
    w = weights(16, k, seed=1)
    g = -(-k // group_size)
    rng = np.random.default_rng(2)
    blocks_max = np.abs(np.pad(w, ((0, 0), (0, g * group_size - k)), mode="edge")).reshape(16, g, -1).max(-1)
    clip = (blocks_max * rng.uniform(0.3, 1.0, blocks_max.shape)).astype(np.float32)
    clip[0, 0] = 0.005  # below every value of an all-positive block
    qw = rtn.quantize(w, group_size, symmetric=symmetric, clip=clip)
    deq, scales, _ = reference(w, group_size, 4, symmetric, clip=clip)
    assert_same_bits(qw.scales, scales)
    assert_same_bits(qw.dequantize(), deq)
    # clipping never leaves a level outside the block's clip range (+ half a step)
    d = qw.dequantize()
    lim = np.repeat(clip, group_size, axis=1)[:, :k] + np.repeat(qw.scales, group_size, axis=1)[:, :k]
    assert (np.abs(d) <= lim).all()


def test_error_is_at_most_half_a_step():
    # rows 4+: blocks with both signs (AutoAWQ's range [min, max] then holds every value; rows 0-2
    # are single-signed or constant blocks, which its formula represents poorly, as AutoAWQ does)
    w = weights(32, 320, seed=3)[4:]
    qw = rtn.quantize(w, 64)
    step = np.repeat(qw.scales, 64, axis=1)
    assert (np.abs(qw.dequantize() - w) <= step / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("bad", [0, -128, 8, 100, 24, True, 128.0, "128", None])
def test_group_size_must_be_positive_multiple_of_16(bad):
    with pytest.raises(ValueError, match="group_size"):
        rtn.quantize(weights(4, 128), bad)


def test_bad_inputs():
    with pytest.raises(ValueError, match="bits"):
        rtn.quantize(weights(4, 128), 64, bits=3)
    with pytest.raises(ValueError, match="2-D"):
        rtn.quantize(np.zeros(128, np.float32), 64)
    w = weights(4, 128)
    w[1, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        rtn.quantize(w, 64)
    with pytest.raises(ValueError, match="clip must have shape"):
        rtn.quantize(weights(4, 128), 64, clip=np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="non-negative"):
        rtn.quantize(weights(4, 128), 64, clip=-np.ones((4, 2), np.float32))


def test_dequantize_formula_and_validate():
    q = np.array([[0, 15, 7, 8, 3]], np.uint8)
    qw = QuantWeight(q=q, scales=np.array([[0.5, 2.0]], np.float32), zeros=np.array([[8, 1]], np.uint8), group_size=4)
    assert np.array_equal(qw.dequantize(), np.array([[-4.0, 3.5, -0.5, 0.0, 4.0]], np.float32))
    assert qw.validate() is qw
    with pytest.raises(ValueError, match="scales/zeros"):
        QuantWeight(q=q, scales=np.ones((1, 1), np.float32), zeros=np.ones((1, 1), np.uint8), group_size=4).validate()
    with pytest.raises(ValueError, match="levels above"):
        QuantWeight(q=q + 1, scales=np.ones((1, 2), np.float32), zeros=np.ones((1, 2), np.uint8), group_size=4).validate()
