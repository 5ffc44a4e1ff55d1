"""Quantization maths: int4/int8 block formats, RTN, AWQ. Pure: it reads no checkpoint and knows no
module or graph (the thinker module streams its layers through these functions).

* :mod:`.types`: :class:`QuantWeight`, the canonical block-quantized weight;
* :mod:`.rtn`: round-to-nearest (AutoAWQ's formulas), with optional AWQ clipping; symmetric
  per-output-channel int8 (:class:`~.types.ChannelQuantWeight`, weight-only int8 of the float modules);
* :mod:`.packing`: ONNX Runtime MatMulNBits, ONNX blocked DequantizeLinear (uint4), AutoAWQ GEMM;
* :mod:`.awq`: activation-aware scale and clip search for one decoder layer (torch);
* :mod:`.w8a8`: W8A8 (int8 weights per channel, int8 activations per token at run time), its numpy
  reference and SmoothQuant scales.

Only :mod:`.awq` imports torch at import time. AutoAWQ checkpoints are read by
``omni_export.checkpoint.autoawq``.
"""

from omni_export.quant.types import ChannelQuantWeight, QuantWeight, W8A8Weight

__all__ = ["ChannelQuantWeight", "QuantWeight", "W8A8Weight"]
