"""AWQ over the whole thinker, one decoder layer at a time (the ``awq`` recipe's weight stream).

Calibration token ids (``omni_export.build.calibration``) are embedded with the checkpoint's table;
then for each layer: its float weights are read from the safetensors files into a
transformers ``Qwen2_5OmniDecoderLayer``, ``awq_layer`` searches and folds the scales and
searches the clipping values, the layer's output on the calibration states becomes the next
layer's input (the scaled float layer computes the same function as the original), and the
scaled weights are quantized to int4 and handed to the graph builder. Only one layer's
weights and the calibration activations are in memory at a time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import torch

from omni_export.export.onnx_graph import Linear
from omni_export.export.thinker_decoder import LINEARS, DecoderLayer
from omni_export.export.thinker_weights import torch_decoder_layer
from omni_export.quant.awq import AwqConfig, AwqStats, awq_layer, layer_kwargs_for


def calibration_ids(module, ctx) -> np.ndarray:
    """[samples, sequence_length] int64 token ids of the recipe's calibration conversations."""
    from omni_export.build.calibration import calibration_batch, calibration_messages
    from omni_export.checkpoint.info import chat_template

    calib = ctx.recipe.calibration
    return calibration_batch(calibration_messages(calib), module.ckpt.root / "tokenizer.json",
                             chat_template(module.ckpt), calib.samples, calib.sequence_length)


def awq_layers(module, ctx, weights) -> Iterator[DecoderLayer]:
    """The thinker's decoder layers with AWQ-scaled, clipped int4 linears, in order."""
    settings = module.settings
    text_config = module.ckpt.text_config()
    text_config._attn_implementation = "sdpa"
    ids = calibration_ids(module, ctx)
    table = weights.embedding()
    hidden = torch.from_numpy(table[ids])  # [samples, seq, hidden]
    del table
    kwargs = layer_kwargs_for(text_config, ids.shape[1])
    config = AwqConfig(group_size=settings.group_size, symmetric=settings.symmetric)
    ctx.stats.setdefault("awq", [])
    for i in range(weights.num_layers):
        started = time.perf_counter()
        layer = torch_decoder_layer(text_config, i, weights.float_layer(i))
        stats = AwqStats()
        clips = awq_layer(layer, hidden, kwargs, config, stats)
        with torch.no_grad():
            out = layer(hidden, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        scaled = DecoderLayer(
            layer.input_layernorm.weight.detach().numpy().copy(),
            layer.post_attention_layernorm.weight.detach().numpy().copy(),
            **{field: _linear(layer, path) for field, path in LINEARS.items()})
        del layer
        ctx.stats["awq"].append({"layer": i, "seconds": round(time.perf_counter() - started, 2),
                                 "search_seconds": {k: round(v, 2) for k, v in stats.seconds.items()},
                                 "ratios": stats.ratios})
        yield module._quantize_layer(i, scaled, clips)


def _linear(layer, path: str) -> Linear:
    m = layer
    for part in path.split("."):
        m = getattr(m, part)
    bias = None if m.bias is None else m.bias.detach().numpy().copy()
    return Linear(m.weight.detach().numpy().copy(), bias)
