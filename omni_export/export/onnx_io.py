"""Shared helpers for exporting a torch module to one ONNX file (+ external data)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

OPSET = 18
# Graphs above this size keep their weights in "<file>.data" next to the model.
EXTERNAL_DATA_THRESHOLD = 1 << 20


@dataclass(frozen=True)
class TensorIO:
    """One graph input or output: name, ONNX dtype name and shape (ints or axis names)."""

    name: str
    dtype: str
    shape: tuple

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ExportedGraph:
    """What an exporter wrote: the model file, its external data files, and its IO."""

    file: str
    external_data: tuple[str, ...]
    inputs: tuple[TensorIO, ...]
    outputs: tuple[TensorIO, ...]
    opset: int = OPSET
    #: the float type its activations are computed in (the manifest's graph ``dtype``)
    dtype: str = "float32"


def export_module(
    module: torch.nn.Module,
    args: tuple,
    out_dir: Path,
    file_name: str,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes,
) -> list[str]:
    """Export ``module`` with the dynamo exporter and save it as ``out_dir/file_name``.

    Weights go to one external data file when the graph is large. Returns the list of
    external data file names written (relative to ``out_dir``).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=OPSET,
            dynamo=True,
            external_data=True,
            verbose=False,
        )
    program.optimize()
    path = out_dir / file_name
    data_name = f"{file_name}.data"
    size = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)
    # ONNXProgram.save goes through onnx-ir, so graphs over protobuf's 2 GB limit are fine.
    program.save(str(path), external_data=size > EXTERNAL_DATA_THRESHOLD)
    return [data_name] if (out_dir / data_name).exists() else []
