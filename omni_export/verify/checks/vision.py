"""The vision encoder's check: random patches of grid ``VISION_GRID`` through
``vision_prep.encoder_inputs`` and the ``vision_encoder`` graph vs
``Qwen2_5OmniVisionEncoder(..., grid_thw).pooler_output``."""

from __future__ import annotations

import numpy as np

from omni_runtime.bundle.names import VISION_ENCODER

from omni_export.verify.context import ModuleReport, VerifyContext
from omni_export.verify.metrics import metrics
from omni_export.verify.reference import reference_module, run_graph

#: (t, h, w) patches by ``ctx.shape``: 24 merged tokens, several (partial) 112-px windows; two frames of 12 x 8
VISION_GRIDS = ((1, 8, 12), (2, 12, 8))
VISION_GRID = VISION_GRIDS[0]


def verify(module, ctx: VerifyContext) -> ModuleReport:
    import torch
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniVisionEncoder

    from omni_runtime.media.vision_prep import encoder_inputs

    cfg = ctx.manifest.configs.vision
    grid = VISION_GRIDS[ctx.shape]
    t, h, w = grid
    patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    pixels = ctx.rng().standard_normal((t * h * w, patch_dim)).astype(np.float32)  # normalized-pixel range
    ctx.say(f"bundle: {VISION_ENCODER}")
    (ours,) = run_graph(ctx.pool, VISION_ENCODER, {"pixel_values": pixels, **encoder_inputs([grid], cfg)})
    ctx.say(f"reference: {VISION_ENCODER}")
    ckpt = module.ckpt
    visual = reference_module(ckpt, Qwen2_5OmniVisionEncoder, ckpt.config.thinker_config.vision_config,
                              module.prefixes)
    with torch.no_grad():
        ref = visual(torch.from_numpy(pixels), grid_thw=torch.tensor([grid])).pooler_output.numpy()
    return ModuleReport({VISION_ENCODER: metrics(ours, ref)})
