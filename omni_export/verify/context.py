"""What a module's verify check is given (``VerifyContext``) and what it returns (``ModuleReport``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from omni_runtime.bundle.manifest import Manifest
from omni_runtime.bundle.sessions import SessionPool
from omni_runtime.errors import OmniError

from omni_export.checkpoint.reader import Checkpoint

SEED = 0
EMBEDDING_SAMPLES = 64      # token ids checked through an embedding graph


class VerifyError(OmniError):
    """The bundle and the checkpoint cannot be compared (different models, no usable prompts)."""


@dataclass
class VerifyContext:
    """One ``verify``: the bundle, the checkpoint and the settings every module check shares."""

    manifest: Manifest
    ckpt: Checkpoint
    #: CPU sessions over the bundle; a check releases its sessions before it builds its reference
    pool: SessionPool
    #: the std of the checkpoint's token embedding table: random thinker-space inputs are scaled by it
    scale: float
    seed: int = SEED
    #: the thinker's teacher forcing: how many built-in conversations, how many answer tokens each
    #: (None: no teacher-forcing settings, see ``omni_export.verify.driver.verify_modules``)
    prompts: int | None = None
    tokens: int | None = None
    say: Callable[[str], None] = lambda description: None  # progress: what runs now
    #: which of a check's sample input sizes to use (0: verify's; 1: a second size, for the parity tests)
    shape: int = 0

    def rng(self) -> np.random.Generator:
        """A fresh generator seeded with ``seed``: a check draws the same inputs whatever ran before it."""
        return np.random.default_rng(self.seed)


@dataclass
class ModuleReport:
    """A module check's results: ``graphs`` goes into the report's ``graphs``, ``summary`` (if any)
    under the module's name, ``settings`` (the check's own constants) into the report's ``settings``."""

    graphs: dict[str, dict] = field(default_factory=dict)  # graph name -> {"max_abs", "rel_rms", ...}
    summary: dict | None = None
    settings: dict = field(default_factory=dict)


def embedding_scale(ckpt: Checkpoint) -> float:
    """``VerifyContext.scale``: the std of the checkpoint's float token embedding table."""
    from omni_export.modules.thinker import ThinkerModule

    return float(ThinkerModule.reference(ckpt).weights().embedding().std())
