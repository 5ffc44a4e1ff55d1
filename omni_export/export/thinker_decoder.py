"""Export the thinker decoder: text model layers + final norm + lm_head, with a KV cache.

Graph IO (see docs/bundle-format.md, ``thinker_decoder``)::

    inputs_embeds [batch, sequence, hidden] float
    attention_mask [batch, total_sequence] int64
    position_ids [3, batch, sequence] int64
    past_key_values.{i}.key / .value [batch, kv_heads, past_sequence, head_dim]
    -> logits [batch, 1, vocab] (last position), last_hidden_state [batch, sequence, hidden],
       present.{i}.key / .value [batch, kv_heads, total_sequence, head_dim]

The KV cache is owned by the host: the wrapper rebuilds a transformers ``DynamicCache`` from
the past tensors inside ``forward`` so the transformers layers run unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.initialization import no_init_weights
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerTextModel

from ..checkpoint import Checkpoint, CheckpointError
from .onnx_io import ExportedGraph, TensorIO, export_module

GRAPH_NAME = "thinker_decoder"
FILE_NAME = "thinker_decoder.onnx"


def head_dim(config) -> int:
    """Attention head size of a text config (explicit ``head_dim`` or hidden / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


class ThinkerDecoder(nn.Module):
    """The thinker text model and lm_head behind a tensor-only, cache-as-inputs interface."""

    def __init__(self, text_model: Qwen2_5OmniThinkerTextModel, lm_head: nn.Linear):
        super().__init__()
        self.text_model = text_model
        self.lm_head = lm_head
        self.num_layers = text_model.config.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        cache = DynamicCache(config=self.text_model.config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.text_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -1:, :])
        presents = []
        for layer in cache.layers:
            presents += [layer.keys, layer.values]
        return (logits, hidden, *presents)


def build(ckpt: Checkpoint, dtype: torch.dtype = torch.float32) -> ThinkerDecoder:
    """Build the decoder module from the checkpoint's weights (thinker text part only)."""
    config = ckpt.text_config()
    with no_init_weights():
        text_model = Qwen2_5OmniThinkerTextModel(config)
        lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    embedding = ckpt.embed_tokens_name()
    state = ckpt.read({n: t for n, t in ckpt.thinker_text_names().items() if n != embedding}, dtype)
    missing, unexpected = text_model.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "embed_tokens.weight"]
    if missing or unexpected:
        raise CheckpointError(
            f"thinker text weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})",
            path=ckpt.root, fix="check that config.json belongs to these weights")
    # The embedding lives in its own graph (thinker_embedding); the decoder takes inputs_embeds.
    text_model.embed_tokens = None
    lm_head.load_state_dict(ckpt.read({ckpt.lm_head_name(): "weight"}, dtype))
    module = ThinkerDecoder(text_model.to(dtype), lm_head.to(dtype)).eval()
    return module


def example_inputs(config, batch: int = 2, sequence: int = 3, past: int = 4, dtype=torch.float32) -> tuple:
    """Inputs with distinct sizes per dynamic axis, used for tracing and tests."""
    embeds = torch.randn(batch, sequence, config.hidden_size, dtype=dtype)
    mask = torch.ones(batch, past + sequence, dtype=torch.int64)
    positions = (torch.arange(past, past + sequence).view(1, 1, -1).expand(3, batch, -1)).contiguous()
    kv = [torch.randn(batch, config.num_key_value_heads, past, head_dim(config), dtype=dtype)
          for _ in range(2 * config.num_hidden_layers)]
    return (embeds, mask, positions, *kv)


def export(module: ThinkerDecoder, out_dir: Path, onnx_dtype: str = "float32") -> ExportedGraph:
    config = module.text_model.config
    layers = config.num_hidden_layers
    batch = torch.export.Dim("batch", min=1, max=1024)
    sequence = torch.export.Dim("sequence", min=1, max=config.max_position_embeddings)
    past = torch.export.Dim("past_sequence", min=0, max=config.max_position_embeddings)
    total = torch.export.Dim("total_sequence", min=1, max=2 * config.max_position_embeddings)
    kv_shape = {0: batch, 2: past}
    dynamic_shapes = (
        {0: batch, 1: sequence},
        {0: batch, 1: total},
        {1: batch, 2: sequence},
        tuple([kv_shape] * (2 * layers)),  # the *past varargs
    )
    args = example_inputs(config, dtype=next(module.parameters()).dtype)
    input_names = ["inputs_embeds", "attention_mask", "position_ids", *past_names(layers)]
    output_names = ["logits", "last_hidden_state", *present_names(layers)]
    with torch.no_grad():
        external = export_module(module, args, out_dir, FILE_NAME, input_names, output_names, dynamic_shapes)
    kv_in = ("batch", config.num_key_value_heads, "past_sequence", head_dim(config))
    kv_out = ("batch", config.num_key_value_heads, "total_sequence", head_dim(config))
    inputs = (
        TensorIO("inputs_embeds", onnx_dtype, ("batch", "sequence", config.hidden_size)),
        TensorIO("attention_mask", "int64", ("batch", "total_sequence")),
        TensorIO("position_ids", "int64", (3, "batch", "sequence")),
        *(TensorIO(n, onnx_dtype, kv_in) for n in past_names(layers)),
    )
    outputs = (
        TensorIO("logits", onnx_dtype, ("batch", 1, config.vocab_size)),
        TensorIO("last_hidden_state", onnx_dtype, ("batch", "sequence", config.hidden_size)),
        *(TensorIO(n, onnx_dtype, kv_out) for n in present_names(layers)),
    )
    return ExportedGraph(FILE_NAME, tuple(external), inputs, outputs)
