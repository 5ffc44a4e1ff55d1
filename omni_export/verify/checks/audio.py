"""The audio encoder's check: ``AUDIO_FRAMES`` random log-mel frames through
``audio_prep.encoder_inputs`` and the ``audio_encoder`` graph vs ``Qwen2_5OmniAudioEncoder``
called as ``Qwen2_5OmniThinkerModel.get_audio_features`` does."""

from __future__ import annotations

import numpy as np

from omni_runtime.bundle.names import AUDIO_ENCODER

from omni_export.verify.context import ModuleReport, VerifyContext
from omni_export.verify.metrics import metrics
from omni_export.verify.reference import reference_module, run_graph

#: log-mel frames by ``ctx.shape``: one full 200-frame chunk (n_window 100) and a partial one; 3 and a short one
AUDIO_FRAMES = (250, 730)


def verify(module, ctx: VerifyContext) -> ModuleReport:
    import torch
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

    from omni_runtime.media.audio_prep import encoder_inputs

    block = ctx.manifest.config["audio"]
    n_mels = int(block["num_mel_bins"])
    frames = AUDIO_FRAMES[ctx.shape]
    features = (ctx.rng().standard_normal((n_mels, frames)) * 0.5).astype(np.float32)  # log-mel-like range
    ctx.say(f"bundle: {AUDIO_ENCODER}")
    (ours,) = run_graph(ctx.pool, AUDIO_ENCODER,
                        encoder_inputs([features], n_window=int(block["n_window"]), n_mels=n_mels))
    ctx.say(f"reference: {AUDIO_ENCODER}")
    ckpt = module.ckpt
    tower = reference_module(ckpt, Qwen2_5OmniAudioEncoder, ckpt.config.thinker_config.audio_config,
                             module.prefixes)
    lens = torch.tensor([frames])
    with torch.no_grad():  # as Qwen2_5OmniThinkerModel.get_audio_features calls the tower
        after_cnn, _ = tower._get_feat_extract_output_lengths(lens)
        ref = tower(torch.from_numpy(features), feature_lens=lens, aftercnn_lens=after_cnn).last_hidden_state.numpy()
    return ModuleReport({AUDIO_ENCODER: metrics(ours, ref)})
