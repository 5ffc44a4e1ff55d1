"""The audio encoder stage: log-mel features of one or several audios -> audio token embeddings.

The ``audio_encoder`` session is created when a request has audio; right after, the pool is told
the stage is done with it (``release=False`` does not, e.g. to encode several requests in a
row), so under the ``lazy`` policy it never shares memory with the thinker's decode.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from omni_runtime.media.audio_prep import AudioConfig, audio_features, encoder_inputs, split_tokens
from omni_runtime.errors import BundleError
from omni_runtime.bundle.manifest import REBUILD_FIX, Manifest
from omni_runtime.bundle.sessions import SessionPool

from omni_runtime.bundle.names import AUDIO_ENCODER as GRAPH_NAME
OUTPUT = "audio_embeds"


class AudioEncoder:
    """Runs the bundle's ``audio_encoder`` graph through a :class:`SessionPool`."""

    def __init__(self, manifest: Manifest, pool: SessionPool):
        self.manifest = manifest
        self.pool = pool
        config = manifest.configs.audio
        if config is None or GRAPH_NAME not in manifest.graphs:
            raise BundleError("the bundle has no audio encoder (no config.audio or graph 'audio_encoder')",
                              path=manifest.manifest_path,
                              fix="rebuild the bundle with a recipe whose modules include `audio` "
                                  "(e.g. `omni-export build --recipe fp32`)")
        self.config: AudioConfig = config

    def features(self, source, **kwargs) -> np.ndarray:
        """Log-mel features [n_mels, frames] of a path, bytes or array (``audio_prep.audio_features``)."""
        return audio_features(source, self.config, **kwargs)

    def encode(self, features_list: Sequence[np.ndarray] | np.ndarray, release: bool = True) -> list[np.ndarray]:
        """One [tokens, output_dim] float32 array per audio, in order (25 tokens per second)."""
        if isinstance(features_list, np.ndarray):
            features_list = [features_list]
        inputs = encoder_inputs(features_list, n_window=self.config.n_window, n_mels=self.config.num_mel_bins)
        try:
            session = self.pool.get(GRAPH_NAME)
            (embeds,) = session.run([OUTPUT], inputs)
            # a copy: the output array otherwise keeps the session's arena alive after release
            embeds = np.array(embeds)
        finally:
            if release:
                self.pool.done(GRAPH_NAME)
        if embeds.ndim != 2 or embeds.shape[1] != self.config.output_dim:
            raise BundleError(f"the audio encoder returned shape {embeds.shape}, expected [tokens, "
                              f"{self.config.output_dim}]", path=self.manifest.manifest_path, fix=REBUILD_FIX)
        return split_tokens(embeds, [f.shape[1] for f in features_list])
