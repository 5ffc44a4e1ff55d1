"""Build ONNX graphs directly with onnx-ir, weights streamed into external data.

This is the route of onnxruntime-genai's model builder: the graph is written op by op with
explicit IO names, and weights are never traced. Each weight is appended to the graph's
``.onnx.data`` file as soon as it is produced (one decoder layer at a time), and the graph
only holds a reference (offset, length) to it, so building a 28-layer 7B decoder needs about
one layer's tensors in memory, not the model.

``GraphBuilder`` wraps ``onnx_ir.tape.Tape`` with the few composite ops the Qwen2.5-Omni
graphs need: linears in float, int4/int8 block-quantized (standard DequantizeLinear + MatMul,
which onnxruntime fuses into MatMulNBits, or MatMulNBits written directly), RMSNorm.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir

from omni_export.quant.types import QuantWeight
from omni_export.export.onnx_io import ExportedGraph, TensorIO

OPSET = 21  # blocked DequantizeLinear (block_size) needs opset 21
MS_DOMAIN = "com.microsoft"
ALIGN = 4096  # page-aligned offsets let onnxruntime memory-map large external tensors
EMBED_THRESHOLD = 1024  # bytes: smaller tensors stay inside the .onnx file

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

    weight: np.ndarray | QuantWeight
    bias: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.q.shape) if isinstance(self.weight, QuantWeight) else tuple(self.weight.shape)


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

    def __init__(self, out_dir: Path, file_name: str, emit: str = "qdq", accuracy_level: int = 0):
        self.out_dir = Path(out_dir)
        self.file_name = file_name
        self.weights = WeightFile(self.out_dir, f"{file_name}.data")
        self.tape = ir.tape.Tape()
        self.inputs: list[ir.Value] = []
        self.outputs: list[ir.Value] = []
        self.emit = emit
        self.accuracy_level = accuracy_level
        self._consts: dict[tuple, ir.Value] = {}

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

    def weight(self, name: str, array: np.ndarray) -> ir.Value:
        tensor = self.weights.add(name, array)
        value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=tensor.shape, const_value=tensor)
        self.tape._initializers.append(value)  # Tape.initializer() would copy small arrays only
        return value

    def const(self, array, dtype=np.int64) -> ir.Value:
        """A small constant (shape vectors, axes), shared by value."""
        array = np.asarray(array, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(f"const_{len(self._consts)}", array)
        return self._consts[key]

    # -- ops ------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs, domain: str = "", **attributes) -> ir.Value:
        return self.tape.op(op_type, list(inputs), attributes or None, domain=domain)

    def ops(self, op_type: str, *inputs, outputs: int, domain: str = "", **attributes) -> tuple[ir.Value, ...]:
        return tuple(self.tape.op_multi_out(op_type, list(inputs), attributes or None, num_outputs=outputs,
                                            domain=domain))

    def rms_norm(self, x: ir.Value, weight: np.ndarray, eps: float, name: str) -> ir.Value:
        return self.op("SimplifiedLayerNormalization", x, self.weight(name, weight.astype(np.float32)),
                       axis=-1, epsilon=float(eps), stash_type=1)

    def skip_rms_norm(self, x: ir.Value, skip: ir.Value, weight: np.ndarray, eps: float,
                      name: str) -> tuple[ir.Value, ir.Value]:
        """(RMSNorm(x + skip), x + skip): onnxruntime's fused residual add and norm."""
        normed, _, _, summed = self.ops("SkipSimplifiedLayerNormalization", x, skip,
                                        self.weight(name, weight.astype(np.float32)), outputs=4,
                                        domain=MS_DOMAIN, epsilon=float(eps))
        return normed, summed

    def linear(self, x: ir.Value, linear: Linear, name: str) -> ir.Value:
        """``x @ W.T + b`` for a float or block-quantized weight."""
        w = linear.weight
        if not isinstance(w, QuantWeight):
            y = self.op("MatMul", x, self.weight(f"{name}.weight", np.ascontiguousarray(w.T, dtype=np.float32)))
        elif self.emit == "matmulnbits":
            y = self._matmulnbits(x, w, name)
        else:
            y = self._dq_matmul(x, w, name)
        if linear.bias is not None:
            y = self.op("Add", y, self.weight(f"{name}.bias", linear.bias.astype(np.float32)))
        return y

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
                         self.weight(f"{name}.scales", scales.astype(np.float32)),
                         self.weight(f"{name}.zero_points", zeros.astype(qtype)),
                         axis=0, block_size=int(w.group_size))
        return self.op("MatMul", x, weight)

    def _matmulnbits(self, x: ir.Value, w: QuantWeight, name: str) -> ir.Value:
        from omni_export.quant.packing import to_matmulnbits

        blob, scales, zeros = to_matmulnbits(w)
        n, k = w.q.shape
        return self.op("MatMulNBits", x, self.weight(f"{name}.qweight", blob),
                       self.weight(f"{name}.scales", scales.astype(np.float32)),
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
        return ExportedGraph(self.file_name, external, graph_io(self.inputs), graph_io(self.outputs), opset=OPSET)


def _pack(linears: list[Linear]) -> Linear | None:
    """The linears concatenated along their outputs, or None when they cannot share a MatMul."""
    weights = [lin.weight for lin in linears]
    if all(isinstance(w, QuantWeight) for w in weights):
        first = weights[0]
        if any((w.bits, w.group_size, w.q.shape[1]) != (first.bits, first.group_size, first.q.shape[1]) for w in weights):
            return None
        weight = QuantWeight(np.concatenate([w.q for w in weights]), np.concatenate([w.scales for w in weights]),
                             np.concatenate([w.zeros for w in weights]), first.group_size, first.bits)
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
