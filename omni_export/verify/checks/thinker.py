"""The thinker's check: its embedding and decoder graphs, and its distributions teacher-forced on
built-in conversations, against transformers' own ``Qwen2_5OmniDecoderLayer`` run ONE LAYER AT A
TIME (``reference_layers``).

Each reference layer is built, loaded with that layer's float32 weights, run over every sample
sequence and dropped before the next one is read, so a real 7B (28 GB in fp32) is verified in a
few GB. For an AutoAWQ checkpoint the reference uses its dequantized int4 weights (what the
checkpoint means), so an exact import shows ~0 error.

- ``thinker_embedding``: the graph's rows for ``EMBEDDING_SAMPLES`` sample token ids vs the
  checkpoint's float rows.
- ``thinker_decoder``: one prefill of the checkpoint's token embeddings of ``DECODER_TOKENS``
  distinct random vocabulary ids (fixed seed; ``decoder_sample``) through the graph vs the
  reference layers + final norm + lm_head. Embedding rows, not isotropic noise: they are what
  the decoder reads (a text prompt's ``inputs_embeds``), with the table's structure, such as a
  real model's outlier hidden channels, which quantization error depends on; 128 of them so the
  figure does not hang on a few draws. Reported: the post-norm hidden states of every position
  (``max_abs``, ``rel_rms``) and
  the logits of the last position (``logits_*``). ``rel_rms = rms(bundle - ref) / rms(ref)``.
- the summary (the report's ``thinker``): end to end and teacher-forced on ``prompts`` of the
  built-in calibration conversations (``omni_export/build/calibration_data.jsonl``, evenly spaced
  over the set), rendered with the bundle's chat template and tokenizer. The prompt is the
  conversation up to its first assistant turn (with the generation prompt), keeping its last
  ``PROMPT_TOKENS`` tokens; the continuation is the first ``tokens`` tokens of that assistant
  answer, i.e. the conversation's own next tokens (not the reference's greedy tokens: those would
  need ``tokens`` passes over all the weights, one per new token, while the written answer needs a
  single layer-at-a-time pass). The reference computes the logits of every position of prompt +
  continuation in one causal pass; the bundle scores the continuation with the runtime's
  generator (``ThinkerGenerator.score``: one prefill, then one cached step per token, as
  generation runs). The positions compared are those predicting each continuation token
  (``tokens`` per prompt): ``top1_agreement`` is the fraction where both argmaxes agree,
  ``mean_kl`` the mean of KL(reference || bundle) over them, softmax in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from omni_runtime.bundle.names import THINKER_DECODER, THINKER_EMBEDDING
from omni_runtime.errors import InputError

from omni_export.checkpoint.reader import Checkpoint
from omni_export.verify.context import EMBEDDING_SAMPLES, ModuleReport, VerifyContext, VerifyError
from omni_export.verify.metrics import decoder_metrics, kl_divergence, metrics
from omni_export.verify.reference import run_decoder

#: token-embedding prefill checked through the decoder graph, by ``ctx.shape`` (verify: the first)
DECODER_SHAPES = (128, 37)
DECODER_TOKENS = DECODER_SHAPES[0]
PROMPT_TOKENS = 48          # prompt tokens kept per conversation (its last ones)
#: shape constants a bundle and the checkpoint it is verified against must share
MATCHED_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "vocab_size")

Progress = Callable[[str, int, int], None]  # (description, done, total)


# ------------------------------------------------------------------------------------------------
# The reference: transformers' decoder layers, one at a time
# ------------------------------------------------------------------------------------------------
def _thinker(ckpt: Checkpoint):
    from omni_export.modules.thinker import ThinkerModule

    return ThinkerModule.reference(ckpt)


def reference_layers(ckpt: Checkpoint, module=None) -> Iterator:
    """transformers ``Qwen2_5OmniDecoderLayer`` modules (fp32, eval) with the checkpoint's float
    weights (``ThinkerModule.float_layers``: for an AutoAWQ checkpoint its int4 weights
    dequantized), yielded one at a time: drop each one before asking for the next to hold one
    layer. ``module``: the thinker module over ``ckpt`` (built here when not given)."""
    config = ckpt.text_config()
    for i, layer in enumerate((module or _thinker(ckpt)).float_layers()):
        yield _reference_layer(config, i, layer)  # no local keeps the layer while suspended


def _reference_layer(config, i: int, layer):
    """A ``Qwen2_5OmniDecoderLayer`` holding ``layer``'s arrays (shared, not copied)."""
    from omni_export.export.thinker_weights import torch_decoder_layer

    return torch_decoder_layer(config, i, layer)


@dataclass
class ReferenceOutput:
    """Post-norm hidden states [1, S, hidden] of each sequence, and what computes logits from them."""

    hidden: list[np.ndarray]
    lm_head: np.ndarray  # [vocab, hidden] float32

    def logits(self, k: int, positions) -> np.ndarray:
        """float32 logits [len(positions), vocab] of sequence ``k`` at ``positions``."""
        return self.hidden[k][0, positions] @ self.lm_head.T


def reference_forward(ckpt: Checkpoint, sequences: list[tuple[np.ndarray, np.ndarray]],
                      progress: Progress | None = None, module=None) -> ReferenceOutput:
    """Run ``[(inputs_embeds [1, S, hidden], position_ids [3, 1, S])]`` (batch 1, no padding)
    through the thinker text model as ``Qwen2_5OmniThinkerTextModel.forward`` does, one decoder
    layer at a time for all sequences; returns the final-norm hidden states and the lm_head.
    ``module``: the thinker module over ``ckpt`` (built here when not given)."""
    import torch
    from transformers.masking_utils import create_causal_mask
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (Qwen2_5OmniRMSNorm,
                                                                        Qwen2_5OmniRotaryEmbedding)

    module = module or _thinker(ckpt)
    config = ckpt.text_config()
    n = config.num_hidden_layers
    rotary = Qwen2_5OmniRotaryEmbedding(config=config)
    states, rope, masks = [], [], []
    with torch.no_grad():
        for embeds, positions in sequences:
            h = torch.from_numpy(np.ascontiguousarray(embeds, dtype=np.float32))
            states.append(h)
            rope.append(rotary(h, torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64))))
            masks.append(create_causal_mask(config=config, inputs_embeds=h, attention_mask=None,
                                            past_key_values=None, position_ids=None))
        for i, layer in enumerate(reference_layers(ckpt, module)):
            if progress is not None:
                progress(f"reference layer {i + 1}/{n}", i, n + 1)
            for k in range(len(states)):
                states[k] = layer(states[k], attention_mask=masks[k], position_embeddings=rope[k],
                                  position_ids=None, past_key_values=None, use_cache=False)
            del layer
        weights = module.weights()
        norm = Qwen2_5OmniRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        norm.weight = torch.nn.Parameter(torch.from_numpy(weights.final_norm()))
        hidden = [norm(h).numpy() for h in states]
    if progress is not None:
        progress("reference lm_head", n, n + 1)
    return ReferenceOutput(hidden, weights.lm_head())


# ------------------------------------------------------------------------------------------------
# Samples
# ------------------------------------------------------------------------------------------------
def sample_ids(rng: np.random.Generator, vocab: int, shape: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """verify's token ids, drawn from ``rng`` in this order: the embedding check's
    ``EMBEDDING_SAMPLES`` ids (0, ``vocab - 1`` and distinct random ones) and the decoder check's
    ``DECODER_SHAPES[shape]`` distinct random ids (int64)."""
    tokens = DECODER_SHAPES[shape]
    if vocab < max(EMBEDDING_SAMPLES, tokens):
        raise VerifyError(f"the thinker's vocabulary ({vocab} ids) is smaller than verify's samples "
                          f"({max(EMBEDDING_SAMPLES, tokens)} ids)", fix="verify a model with a larger vocabulary")
    embedding = np.concatenate([[0, vocab - 1], rng.choice(vocab, EMBEDDING_SAMPLES - 2, replace=False)])
    return embedding.astype(np.int64), rng.choice(vocab, tokens, replace=False).astype(np.int64)


def decoder_sample(ckpt: Checkpoint, seed: int, shape: int = 0, table: np.ndarray | None = None) -> np.ndarray:
    """The inputs_embeds [1, DECODER_SHAPES[shape], hidden] float32 that verify (seeded with
    ``seed``) prefills the decoder with: rows of the checkpoint's float embedding ``table`` (read
    from ``ckpt`` when not given) at ``sample_ids``' decoder ids."""
    if table is None:
        table = _thinker(ckpt).weights().embedding()
    _, ids = sample_ids(np.random.default_rng(seed), table.shape[0], shape)
    return np.ascontiguousarray(table[ids][None], dtype=np.float32)


def _prompt_samples(template, tokenizer, prompts: int, tokens: int) -> list[tuple[list[int], list[int]]]:
    """``[(prompt ids, continuation ids)]`` from the built-in conversations (module docstring)."""
    from omni_export.build.calibration import builtin_messages

    conversations = [c for c in builtin_messages() if any(m["role"] == "assistant" for m in c)]
    if prompts > len(conversations):
        raise InputError(f"{prompts} prompts were asked but there are only {len(conversations)} built-in conversations",
                         fix=f"ask for at most {len(conversations)} prompts", param="prompts")
    picks = np.linspace(0, len(conversations) - 1, prompts).round().astype(int)
    samples = []
    for index in picks:
        messages = conversations[index]
        first = next(j for j, m in enumerate(messages) if m["role"] == "assistant")
        prompt_text = template.render(messages[:first], add_generation_prompt=True)
        full_text = template.render(messages[:first + 1], add_generation_prompt=False)
        prompt = tokenizer.encode(prompt_text, add_special_tokens=False).ids
        full = tokenizer.encode(full_text, add_special_tokens=False).ids
        if full[:len(prompt)] == prompt:
            answer = full[len(prompt):]
        elif full_text.startswith(prompt_text):  # the answer does not start on a token boundary
            answer = tokenizer.encode(full_text[len(prompt_text):], add_special_tokens=False).ids
        else:
            raise VerifyError(f"the bundle's chat template renders built-in conversation {index}'s answer turn "
                              "differently from its generation prompt", path=template.path,
                              fix="verify with a bundle whose chat template is the checkpoint's (rebuild it)")
        if len(answer) < tokens:
            raise VerifyError(f"built-in conversation {index} has only {len(answer)} answer tokens, "
                              f"{tokens} were asked", fix=f"ask for at most {len(answer)} tokens")
        samples.append((prompt[-PROMPT_TOKENS:], answer[:tokens]))
    return samples


def _bundle_samples(manifest, prompts: int, tokens: int) -> list[tuple[list[int], list[int]]]:
    """The prompt samples rendered with the bundle's tokenizer and chat template (checked first)."""
    from tokenizers import Tokenizer

    from omni_runtime.bundle.manifest import verify_file
    from omni_runtime.prompt.chat import ChatTemplate

    tok = manifest.tokenizer
    for rel in (tok["file"], tok["chat_template_file"]):
        verify_file(manifest, rel)
    tokenizer = Tokenizer.from_file(str(manifest.path(tok["file"])))
    template = ChatTemplate.from_file(manifest.path(tok["chat_template_file"]))
    samples = _prompt_samples(template, tokenizer, prompts, tokens)
    limit = int(manifest.config["thinker"]["max_position_embeddings"])
    if max(len(p) + len(c) for p, c in samples) > limit:
        raise InputError(f"prompt + tokens exceed the model's {limit} positions", fix="ask for fewer tokens",
                         param="tokens")
    return samples


def _check_same_model(manifest, ckpt: Checkpoint) -> None:
    from omni_export.export.thinker_decoder import TextDims

    bundle = manifest.config.get("thinker", {})
    dims = TextDims.from_config(ckpt.text_config())
    diffs = [f"{key} {bundle.get(key)} vs {getattr(dims, key)}" for key in MATCHED_KEYS
             if bundle.get(key) != getattr(dims, key)]
    if diffs:
        raise VerifyError(f"the bundle and the checkpoint are different models ({'; '.join(diffs)})",
                          path=ckpt.root, fix=f"pass --model the checkpoint the bundle was built from "
                                              f"(the manifest names {manifest.model.get('source')!r})")


# ------------------------------------------------------------------------------------------------
# The check
# ------------------------------------------------------------------------------------------------
def verify(module, ctx: VerifyContext) -> ModuleReport:
    """The thinker's graphs and summary (module docstring). Its graphs are checked in the same
    layer-at-a-time pass as the prompts: without teacher-forcing settings (``ctx.prompts`` None)
    nothing is checked and the report is empty."""
    if ctx.prompts is None:
        return ModuleReport()
    from omni_runtime.prompt.rope import text_position_ids
    from omni_runtime.stages.thinker import ThinkerGenerator

    manifest, ckpt = ctx.manifest, module.ckpt
    _check_same_model(manifest, ckpt)
    samples = _bundle_samples(manifest, ctx.prompts, ctx.tokens)
    cfg = manifest.config["thinker"]
    vocab = int(cfg["vocab_size"])

    # The checkpoint's float embedding rows: the embedding check and the reference's inputs.
    ctx.say("reading the embedding table")
    embedding_ids, decoder_ids = sample_ids(ctx.rng(), vocab, ctx.shape)
    table = module.weights().embedding()
    ref_rows = table[embedding_ids]
    ref_prompt_embeds = [table[np.asarray(p + c)][None] for p, c in samples]
    decoder_embeds = np.ascontiguousarray(table[decoder_ids][None], dtype=np.float32)  # as decoder_sample
    decoder_tokens = decoder_embeds.shape[1]
    del table
    decoder_positions = text_position_ids(np.ones((1, decoder_tokens), dtype=np.int64))

    # The bundle (ONNX Runtime, CPU, fp32 host side); its sessions are released before the reference.
    try:
        ctx.say(f"bundle: {THINKER_EMBEDDING}")
        bundle_rows = ctx.pool.get(THINKER_EMBEDDING).run(None, {"input_ids": embedding_ids[None]})[0][0]
        ctx.say(f"bundle: {THINKER_DECODER}")
        bundle_last_logits, bundle_hidden = run_decoder(ctx.pool, THINKER_DECODER, decoder_embeds, decoder_positions,
                                                        release=False)
        generator = ThinkerGenerator(manifest, ctx.pool)
        bundle_logits = []
        for n, (prompt, continuation) in enumerate(samples):
            ctx.say(f"bundle: prompt {n + 1}/{len(samples)}")
            bundle_logits.append(generator.score(prompt, continuation))
        del generator
    finally:
        for name in module.graphs:
            ctx.pool.release(name)

    # The reference (transformers, one decoder layer at a time).
    sequences = [(decoder_embeds, decoder_positions)]
    for (prompt, continuation), embeds in zip(samples, ref_prompt_embeds):
        sequences.append((embeds, text_position_ids(np.ones((1, len(prompt) + len(continuation)), dtype=np.int64))))
    ref = reference_forward(ckpt, sequences, lambda description, done, total: ctx.say(description), module)
    graphs = {THINKER_EMBEDDING: metrics(bundle_rows, ref_rows),
              THINKER_DECODER: decoder_metrics(bundle_hidden, ref.hidden[0], bundle_last_logits,
                                               ref.logits(0, [decoder_tokens - 1])[0])}
    agree, kls = [], []
    for k, (prompt, continuation) in enumerate(samples, start=1):
        first = len(prompt) - 1  # the position predicting the first continuation token
        ref_logits = ref.logits(k, list(range(first, first + len(continuation))))
        ours = bundle_logits[k - 1]
        agree.append(ref_logits.argmax(-1) == ours.argmax(-1))
        kls.append(kl_divergence(ref_logits, ours))
    agree, kls = np.concatenate(agree), np.concatenate(kls)
    return ModuleReport(graphs, {"top1_agreement": float(agree.mean()), "mean_kl": float(kls.mean()),
                                 "max_kl": float(kls.max()), "positions": int(agree.size)},
                        {"prompt_tokens": PROMPT_TOKENS, "decoder_tokens": decoder_tokens,
                         "embedding_samples": EMBEDDING_SAMPLES})
