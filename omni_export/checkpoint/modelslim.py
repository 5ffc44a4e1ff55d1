"""Read msModelSlim's AscendV1 output: a W8A8 checkpoint imported without re-quantizing.

The format, as msModelSlim writes it (read in Ascend/msmodelslim at commit
3de0a3c4e96577644289563b0d3c4dccfa552c1b, 2026-07-02: ``docs/zh/user_guide/quantization_formats/
ascendv1.md``, ``msmodelslim/core/quant_service/modelslim_v1/save/ascendv1.py`` and
``.../save/utils/safetensors.py``, ``msmodelslim/model/qwen2_5_omni_thinker/model_adapter.py``):

- ``quant_model_description.json``: ``{tensor name: quantization type}`` for every tensor
  written, plus globals ``version`` ("1.0.0"), ``model_quant_type``, ``group_size``,
  ``metadata``, ``optional`` (and ``kv_quant_type`` / ``fa_quant_type`` / ``reduce_quant_type``
  when set). For Qwen2.5-Omni the adapter's ``ascendv1_save_postprocess`` then prefixes every
  key of the description with ``thinker.`` (the globals too: ``thinker.version``), and every
  tensor name of the weights and the index;
- ``quant_model_weights.safetensors`` (``part_file_size: 0``), or shards
  ``quant_model_weights-00001-of-0000N.safetensors`` with
  ``quant_model_weights.safetensors.index.json`` (``{"metadata": ..., "weight_map": ...}``, which
  the Omni post-processing rewrites as the bare ``{name: file}`` map);
- per linear of type ``W8A8_DYNAMIC`` (int8 weight per output channel, activations per token at
  run time): ``weight`` int8 [N, K], ``weight_scale`` float32 [N, 1], ``weight_offset`` float32
  [N, 1] (zeros: symmetric), and ``bias`` float32 [N] described as ``FLOAT``; ``W8A8`` (static
  per-tensor activations) stores ``weight``, ``quant_bias`` int32, ``input_scale``,
  ``input_offset``, ``deq_scale`` instead; ``FLOAT`` tensors are the model's own weights;
- ``config.json`` copied from the float model without ``quantization_config``, and the other
  ``.json`` / ``.py`` / ``.txt`` / ``.jinja`` files (tokenizer, chat template).

msModelSlim quantizes the thinker only (``Qwen2_5OmniThinkerForConditionalGeneration``, the
audio tower and vision encoder excluded and written as FLOAT); the talker and token2wav come
from the float model's safetensors placed in the same directory (``model.safetensors`` or
shards with ``model.safetensors.index.json``), as ``omni_export.checkpoint.reader`` reads them.

This importer builds ``W8A8_DYNAMIC`` linears (bit for bit: the int8 weight and the float32
scale are the files' bytes), ``W8A8`` linears (static per-tensor activations: the int8 weight,
``input_scale``, ``input_offset``, the int32 ``quant_bias`` and ``deq_scale`` are the files'
bytes; a ``deq_scale`` stored as int64, msModelSlim's form for a model whose dtype is not
bfloat16 (``save/utils/deqscale.py``: the float32's bit pattern as an int32, widened), is read
back as that float32) and ``FLOAT`` tensors; any other type is a :class:`ModelSlimError` naming
the tensor and its type.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open

from omni_export.checkpoint.reader import CheckpointError
from omni_export.quant.types import W8A8StaticWeight, W8A8Weight

DESCRIPTION_FILE = "quant_model_description.json"
WEIGHTS_FILE = "quant_model_weights.safetensors"
WEIGHTS_INDEX = "quant_model_weights.safetensors.index.json"
WEIGHTS_GLOB = "quant_model_weights*.safetensors"
#: the description's global keys (not tensor names)
GLOBAL_KEYS = ("version", "model_quant_type", "group_size", "kv_quant_type", "kv_cache_type", "fa_quant_type",
               "reduce_quant_type", "metadata", "optional")
#: the prefix msModelSlim's Qwen2.5-Omni adapter puts before every key
OMNI_PREFIX = "thinker."
FLOAT = "FLOAT"
W8A8_DYNAMIC = "W8A8_DYNAMIC"
W8A8_STATIC = "W8A8"
SUPPORTED_TYPES = (FLOAT, W8A8_DYNAMIC, W8A8_STATIC)
#: the tensors of a static W8A8 linear beside its weight (``AscendV1Saver.on_w8a8_static``)
STATIC_PARTS = ("quant_bias", "input_scale", "input_offset", "deq_scale")
FIX_TYPE = ("re-export the thinker with msModelSlim's W8A8 (dynamic or static) recipe (lab_practice/qwen2_5_omni_thinker/"
            "qwen2_5_omni_thinker_w8a8.yaml: weights int8 per channel, activations per token), or build from the "
            "float checkpoint with --recipe w8a8")


class ModelSlimError(CheckpointError):
    """An msModelSlim AscendV1 directory this importer cannot read."""


@dataclass(frozen=True)
class ModelSlimDescription:
    """``quant_model_description.json``: each tensor's type and the globals."""

    path: Path
    types: dict[str, str]
    globals: dict

    @property
    def model_quant_type(self) -> str | None:
        return self.globals.get("model_quant_type")

    @property
    def version(self) -> str | None:
        return self.globals.get("version")

    def type_of(self, name: str) -> str | None:
        """The type of tensor ``name`` (a checkpoint name), None if not described."""
        return self.types.get(name)

    def linear_type(self, prefix: str) -> str | None:
        """The type of the linear ``prefix`` (its ``.weight``'s), None if not described."""
        return self.types.get(f"{prefix}.weight")

    def source(self) -> dict:
        """What the manifest records of the description (``quantization.source``)."""
        return {"format": "msmodelslim-ascendv1", "model_quant_type": self.model_quant_type,
                "version": self.version}


def is_modelslim(root: str | Path) -> bool:
    """True if ``root`` holds msModelSlim's ``quant_model_description.json``."""
    return (Path(root) / DESCRIPTION_FILE).is_file()


def read_description(root: str | Path) -> ModelSlimDescription:
    """Parse ``root/quant_model_description.json`` (ModelSlimError if it is not such a file)."""
    path = Path(root) / DESCRIPTION_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSlimError(f"cannot read msModelSlim's description ({exc})", path=path,
                             fix="restore the file msModelSlim wrote") from None
    if not isinstance(data, dict):
        raise ModelSlimError("the description must be a JSON object of tensor name -> type", path=path,
                             fix="restore the file msModelSlim wrote")
    types, globals_ = {}, {}
    for key, value in data.items():
        bare = key[len(OMNI_PREFIX):] if key.startswith(OMNI_PREFIX) else key
        if bare in GLOBAL_KEYS:
            globals_[bare] = value
        elif isinstance(value, str):
            types[key] = value
        else:
            raise ModelSlimError(f"tensor {key} has type {value!r}, not a quantization type name", path=path,
                                 fix="restore the file msModelSlim wrote")
    return ModelSlimDescription(path, types, globals_)


def weight_map(root: str | Path) -> dict[str, str]:
    """``{tensor name: file}`` of the quantized weights: the index (msModelSlim's
    ``{"weight_map": ...}`` or the Omni post-processing's bare map), or the single file, or the
    shards found; every described tensor must be in it."""
    root = Path(root)
    index = root / WEIGHTS_INDEX
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelSlimError(f"cannot read the weights index ({exc})", path=index,
                                 fix="restore the index msModelSlim wrote") from None
        mapping = data.get("weight_map", data) if isinstance(data, dict) else None
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise ModelSlimError("the weights index is not a map of tensor name -> file", path=index,
                                 fix="restore the index msModelSlim wrote")
        for file in sorted(set(mapping.values())):
            if not (root / file).is_file():
                raise ModelSlimError("weight shard listed in the index is missing", path=root / file,
                                     fix="copy every quant_model_weights shard msModelSlim wrote")
        return dict(mapping)
    files = [root / WEIGHTS_FILE] if (root / WEIGHTS_FILE).is_file() else sorted(root.glob(WEIGHTS_GLOB))
    if not files:
        raise ModelSlimError(f"{DESCRIPTION_FILE} is here but no {WEIGHTS_FILE} (or shards)", path=root,
                             fix="copy the quant_model_weights*.safetensors files msModelSlim wrote")
    mapping = {}
    for file in files:
        with safe_open(file, framework="numpy") as f:
            mapping.update({name: file.name for name in f.keys()})
    return mapping


def check_described(description: ModelSlimDescription, mapping: dict[str, str]) -> None:
    """Every described tensor is in the weights, and every weight is described."""
    missing = sorted(set(description.types) - set(mapping))
    if missing:
        raise ModelSlimError(f"tensors described but not in the weights: {', '.join(missing[:5])}"
                             + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""),
                             path=description.path, fix="copy every quant_model_weights shard msModelSlim wrote")
    undescribed = sorted(set(mapping) - set(description.types))
    if undescribed:
        raise ModelSlimError(f"tensors in the weights without a type in the description: {', '.join(undescribed[:5])}",
                             path=description.path, fix="restore the description msModelSlim wrote")


def _raw(ckpt, name: str) -> np.ndarray:
    """The stored array of checkpoint tensor ``name`` in its own dtype (no conversion)."""
    with safe_open(ckpt.root / ckpt.weight_map[name], framework="numpy") as f:
        return f.get_tensor(name)


def read_w8a8_linear(ckpt, description: ModelSlimDescription, prefix: str
                     ) -> W8A8Weight | W8A8StaticWeight | None:
    """The linear ``prefix`` (checkpoint name without ``.weight``) as msModelSlim stored it: a
    ``W8A8Weight`` (levels and scales exactly the files') for ``W8A8_DYNAMIC``, a
    ``W8A8StaticWeight`` for ``W8A8``, None for ``FLOAT``; any other type is a ModelSlimError
    naming the tensor and the type."""
    weight = f"{prefix}.weight"
    kind = description.type_of(weight)
    if kind is None:
        raise ModelSlimError(f"tensor {weight} has no type in the description", path=description.path,
                             fix="restore the description msModelSlim wrote")
    if kind == FLOAT:
        return None
    if kind == W8A8_STATIC:
        return _read_static_linear(ckpt, prefix)
    if kind != W8A8_DYNAMIC:
        raise ModelSlimError(f"tensor {weight} has quantization type {kind}, which this importer does not read "
                             f"(it reads {', '.join(SUPPORTED_TYPES)})", path=description.path, fix=FIX_TYPE)
    for part in ("weight_scale", "weight_offset"):
        if f"{prefix}.{part}" not in ckpt.weight_map:
            raise ModelSlimError(f"the W8A8_DYNAMIC linear {prefix} has no {part}", path=ckpt.root,
                                 fix="copy every quant_model_weights shard msModelSlim wrote")
    q = _raw(ckpt, weight)
    scale = _raw(ckpt, f"{prefix}.weight_scale")
    offset = _raw(ckpt, f"{prefix}.weight_offset")
    if q.dtype != np.int8 or q.ndim != 2:
        raise ModelSlimError(f"tensor {weight} is {q.dtype} {list(q.shape)}, W8A8_DYNAMIC stores int8 [N, K]",
                             path=ckpt.root, fix="restore the weights msModelSlim wrote")
    n = q.shape[0]
    if scale.dtype != np.float32 or scale.size != n or (scale.ndim == 2 and scale.shape[1] != 1):
        detail = f"{scale.dtype} {list(scale.shape)}"
        problem = (f"tensor {prefix}.weight_scale is {detail}: a scale per group (group_size "
                   f"{description.globals.get('group_size')}) is not read, only one per output channel [{n}, 1]"
                   if scale.ndim == 2 and scale.shape[0] == n and scale.shape[1] > 1
                   else f"tensor {prefix}.weight_scale is {detail}, expected float32 [{n}, 1]")
        raise ModelSlimError(problem, path=ckpt.root, fix=FIX_TYPE)
    if offset.size != n or np.any(offset != 0):
        raise ModelSlimError(f"tensor {prefix}.weight_offset is not all zeros: asymmetric int8 weights are not read "
                             "(msModelSlim's W8A8_DYNAMIC weights are symmetric)", path=ckpt.root, fix=FIX_TYPE)
    return W8A8Weight(np.ascontiguousarray(q), np.ascontiguousarray(scale.reshape(n)), "per_token").validate()


def _read_static_linear(ckpt, prefix: str) -> W8A8StaticWeight:
    """A ``W8A8`` (static) linear's tensors exactly as stored; deq_scale int64 read back as float32."""
    for part in STATIC_PARTS:
        if f"{prefix}.{part}" not in ckpt.weight_map:
            raise ModelSlimError(f"the W8A8 linear {prefix} has no {part}", path=ckpt.root,
                                 fix="copy every quant_model_weights shard msModelSlim wrote")
    q = _raw(ckpt, f"{prefix}.weight")
    if q.dtype != np.int8 or q.ndim != 2:
        raise ModelSlimError(f"tensor {prefix}.weight is {q.dtype} {list(q.shape)}, W8A8 stores int8 [N, K]",
                             path=ckpt.root, fix="restore the weights msModelSlim wrote")
    n = q.shape[0]
    parts = {part: _raw(ckpt, f"{prefix}.{part}") for part in STATIC_PARTS}
    deq = parts["deq_scale"]
    if deq.dtype == np.int64:  # float32 bits as int32, widened (msModelSlim's deqscale2int64)
        if deq.size and (deq.min() < np.iinfo(np.int32).min or deq.max() > np.iinfo(np.int32).max):
            raise ModelSlimError(f"tensor {prefix}.deq_scale is int64 beyond the int32 range: not a float32 "
                                 "bit pattern as msModelSlim stores it", path=ckpt.root,
                                 fix="restore the weights msModelSlim wrote")
        deq = deq.astype(np.int32).view(np.float32)
    expected = {"quant_bias": (np.int32, n), "input_scale": (np.float32, 1), "input_offset": (np.float32, 1),
                "deq_scale": (np.float32, n)}
    values = {**parts, "deq_scale": deq}
    for part, (dtype, size) in expected.items():
        value = values[part]
        if value.dtype != dtype or value.size != size:
            raise ModelSlimError(f"tensor {prefix}.{part} is {parts[part].dtype} {list(parts[part].shape)}, "
                                 f"W8A8 stores {np.dtype(dtype).name} [{size}]"
                                 + (" (int64 or float32 for deq_scale)" if part == "deq_scale" else ""),
                                 path=ckpt.root, fix=FIX_TYPE)
    try:
        return W8A8StaticWeight(np.ascontiguousarray(q), values["input_scale"].reshape(1).copy(),
                                values["input_offset"].reshape(1).copy(),
                                np.ascontiguousarray(values["deq_scale"].reshape(n)),
                                np.ascontiguousarray(values["quant_bias"].reshape(n))).validate()
    except ValueError as exc:
        raise ModelSlimError(f"the W8A8 linear {prefix}: {exc}", path=ckpt.root,
                             fix="restore the weights msModelSlim wrote") from None
