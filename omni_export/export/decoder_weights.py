"""A Qwen2-style decoder's float weights, read from the checkpoint one layer at a time, as numpy.

Shared by the thinker (``omni_export.modules.thinker.ThinkerWeights``) and the talker
(``omni_export.modules.talker.TalkerWeights``): each names its checkpoint prefixes (one per
layout) and the path of its layer list; this class reads the tensors by local name
(``layers.0.mlp.up_proj.weight``) through ``Checkpoint.tensors`` as float32 arrays and groups a
layer's norms and linears into a ``DecoderLayer`` for the graph builder.

Imported by the module registry, so it imports nothing heavy (the graph types on use).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from omni_export.checkpoint.reader import Checkpoint

if TYPE_CHECKING:  # pragma: no cover
    from omni_export.export.decoder_graph import DecoderLayer
    from omni_export.export.onnx_graph import Linear

#: The linears of a decoder layer: ``DecoderLayer`` field -> module path inside the layer (the
#: checkpoint's, transformers' ``Qwen2_5OmniDecoderLayer``'s and the graph's initializer names).
LINEARS = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
#: The two RMSNorm weights of a decoder layer (``DecoderLayer`` fields, module paths).
NORMS = ("input_layernorm", "post_attention_layernorm")


class DecoderWeights:
    """Lazy float32 access to one decoder's tensors by local name, one decoder layer at a time.

    ``prefixes`` are the decoder's checkpoint prefixes (``Checkpoint.prefix`` picks the one in
    use); ``layer_prefix`` is the local path of the layer list (``layers`` for the thinker text
    model, ``model.layers`` for the talker); ``fix`` is the missing-weights error's fix.
    """

    def __init__(self, ckpt: Checkpoint, prefixes: Sequence[str], num_layers: int, layer_prefix: str = "layers",
                 fix: str | None = None):
        self.ckpt = ckpt
        self.prefixes = tuple(prefixes)
        self.num_layers = num_layers
        self.layer_prefix = layer_prefix
        self.fix = fix

    @property
    def names(self) -> dict[str, str]:
        """Local name -> checkpoint name of every tensor under the decoder's prefix."""
        return self.ckpt.tensor_names(self.prefixes)

    def has(self, target: str) -> bool:
        return target in self.names

    def read(self, targets: list[str]) -> dict[str, np.ndarray]:
        """float32 arrays of the tensors named ``targets`` (local names)."""
        return {t: v.numpy() for t, v in self.ckpt.tensors(self.prefixes, targets, fix=self.fix).items()}

    def linear(self, target: str) -> Linear:
        """The linear ``target`` (module path): its weight and, if the checkpoint has one, its bias."""
        from omni_export.export.onnx_graph import Linear

        names = [f"{target}.weight"] + ([f"{target}.bias"] if self.has(f"{target}.bias") else [])
        t = self.read(names)
        return Linear(t[f"{target}.weight"], t.get(f"{target}.bias"))

    def layer_path(self, i: int) -> str:
        """Local path of decoder layer ``i`` with a trailing dot (``layers.3.``)."""
        return f"{self.layer_prefix}.{i}."

    def norms(self, i: int) -> dict[str, np.ndarray]:
        """Layer ``i``'s RMSNorm weights by ``DecoderLayer`` field."""
        p = self.layer_path(i)
        t = self.read([f"{p}{n}.weight" for n in NORMS])
        return {n: t[f"{p}{n}.weight"] for n in NORMS}

    def float_layer(self, i: int) -> DecoderLayer:
        """Decoder layer ``i`` in float32 (the float recipes, and the input of RTN/AWQ)."""
        from omni_export.export.decoder_graph import DecoderLayer

        p = self.layer_path(i)
        return DecoderLayer(**self.norms(i), **{field: self.linear(f"{p}{path}") for field, path in LINEARS.items()})

    def float_layers(self) -> Iterator[DecoderLayer]:
        for i in range(self.num_layers):
            yield self.float_layer(i)

    def required(self) -> list[str]:
        """Local names of every layer tensor (biases are optional)."""
        return [f"{self.layer_path(i)}{path}.weight" for i in range(self.num_layers)
                for path in (*NORMS, *LINEARS.values())]
