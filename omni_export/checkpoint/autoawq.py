"""Read AutoAWQ GEMM checkpoints (the layout of ``Qwen/Qwen2.5-Omni-7B-AWQ``).

AutoAWQ writes ``config.json`` -> ``"quantization_config"`` (``AwqConfig.to_transformers_dict``)::

    {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": true,
     "version": "gemm", "modules_to_not_convert": [...]}

(transformers 5 may write ``"format"`` instead of ``"version"``) and replaces each quantized
``nn.Linear`` ``<prefix>.weight`` by ``<prefix>.qweight`` int32 [K, N/8], ``<prefix>.qzeros``
int32 [K/group, N/8] and ``<prefix>.scales`` float16 [K/group, N]; the bias stays
``<prefix>.bias``. For Qwen2.5-Omni only the thinker's text decoder layers are quantized
(AutoAWQ's ``Qwen2_5_OmniAWQForConditionalGeneration.get_model_layers`` is
``thinker.model.layers``).

:attr:`omni_export.checkpoint.reader.Checkpoint.autoawq` holds a checkpoint's validated settings;
the int4 levels are unpacked by ``omni_export.quant.packing.unpack_autoawq``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from omni_export.quant.packing import unpack_autoawq
from omni_export.quant.types import QuantWeight

if TYPE_CHECKING:  # pragma: no cover
    from omni_export.checkpoint.reader import Checkpoint  # which reads config.json with detect_autoawq

__all__ = ["AutoAwqError", "detect_autoawq", "is_autoawq_linear", "read_autoawq_linear"]

_FIX = ("use an AutoAWQ GEMM 4-bit checkpoint (quant_method awq, version gemm, bits 4, zero_point true), "
        "e.g. Qwen/Qwen2.5-Omni-7B-AWQ, or the original float checkpoint")


class AutoAwqError(ValueError):
    """The checkpoint's quantization is not AutoAWQ GEMM 4-bit, or its AWQ tensors are bad.

    ``problem`` and ``fix`` are kept separately so callers can build their own error type."""

    def __init__(self, problem: str, fix: str = _FIX):
        super().__init__(f"{problem}; {fix}")
        self.problem = problem
        self.fix = fix


def _quant_config(raw_config: dict) -> tuple[dict | None, str]:
    qc = raw_config.get("quantization_config")
    if qc is not None:
        return qc, "quantization_config"
    thinker = raw_config.get("thinker_config")
    if isinstance(thinker, dict) and thinker.get("quantization_config") is not None:
        return thinker["quantization_config"], "thinker_config.quantization_config"
    return None, ""


def detect_autoawq(raw_config: dict) -> dict | None:
    """The validated AutoAWQ settings of a checkpoint's ``config.json`` dict, or None when it
    has no ``quantization_config`` (a float checkpoint).

    Returns ``{"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": int,
    "zero_point": True, "modules_to_not_convert": list[str]}``. Raises :class:`AutoAwqError`
    (a ValueError) naming the offending value if a quantization config is present but is not
    AutoAWQ GEMM 4-bit with zero points."""
    qc, where = _quant_config(raw_config)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise AutoAwqError(f"config.json {where} is not an object ({type(qc).__name__})")
    method = qc.get("quant_method")
    if not isinstance(method, str) or method.lower() != "awq":
        raise AutoAwqError(f"config.json {where}.quant_method is {method!r}; omni-export imports only 'awq'")
    version = qc.get("version", qc.get("format"))
    if not isinstance(version, str) or version.lower() != "gemm":
        raise AutoAwqError(
            f"config.json {where}.version is {version!r}; omni-export imports only AutoAWQ's 'gemm' layout "
            "(gemv, gemv_fast, marlin and exllama store the weights differently)"
        )
    bits = qc.get("bits", qc.get("w_bit"))
    if isinstance(bits, bool) or bits != 4:
        raise AutoAwqError(f"config.json {where}.bits is {bits!r}; AutoAWQ GEMM checkpoints are 4-bit")
    zero_point = qc.get("zero_point", True)
    if zero_point is not True:
        raise AutoAwqError(f"config.json {where}.zero_point is {zero_point!r}; AutoAWQ GEMM needs zero points (true)")
    group_size = qc.get("group_size", qc.get("q_group_size"))
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or group_size % 16:
        raise AutoAwqError(
            f"config.json {where}.group_size is {group_size!r}; a positive multiple of 16 (e.g. 128) is supported"
        )
    skip = qc.get("modules_to_not_convert") or []
    if not isinstance(skip, list) or not all(isinstance(m, str) for m in skip):
        raise AutoAwqError(f"config.json {where}.modules_to_not_convert must be a list of module names, got {skip!r}")
    return {
        "quant_method": "awq",
        "version": "gemm",
        "bits": 4,
        "group_size": group_size,
        "zero_point": True,
        "modules_to_not_convert": list(skip),
    }


def is_autoawq_linear(ckpt: "Checkpoint", prefix: str) -> bool:
    """True if ``<prefix>.qweight`` is in the checkpoint (the linear is AWQ-quantized)."""
    return f"{prefix}.qweight" in ckpt.weight_map


def read_autoawq_linear(ckpt: "Checkpoint", prefix: str) -> QuantWeight:
    """The :class:`QuantWeight` [N, K] of the AutoAWQ GEMM linear ``prefix`` (e.g.
    ``thinker.model.layers.0.self_attn.q_proj``), read lazily with ``Checkpoint.tensors``.
    The bias, if any, is ``<prefix>.bias`` (read it as any float tensor)."""
    import torch

    if not is_autoawq_linear(ckpt, prefix):
        raise AutoAwqError(f"{prefix} is not an AutoAWQ linear: {prefix}.qweight is missing from the weights",
                           fix="the checkpoint is incomplete or not AutoAWQ GEMM: download all weight shards")
    at = (f"{prefix}.",)
    ints = ckpt.tensors(at, ["qweight", "qzeros"], torch.int32)
    scales = ckpt.tensors(at, ["scales"], torch.float16)["scales"]
    qweight, qzeros = ints["qweight"].numpy(), ints["qzeros"].numpy()
    k = qweight.shape[0]
    g = qzeros.shape[0] if qzeros.ndim == 2 else 0
    config = ckpt.autoawq
    if config is not None:
        group_size = config["group_size"]
    elif g and k % g == 0:
        group_size = k // g
    else:
        raise AutoAwqError(f"cannot infer the AWQ group size of {prefix} (qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)})")
    try:
        return unpack_autoawq(qweight, qzeros, scales.numpy(), group_size)
    except ValueError as exc:
        raise AutoAwqError(f"bad AutoAWQ tensors for {prefix}: {exc}",
                           fix="the weights do not match the config's group_size: re-download the checkpoint") from None
