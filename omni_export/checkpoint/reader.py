"""Open a Qwen2.5-Omni checkpoint directory and hand out its parts.

A checkpoint is a directory in the real Hugging Face layout of Qwen/Qwen2.5-Omni-7B / -3B:
``config.json``, ``model.safetensors`` or ``model-*-of-*.safetensors`` with
``model.safetensors.index.json``, tokenizer files, ``preprocessor_config.json`` and
``spk_dict.pt``. Tensor names may be the transformers 4.5x names the published checkpoints
use (``thinker.model.layers.0...``) or the transformers 5 names
(``thinker.model.language_model.layers.0...``); both are accepted.

Tensors are read lazily with ``safetensors.safe_open`` so one component (or one layer) can be
built at a time without loading the whole 7B model.
"""

from __future__ import annotations

import json
import math
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


class CheckpointError(OmniError):
    """The model directory is missing, incomplete or not a Qwen2.5-Omni checkpoint."""


def _thinker_text_name(name: str) -> str | None:
    """Map a checkpoint tensor name to the thinker text model's own name, or None."""
    for prefix in ("thinker.model.language_model.", "thinker.model."):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            if rest.startswith(("audio_tower.", "visual.")):
                return None
            return rest
    return None


@dataclass
class Checkpoint:
    """A validated Qwen2.5-Omni checkpoint directory."""

    root: Path
    raw_config: dict
    weight_map: dict[str, str] = field(repr=False)  # tensor name -> file name

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
        return cls(root=root, raw_config=raw, weight_map=weight_map)

    @staticmethod
    def _weight_map(root: Path) -> dict[str, str]:
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
    def _by_file(self, names) -> dict[str, list[str]]:
        """Group tensor names by the weight file that holds them (one open per file)."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        return by_file

    def read(self, names: dict[str, str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Read checkpoint tensors ``{checkpoint name: target name}`` as ``dtype``."""
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

    def thinker_text_names(self) -> dict[str, str]:
        """Checkpoint names of the thinker text model, mapped to the module's own names."""
        names = {}
        for name in self.weight_map:
            target = _thinker_text_name(name)
            if target is not None:
                names[name] = target
        return names

    def embed_tokens_name(self) -> str:
        """Checkpoint name of the thinker token embedding table."""
        for name, target in self.thinker_text_names().items():
            if target == "embed_tokens.weight":
                return name
        raise CheckpointError("the thinker embed_tokens weight is missing from the weights", path=self.root,
                              fix="the checkpoint is incomplete: download all weight shards")

    def lm_head_name(self) -> str:
        """Checkpoint name of the thinker lm_head weight (the embedding table when tied)."""
        if "thinker.lm_head.weight" in self.weight_map:
            return "thinker.lm_head.weight"
        if self.config.thinker_config.text_config.tie_word_embeddings:
            return self.embed_tokens_name()
        raise CheckpointError("thinker.lm_head.weight is missing from the weights", path=self.root,
                              fix="the checkpoint is incomplete: download all weight shards")
