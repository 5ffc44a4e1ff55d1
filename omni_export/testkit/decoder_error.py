"""The thinker decoder error of a recipe without writing a bundle: ``verify``'s
``thinker_decoder`` figures (``rel_rms`` of the post-norm hidden states), computed in PyTorch.

The quantized layers are the build's own (``ThinkerModule._layers``: RTN, AWQ with its
calibration, W8A8 with smoothing), run as transformers ``Qwen2_5OmniDecoderLayer`` modules whose
int4 weights are dequantized and whose W8A8 linears compute as the graph does
(``quant.w8a8.w8a8_matmul``); the reference is the float checkpoint. The input is verify's own
(``omni_export.verify.checks.thinker.decoder_sample``: the token embeddings of its seeded
random ids). So the figure equals ``verify --json``'s
``graphs.thinker_decoder.rel_rms`` up to the float rounding of ONNX Runtime against PyTorch, in
seconds instead of a build and a verify (benchmarks/awq_study.py, tests/test_awq_sweep.py).
"""

from __future__ import annotations

import numpy as np

__all__ = ["decoder_error"]


class _Int4Linear:
    """A dequantized int4 linear whose input is first quantized to int8 per block of the weight's
    group, as onnxruntime's MatMulNBits computes with ``accuracy_level`` 4 on CPU (MLAS
    ``QuantizeARow_CompInt8``: per block ``scale = absmax / 127``, levels ``round(x / scale)``)."""

    def __init__(self, weight: np.ndarray, bias, group_size: int):
        import torch

        self.weight = torch.from_numpy(weight)
        self.bias = None if bias is None else torch.from_numpy(np.asarray(bias, np.float32))
        self.group_size = group_size

    def __call__(self, x):
        import torch.nn.functional as F

        return F.linear(_int8_blocks(x, self.group_size), self.weight, self.bias)


def _int8_blocks(x, group_size: int):
    import torch.nn.functional as F

    k = x.shape[-1]
    pad = -k % group_size
    xb = F.pad(x, (0, pad)).unflatten(-1, (-1, group_size))
    scale = xb.abs().amax(dim=-1, keepdim=True) / 127.0
    inv = 1.0 / scale.where(scale > 0, 1.0)
    return ((xb * inv).round() * scale).flatten(-2)[..., :k]


class _W8A8Linear:
    """A W8A8 linear as the graph computes it (int8 activations per token / tensor, int32 sums)."""

    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias

    def __call__(self, x):
        import torch

        from omni_export.quant.w8a8 import w8a8_matmul

        return torch.from_numpy(w8a8_matmul(x.detach().numpy(), self.weight, self.bias))


def _torch_layer(text_config, i: int, layer, int8_compute: bool):
    """``layer`` (a ``DecoderLayer`` as the build writes it) as a transformers module;
    ``int8_compute``: its int4 linears quantize their inputs as MatMulNBits accuracy level 4."""
    import dataclasses

    from omni_export.export.decoder_weights import LINEARS
    from omni_export.export.onnx_graph import Linear
    from omni_export.export.thinker_weights import torch_decoder_layer
    from omni_export.quant.types import QuantWeight, W8A8Weight

    fields, calls = {}, {}
    for field in LINEARS:
        linear = getattr(layer, field)
        if isinstance(linear.weight, QuantWeight):
            fields[field] = Linear(linear.weight.dequantize(), linear.bias)
            if int8_compute:
                calls[field] = _Int4Linear(fields[field].weight, linear.bias, linear.weight.group_size)
        elif isinstance(linear.weight, W8A8Weight):
            calls[field] = _W8A8Linear(linear.weight, linear.bias)
            fields[field] = Linear(linear.weight.dequantize(), linear.bias)
        elif not isinstance(linear.weight, np.ndarray):
            raise TypeError(f"decoder_error does not run {type(linear.weight).__name__} linears")
    module = torch_decoder_layer(text_config, i, dataclasses.replace(layer, **fields))
    for field, fn in calls.items():
        parent, _, name = LINEARS[field].rpartition(".")
        setattr(getattr(module, parent), name, _as_module(fn))
    return module


def _as_module(fn):
    import torch

    class _Call(torch.nn.Module):
        def forward(self, x):
            return fn(x)

    return _Call()


def decoder_error(ckpt, recipe, inputs: np.ndarray | None = None, int8_compute: bool | None = None) -> dict:
    """``{"rel_rms", "max_abs"}`` of the thinker decoder that ``recipe`` (a ``Recipe``) builds
    from checkpoint ``ckpt`` (a ``Checkpoint`` or its directory), against the float checkpoint,
    on verify's prefill (module docstring), or on ``inputs`` [batch, seq, hidden].
    ``int8_compute`` (default: the recipe's ``accuracy_level`` is 4) quantizes the int4 linears'
    inputs as the CPU runtime does."""
    import torch

    from omni_export.checkpoint.reader import Checkpoint
    from omni_export.export.thinker_weights import torch_decoder_layer
    from omni_export.modules.thinker import CalibrationLog, ThinkerModule
    from omni_export.quant.awq import layer_kwargs_for
    from omni_export.verify.metrics import errors

    if not isinstance(ckpt, Checkpoint):
        ckpt = Checkpoint.open(ckpt)
    cfg = ckpt.text_config()
    settings = recipe.modules["thinker"]
    module = ThinkerModule(ckpt, settings, recipe.calibration)
    if int8_compute is None:
        int8_compute = settings.accuracy_level == 4  # the runtime's CPU session setting
    reference = ThinkerModule.reference(ckpt)
    if inputs is None:
        from omni_export.verify.checks.thinker import decoder_sample
        from omni_export.verify.context import SEED

        inputs = decoder_sample(ckpt, SEED, table=reference.weights().embedding())
    x = torch.from_numpy(np.asarray(inputs, np.float32))
    kwargs = layer_kwargs_for(cfg, x.shape[1])
    ours, ref = x, x
    with torch.no_grad():
        quantized = module._layers(module.weights(), CalibrationLog())
        for i, (q, f) in enumerate(zip(quantized, reference.float_layers())):
            ours = _out(_torch_layer(cfg, i, q, int8_compute)(ours, **kwargs))
            ref = _out(torch_decoder_layer(cfg, i, f)(ref, **kwargs))
        norm_weight = torch.from_numpy(reference.weights().final_norm())
        ours, ref = (_rms_norm(h, norm_weight, cfg.rms_norm_eps) for h in (ours, ref))
    max_abs, rel = errors(ours.numpy(), ref.numpy())
    return {"rel_rms": rel, "max_abs": max_abs}


def _out(out):
    return out[0] if isinstance(out, tuple) else out


def _rms_norm(h, weight, eps: float):
    import torch

    variance = h.pow(2).mean(-1, keepdim=True)
    return weight * (h * torch.rsqrt(variance + eps))
