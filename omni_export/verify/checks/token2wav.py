"""token2wav's check. ``token2wav_dit``: one velocity evaluation with classifier-free guidance's
two rows for the default speaker (the bundle's stored speaker encodings) vs
``Qwen2_5OmniToken2WavDiTModel(..., apply_cfg=True)`` on the speaker's reference mel.
``token2wav_bigvgan``: ``BIGVGAN_FRAMES`` random mel frames vs ``Qwen2_5OmniToken2WavBigVGANModel``.
Each graph the bundle has is checked on its own seeded input, its reference built after its
session is released and dropped before the next."""

from __future__ import annotations

import gc

import numpy as np

from omni_runtime.bundle.names import TOKEN2WAV_BIGVGAN, TOKEN2WAV_DIT

from omni_export.verify.context import ModuleReport, VerifyContext
from omni_export.verify.metrics import metrics
from omni_export.verify.reference import reference_module, run_graph

#: codes by ``ctx.shape`` and the ODE time of one velocity evaluation with the guidance rows
DIT_CODES, DIT_TIME = (13, 30), 0.5
BIGVGAN_FRAMES = (16, 41)   # mel frames through the vocoder, by ``ctx.shape``


def _check_dit(module, ctx: VerifyContext) -> dict:
    import torch
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniToken2WavDiTModel

    manifest, rng = ctx.manifest, ctx.rng()
    block = manifest.config["token2wav"]
    speaker = block["default_speaker"]
    stored = {k: np.load(manifest.path(v), allow_pickle=False) for k, v in block["speakers"][speaker].items()
              if k != "bos_token"}
    spk = module.speakers()[speaker]
    config = module.ckpt.config.token2wav_config.dit_config
    n_codes = DIT_CODES[ctx.shape]
    frames = n_codes * config.repeats
    codes = rng.integers(0, config.num_embeds + 1, (1, n_codes)).astype(np.int64)
    x = rng.standard_normal((1, frames, config.mel_dim)).astype(np.float32)
    # classifier-free guidance's two rows, as the runtime feeds them (tests/test_token2wav_dit_parity.py)
    feeds = {"x": np.concatenate([x, x]), "codes": np.concatenate([codes, np.zeros_like(codes)]),
             "time": np.full(2, DIT_TIME, np.float32),
             "speaker_embedding": np.stack([stored["speaker_embedding"], np.zeros_like(stored["speaker_embedding"])]),
             "reference_embedding": np.stack([stored["reference_embedding"], stored["null_reference_embedding"]])}
    ctx.say(f"bundle: {TOKEN2WAV_DIT}")
    (ours,) = run_graph(ctx.pool, TOKEN2WAV_DIT, feeds)
    ctx.say(f"reference: {TOKEN2WAV_DIT}")
    dit = reference_module(module.ckpt, Qwen2_5OmniToken2WavDiTModel, config, module.dit_prefixes)
    cond = torch.from_numpy(spk["cond"])
    with torch.no_grad():
        ref = dit(hidden_states=torch.from_numpy(x), condition_vector=torch.from_numpy(spk["ref_mel"])[None],
                  speaker_embedding=cond[None, None].repeat(1, frames, 1), quantized_code=torch.from_numpy(codes),
                  time_step=torch.tensor(DIT_TIME), apply_cfg=True).numpy()
    return metrics(ours, ref)


def _check_bigvgan(module, ctx: VerifyContext) -> dict:
    import torch
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniToken2WavBigVGANModel

    config = module.ckpt.config.token2wav_config.bigvgan_config
    mel = (ctx.rng().standard_normal((1, config.mel_dim, BIGVGAN_FRAMES[ctx.shape])) * 1.7 - 0.5).astype(np.float32)
    ctx.say(f"bundle: {TOKEN2WAV_BIGVGAN}")
    (ours,) = run_graph(ctx.pool, TOKEN2WAV_BIGVGAN, {"mel": mel})
    ctx.say(f"reference: {TOKEN2WAV_BIGVGAN}")
    vocoder = reference_module(module.ckpt, Qwen2_5OmniToken2WavBigVGANModel, config, module.bigvgan_prefixes)
    with torch.no_grad():
        ref = vocoder(torch.from_numpy(mel)).numpy().reshape(-1)
    return metrics(ours.reshape(-1), ref)


#: graph -> its check, in report order
GRAPH_CHECKS = {TOKEN2WAV_DIT: _check_dit, TOKEN2WAV_BIGVGAN: _check_bigvgan}


def verify(module, ctx: VerifyContext) -> ModuleReport:
    report = {}
    for name, check in GRAPH_CHECKS.items():
        if name in ctx.manifest.graphs:
            report[name] = check(module, ctx)
            gc.collect()  # drop the reference before the next one is read
    return ModuleReport(report)
