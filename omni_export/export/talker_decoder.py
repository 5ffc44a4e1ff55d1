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
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import onnx_ir as ir

from omni_export.checkpoint.reader import Checkpoint
from omni_export.export.decoder_graph import LINEARS, TextDims, build_decoder_graph
from omni_export.export.decoder_weights import DecoderWeights
from omni_export.export.onnx_graph import GraphBuilder, Linear
from omni_export.export.onnx_io import ExportedGraph

from omni_runtime.bundle.names import TALKER_DECODER as GRAPH_NAME
FILE_NAME = "talker_decoder.onnx"
from omni_runtime.bundle.names import TALKER_EMBEDDING as EMBEDDING_GRAPH_NAME
EMBEDDING_FILE_NAME = "talker_embedding.onnx"

#: Checkpoint prefix of the talker (the same in transformers 4.5x and 5 checkpoints).
PREFIX = "talker."

#: ``build_graph(dims, layers, final_norm, codec_head, out_dir, input_proj=..., input_width=...)``
build_graph = partial(build_decoder_graph, FILE_NAME)


def talker_dims(talker_config) -> TextDims:
    """The talker decoder's shape constants from its transformers config."""
    return TextDims.from_config(talker_config)


def build_embedding_graph(table: np.ndarray, out_dir: Path) -> ExportedGraph:
    """Write ``talker_embedding.onnx``: codec ids -> rows of the float32 ``[vocab, embedding_size]`` table."""
    g = GraphBuilder(out_dir, EMBEDDING_FILE_NAME)
    ids = g.input("input_ids", ir.DataType.INT64, ("batch", "sequence"))
    embeds = g.op("Gather", g.weight("embed_tokens.weight", np.asarray(table, dtype=np.float32)), ids, axis=0)
    g.output(embeds, "inputs_embeds", ir.DataType.FLOAT, ("batch", "sequence", int(table.shape[1])))
    return g.save()


class TalkerWeights(DecoderWeights):
    """Lazy float32 access to the talker's tensors (``talker.*``), one decoder layer at a time."""

    def __init__(self, ckpt: Checkpoint):
        super().__init__(ckpt, {name[len(PREFIX):]: name for name in ckpt.weight_map if name.startswith(PREFIX)},
                         ckpt.config.talker_config.num_hidden_layers, "talker", layer_prefix="model.layers.",
                         shown=PREFIX)

    def required(self) -> list[str]:
        """Every tensor the talker graphs need (module names under ``talker.``); biases are optional."""
        names = ["model.embed_tokens.weight", "model.norm.weight", "thinker_to_talker_proj.weight",
                 "codec_head.weight"]
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            names += [f"{p}input_layernorm.weight", f"{p}post_attention_layernorm.weight"]
            names += [f"{p}{path}.weight" for path in LINEARS.values()]
        return names

    def missing(self) -> list[str]:
        return [t for t in self.required() if t not in self.names]

    def final_norm(self) -> np.ndarray:
        return self.read(["model.norm.weight"])["model.norm.weight"]

    def input_proj(self) -> Linear:
        return self.linear("thinker_to_talker_proj")

    def codec_head(self) -> Linear:
        return self.linear("codec_head")

    def codec_embedding(self) -> np.ndarray:
        return self.read(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
