"""What every registered module provides to ``build``, and what ``build`` hands to it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from omni_export.checkpoint.reader import Checkpoint
from omni_export.build.recipes import CalibrationRecipe, ModuleRecipe, Recipe


@dataclass
class BuildContext:
    """One build: the checkpoint, the recipe, the bundle's temporary directory, progress."""

    ckpt: Checkpoint
    recipe: Recipe
    out_dir: Path
    say: Callable[[str], None] = lambda message: None
    #: (description, completed, total) of the module's own steps, for the progress bar
    progress: Callable[[str, int, int], None] = lambda description, done, total: None
    stats: dict = field(default_factory=dict)  # timings and sizes reported at the end


class Module:
    """Base of registered modules. Subclasses set ``name`` and implement the methods."""

    name: ClassVar[str]
    #: graph names this module writes, in the manifest's ``graphs``
    graphs: ClassVar[tuple[str, ...]]

    def __init__(self, ckpt: Checkpoint, settings: ModuleRecipe, calibration: CalibrationRecipe | None = None):
        self.ckpt = ckpt
        self.settings = settings
        self.calibration = calibration  # the recipe's calibration section (AWQ), if any

    #: modules this one needs in the same bundle (skipped with them)
    requires: ClassVar[tuple[str, ...]] = ()

    def skip_reason(self) -> str | None:
        """Why this checkpoint has nothing to build for the module (e.g. no talker), or None."""
        return None

    def check(self) -> None:
        """Refuse, before any work, a checkpoint or setting this module cannot build."""

    def memory_estimate(self) -> int:
        """Peak bytes of RAM the module's build needs (for the pre-flight check)."""
        raise NotImplementedError

    def config(self) -> dict:
        """The module's ``config`` block in the manifest (shape constants the runtime needs)."""
        raise NotImplementedError

    def build(self, ctx: BuildContext) -> dict:
        """Write the module's graphs into ``ctx.out_dir``; returns ``{graph name: (ExportedGraph, quantization)}``."""
        raise NotImplementedError
