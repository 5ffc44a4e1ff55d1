"""Build ONNX graphs directly with onnx-ir, weights streamed into external data.

This is the route of onnxruntime-genai's model builder: the graph is written op by op with
explicit IO names, and weights are never traced. Each weight is appended to the graph's
``.onnx.data`` file as soon as it is produced (one decoder layer at a time), and the graph
only holds a reference (offset, length) to it, so building a 28-layer 7B decoder needs about
one layer's tensors in memory, not the model.

``GraphBuilder`` wraps ``onnx_ir.tape.Tape`` with the few composite ops the Qwen2.5-Omni
graphs need: linears in float, int4/int8 block-quantized (standard DequantizeLinear + MatMul,
which onnxruntime fuses into MatMulNBits, or MatMulNBits written directly), int8 per output
channel (DequantizeLinear with a per-axis scale + MatMul or Conv), RMSNorm.

Float type (``dtype``): a graph computes in float32 or float16. In a float16 graph the float
weights are cast as they are streamed (one tensor at a time), float constants are float16
(``fconst``), and the float graph inputs and outputs stay float32 (``float_input`` /
``float_output`` put the Cast inside the graph), so a host feeds the same arrays whatever the
precision. Builders keep in float32 what float16 cannot carry (``to_float32``): positions and
times turned into angles (rotary, sinusoids), and anything ``keep_fp32`` names. A float32 graph
is built exactly as before (same nodes, names and bytes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir

from omni_export.quant.types import ChannelQuantWeight, QuantWeight
from omni_export.export.onnx_io import ExportedGraph, TensorIO

OPSET = 21  # blocked DequantizeLinear (block_size) needs opset 21
MS_DOMAIN = "com.microsoft"
ALIGN = 4096  # page-aligned offsets let onnxruntime memory-map large external tensors
EMBED_THRESHOLD = 1024  # bytes: smaller tensors stay inside the .onnx file
FLOAT_TYPES = {"float32": (ir.DataType.FLOAT, np.float32), "float16": (ir.DataType.FLOAT16, np.float16)}
FLOAT16_MAX = float(np.finfo(np.float16).max)
MASK16 = 32768.0  # float16 stand-in for -inf / float32's minimum in additive masks (float16_safe)

IR_DTYPES = {
    np.dtype(np.float32): ir.DataType.FLOAT,
    np.dtype(np.float16): ir.DataType.FLOAT16,
    np.dtype(np.int64): ir.DataType.INT64,
    np.dtype(np.int32): ir.DataType.INT32,
    np.dtype(np.uint8): ir.DataType.UINT8,
    np.dtype(np.int8): ir.DataType.INT8,
    np.dtype(ml_dtypes.uint4): ir.DataType.UINT4,
    np.dtype(ml_dtypes.int4): ir.DataType.INT4,
}
MANIFEST_DTYPES = {
    ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.INT64: "int64",
    ir.DataType.INT32: "int32", ir.DataType.UINT8: "uint8", ir.DataType.INT8: "int8", ir.DataType.BOOL: "bool",
}


@dataclass
class Linear:
    """A linear layer's weight ``[out, in]`` (float array or QuantWeight) and optional bias ``[out]``."""

    weight: np.ndarray | QuantWeight | ChannelQuantWeight
    bias: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        quantized = isinstance(self.weight, (QuantWeight, ChannelQuantWeight))
        return tuple(self.weight.q.shape) if quantized else tuple(self.weight.shape)


class WeightFile:
    """Appends tensors to one external data file and hands out references to them."""

    def __init__(self, out_dir: Path, name: str):
        self.out_dir = Path(out_dir)
        self.name = name
        self._file = open(self.out_dir / name, "wb")
        self.offset = 0
        self.used = False

    def add(self, name: str, array: np.ndarray) -> ir.TensorProtocol:
        """The tensor for ``array``: in the graph when tiny, else appended to the data file."""
        array = np.ascontiguousarray(array).reshape(np.shape(array))  # ascontiguousarray makes scalars 1-D
        dtype = IR_DTYPES[array.dtype]
        if array.nbytes <= EMBED_THRESHOLD:
            return ir.tensor(array, dtype=dtype, name=name)
        raw = ir.tensor(array, dtype=dtype).tobytes()  # packs 4-bit types two per byte
        pad = (-self.offset) % ALIGN if len(raw) >= ALIGN else 0
        if pad:
            self._file.write(b"\0" * pad)
            self.offset += pad
        self._file.write(raw)
        tensor = ir.ExternalTensor(self.name, self.offset, len(raw), dtype, shape=ir.Shape(array.shape),
                                   name=name, base_dir=self.out_dir)
        self.offset += len(raw)
        self.used = True
        return tensor

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if not self.used:
            (self.out_dir / self.name).unlink(missing_ok=True)


class GraphBuilder:
    """Nodes, initializers and IO of one graph being built; ``save`` writes it."""

    def __init__(self, out_dir: Path, file_name: str, emit: str = "qdq", accuracy_level: int = 0,
                 dtype: str = "float32", keep_fp32: frozenset[str] | tuple[str, ...] = ()):
        if dtype not in FLOAT_TYPES:
            raise ValueError(f"dtype must be one of {', '.join(FLOAT_TYPES)}, got {dtype!r}")
        self.out_dir = Path(out_dir)
        self.file_name = file_name
        self.weights = WeightFile(self.out_dir, f"{file_name}.data")
        self.tape = ir.tape.Tape()
        self.inputs: list[ir.Value] = []
        self.outputs: list[ir.Value] = []
        self.emit = emit
        self.accuracy_level = accuracy_level
        self.dtype = dtype
        #: the compute float type (ONNX, numpy)
        self.F, self.np_float = FLOAT_TYPES[dtype]
        #: parts a float16 graph computes in float32 (builder-specific names, e.g. "norm", "softmax")
        self.keep_fp32 = frozenset(keep_fp32)
        self._consts: dict[tuple, ir.Value] = {}
        self._fp32_values: set[int] = set()  # ids of the float32 values of a float16 graph (op outputs carry no type)

    @property
    def half(self) -> bool:
        """True for a float16 graph."""
        return self.dtype == "float16"

    def fp32(self, part: str) -> bool:
        """True if ``part`` runs in float32 (always in a float32 graph)."""
        return not self.half or part in self.keep_fp32

    # -- IO and constants ---------------------------------------------------------------
    def input(self, name: str, dtype: ir.DataType, shape: tuple) -> ir.Value:
        value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))
        self.inputs.append(value)
        return value

    def output(self, value: ir.Value, name: str, dtype: ir.DataType, shape: tuple) -> None:
        value.name = name
        value.type = ir.TensorType(dtype)
        value.shape = ir.Shape(shape)
        self.outputs.append(value)

    def float_input(self, name: str, shape: tuple) -> ir.Value:
        """A float32 graph input, as the compute type (a Cast inside a float16 graph)."""
        return self.to_compute(self.input(name, ir.DataType.FLOAT, shape))

    def float_output(self, value: ir.Value, name: str, shape: tuple) -> None:
        """A float32 graph output from a compute-type value (a Cast inside a float16 graph)."""
        self.output(self.to_float32(value), name, ir.DataType.FLOAT, shape)

    def is_fp32(self, x: ir.Value) -> bool:
        """True if ``x`` is float32 in a float16 graph (a float32 input, or made by ``to_float32``,
        ``mark_fp32``)."""
        return self.half and (id(x) in self._fp32_values or x.dtype == ir.DataType.FLOAT)

    def mark_fp32(self, x: ir.Value) -> ir.Value:
        """Record that ``x`` (an op output of a float16 graph) is float32; returns it."""
        if self.half:
            self._fp32_values.add(id(x))
        return x

    def to_compute(self, x: ir.Value) -> ir.Value:
        """``x`` (float32) as the compute type: a Cast in a float16 graph, ``x`` itself otherwise."""
        return self.op("Cast", x, to=self.F) if self.half else x

    def to_float32(self, x: ir.Value) -> ir.Value:
        """``x`` as float32: a Cast in a float16 graph (none if ``x`` is float32 already), ``x``
        itself otherwise."""
        if not self.half or self.is_fp32(x):
            return x
        return self.mark_fp32(self.op("Cast", x, to=ir.DataType.FLOAT))

    def cast(self, x: ir.Value, fp32: bool) -> ir.Value:
        """``x`` as float32 when ``fp32``, else unchanged: the input of a part kept in float32."""
        return self.to_float32(x) if fp32 else x

    def uncast(self, x: ir.Value, fp32: bool) -> ir.Value:
        """The output of a part kept in float32 (``fp32``) back in the compute type."""
        return self.to_compute(x) if fp32 else x

    def weight(self, name: str, array: np.ndarray) -> ir.Value:
        tensor = self.weights.add(name, array)
        value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=tensor.shape, const_value=tensor)
        self.tape._initializers.append(value)  # Tape.initializer() would copy small arrays only
        return value

    def fweight(self, name: str, array: np.ndarray, fp32: bool = False) -> ir.Value:
        """A float weight in the compute type (float32 when ``fp32``), cast as it is written: one
        tensor at a time, never a module's weights at once. A finite value beyond float16's range
        is an error naming the tensor (it would become infinity)."""
        array = np.asarray(array)
        if fp32 or not self.half:
            return self.weight(name, array.astype(np.float32))
        if array.size and np.abs(array[np.isfinite(array)]).max(initial=0.0) > FLOAT16_MAX:
            raise ValueError(f"weight {name} of {self.file_name} holds values beyond float16's range "
                             f"({FLOAT16_MAX:g}); build this module in float32 or int8")
        return self.weight(name, array.astype(np.float16))

    def const(self, array, dtype=np.int64) -> ir.Value:
        """A small constant (shape vectors, axes), shared by value."""
        array = np.asarray(array, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(f"const_{len(self._consts)}", array)
        return self._consts[key]

    def fconst(self, array, fp32: bool = False) -> ir.Value:
        """A float constant in the compute type (float32 when ``fp32``); in float16, infinities and
        float32's extremes (masks) become +-32768 (``float16_safe``)."""
        if fp32 or not self.half:
            return self.const(array, np.float32)
        return self.const(float16_safe(np.asarray(array, dtype=np.float64)), np.float16)

    # -- ops ------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs, domain: str = "", **attributes) -> ir.Value:
        return self.tape.op(op_type, list(inputs), attributes or None, domain=domain)

    def ops(self, op_type: str, *inputs, outputs: int, domain: str = "", **attributes) -> tuple[ir.Value, ...]:
        return tuple(self.tape.op_multi_out(op_type, list(inputs), attributes or None, num_outputs=outputs,
                                            domain=domain))

    def rms_norm(self, x: ir.Value, weight: np.ndarray, eps: float, name: str) -> ir.Value:
        """RMSNorm (statistics in float32: ``stash_type=1``); in float32 throughout when
        ``keep_fp32`` has ``norm``."""
        fp32 = self.half and "norm" in self.keep_fp32
        if not fp32:
            x = self.stream(x)
        y = self.op("SimplifiedLayerNormalization", self.cast(x, fp32), self.fweight(name, weight, fp32),
                    axis=-1, epsilon=float(eps), stash_type=1)
        return self.uncast(self.mark_fp32(y) if fp32 else y, fp32)

    def skip_rms_norm(self, x: ir.Value, skip: ir.Value, weight: np.ndarray, eps: float,
                      name: str) -> tuple[ir.Value, ir.Value]:
        """(RMSNorm(x + skip), x + skip): onnxruntime's fused residual add and norm. With ``norm``
        in ``keep_fp32`` a float16 graph carries the residual stream ``skip`` in float32 (the
        first call's ``skip`` may be either type) and casts only the normed output back."""
        if self.half and "norm" in self.keep_fp32:
            normed, _, _, summed = self.ops("SkipSimplifiedLayerNormalization", self.to_float32(x),
                                            self.to_float32(skip), self.fweight(name, weight, True), outputs=4,
                                            domain=MS_DOMAIN, epsilon=float(eps))
            self.mark_fp32(normed)
            return self.to_compute(normed), self.mark_fp32(summed)
        normed, _, _, summed = self.ops("SkipSimplifiedLayerNormalization", x, skip,
                                        self.fweight(name, weight), outputs=4,
                                        domain=MS_DOMAIN, epsilon=float(eps))
        return normed, summed

    def layer_norm(self, x: ir.Value, weight: ir.Value | np.ndarray, bias: ir.Value | np.ndarray, eps: float,
                   name: str | None = None) -> ir.Value:
        """LayerNorm over the last axis (statistics in float32, the op's default ``stash_type``);
        in float32 throughout when ``keep_fp32`` has ``norm``. ``weight``/``bias`` are arrays
        (written as ``name.weight`` / ``name.bias``) or values already in the graph."""
        fp32 = self.half and "norm" in self.keep_fp32
        if isinstance(weight, np.ndarray):
            weight = self.fweight(f"{name}.weight", weight, fp32)
            bias = self.fweight(f"{name}.bias", bias, fp32)
        if not fp32:
            x = self.stream(x)
        y = self.op("LayerNormalization", self.cast(x, fp32), weight, bias, axis=-1, epsilon=eps)
        return self.uncast(self.mark_fp32(y) if fp32 else y, fp32)

    def softmax(self, scores: ir.Value, bias: ir.Value | None = None) -> ir.Value:
        """Softmax over the last axis of ``scores`` (+ an additive mask ``bias``, of the type the
        softmax runs in); in float32 when ``keep_fp32`` has ``softmax``."""
        fp32 = self.half and "softmax" in self.keep_fp32
        x = self.cast(scores, fp32)
        if bias is not None:
            x = self.op("Add", x, bias)
        y = self.op("Softmax", x, axis=-1)
        return self.uncast(self.mark_fp32(y) if fp32 else y, fp32)

    def residual(self, x: ir.Value, branch: ir.Value) -> ir.Value:
        """``x + branch`` of a residual stream; with ``residual`` in ``keep_fp32`` a float16 graph
        carries ``x`` in float32 (``branch`` is cast up): the stream is where large values build up."""
        if self.half and "residual" in self.keep_fp32:
            return self.mark_fp32(self.op("Add", self.to_float32(x), self.to_float32(branch)))
        return self.op("Add", x, branch)

    def stream(self, x: ir.Value) -> ir.Value:
        """A residual-stream value as the compute type, for the ops that read it (a Cast if it
        is carried in float32)."""
        return self.to_compute(x) if self.is_fp32(x) else x

    def linear(self, x: ir.Value, linear: Linear, name: str) -> ir.Value:
        """``x @ W.T + b`` for a float, block-quantized or per-channel int8 weight."""
        w = linear.weight
        if isinstance(w, ChannelQuantWeight):
            y = self.op("MatMul", x, self.channel_weight(f"{name}.weight", w, transpose=True))
        elif not isinstance(w, QuantWeight):
            y = self.op("MatMul", x, self.fweight(f"{name}.weight", np.ascontiguousarray(w.T)))
        elif self.emit == "matmulnbits":
            y = self._matmulnbits(x, w, name)
        else:
            y = self._dq_matmul(x, w, name)
        if linear.bias is not None:
            y = self.op("Add", y, self.fweight(f"{name}.bias", linear.bias))
        return y

    def channel_weight(self, name: str, w: ChannelQuantWeight, transpose: bool = False) -> ir.Value:
        """The float weight of a per-output-channel int8 ``w``, dequantized in the graph:
        ``DequantizeLinear(int8 levels, scale [N], axis)`` with the scale in the compute type.
        ``transpose``: a linear's [N, K] stored as MatMul's [K, N] (the channel axis becomes 1;
        onnxruntime fuses this DequantizeLinear + MatMul into MatMulNBits with 8 bits). Otherwise
        the levels keep their shape (a convolution's [out, in, k], channel axis 0)."""
        levels = np.ascontiguousarray(w.q.T) if transpose else w.q
        if transpose and levels.ndim != 2:
            raise ValueError(f"{name}: only a 2-D weight can be transposed, got shape {w.q.shape}")
        scales = w.scales.astype(self.np_float)
        return self.op("DequantizeLinear", self.weight(f"{name}.qweight", levels),
                       self.weight(f"{name}.scales", scales), axis=1 if transpose else 0)

    def conv_weight(self, name: str, weight: np.ndarray | ChannelQuantWeight, transposed: bool = False) -> ir.Value:
        """A convolution's weight [out, in, k...] (``transposed``: a ConvTranspose's [in, out, k...]):
        float in the compute type, or int8 per output channel dequantized in the graph
        (``channel_weight``; a ConvTranspose's ``ChannelQuantWeight`` holds [out, in, k...] levels,
        stored back in its layout with the scale on axis 1)."""
        if not isinstance(weight, ChannelQuantWeight):
            return self.fweight(name, weight)
        if not transposed:
            return self.channel_weight(name, weight)
        levels = np.ascontiguousarray(np.swapaxes(weight.q, 0, 1))
        return self.op("DequantizeLinear", self.weight(f"{name}.qweight", levels),
                       self.weight(f"{name}.scales", weight.scales.astype(self.np_float)), axis=1)

    def linears(self, x: ir.Value, linears: list[Linear], names: list[str]) -> list[ir.Value]:
        """Several linears of the same input: one packed MatMul (weights concatenated along the
        outputs) and a Split, when their weights are alike (all float, or all quantized with the
        same bits and group size); separate MatMuls otherwise. One kernel call instead of three
        for q/k/v (two for gate/up) makes a decode step cheaper."""
        widths = [lin.shape[0] for lin in linears]
        packed = _pack(linears)
        if packed is None:
            return [self.linear(x, lin, name) for lin, name in zip(linears, names)]
        y = self.linear(x, packed, "+".join(names))
        return list(self.ops("Split", y, self.const(widths), outputs=len(linears), axis=-1))

    def _dq_matmul(self, x: ir.Value, w: QuantWeight, name: str) -> ir.Value:
        from omni_export.quant.packing import to_blocked_dq

        levels, scales, zeros = to_blocked_dq(w)  # [K, N], [G, N], [G, N]
        qtype = ml_dtypes.uint4 if w.bits == 4 else np.uint8
        weight = self.op("DequantizeLinear", self.weight(f"{name}.qweight", levels.astype(qtype)),
                         self.weight(f"{name}.scales", scales.astype(self.np_float)),
                         self.weight(f"{name}.zero_points", zeros.astype(qtype)),
                         axis=0, block_size=int(w.group_size))
        return self.op("MatMul", x, weight)

    def _matmulnbits(self, x: ir.Value, w: QuantWeight, name: str) -> ir.Value:
        from omni_export.quant.packing import to_matmulnbits

        blob, scales, zeros = to_matmulnbits(w)
        n, k = w.q.shape
        return self.op("MatMulNBits", x, self.weight(f"{name}.qweight", blob),
                       self.weight(f"{name}.scales", scales.astype(self.np_float)),
                       self.weight(f"{name}.zero_points", zeros),
                       domain=MS_DOMAIN, K=int(k), N=int(n), bits=int(w.bits), block_size=int(w.group_size),
                       accuracy_level=int(self.accuracy_level))

    # -- saving ---------------------------------------------------------------------------
    def save(self) -> ExportedGraph:
        """Write ``file_name`` (its external data is already on disk) and describe its IO."""
        self.weights.close()
        opsets = {"": OPSET, MS_DOMAIN: 1}
        graph = ir.Graph(self.inputs, self.outputs, nodes=self.tape.nodes, initializers=self.tape.initializers,
                         opset_imports=opsets, name=self.file_name.removesuffix(".onnx"))
        model = ir.Model(graph, ir_version=10, producer_name="omni-export")
        path = self.out_dir / self.file_name
        tmp = path.with_name(path.name + ".tmp")
        ir.save(model, tmp)
        os.replace(tmp, path)
        external = (self.weights.name,) if self.weights.used else ()
        return ExportedGraph(self.file_name, external, graph_io(self.inputs), graph_io(self.outputs), opset=OPSET,
                             dtype=self.dtype)


def float16_safe(array: np.ndarray) -> np.ndarray:
    """``array`` with infinities and values beyond float16's range replaced by +-32768 (a mask
    of ``-inf`` or float32's minimum): half of float16's range, so that mask + score stays finite
    and a fully masked row gives a uniform softmax as in float32, not NaN, while exp(-32768) is
    still exactly 0 for the masked entries of any other row."""
    big = np.float64(MASK16)
    out = np.where(np.abs(array) > FLOAT16_MAX, np.sign(array) * big, array)
    return np.where(np.isnan(out), 0.0, out)


def _pack(linears: list[Linear]) -> Linear | None:
    """The linears concatenated along their outputs, or None when they cannot share a MatMul."""
    weights = [lin.weight for lin in linears]
    if all(isinstance(w, QuantWeight) for w in weights):
        first = weights[0]
        if any((w.bits, w.group_size, w.q.shape[1]) != (first.bits, first.group_size, first.q.shape[1]) for w in weights):
            return None
        weight = QuantWeight(np.concatenate([w.q for w in weights]), np.concatenate([w.scales for w in weights]),
                             np.concatenate([w.zeros for w in weights]), first.group_size, first.bits)
    elif all(isinstance(w, ChannelQuantWeight) for w in weights):  # channels are independent: concatenate
        weight = ChannelQuantWeight(np.concatenate([w.q for w in weights]), np.concatenate([w.scales for w in weights]))
    elif all(isinstance(w, np.ndarray) for w in weights):
        weight = np.concatenate(weights)
    else:
        return None
    if all(lin.bias is None for lin in linears):
        bias = None
    else:
        bias = np.concatenate([lin.bias if lin.bias is not None else np.zeros(lin.shape[0], np.float32)
                               for lin in linears])
    return Linear(weight, bias)


def graph_io(values: list[ir.Value]) -> tuple[TensorIO, ...]:
    """The manifest's description of graph inputs or outputs, read from the graph's values."""
    out = []
    for value in values:
        dims = tuple(d if isinstance(d, int) else str(d) for d in value.shape)
        out.append(TensorIO(value.name, MANIFEST_DTYPES[value.dtype], dims))
    return tuple(out)
