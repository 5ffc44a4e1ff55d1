"""W8A8 linears in ONNX: int8 weights per output channel, int8 activations per token at run time.

:class:`W8A8GraphBuilder` is the decoder's ``GraphBuilder`` that also writes
``omni_export.quant.types.W8A8Weight`` linears (any other weight goes to the base class, built
exactly as before). The activation entering a linear is quantized once, whichever linears read
it (q/k/v, gate/up), and its packed linears share one integer GEMM::

    absmax  = ReduceMax(Abs(x), axes=[-1], keepdims=1)        (per tensor: over every axis)
    x_scale = Max(absmax, ACT_EPS) / 127                      [batch, sequence, 1]
    levels  = Clip(Round(x / x_scale), -127, 127)             (half to even)

and then one of three forms (``emit``):

- ``matmulinteger_u8`` (the CPU default; standard ONNX): the levels + 128 as uint8 with the scalar
  zero point 128, which is onnxruntime's fast CPU path (MLAS u8 x s8; int8 x int8 is several
  times slower there: benchmarks/w8a8_forms.py)::

      y = Cast(MatMulInteger(Cast(levels + 128, uint8), W int8 [K, N], 128), float) * w_scale[N] * x_scale

- ``matmulinteger`` (standard ONNX, runs on the CPU and CUDA providers: CUDA's only integer
  GEMM is ``MatMulInteger`` with int8 x int8 and scalar zero points; the cuda target's form)::

      y = Cast(MatMulInteger(Cast(levels, int8), W int8 [K, N]), float) * w_scale[N] * x_scale

- ``matmulintegertofloat`` (onnxruntime's CPU-only ``com.microsoft.MatMulIntegerToFloat``, whose
  CPU kernel takes a uint8 activation with a scalar zero point: the symmetric levels + 128 with
  zero point 128; it multiplies by the per-column ``w_scale`` inside the GEMM and by the
  non-scalar ``x_scale`` after it)::

      y = MatMulIntegerToFloat(Cast(levels + 128, uint8), W, x_scale, w_scale, 128)

All compute ``float32(int32 accumulation) * w_scale * x_scale`` (the accumulation of
``(levels + 128 - 128) * W`` is the same integer): ``quant.w8a8.w8a8_matmul`` is the numpy
reference of each.

Static activations (``omni_export.quant.types.W8A8StaticWeight``, msModelSlim's ``W8A8``): the
levels come from the calibrated scale and offset, the int32 ``quant_bias`` is added to the
accumulation and ``deq_scale`` multiplies once (``quant.w8a8.w8a8_static_matmul``)::

    levels = Clip(Round(x / input_scale + input_offset), -128, 127)
    y      = Cast(MatMulInteger(levels as uint8 + 128 | int8, W, 128 | -) + quant_bias, float) * deq_scale

``matmulintegertofloat`` has no integer bias input (its float bias would round differently from
``(acc + quant_bias) * deq_scale``), so a static linear is built with ``MatMulInteger`` in that
form too: uint8 activations, the CPU's fast path.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from omni_export.build.recipes import W8A8_EMITS
from omni_export.export.onnx_graph import MS_DOMAIN, GraphBuilder, Linear
from omni_export.quant.types import W8A8StaticWeight, W8A8Weight
from omni_export.quant.w8a8 import ACT_EPS, QMAX

__all__ = ["W8A8GraphBuilder", "W8A8_EMITS"]


class W8A8GraphBuilder(GraphBuilder):
    """A ``GraphBuilder`` whose ``linear`` / ``linears`` also take ``W8A8Weight`` linears. In a float16
    graph only the float parts are float16: each int8 GEMM quantizes its activation from float32 and
    rescales its int32 sums in float32 (a sum of 127 x 127 x K exceeds float16's range), then casts
    the result once (``to_compute``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.emit not in W8A8_EMITS:
            raise ValueError(f"a W8A8 graph's emit must be one of {', '.join(W8A8_EMITS)}, got {self.emit!r}")
        self._quantized: dict[tuple[int, str], tuple[ir.Value, ir.Value]] = {}

    def linear(self, x: ir.Value, linear: Linear, name: str) -> ir.Value:
        if isinstance(linear.weight, W8A8StaticWeight):
            if linear.bias is not None:  # quant_bias carries it (msModelSlim's AscendV1 W8A8)
                raise ValueError(f"{name}: a static W8A8 linear carries its bias in quant_bias")
            return self.w8a8_static_matmul(x, linear.weight, name)
        if not isinstance(linear.weight, W8A8Weight):
            return super().linear(x, linear, name)
        y = self.w8a8_matmul(x, linear.weight, name)
        if linear.bias is not None:
            y = self.op("Add", y, self.fweight(f"{name}.bias", linear.bias))
        return y

    def linears(self, x: ir.Value, linears: list[Linear], names: list[str]) -> list[ir.Value]:
        weights = [lin.weight for lin in linears]
        if all(isinstance(w, W8A8StaticWeight) for w in weights):
            return self._static_linears(x, linears, names)
        if not all(isinstance(w, W8A8Weight) for w in weights):
            return super().linears(x, linears, names)
        first = weights[0]
        if any((w.activations, w.q.shape[1]) != (first.activations, first.q.shape[1]) for w in weights):
            return [self.linear(x, lin, name) for lin, name in zip(linears, names)]
        packed = W8A8Weight(np.concatenate([w.q for w in weights]), np.concatenate([w.scales for w in weights]),
                            first.activations)
        if all(lin.bias is None for lin in linears):
            bias = None
        else:
            bias = np.concatenate([lin.bias if lin.bias is not None else np.zeros(lin.shape[0], np.float32)
                                   for lin in linears])
        y = self.linear(x, Linear(packed, bias), "+".join(names))
        return list(self.ops("Split", y, self.const([w.q.shape[0] for w in weights]), outputs=len(linears),
                             axis=-1))

    def quantize_activation(self, x: ir.Value, activations: str) -> tuple[ir.Value, ir.Value]:
        """(levels as float, x_scale) of ``x``, made once per value and granularity."""
        key = (id(x), activations)
        if key not in self._quantized:
            x = self.to_float32(x)  # a float16 graph's activation is quantized from float32, as a float32 graph's
            magnitude = self.op("Abs", x)
            if activations == "per_token":
                absmax = self.op("ReduceMax", magnitude, self.const([-1]), keepdims=1)
            elif activations == "per_tensor":
                absmax = self.op("ReduceMax", magnitude, keepdims=0)
            else:
                raise ValueError(f"unknown W8A8 activations {activations!r}")
            scale = self.op("Div", self.op("Max", absmax, self.const(ACT_EPS, np.float32)),
                            self.const(QMAX, np.float32))
            levels = self.op("Clip", self.op("Round", self.op("Div", x, scale)), self.const(-QMAX, np.float32),
                             self.const(QMAX, np.float32))
            self._quantized[key] = (levels, scale)
        return self._quantized[key]

    def w8a8_matmul(self, x: ir.Value, w: W8A8Weight, name: str) -> ir.Value:
        """``x @ W.T`` of a W8A8 weight (no bias), in the builder's ``emit`` form."""
        w.validate()
        levels, x_scale = self.quantize_activation(x, w.activations)
        qweight = self.weight(f"{name}.qweight", np.ascontiguousarray(w.q.T))      # int8 [K, N]
        w_scale = self.weight(f"{name}.weight_scale", w.scales.astype(np.float32))  # [N]
        if self.emit in ("matmulintegertofloat", "matmulinteger_u8"):
            shifted = self._shared(("u8", id(levels)), lambda: self.op(
                "Cast", self.op("Add", levels, self.const(128.0, np.float32)), to=ir.DataType.UINT8))
            if self.emit == "matmulintegertofloat":
                return self.to_compute(self.op("MatMulIntegerToFloat", shifted, qweight, x_scale, w_scale,
                                               self.const(128, np.uint8), domain=MS_DOMAIN))
            acc = self.op("MatMulInteger", shifted, qweight, self.const(128, np.uint8))
        else:
            int8 = self._shared(("s8", id(levels)), lambda: self.op("Cast", levels, to=ir.DataType.INT8))
            acc = self.op("MatMulInteger", int8, qweight)
        return self.to_compute(self.op("Mul", self.op("Mul", self.op("Cast", acc, to=ir.DataType.FLOAT), w_scale),
                                       x_scale))


    def _static_linears(self, x: ir.Value, linears: list[Linear], names: list[str]) -> list[ir.Value]:
        """Static linears reading one input share one GEMM when they share its scale and offset."""
        weights = [lin.weight for lin in linears]
        first = weights[0]
        if any((w.activation_key, w.q.shape[1]) != (first.activation_key, first.q.shape[1]) for w in weights):
            return [self.linear(x, lin, name) for lin, name in zip(linears, names)]
        packed = W8A8StaticWeight(np.concatenate([w.q for w in weights]), first.input_scale, first.input_offset,
                                  np.concatenate([w.deq_scale for w in weights]),
                                  np.concatenate([w.quant_bias for w in weights]))
        y = self.linear(x, Linear(packed, None), "+".join(names))
        return list(self.ops("Split", y, self.const([w.q.shape[0] for w in weights]), outputs=len(linears),
                             axis=-1))

    def w8a8_static_matmul(self, x: ir.Value, w: W8A8StaticWeight, name: str) -> ir.Value:
        """``x @ W.T + bias`` of a static W8A8 weight: int32 accumulation + quant_bias, * deq_scale."""
        w.validate()
        key = ("static", id(x), w.activation_key)
        if key not in self._quantized:
            x = self.to_float32(x)
            scale = self.weight(f"{name}.input_scale", w.input_scale.reshape(()))
            offset = self.weight(f"{name}.input_offset", w.input_offset.reshape(()))
            levels = self.op("Clip", self.op("Round", self.op("Add", self.op("Div", x, scale), offset)),
                             self.const(-128.0, np.float32), self.const(127.0, np.float32))
            self._quantized[key] = levels
        levels = self._quantized[key]
        qweight = self.weight(f"{name}.qweight", np.ascontiguousarray(w.q.T))      # int8 [K, N]
        if self.emit == "matmulinteger":
            int8 = self._shared(("s8", id(levels)), lambda: self.op("Cast", levels, to=ir.DataType.INT8))
            acc = self.op("MatMulInteger", int8, qweight)
        else:
            shifted = self._shared(("u8", id(levels)), lambda: self.op(
                "Cast", self.op("Add", levels, self.const(128.0, np.float32)), to=ir.DataType.UINT8))
            acc = self.op("MatMulInteger", shifted, qweight, self.const(128, np.uint8))
        acc = self.op("Add", acc, self.weight(f"{name}.quant_bias", w.quant_bias))
        return self.to_compute(self.op("Mul", self.op("Cast", acc, to=ir.DataType.FLOAT),
                                       self.weight(f"{name}.deq_scale", w.deq_scale)))

    def _shared(self, key, make):
        if key not in self._quantized:
            self._quantized[key] = make()
        return self._quantized[key]
