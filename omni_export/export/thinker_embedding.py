"""Export the thinker token embedding: ``input_ids [batch, sequence] -> inputs_embeds``.

A graph of its own so the host can splice audio/image/video encoder features into the
embedding sequence before the decoder runs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint import Checkpoint
from .onnx_io import ExportedGraph, TensorIO, export_module

GRAPH_NAME = "thinker_embedding"
FILE_NAME = "thinker_embedding.onnx"


class ThinkerEmbedding(nn.Module):
    def __init__(self, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)


def build(ckpt: Checkpoint, dtype: torch.dtype = torch.float32) -> ThinkerEmbedding:
    """Build the embedding module from the checkpoint's ``embed_tokens`` weight."""
    weight = ckpt.read({ckpt.embed_tokens_name(): "weight"}, dtype)["weight"]
    return ThinkerEmbedding(nn.Embedding.from_pretrained(weight, freeze=True)).eval()


def export(module: ThinkerEmbedding, out_dir: Path, onnx_dtype: str = "float32") -> ExportedGraph:
    vocab, hidden = module.embed_tokens.weight.shape
    batch = torch.export.Dim("batch", min=1, max=1024)
    sequence = torch.export.Dim("sequence", min=1, max=1 << 20)
    args = (torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.int64),)
    with torch.no_grad():
        external = export_module(module, args, out_dir, FILE_NAME, ["input_ids"], ["inputs_embeds"],
                                 ({0: batch, 1: sequence},))
    return ExportedGraph(
        FILE_NAME, tuple(external),
        (TensorIO("input_ids", "int64", ("batch", "sequence")),),
        (TensorIO("inputs_embeds", onnx_dtype, ("batch", "sequence", hidden)),),
    )
