"""The thinker text weights, read from the checkpoint one decoder layer at a time, as numpy.

The checkpoint's tensor names (4.5x ``thinker.model.layers.N...`` or 5.x
``thinker.model.language_model.layers.N...``) are resolved by ``Checkpoint.thinker_text_names``;
``DecoderWeights`` groups them per layer and hands out float32 arrays. Quantized layers (RTN, AWQ,
AutoAWQ import) are produced from these by ``omni_export.quant``.
"""

from __future__ import annotations


import numpy as np

from omni_export.checkpoint.reader import Checkpoint
from omni_export.export.decoder_weights import DecoderWeights
from omni_export.export.thinker_decoder import LINEARS, DecoderLayer


class ThinkerWeights(DecoderWeights):
    """Lazy access to the thinker text model's tensors, grouped per decoder layer."""

    def __init__(self, ckpt: Checkpoint):
        super().__init__(ckpt, {target: name for name, target in ckpt.thinker_text_names().items()},
                         ckpt.text_config().num_hidden_layers, "thinker")

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
