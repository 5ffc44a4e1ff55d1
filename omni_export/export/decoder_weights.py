"""A Qwen2-style decoder's float weights, read from the checkpoint one layer at a time, as numpy.

Shared by the thinker (``thinker_weights.ThinkerWeights``) and the talker
(``talker_decoder.TalkerWeights``): each maps the decoder's module names (``layers.0.mlp.up_proj.weight``)
to the checkpoint's tensor names; this class reads them lazily as float32 arrays and groups a
layer's norms and linears into a ``DecoderLayer`` for the graph builder.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from omni_export.checkpoint.reader import Checkpoint, CheckpointError
from omni_export.export.decoder_graph import LINEARS, DecoderLayer
from omni_export.export.onnx_graph import Linear


class DecoderWeights:
    """Lazy float32 access to one decoder's tensors by module name, one decoder layer at a time.

    ``names`` maps module names to checkpoint tensor names; ``layer_prefix`` is the module path
    of the layer list (``layers.`` for the thinker text model, ``model.layers.`` for the talker);
    ``shown`` is prefixed to module names in error messages.
    """

    def __init__(self, ckpt: Checkpoint, names: dict[str, str], num_layers: int, what: str,
                 layer_prefix: str = "layers.", shown: str = ""):
        self.ckpt = ckpt
        self.names = names
        self.num_layers = num_layers
        self.what = what
        self.layer_prefix = layer_prefix
        self.shown = shown

    def has(self, target: str) -> bool:
        return target in self.names

    def read(self, targets: list[str]) -> dict[str, np.ndarray]:
        """float32 arrays of the tensors named ``targets`` (module names)."""
        import torch

        missing = [t for t in targets if t not in self.names]
        if missing:
            raise CheckpointError(f"{self.what} weights are missing: {', '.join(self.shown + t for t in missing[:3])}",
                                  path=self.ckpt.root, fix="the checkpoint is incomplete or does not match config.json")
        tensors = self.ckpt.read({self.names[t]: t for t in targets}, torch.float32)
        return {t: tensors[t].numpy() for t in targets}

    def linear(self, target: str) -> Linear:
        """The linear ``target`` (module path): its weight and, if the checkpoint has one, its bias."""
        names = [f"{target}.weight"] + ([f"{target}.bias"] if self.has(f"{target}.bias") else [])
        t = self.read(names)
        return Linear(t[f"{target}.weight"], t.get(f"{target}.bias"))

    def float_layer(self, i: int) -> DecoderLayer:
        """Decoder layer ``i`` in float32 (the float recipes, and the input of RTN/AWQ)."""
        p = f"{self.layer_prefix}{i}."
        norms = self.read([f"{p}input_layernorm.weight", f"{p}post_attention_layernorm.weight"])
        linears = {field: self.linear(f"{p}{path}") for field, path in LINEARS.items()}
        return DecoderLayer(norms[f"{p}input_layernorm.weight"], norms[f"{p}post_attention_layernorm.weight"],
                            **linears)

    def float_layers(self) -> Iterator[DecoderLayer]:
        for i in range(self.num_layers):
            yield self.float_layer(i)
