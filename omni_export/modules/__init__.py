"""The module registry: each exported module (thinker now; audio, vision, talker, token2wav with
their issues) is one entry with its graphs, its manifest ``config`` block, its memory estimate
and the recipe section that governs it. ``omni-export build`` loops over the recipe's modules.

A module's name is found in four places: its exporter (``omni_export/export/<name>_*.py``),
its host-side preparation, its runtime stage (``omni_runtime/<name>.py``) and its parity test
(``tests/test_<name>_*_parity.py``).
"""

from __future__ import annotations

from omni_export.modules.audio import AudioModule
from omni_export.modules.base import BuildContext, Module
from omni_export.modules.talker import TalkerModule
from omni_export.modules.thinker import ThinkerModule
from omni_export.modules.token2wav import Token2WavModule
from omni_export.modules.vision import VisionModule

REGISTRY: dict[str, type[Module]] = {ThinkerModule.name: ThinkerModule, AudioModule.name: AudioModule,
                                     TalkerModule.name: TalkerModule, VisionModule.name: VisionModule,
                                     Token2WavModule.name: Token2WavModule}

__all__ = ["REGISTRY", "AudioModule", "BuildContext", "Module", "TalkerModule", "ThinkerModule", "Token2WavModule",
           "VisionModule"]
