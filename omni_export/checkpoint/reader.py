"""Open a Qwen2.5-Omni checkpoint directory and hand out its parts.

A checkpoint is a directory in the real Hugging Face layout of Qwen/Qwen2.5-Omni-7B / -3B:
``config.json``, ``model.safetensors`` or ``model-*-of-*.safetensors`` with
``model.safetensors.index.json``, tokenizer files, ``preprocessor_config.json`` and
``spk_dict.pt``. Tensor names may be the transformers 4.5x names the published checkpoints
use (``thinker.model.layers.0...``) or the transformers 5 names
(``thinker.model.language_model.layers.0...``); both are accepted.

One reader for every module: a module names its tensors by a prefix per layout (its
``prefixes``, e.g. ``("thinker.audio_tower.", "thinker.model.audio_tower.")``) and local names
after it; :meth:`Checkpoint.tensors` reads them, and a tensor the weights lack is one
:class:`CheckpointError` naming every missing tensor in full (:meth:`Checkpoint.require`).
Tensors are read lazily with ``safetensors.safe_open`` so one component (or one layer) can be
built at a time without loading the whole 7B model. A quantized checkpoint must be AutoAWQ
GEMM 4-bit (:attr:`Checkpoint.autoawq`, checked by :meth:`Checkpoint.open`), or msModelSlim's
AscendV1 output (:attr:`Checkpoint.modelslim`: ``quant_model_description.json`` and
``quant_model_weights*.safetensors``, whose tensors join the float files' in the weight map;
``omni_export.checkpoint.modelslim``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

if TYPE_CHECKING:  # torch is imported by safetensors when tensors are read; opening and
    import torch   # validating a checkpoint (keys, shapes) stays torch-free and fast

from omni_runtime.errors import OmniError

MODEL_TYPE = "qwen2_5_omni"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
MISSING_FIX = "the checkpoint is incomplete or does not match config.json: download all weight shards"


class CheckpointError(OmniError):
    """The model directory is missing, incomplete or not a Qwen2.5-Omni checkpoint."""


@dataclass
class Checkpoint:
    """A validated Qwen2.5-Omni checkpoint directory."""

    root: Path
    raw_config: dict
    weight_map: dict[str, str] = field(repr=False)  # tensor name -> file name
    #: tensor_names() by prefixes (not copied by dataclasses.replace: a new weight map, a new cache)
    _names: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def open(cls, model_dir: str | Path) -> "Checkpoint":
        root = Path(model_dir)
        fix_real = "point --model at a Qwen2.5-Omni checkpoint directory (e.g. a download of Qwen/Qwen2.5-Omni-7B), or make a test one with `omni-export tiny DIR`"
        if not root.is_dir():
            raise CheckpointError("model directory does not exist", path=root, fix=fix_real)
        config_path = root / "config.json"
        if not config_path.is_file():
            raise CheckpointError("no config.json: not a Hugging Face checkpoint directory", path=root, fix=fix_real)
        try:
            raw = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"config.json is not valid JSON ({exc})", path=config_path, fix="restore the file from the original checkpoint") from None
        if raw.get("model_type") != MODEL_TYPE:
            raise CheckpointError(
                f"model_type is {raw.get('model_type')!r}, not {MODEL_TYPE!r}: omni-export compiles Qwen2.5-Omni only",
                path=config_path, fix=fix_real)
        if not isinstance(raw.get("thinker_config"), dict):
            raise CheckpointError("config.json has no 'thinker_config' section", path=config_path, fix=fix_real)
        weight_map = cls._weight_map(root)
        for name in TOKENIZER_FILES:
            if not (root / name).is_file():
                raise CheckpointError(f"tokenizer file {name} is missing", path=root / name,
                                      fix="copy the tokenizer files of the original checkpoint into the model directory")
        ckpt = cls(root=root, raw_config=raw, weight_map=weight_map)
        ckpt.autoawq  # noqa: B018 - a quantization omni-export cannot read is refused now
        return ckpt

    @staticmethod
    def _weight_map(root: Path) -> dict[str, str]:
        from omni_export.checkpoint import modelslim

        if not modelslim.is_modelslim(root):
            return Checkpoint._float_weight_map(root)
        quantized = modelslim.weight_map(root)  # a ModelSlimError (a CheckpointError) if unreadable
        modelslim.check_described(modelslim.read_description(root), quantized)
        # the float modules msModelSlim does not write (talker, token2wav), if present
        has_float = (root / INDEX_FILE).is_file() or (root / SINGLE_FILE).is_file()
        floats = Checkpoint._float_weight_map(root) if has_float else {}
        both = sorted(set(floats) & set(quantized))
        if both:
            raise CheckpointError(f"tensors both in msModelSlim's weights and the float weights: {', '.join(both[:5])}",
                                  path=root, fix="keep only the float modules msModelSlim did not write "
                                                 "(talker, token2wav) in model.safetensors")
        return {**floats, **quantized}

    @staticmethod
    def _float_weight_map(root: Path) -> dict[str, str]:
        index = root / INDEX_FILE
        if index.is_file():
            try:
                mapping = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"bad safetensors index ({exc!r})", path=index, fix="restore the index file from the original checkpoint") from None
            for file in sorted(set(mapping.values())):
                if not (root / file).is_file():
                    raise CheckpointError("weight shard listed in the index is missing", path=root / file,
                                          fix="download the missing shard into the model directory")
            return dict(mapping)
        single = root / SINGLE_FILE
        if single.is_file():
            try:
                with safe_open(single, framework="numpy") as f:
                    return {name: SINGLE_FILE for name in f.keys()}
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"cannot read safetensors file ({exc})", path=single, fix="the file is corrupt or truncated: download it again") from None
        if any(root.glob("*.bin")):
            raise CheckpointError("only PyTorch .bin weights found; omni-export reads safetensors only (no unpickling)",
                                  path=root, fix="convert the weights to safetensors (save_pretrained(..., safe_serialization=True))")
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE}", path=root, fix="download the model weights (*.safetensors) into the model directory")

    # ----------------------------------------------------------------- config
    @cached_property
    def config(self):
        """The transformers ``Qwen2_5OmniConfig`` of this checkpoint (parsed once)."""
        from transformers import Qwen2_5OmniConfig
        from transformers.utils import logging as transformers_logging

        # transformers' config validation warns about the real checkpoints' own token ids
        # (e.g. "vision_start_token_id must be within the vocabulary" for the talker): not for users.
        transformers_logging.set_verbosity_error()
        return Qwen2_5OmniConfig.from_pretrained(self.root)

    def text_config(self):
        cfg = self.config.thinker_config.text_config
        cfg._attn_implementation = "sdpa"
        return cfg

    def json_file(self, name: str) -> dict | None:
        path = self.root / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"not valid JSON ({exc})", path=path, fix="restore the file from the original checkpoint") from None

    # ---------------------------------------------------------------- tensors
    @cached_property
    def modelslim(self):
        """msModelSlim's ``quant_model_description.json``
        (``omni_export.checkpoint.modelslim.ModelSlimDescription``), or None for other checkpoints."""
        from omni_export.checkpoint import modelslim

        return modelslim.read_description(self.root) if modelslim.is_modelslim(self.root) else None

    @cached_property
    def autoawq(self) -> dict | None:
        """The AutoAWQ GEMM 4-bit settings of config.json's ``quantization_config``
        (``omni_export.checkpoint.autoawq.detect_autoawq``), or None for a float checkpoint. Any
        other quantization is a CheckpointError (raised by :meth:`open`)."""
        from omni_export.checkpoint.autoawq import AutoAwqError, detect_autoawq

        try:
            return detect_autoawq(self.raw_config)
        except AutoAwqError as exc:
            raise CheckpointError(exc.problem, path=self.root / "config.json", fix=exc.fix) from None

    def prefix(self, prefixes: Sequence[str]) -> str:
        """The one of ``prefixes`` (a module's name prefix in each checkpoint layout, e.g.
        transformers 4.5x then 5.x) this checkpoint uses: the first that starts a tensor name
        (the first of all if none does)."""
        return next((p for p in prefixes if any(name.startswith(p) for name in self.weight_map)), prefixes[0])

    def tensor_names(self, prefixes: Sequence[str]) -> dict[str, str]:
        """``{local name: checkpoint name}`` of the tensors under :meth:`prefix` (``prefixes``),
        the local name being the rest of the checkpoint name (``layers.0.mlp.up_proj.weight``)."""
        prefixes = tuple(prefixes)
        if prefixes not in self._names:
            prefix = self.prefix(prefixes)
            self._names[prefixes] = {name[len(prefix):]: name for name in self.weight_map if name.startswith(prefix)}
        return self._names[prefixes]

    def missing(self, prefixes: Sequence[str], targets: Iterable[str]) -> list[str]:
        """Checkpoint names of the local names ``targets`` (under ``prefixes``) the weights lack."""
        names = self.tensor_names(prefixes)
        prefix = self.prefix(prefixes)
        return [prefix + t for t in targets if t not in names]

    def require(self, prefixes: Sequence[str], targets: Iterable[str], fix: str | None = None) -> None:
        """The checkpoint's one missing-weights error, naming every missing tensor in full, unless
        the weights hold all of ``targets`` (local names under ``prefixes``)."""
        missing = self.missing(prefixes, targets)
        if missing:
            raise CheckpointError(f"weights missing from the checkpoint: {', '.join(missing)}", path=self.root,
                                  fix=fix or MISSING_FIX)

    def tensors(self, prefixes: Sequence[str], targets: Iterable[str] | None = None, dtype: torch.dtype | None = None,
                fix: str | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``targets`` (local names under ``prefixes``; None: all of them) as ``dtype``
        (default float32), by local name. Missing ones: :meth:`require`'s error, before any read."""
        names = self.tensor_names(prefixes)
        targets = list(names) if targets is None else list(targets)
        self.require(prefixes, targets, fix)
        return self._read({names[t]: t for t in targets}, dtype)

    def _by_file(self, names) -> dict[str, list[str]]:
        """Group tensor names by the weight file that holds them (one open per file)."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        return by_file

    def _read(self, names: dict[str, str], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """Read checkpoint tensors ``{checkpoint name: target name}`` as ``dtype`` (default float32)."""
        import torch

        dtype = torch.float32 if dtype is None else dtype
        out: dict[str, torch.Tensor] = {}
        for file, file_names in self._by_file(names).items():
            with safe_open(self.root / file, framework="pt") as f:
                for name in file_names:
                    out[names[name]] = f.get_tensor(name).to(dtype)
        return out

    def numel(self, names) -> int:
        """Total element count of the named tensors, read from the safetensors headers only."""
        total = 0
        for file, file_names in self._by_file(names).items():
            with safe_open(self.root / file, framework="numpy") as f:
                for name in file_names:
                    total += math.prod(f.get_slice(name).get_shape())
        return total
