"""The module registry: every module a bundle can hold, one class each, in build order.

A module class (``omni_export.modules.base.Module``) declares all it is: its recipe keys and
precisions, its checkpoint name map, its graphs, its manifest ``config`` block, its memory
estimate, its build (graphs and build info) and its verify check. The recipes, ``build``,
``verify`` and the command line iterate ``REGISTRY`` and name no module: adding one is its file
(``omni_export/modules/<name>.py``, with its exporter ``omni_export/export/<name>_*.py`` and its
check ``omni_export/verify/checks/<name>.py``) and one line here.

Importing the registry is light (no torch, transformers or onnx): the recipe check reads it.
"""

from __future__ import annotations

from omni_export.modules.audio import AudioModule
from omni_export.modules.base import BuildContext, Module, ModuleBuild
from omni_export.modules.talker import TalkerModule
from omni_export.modules.thinker import ThinkerModule
from omni_export.modules.token2wav import Token2WavModule
from omni_export.modules.vision import VisionModule

REGISTRY: dict[str, type[Module]] = {module.name: module for module in (
    ThinkerModule,
    AudioModule,
    VisionModule,
    TalkerModule,
    Token2WavModule,
)}

__all__ = ["REGISTRY", "AudioModule", "BuildContext", "Module", "ModuleBuild", "TalkerModule", "ThinkerModule",
           "Token2WavModule", "VisionModule"]
