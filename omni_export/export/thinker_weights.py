"""A thinker (or talker) decoder layer's float arrays as a transformers ``Qwen2_5OmniDecoderLayer``.

The layers themselves are read by ``omni_export.modules.thinker.ThinkerWeights``; the AWQ
stream of the thinker module and verify's reference run them through transformers' own layer.
"""

from __future__ import annotations

import numpy as np

from omni_export.export.decoder_graph import DecoderLayer
from omni_export.export.decoder_weights import LINEARS, NORMS


def torch_decoder_layer(text_config, index: int, layer: DecoderLayer):
    """A float32 transformers ``Qwen2_5OmniDecoderLayer`` (eval) holding ``layer``'s arrays.

    The parameters share memory with the arrays (no copy): AWQ's in-place scale folding
    changes them, and the verify reference holds one layer without a second copy.
    """
    import torch
    from transformers.initialization import no_init_weights
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniDecoderLayer

    state = {f"{norm}.weight": getattr(layer, norm) for norm in NORMS}
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
