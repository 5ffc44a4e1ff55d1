"""The thinker token embedding graph: ``input_ids [batch, sequence] -> inputs_embeds``.

A graph of its own so the host can splice audio/image/video encoder features into the
embedding sequence before the decoder runs. The table is float32, or block-quantized
(int8/int4 rows, ``QuantWeight``): the graph then gathers the quantized rows with their scales
and zero points and dequantizes only those (a blocked DequantizeLinear along the hidden axis),
so the table stays quantized in memory.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir

from omni_runtime.bundle.names import THINKER_EMBEDDING as GRAPH_NAME

from omni_export.quant.types import QuantWeight
from omni_export.export.onnx_graph import GraphBuilder
from omni_export.export.onnx_io import ExportedGraph

FILE_NAME = "thinker_embedding.onnx"


def build_graph(table: np.ndarray | QuantWeight, out_dir: Path, dtype: str = "float32") -> ExportedGraph:
    """Write ``thinker_embedding.onnx`` for a float [vocab, hidden] or quantized table. ``dtype``
    float16 stores a float table in float16 (the gathered rows are cast to the float32 output);
    a quantized table dequantizes to float32 whatever ``dtype`` is."""
    g = GraphBuilder(out_dir, FILE_NAME, dtype="float32" if isinstance(table, QuantWeight) else dtype)
    ids = g.input("input_ids", ir.DataType.INT64, ("batch", "sequence"))
    if isinstance(table, QuantWeight):
        vocab, hidden = table.q.shape
        qtype = ml_dtypes.uint4 if table.bits == 4 else np.uint8
        rows = g.op("Gather", g.weight("embed_tokens.qweight", table.q.astype(qtype)), ids, axis=0)
        scales = g.op("Gather", g.weight("embed_tokens.scales", table.scales.astype(np.float32)), ids, axis=0)
        zeros = g.op("Gather", g.weight("embed_tokens.zero_points", table.zeros.astype(qtype)), ids, axis=0)
        embeds = g.op("DequantizeLinear", rows, scales, zeros, axis=2, block_size=int(table.group_size))
    else:
        vocab, hidden = table.shape
        embeds = g.op("Gather", g.fweight("embed_tokens.weight", table), ids, axis=0)
    g.float_output(embeds, "inputs_embeds", ("batch", "sequence", hidden))
    return g.save()
