"""``omni-export verify``: a bundle's graphs against the PyTorch (transformers) modules, fp32.

The reference is transformers' own ``Qwen2_5OmniDecoderLayer``, run ONE LAYER AT A TIME
(``reference_layers``): each layer is built, loaded with that layer's float32 weights, run over
every sample sequence and dropped before the next one is read, so a real 7B (28 GB in fp32)
is verified in a few GB. For an AutoAWQ checkpoint the reference uses its dequantized int4
weights (what the checkpoint means), so an exact import shows ~0 error.

Reported (``verify_bundle``)::

    {"graphs": {"thinker_embedding": {"max_abs", "rel_rms"},
                "thinker_decoder": {"max_abs", "rel_rms", "logits_max_abs", "logits_rel_rms"}},
     "thinker": {"top1_agreement", "mean_kl", "max_kl", "positions"},
     "bundle", "model", "recipe", "seconds", "settings"}

- ``thinker_embedding``: the graph's rows for sample token ids vs the checkpoint's float rows.
- ``thinker_decoder``: one prefill of random embeddings (fixed seed, ``DECODER_TOKENS`` tokens,
  scaled like the checkpoint's embeddings) through the graph vs the reference layers + final
  norm + lm_head: the post-norm hidden states of every position (``max_abs``, ``rel_rms``) and
  the logits of the last position (``logits_*``). ``rel_rms = rms(bundle - ref) / rms(ref)``.
- ``thinker``: end to end and teacher-forced on ``prompts`` of the built-in calibration
  conversations (``omni_export/calibration_data.jsonl``, evenly spaced over the set), rendered
  with the bundle's chat template and tokenizer. The prompt is the conversation up to its first
  assistant turn (with the generation prompt), keeping its last ``PROMPT_TOKENS`` tokens; the
  continuation is the first ``tokens`` tokens of that assistant answer, i.e. the conversation's
  own next tokens (not the reference's greedy tokens: those would need ``tokens`` passes over
  all the weights, one per new token, while the written answer needs a single layer-at-a-time
  pass). The reference computes the logits of every position of prompt + continuation in one
  causal pass; the bundle prefills the prompt through its embedding and decoder graphs and then
  steps the continuation one token at a time through its KV cache, as generation does. The
  positions compared are those predicting each continuation token (``tokens`` per prompt):
  ``top1_agreement`` is the fraction where both argmaxes agree, ``mean_kl`` the mean of
  KL(reference || bundle) over them, softmax in float64.

The bundle runs first (its sessions are then released), the reference after, so the two never
hold their weights at the same time.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omni_runtime.errors import InputError, OmniError

from .checkpoint import Checkpoint

EMBEDDING = "thinker_embedding"
DECODER = "thinker_decoder"
SEED = 0
EMBEDDING_SAMPLES = 64      # token ids checked through the embedding graph
DECODER_TOKENS = 16         # random-embedding prefill checked through the decoder graph
PROMPT_TOKENS = 48          # prompt tokens kept per conversation (its last ones)
#: shape constants a bundle and the checkpoint it is verified against must share
MATCHED_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "vocab_size")

Progress = Callable[[str, int, int], None]  # (description, done, total)


class VerifyError(OmniError):
    """The bundle and the checkpoint cannot be compared (different models, no usable prompts)."""


# ------------------------------------------------------------------------------------------------
# The reference: transformers' decoder layers, one at a time
# ------------------------------------------------------------------------------------------------
def _float_layers(ckpt: Checkpoint) -> Iterator:
    """The checkpoint's decoder layers as float32 ``DecoderLayer``s: the fp32 recipe's weights,
    which for an AutoAWQ checkpoint are its int4 weights dequantized."""
    from .export.thinker_weights import ThinkerWeights
    from .modules.thinker import ThinkerModule
    from .recipes import load_recipe

    module = ThinkerModule(ckpt, load_recipe("fp32").modules["thinker"])
    module.check()  # detects (and validates) an AutoAWQ checkpoint
    yield from module.layers(None, ThinkerWeights(ckpt))  # the float paths never use the build context


def reference_layers(ckpt: Checkpoint) -> Iterator:
    """transformers ``Qwen2_5OmniDecoderLayer`` modules (fp32, eval) with the checkpoint's float
    weights, yielded one at a time: drop each one before asking for the next to hold one layer."""
    config = ckpt.text_config()
    for i, layer in enumerate(_float_layers(ckpt)):
        yield _reference_layer(config, i, layer)  # no local keeps the layer while suspended


def _reference_layer(config, i: int, layer):
    """A ``Qwen2_5OmniDecoderLayer`` holding ``layer``'s arrays (shared, not copied)."""
    from .export.thinker_weights import torch_decoder_layer

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
                      progress: Progress | None = None) -> ReferenceOutput:
    """Run ``[(inputs_embeds [1, S, hidden], position_ids [3, 1, S])]`` (batch 1, no padding)
    through the thinker text model as ``Qwen2_5OmniThinkerTextModel.forward`` does, one decoder
    layer at a time for all sequences; returns the final-norm hidden states and the lm_head."""
    import torch
    from transformers.masking_utils import create_causal_mask
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (Qwen2_5OmniRMSNorm,
                                                                        Qwen2_5OmniRotaryEmbedding)

    from .export.thinker_weights import ThinkerWeights

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
        for i, layer in enumerate(reference_layers(ckpt)):
            if progress is not None:
                progress(f"reference layer {i + 1}/{n}", i, n + 1)
            for k in range(len(states)):
                states[k] = layer(states[k], attention_mask=masks[k], position_embeddings=rope[k],
                                  position_ids=None, past_key_values=None, use_cache=False)
            del layer
        weights = ThinkerWeights(ckpt)
        norm = Qwen2_5OmniRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        norm.weight = torch.nn.Parameter(torch.from_numpy(weights.final_norm()))
        hidden = [norm(h).numpy() for h in states]
    if progress is not None:
        progress("reference lm_head", n, n + 1)
    return ReferenceOutput(hidden, weights.lm_head())


# ------------------------------------------------------------------------------------------------
# Samples
# ------------------------------------------------------------------------------------------------
def _prompt_samples(template, tokenizer, prompts: int, tokens: int) -> list[tuple[list[int], list[int]]]:
    """``[(prompt ids, continuation ids)]`` from the built-in conversations (module docstring)."""
    from .calibration import builtin_messages

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


def _check_same_model(manifest, ckpt: Checkpoint) -> None:
    from .export.thinker_decoder import TextDims

    bundle = manifest.config.get("thinker", {})
    dims = TextDims.from_config(ckpt.text_config())
    diffs = [f"{key} {bundle.get(key)} vs {getattr(dims, key)}" for key in MATCHED_KEYS
             if bundle.get(key) != getattr(dims, key)]
    if diffs:
        raise VerifyError(f"the bundle and the checkpoint are different models ({'; '.join(diffs)})",
                          path=ckpt.root, fix=f"pass --model the checkpoint the bundle was built from "
                                              f"(the manifest names {manifest.model.get('source')!r})")


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------
def _errors(actual: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(max |a - r|, rms(a - r) / rms(r)) in float64."""
    a, r = np.asarray(actual, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    diff = a - r
    rms_ref = np.sqrt(np.mean(r * r))
    rel = float(np.sqrt(np.mean(diff * diff)) / rms_ref) if rms_ref > 0 else float(np.sqrt(np.mean(diff * diff)))
    return float(np.abs(diff).max()), rel


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """KL(softmax(reference) || softmax(other)) per row of [positions, vocab] logits, float64."""
    p_log, q_log = _log_softmax(reference), _log_softmax(other)
    return np.maximum((np.exp(p_log) * (p_log - q_log)).sum(axis=-1), 0.0)


# ------------------------------------------------------------------------------------------------
# verify
# ------------------------------------------------------------------------------------------------
def _check_count(value, name: str, low: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise InputError(f"{name} must be an integer >= {low}, got {value!r}", fix=f"pass {name} >= {low}",
                         param=name)


def verify_bundle(bundle_dir: str | Path, model_dir: str | Path, prompts: int = 4, tokens: int = 32,
                  progress: Progress | None = None) -> dict:
    """Compare the bundle's thinker graphs with transformers on the checkpoint ``model_dir``
    (module docstring); ``progress(description, done, total)`` is told what runs."""
    _check_count(prompts, "prompts")
    _check_count(tokens, "tokens")
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # config-validation chatter is not for users
    try:
        return _verify(Path(bundle_dir), Path(model_dir), prompts, tokens, progress)
    finally:
        transformers_logging.set_verbosity(verbosity)


def _verify(bundle_dir: Path, model_dir: Path, prompts: int, tokens: int, progress: Progress | None) -> dict:
    from tokenizers import Tokenizer

    from omni_runtime.chat import ChatTemplate
    from omni_runtime.kv_decoder import KVDecoder
    from omni_runtime.manifest import load_manifest, verify_file
    from omni_runtime.rope import next_position_ids, text_position_ids
    from omni_runtime.sessions import CPU, SessionPool, import_onnxruntime

    from .export.thinker_weights import ThinkerWeights

    started = time.perf_counter()
    say = progress or (lambda description, done, total: None)
    manifest = load_manifest(bundle_dir)
    ckpt = Checkpoint.open(model_dir)
    _check_same_model(manifest, ckpt)
    tok = manifest.tokenizer
    for rel in (tok["file"], tok["chat_template_file"]):
        verify_file(manifest, rel)
    tokenizer = Tokenizer.from_file(str(manifest.path(tok["file"])))
    template = ChatTemplate.from_file(manifest.path(tok["chat_template_file"]))
    samples = _prompt_samples(template, tokenizer, prompts, tokens)
    cfg = manifest.config["thinker"]
    hidden_size, vocab = int(cfg["hidden_size"]), int(cfg["vocab_size"])
    if max(len(p) + len(c) for p, c in samples) > int(cfg["max_position_embeddings"]):
        raise InputError(f"prompt + tokens exceed the model's {cfg['max_position_embeddings']} positions",
                         fix="ask for fewer tokens", param="tokens")

    # The checkpoint's float embedding rows: the embedding check and the reference's inputs.
    say("reading the embedding table", 0, 1)
    rng = np.random.default_rng(SEED)
    sample_ids = np.concatenate([[0, vocab - 1], rng.choice(vocab, EMBEDDING_SAMPLES - 2, replace=False)])
    table = ThinkerWeights(ckpt).embedding()
    ref_rows = table[sample_ids]
    ref_prompt_embeds = [table[np.asarray(p + c)][None] for p, c in samples]
    scale = float(table.std())
    del table
    decoder_embeds = (rng.standard_normal((1, DECODER_TOKENS, hidden_size)) * scale).astype(np.float32)
    decoder_positions = text_position_ids(np.ones((1, DECODER_TOKENS), dtype=np.int64))

    # The bundle (ONNX Runtime, CPU, fp32 host side).
    steps = 2 + sum(len(c) for _, c in samples)
    say("bundle: thinker_embedding", 0, steps)
    pool = SessionPool(manifest, [CPU])
    embed = pool.get(EMBEDDING)
    bundle_rows = embed.run(None, {"input_ids": sample_ids[None].astype(np.int64)})[0][0]
    say("bundle: thinker_decoder", 1, steps)
    decoder = KVDecoder(pool.get(DECODER), manifest.graph(DECODER), import_onnxruntime())
    cache = decoder.new_cache(DECODER_TOKENS)
    bundle_last_logits, bundle_hidden = decoder.step(cache, decoder_embeds, decoder_positions, want_hidden=True)
    bundle_logits = []
    done = 2
    for n, (prompt, continuation) in enumerate(samples):
        say(f"bundle: prompt {n + 1}/{len(samples)}", done, steps)
        cache = decoder.new_cache(len(prompt) + len(continuation))
        ids = np.asarray([prompt], dtype=np.int64)
        rows = [decoder.step(cache, embed.run(None, {"input_ids": ids})[0], text_position_ids(np.ones_like(ids)))[0]]
        for token in continuation[:-1]:
            positions = next_position_ids(np.full((3, 1), cache.length - 1, dtype=np.int64))
            step_embeds = embed.run(None, {"input_ids": np.asarray([[token]], dtype=np.int64)})[0]
            rows.append(decoder.step(cache, step_embeds, positions)[0])
            done += 1
        done += 1
        bundle_logits.append(np.stack(rows).astype(np.float32))
    del cache, decoder, embed
    pool.release_all()
    gc.collect()

    # The reference (transformers, one decoder layer at a time).
    sequences = [(decoder_embeds, decoder_positions)]
    for (prompt, continuation), embeds in zip(samples, ref_prompt_embeds):
        sequences.append((embeds, text_position_ids(np.ones((1, len(prompt) + len(continuation)), dtype=np.int64))))
    ref = reference_forward(ckpt, sequences, progress)
    report_graphs = {}
    max_abs, rel = _errors(bundle_rows, ref_rows)
    report_graphs[EMBEDDING] = {"max_abs": max_abs, "rel_rms": rel}
    max_abs, rel = _errors(bundle_hidden, ref.hidden[0])
    logits_max_abs, logits_rel = _errors(bundle_last_logits, ref.logits(0, [DECODER_TOKENS - 1])[0])
    report_graphs[DECODER] = {"max_abs": max_abs, "rel_rms": rel, "logits_max_abs": logits_max_abs,
                              "logits_rel_rms": logits_rel}
    agree, kls = [], []
    for k, (prompt, continuation) in enumerate(samples, start=1):
        first = len(prompt) - 1  # the position predicting the first continuation token
        ref_logits = ref.logits(k, list(range(first, first + len(continuation))))
        ours = bundle_logits[k - 1]
        agree.append(ref_logits.argmax(-1) == ours.argmax(-1))
        kls.append(kl_divergence(ref_logits, ours))
    agree, kls = np.concatenate(agree), np.concatenate(kls)
    say("done", 1, 1)
    return {
        "bundle": str(manifest.root),
        "model": str(ckpt.root),
        "recipe": manifest.recipe.get("name"),
        "graphs": report_graphs,
        "thinker": {"top1_agreement": float(agree.mean()), "mean_kl": float(kls.mean()),
                    "max_kl": float(kls.max()), "positions": int(agree.size)},
        "settings": {"prompts": prompts, "tokens": tokens, "prompt_tokens": PROMPT_TOKENS,
                     "decoder_tokens": DECODER_TOKENS, "embedding_samples": EMBEDDING_SAMPLES, "seed": SEED},
        "seconds": round(time.perf_counter() - started, 2),
    }
