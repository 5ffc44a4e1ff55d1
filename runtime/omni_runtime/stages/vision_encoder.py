"""The vision encoder stage: image/video patches -> one embedding row per image/video token.

``VisionEncoder(manifest, pool).encode(pixel_values, grid_thw)`` computes the graph's index
inputs on the host (``vision_prep.encoder_inputs``), runs the ``vision_encoder`` graph and
returns ``[tokens, thinker hidden]`` float32 rows, image after image in the order given. The
session is created on demand and the pool is told the stage is done with it after the call
(``release=False`` does not), so under the ``lazy`` policy the encoder's memory is free again
before the thinker decodes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from omni_runtime.errors import BundleError, InputError
from omni_runtime.bundle.manifest import REBUILD_FIX, Manifest
from omni_runtime.media.vision_prep import VisionConfig, VisionInput, concat_inputs, encoder_inputs, token_count

from omni_runtime.bundle.names import VISION_ENCODER as GRAPH_NAME
OUTPUT_NAME = "vision_embeds"


def vision_config(manifest: Manifest) -> VisionConfig:
    """The bundle's ``config.vision`` block, typed; BundleError if the bundle has no vision encoder."""
    config = manifest.configs.vision
    if config is None or GRAPH_NAME not in manifest.graphs:
        raise BundleError("the bundle has no vision encoder (it was built without the vision module)",
                          path=manifest.manifest_path, fix=REBUILD_FIX + " with a recipe that lists `vision`")
    return config


class VisionEncoder:
    """Runs the bundle's ``vision_encoder`` graph."""

    def __init__(self, manifest: Manifest, pool):
        self.manifest = manifest
        self.pool = pool
        self.config = vision_config(manifest)

    @property
    def merge_size(self) -> int:
        return self.config.spatial_merge_size

    def encode(self, pixel_values: np.ndarray, grid_thw, release: bool = True) -> np.ndarray:
        """Patches ``[patches, C*T*P*P]`` of the images/videos with grids ``[(t, h, w), ...]``
        (concatenated in that order) -> ``[tokens, hidden]`` float32."""
        inputs = encoder_inputs(grid_thw, self.config)
        pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
        patches = int(inputs["position_ids"].shape[0])
        c, tp, p = self.config.in_channels, self.config.temporal_patch_size, self.config.patch_size
        width = c * tp * p * p
        if pixel_values.ndim != 2 or pixel_values.shape != (patches, width):
            raise InputError(f"pixel_values has shape {list(pixel_values.shape)}; the grids need "
                             f"[{patches}, {width}]", param="pixel_values",
                             fix="pass the patches made by vision_prep (preprocess_image / load_video) "
                                 "with their grids")
        try:
            (embeds,) = self.pool.get(GRAPH_NAME).run([OUTPUT_NAME], {"pixel_values": pixel_values, **inputs})
            # a copy: the output array otherwise keeps the session's arena alive after release
            embeds = np.array(embeds)
        finally:
            if release:
                self.pool.done(GRAPH_NAME)
        return embeds

    def encode_inputs(self, items: Sequence[VisionInput], release: bool = True) -> list[np.ndarray]:
        """Several prepared images/videos in one graph call; one ``[tokens_i, hidden]`` array each."""
        pixel_values, grids = concat_inputs(items)
        embeds = self.encode(pixel_values, grids, release=release)
        counts = [token_count(g, self.merge_size) for g in grids]
        return np.split(embeds, np.cumsum(counts)[:-1])
