"""Quantization: int4/int8 block formats, RTN, AWQ, AutoAWQ checkpoints.

* :mod:`.types`: :class:`QuantWeight`, the canonical block-quantized weight;
* :mod:`.rtn`: round-to-nearest (AutoAWQ's formulas), with optional AWQ clipping;
* :mod:`.packing`: ONNX Runtime MatMulNBits, ONNX blocked DequantizeLinear (uint4), AutoAWQ GEMM;
* :mod:`.awq`: activation-aware scale and clip search for one thinker decoder layer (torch);
* :mod:`.autoawq_checkpoint`: detect and read AutoAWQ GEMM checkpoints.

Only :mod:`.awq` imports torch at import time.
"""

from omni_export.quant.types import QuantWeight

__all__ = ["QuantWeight"]
