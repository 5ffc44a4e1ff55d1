"""The thinker text weights, read from the checkpoint one decoder layer at a time, as numpy.

The checkpoint's tensor names (4.5x ``thinker.model.layers.N...`` or 5.x
``thinker.model.language_model.layers.N...``) are resolved by ``Checkpoint.thinker_text_names``;
this module groups them per layer and hands out float32 arrays. Quantized layers (RTN, AWQ,
AutoAWQ import) are produced from these by ``omni_export.quant``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..checkpoint import Checkpoint, CheckpointError
from .onnx_graph import Linear
from .thinker_decoder import LINEARS, DecoderLayer


class ThinkerWeights:
    """Lazy access to the thinker text model's tensors, grouped per decoder layer."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.by_target = {target: name for name, target in ckpt.thinker_text_names().items()}
        self.num_layers = ckpt.text_config().num_hidden_layers

    def has(self, target: str) -> bool:
        return target in self.by_target

    def read(self, targets: list[str]) -> dict[str, np.ndarray]:
        """float32 arrays of the text model's tensors named ``targets`` (module names)."""
        import torch

        missing = [t for t in targets if t not in self.by_target]
        if missing:
            raise CheckpointError(f"thinker weights are missing {', '.join(missing[:3])}", path=self.ckpt.root,
                                  fix="the checkpoint is incomplete or does not match config.json")
        tensors = self.ckpt.read({self.by_target[t]: t for t in targets}, torch.float32)
        return {t: tensors[t].numpy() for t in targets}

    def layer_targets(self, i: int) -> list[str]:
        p = f"layers.{i}."
        return sorted(t[len(p):] for t in self.by_target if t.startswith(p))

    def float_layer(self, i: int) -> DecoderLayer:
        """Layer ``i`` in float32 (the fp32 recipe, and the input of RTN/AWQ)."""
        p = f"layers.{i}."
        names = [f"{p}input_layernorm.weight", f"{p}post_attention_layernorm.weight"]
        for path in LINEARS.values():
            names.append(f"{p}{path}.weight")
            if self.has(f"{p}{path}.bias"):
                names.append(f"{p}{path}.bias")
        t = self.read(names)
        linears = {field: Linear(t[f"{p}{path}.weight"], t.get(f"{p}{path}.bias")) for field, path in LINEARS.items()}
        return DecoderLayer(t[f"{p}input_layernorm.weight"], t[f"{p}post_attention_layernorm.weight"], **linears)

    def float_layers(self) -> Iterator[DecoderLayer]:
        for i in range(self.num_layers):
            yield self.float_layer(i)

    def final_norm(self) -> np.ndarray:
        return self.read(["norm.weight"])["norm.weight"]

    def embedding(self) -> np.ndarray:
        """The token embedding table [vocab, hidden] float32."""
        return self.read(["embed_tokens.weight"])["embed_tokens.weight"]

    def lm_head(self) -> np.ndarray:
        """The lm_head weight [vocab, hidden] float32 (the embedding table when tied)."""
        import torch

        name = self.ckpt.lm_head_name()
        return self.ckpt.read({name: "w"}, torch.float32)["w"].numpy()


def torch_decoder_layer(text_config, index: int, layer: DecoderLayer):
    """A float32 transformers ``Qwen2_5OmniDecoderLayer`` (eval) holding ``layer``'s arrays.

    The parameters share memory with the arrays (no copy): AWQ's in-place scale folding
    changes them, and the verify reference holds one layer without a second copy.
    """
    import torch
    from transformers.initialization import no_init_weights
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniDecoderLayer

    state = {"input_layernorm.weight": layer.input_layernorm,
             "post_attention_layernorm.weight": layer.post_attention_layernorm}
    for field, path in LINEARS.items():
        linear = getattr(layer, field)
        state[f"{path}.weight"] = linear.weight
        if linear.bias is not None:
            state[f"{path}.bias"] = linear.bias
    with no_init_weights(), torch.device("meta"):
        module = Qwen2_5OmniDecoderLayer(text_config, layer_idx=index)
    module.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()},
                           strict=True, assign=True)
    return module.eval()
