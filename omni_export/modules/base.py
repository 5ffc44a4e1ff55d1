"""A module of the bundle is one class that declares all it is (:class:`Module`).

Its recipe section (``recipe_keys``, ``precisions``: what ``omni_export.build.recipes`` accepts),
its checkpoint name map (``prefixes`` and the tables of its file: local tensor names under the
prefix, read through ``Checkpoint.tensors``), the graphs it writes (``graphs``, the names of
``omni_runtime.bundle.names``), its manifest ``config`` block, its memory estimate, its build
(graphs and a build-info block for the manifest) and its verify check. ``build``, ``verify``,
the recipes and the command line loop over ``omni_export.modules.REGISTRY`` and name no module.

Module files import nothing heavy at import time (the recipe check reads the registry before
torch is loaded): exporters and torch are imported where they are used.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from omni_export.checkpoint.reader import Checkpoint, CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    from omni_export.build.recipes import CalibrationRecipe, ModuleRecipe, Recipe
    from omni_export.export.onnx_io import ExportedGraph
    from omni_export.verify.context import ModuleReport


@dataclass
class BuildContext:
    """One build: the checkpoint, the recipe, the bundle's temporary directory, progress."""

    ckpt: Checkpoint
    recipe: Recipe | None
    out_dir: Path
    say: Callable[[str], None] = lambda message: None
    #: (description, completed, total) of the module's own steps, for the progress bar
    progress: Callable[[str, int, int], None] = lambda description, done, total: None


@dataclass
class ModuleBuild:
    """What a module's build wrote: its graphs and its block of the manifest's ``build.modules``."""

    #: graph name -> (the graph, its manifest ``quantization`` or None), in ``Module.graphs`` order
    graphs: dict[str, tuple[ExportedGraph, dict | None]]
    #: timings, sizes, statistics; ``Module.build`` adds ``seconds``
    info: dict = field(default_factory=dict)


class Module:
    """Base of registered modules; a subclass sets the class attributes and implements the methods."""

    name: ClassVar[str]
    #: one line for the recipe documentation and messages
    description: ClassVar[str]
    #: graph names this module writes (``omni_runtime.bundle.names.MODULE_GRAPHS[name]``)
    graphs: ClassVar[tuple[str, ...]]
    #: the keys of its recipe section (``omni_export.build.recipes.KEYS``)
    recipe_keys: ClassVar[tuple[str, ...]] = ("weights",)
    #: recipe keys the manifest's recipe records only when not at this default (keys added to a
    #: module later, so the bundles of earlier recipes keep their recipe block)
    optional_recipe_keys: ClassVar[dict[str, object]] = {}
    #: the ``weights`` values its recipe section accepts
    precisions: ClassVar[tuple[str, ...]] = ("float32",)
    #: ``weights`` values the recipe schema knows that this module will build later: value -> why not yet
    planned: ClassVar[dict[str, str]] = {}
    #: the quantization methods of its int weights (recipe ``method``)
    methods: ClassVar[tuple[str, ...]] = ("rtn",)
    #: the float types its graphs compute in (recipe ``dtype``)
    dtypes: ClassVar[tuple[str, ...]] = ("float32", "float16")
    #: the parts of its float16 graphs that can be kept in float32 (recipe ``keep_fp32``), and the
    #: ones kept by default (chosen by measurement: recipes/README.md)
    fp32_parts: ClassVar[tuple[str, ...]] = ()
    default_keep_fp32: ClassVar[tuple[str, ...]] = ()
    #: checkpoint prefix of its tensors, one per layout (transformers 4.5x, 5.x); local names follow it
    prefixes: ClassVar[tuple[str, ...]]
    #: local path of its block list: ``keep_float`` names are ``<layer_prefix>.<i>.<linear>``
    layer_prefix: ClassVar[str] = "layers"
    #: the linears of one block (local paths inside it)
    linears: ClassVar[tuple[str, ...]]
    #: modules this one needs in the same bundle (skipped with them)
    requires: ClassVar[tuple[str, ...]] = ()
    #: the fix of its missing-weights error
    missing_fix: ClassVar[str | None] = None

    def __init__(self, ckpt: Checkpoint, settings: ModuleRecipe, calibration: CalibrationRecipe | None = None):
        self.ckpt = ckpt
        self.settings = settings
        self.calibration = calibration  # the recipe's calibration section (AWQ), if any

    @classmethod
    def reference(cls, ckpt: Checkpoint) -> Module:
        """The module over ``ckpt`` with its default settings (float32): what verify reads."""
        from omni_export.build.recipes import default_settings

        return cls(ckpt, default_settings(cls.name))

    # -- checks and estimates ---------------------------------------------------------------
    def skip_reason(self) -> str | None:
        """Why this checkpoint has nothing to build for the module (e.g. no talker), or None."""
        return None

    def required_tensors(self) -> list[str]:
        """Local names (under ``prefixes``) of the tensors ``check`` requires."""
        return []

    def no_weights(self) -> str | None:
        """"the checkpoint has no <name> weights (<prefix>*)" if it holds none of the module's tensors."""
        if self.ckpt.tensor_names(self.prefixes):
            return None
        return f"the checkpoint has no {self.name} weights ({self.prefixes[0]}*)"

    def check(self) -> None:
        """Refuse, before any work, a checkpoint or setting this module cannot build: here, a
        checkpoint without the module's tensors or lacking some of ``required_tensors``."""
        required = self.required_tensors()
        absent = self.no_weights() if required else None
        if absent is not None:
            raise CheckpointError(absent, path=self.ckpt.root, fix=f"use a complete Qwen2.5-Omni checkpoint, or drop "
                                                                   f"`{self.name}` from the recipe's modules")
        self.ckpt.require(self.prefixes, required, fix=self.missing_fix)

    def memory_estimate(self) -> int:
        """Peak bytes of RAM the module's build needs (for the pre-flight check)."""
        raise NotImplementedError

    # -- the manifest -----------------------------------------------------------------------
    def config(self) -> dict:
        """The module's ``config`` block in the manifest (shape constants the runtime needs)."""
        raise NotImplementedError

    # -- weights ----------------------------------------------------------------------------
    def arrays(self, targets: Iterable[str] | None = None, prefixes: Sequence[str] | None = None
               ) -> dict[str, np.ndarray]:
        """float32 arrays of the module's tensors ``targets`` (local names under ``prefixes``,
        default the module's; None: all of them)."""
        tensors = self.ckpt.tensors(prefixes or self.prefixes, targets, fix=self.missing_fix)
        return {name: tensor.numpy() for name, tensor in tensors.items()}

    # -- build and verify -------------------------------------------------------------------
    def build(self, ctx: BuildContext) -> ModuleBuild:
        """Write the module's graphs into ``ctx.out_dir`` (:meth:`write`), timed."""
        started = time.perf_counter()
        result = self.write(ctx)
        result.info = {"seconds": round(time.perf_counter() - started, 2), **result.info}
        return result

    def write(self, ctx: BuildContext) -> ModuleBuild:
        """The module's own build step: its graphs (and any other files) and its build info."""
        raise NotImplementedError

    def verify(self, ctx) -> ModuleReport:
        """Compare the bundle's graphs of this module with transformers (``omni_export.verify.checks``)."""
        raise NotImplementedError


def quantize_linear(linear, settings):
    """``linear`` (float) as the recipe's ``weights`` store it: int8 symmetric per output channel
    (``quant.rtn.quantize_channels``) for ``int8``, unchanged otherwise (float weights are cast by
    the graph builder as they are written)."""
    if settings.weights != "int8":
        return linear
    from omni_export.export.onnx_graph import Linear
    from omni_export.quant.rtn import quantize_channels

    return Linear(quantize_channels(linear.weight), linear.bias)


def channel_quantization(settings) -> dict | None:
    """The manifest ``quantization`` block of a graph whose linears / convolutions are int8 per
    output channel (``quantize_linear``), None for float weights."""
    if settings.weights != "int8":
        return None
    return {"weights": "int8", "method": "rtn", "granularity": "channel", "symmetric": True,
            "accuracy_level": INT8_ACCURACY_LEVEL, "emit": "qdq"}


#: MatMulNBits accuracy level of the int8 weight-only graphs (onnxruntime fuses their
#: DequantizeLinear + MatMul pairs into MatMulNBits with 8 bits): measured, recipes/README.md.
INT8_ACCURACY_LEVEL = 4


def linear(tensors: dict[str, np.ndarray], path: str):
    """The ``Linear`` of ``path`` in ``tensors``: ``<path>.weight``, and ``<path>.bias`` if read."""
    from omni_export.export.onnx_graph import Linear

    return Linear(tensors[f"{path}.weight"], tensors.get(f"{path}.bias"))


def weight_and_bias(paths: Iterable[str], without_bias: Iterable[str] = ()) -> list[str]:
    """The tensor names of the linears / norms ``paths``: ``.weight`` and ``.bias`` (only ``.weight``
    for those in ``without_bias``)."""
    without_bias = set(without_bias)
    return [f"{path}.{kind}" for path in paths for kind in ("weight", "bias")
            if kind == "weight" or path not in without_bias]
