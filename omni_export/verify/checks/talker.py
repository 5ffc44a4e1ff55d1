"""The talker's check: ``EMBEDDING_SAMPLES`` sample codec ids through ``talker_embedding`` vs the
talker's ``embed_tokens``; a ``TALKER_TOKENS`` prefill of random thinker-space embeddings (scaled by
``ctx.scale``) through ``talker_decoder`` vs ``Qwen2_5OmniTalkerForConditionalGeneration.forward``:
post-norm hidden states and the last position's logits (``logits_*``)."""

from __future__ import annotations

import numpy as np

from omni_runtime.bundle.names import TALKER_DECODER, TALKER_EMBEDDING

from omni_export.verify.context import EMBEDDING_SAMPLES, ModuleReport, VerifyContext
from omni_export.verify.metrics import decoder_metrics, metrics
from omni_export.verify.reference import reference_module, run_decoder, run_graph

TALKER_TOKENS = (8, 21)     # random thinker-space prefill through the talker decoder, by ``ctx.shape``


def verify(module, ctx: VerifyContext) -> ModuleReport:
    import torch
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniTalkerForConditionalGeneration

    from omni_runtime.prompt.rope import text_position_ids

    graphs = ctx.manifest.graphs
    config = module.ckpt.config.talker_config
    rng = ctx.rng()
    ids = rng.choice(config.vocab_size, min(EMBEDDING_SAMPLES, config.vocab_size), replace=False).astype(np.int64)
    tokens = TALKER_TOKENS[ctx.shape]
    embeds = (rng.standard_normal((1, tokens, config.embedding_size)) * ctx.scale).astype(np.float32)
    positions = text_position_ids(np.ones((1, tokens), dtype=np.int64))
    ours = {}
    if TALKER_EMBEDDING in graphs:
        ctx.say(f"bundle: {TALKER_EMBEDDING}")
        ours[TALKER_EMBEDDING] = run_graph(ctx.pool, TALKER_EMBEDDING, {"input_ids": ids[None]})[0][0]
    if TALKER_DECODER in graphs:
        ctx.say(f"bundle: {TALKER_DECODER}")
        ours[TALKER_DECODER] = run_decoder(ctx.pool, TALKER_DECODER, embeds, positions)
    ctx.say("reference: talker")
    talker = reference_module(module.ckpt, Qwen2_5OmniTalkerForConditionalGeneration, config, module.prefixes)
    report = {}
    with torch.no_grad():
        if TALKER_EMBEDDING in ours:
            report[TALKER_EMBEDDING] = metrics(ours[TALKER_EMBEDDING],
                                               talker.get_input_embeddings()(torch.from_numpy(ids)).numpy())
        if TALKER_DECODER in ours:
            out = talker(inputs_embeds=torch.from_numpy(embeds), position_ids=torch.from_numpy(positions),
                         use_cache=False, output_hidden_states=True)
            logits, hidden = ours[TALKER_DECODER]
            report[TALKER_DECODER] = decoder_metrics(hidden, out.hidden_states[-1].numpy(),
                                                     logits, out.logits[0, -1].numpy())
    return ModuleReport(report)
