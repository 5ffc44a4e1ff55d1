"""The bundle's graph names, in one torch-free place.

The compiler's exporters write graphs under these names, the manifest lists them under
``graphs``, and the runtime stages, ``verify`` and the C++/C# hosts look them up by them. A
module's graphs are listed in ``MODULE_GRAPHS`` in the order ``build`` writes them.
"""

from __future__ import annotations

THINKER_EMBEDDING = "thinker_embedding"
THINKER_DECODER = "thinker_decoder"
AUDIO_ENCODER = "audio_encoder"
VISION_ENCODER = "vision_encoder"
TALKER_EMBEDDING = "talker_embedding"
TALKER_DECODER = "talker_decoder"
TOKEN2WAV_DIT = "token2wav_dit"
TOKEN2WAV_BIGVGAN = "token2wav_bigvgan"

#: module name -> the graphs it writes
MODULE_GRAPHS: dict[str, tuple[str, ...]] = {
    "thinker": (THINKER_EMBEDDING, THINKER_DECODER),
    "audio": (AUDIO_ENCODER,),
    "vision": (VISION_ENCODER,),
    "talker": (TALKER_EMBEDDING, TALKER_DECODER),
    "token2wav": (TOKEN2WAV_DIT, TOKEN2WAV_BIGVGAN),
}

#: every graph name a bundle may hold
ALL_GRAPHS: tuple[str, ...] = tuple(name for graphs in MODULE_GRAPHS.values() for name in graphs)
