"""The thinker decoder graph: the thinker's text layers + final norm + lm_head.

The graph is the shared Qwen2-style decoder of ``decoder_graph`` (GQA attention over an
in-place KV cache, multimodal rotary positions from ``position_ids``); its IO is documented in
docs/bundle-format.md (``thinker_decoder``).
"""

from __future__ import annotations

from functools import partial

from omni_runtime.bundle.names import THINKER_DECODER as GRAPH_NAME

from omni_export.export.decoder_graph import (DecoderLayer, TextDims, build_decoder_graph, head_dim,  # noqa: F401
                                              past_names, present_names)

FILE_NAME = "thinker_decoder.onnx"

#: ``build_graph(dims, layers, final_norm, lm_head, out_dir, emit=..., accuracy_level=..., on_layer=...)``
build_graph = partial(build_decoder_graph, FILE_NAME)
