"""The talker graphs: ``talker_decoder`` (KV-cached decoder) and ``talker_embedding`` (codec table).

transformers' ``Qwen2_5OmniTalkerForConditionalGeneration`` works in the thinker's space: its
inputs are thinker hidden states + thinker token embeddings (width ``embedding_size``, the
thinker's hidden size), to which codec embeddings are added (``model.embed_tokens`` is
``[codec vocab, embedding_size]``, also thinker space); ``thinker_to_talker_proj`` then maps
the sum to the talker's width, the Qwen2-style layers run, and ``codec_head`` gives logits.

So:

- ``talker_decoder`` is the shared decoder of ``decoder_graph`` with ``input_proj`` =
  ``thinker_to_talker_proj`` and head = ``codec_head``. Its IO is the thinker decoder's
  (docs/bundle-format.md), except that ``inputs_embeds`` is ``[batch, sequence, embedding_size]``
  and ``logits`` ``[batch, 1, codec vocab]``; ``last_hidden_state`` is the talker's post-norm state.
- ``talker_embedding``: ``input_ids [batch, sequence] int64 -> inputs_embeds [batch, sequence,
  embedding_size]``, a Gather on the codec table. The host adds the result to the thinker-side
  vectors before the decoder (``omni_runtime.stages.talker``).

The weights are read by ``omni_export.modules.talker.TalkerWeights``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import onnx_ir as ir

from omni_runtime.bundle.names import TALKER_DECODER as GRAPH_NAME, TALKER_EMBEDDING as EMBEDDING_GRAPH_NAME

from omni_export.export.decoder_graph import TextDims, build_decoder_graph
from omni_export.export.onnx_graph import GraphBuilder
from omni_export.export.onnx_io import ExportedGraph
from omni_export.quant.types import ChannelQuantWeight

FILE_NAME = "talker_decoder.onnx"
EMBEDDING_FILE_NAME = "talker_embedding.onnx"

#: ``build_graph(dims, layers, final_norm, codec_head, out_dir, input_proj=..., input_width=...)``
build_graph = partial(build_decoder_graph, FILE_NAME)


def talker_dims(talker_config) -> TextDims:
    """The talker decoder's shape constants from its transformers config."""
    return TextDims.from_config(talker_config)


def build_embedding_graph(table: np.ndarray | ChannelQuantWeight, out_dir: Path, dtype: str = "float32") -> ExportedGraph:
    """Write ``talker_embedding.onnx``: codec ids -> rows of the ``[vocab, embedding_size]`` table,
    float32 out. The table is float (stored in ``dtype``) or int8 with one scale per row
    (``ChannelQuantWeight``): the graph gathers the int8 rows and their scales and dequantizes only
    those rows, so the table stays int8 in memory."""
    g = GraphBuilder(out_dir, EMBEDDING_FILE_NAME, dtype=dtype)
    ids = g.input("input_ids", ir.DataType.INT64, ("batch", "sequence"))
    width = int(table.shape[1])
    if isinstance(table, ChannelQuantWeight):
        rows = g.op("Gather", g.weight("embed_tokens.qweight", table.q), ids, axis=0)            # [B, S, E] int8
        scales = g.op("Gather", g.weight("embed_tokens.scales", table.scales.astype(g.np_float)), ids, axis=0)
        embeds = g.op("Mul", g.op("Cast", rows, to=g.F), g.op("Unsqueeze", scales, g.const([-1])))
    else:
        embeds = g.op("Gather", g.fweight("embed_tokens.weight", table), ids, axis=0)
    g.float_output(embeds, "inputs_embeds", ("batch", "sequence", width))
    return g.save()
