"""``omni-export verify``: every graph of a bundle against its PyTorch (transformers) module, fp32.

The thinker's reference is transformers' own ``Qwen2_5OmniDecoderLayer``, run ONE LAYER AT A TIME
(``reference_layers``): each layer is built, loaded with that layer's float32 weights, run over
every sample sequence and dropped before the next one is read, so a real 7B (28 GB in fp32)
is verified in a few GB. For an AutoAWQ checkpoint the reference uses its dequantized int4
weights (what the checkpoint means), so an exact import shows ~0 error.

Reported (``verify_bundle``)::

    {"graphs": {"thinker_embedding": {"max_abs", "rel_rms"},
                "thinker_decoder": {"max_abs", "rel_rms", "logits_max_abs", "logits_rel_rms"},
                "audio_encoder", "vision_encoder", "talker_embedding", "token2wav_dit",
                "token2wav_bigvgan": {"max_abs", "rel_rms"},
                "talker_decoder": {"max_abs", "rel_rms", "logits_max_abs", "logits_rel_rms"}},
     "thinker": {"top1_agreement", "mean_kl", "max_kl", "positions"},
     "bundle", "model", "recipe", "seconds", "settings"}

- ``thinker_embedding``: the graph's rows for sample token ids vs the checkpoint's float rows.
- ``thinker_decoder``: one prefill of random embeddings (fixed seed, ``DECODER_TOKENS`` tokens,
  scaled like the checkpoint's embeddings) through the graph vs the reference layers + final
  norm + lm_head: the post-norm hidden states of every position (``max_abs``, ``rel_rms``) and
  the logits of the last position (``logits_*``). ``rel_rms = rms(bundle - ref) / rms(ref)``.
- the other graphs (``verify_modules``), each present one on one small seeded sample input
  against its transformers module (``reference_module``: the class built from its sub-config
  without initialising weights, then loaded strictly with only its own checkpoint tensors; ONE
  MODULE AT A TIME, dropped before the next, after its graph's session is released); graphs the
  bundle lacks are skipped. ``audio_encoder``: ``AUDIO_FRAMES`` random log-mel frames through
  ``audio_prep.encoder_inputs`` vs ``Qwen2_5OmniAudioEncoder`` called as ``get_audio_features``
  does. ``vision_encoder``: random patches of grid ``VISION_GRID`` through
  ``vision_prep.encoder_inputs`` vs ``Qwen2_5OmniVisionEncoder(..., grid_thw).pooler_output``.
  ``talker_embedding``: sample codec ids vs the talker's ``embed_tokens``. ``talker_decoder``: a
  ``TALKER_TOKENS`` prefill of random thinker-space embeddings vs
  ``Qwen2_5OmniTalkerForConditionalGeneration.forward``: post-norm hidden states and the last
  position's logits (``logits_*``). ``token2wav_dit``: one velocity evaluation with classifier-free
  guidance's two rows for the default speaker (the bundle's stored speaker encodings) vs
  ``Qwen2_5OmniToken2WavDiTModel(..., apply_cfg=True)`` on the speaker's reference mel.
  ``token2wav_bigvgan``: ``BIGVGAN_FRAMES`` random mel frames vs ``Qwen2_5OmniToken2WavBigVGANModel``.
- ``thinker``: end to end and teacher-forced on ``prompts`` of the built-in calibration
  conversations (``omni_export/build/calibration_data.jsonl``, evenly spaced over the set), rendered
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

from omni_export.checkpoint.reader import Checkpoint

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
    from omni_export.export.thinker_weights import ThinkerWeights
    from omni_export.modules.thinker import ThinkerModule
    from omni_export.build.recipes import load_recipe

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
                      progress: Progress | None = None) -> ReferenceOutput:
    """Run ``[(inputs_embeds [1, S, hidden], position_ids [3, 1, S])]`` (batch 1, no padding)
    through the thinker text model as ``Qwen2_5OmniThinkerTextModel.forward`` does, one decoder
    layer at a time for all sequences; returns the final-norm hidden states and the lm_head."""
    import torch
    from transformers.masking_utils import create_causal_mask
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (Qwen2_5OmniRMSNorm,
                                                                        Qwen2_5OmniRotaryEmbedding)

    from omni_export.export.thinker_weights import ThinkerWeights

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
    """Compare every graph of the bundle with transformers on the checkpoint ``model_dir``
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

    from omni_runtime.prompt.chat import ChatTemplate
    from omni_runtime.stages.kv_decoder import KVDecoder
    from omni_runtime.bundle.manifest import load_manifest, verify_file
    from omni_runtime.prompt.rope import next_position_ids, text_position_ids
    from omni_runtime.bundle.sessions import CPU, SessionPool, import_onnxruntime

    from omni_export.export.thinker_weights import ThinkerWeights

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
    del ref
    gc.collect()

    # The other graphs, each against its transformers module (one at a time).
    report_graphs.update(verify_modules(manifest, ckpt, scale, progress))
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


# ------------------------------------------------------------------------------------------------
# The other graphs: each against its transformers module, one module at a time
# ------------------------------------------------------------------------------------------------
AUDIO = "audio_encoder"
VISION = "vision_encoder"
TALKER_EMBEDDING = "talker_embedding"
TALKER_DECODER = "talker_decoder"
DIT = "token2wav_dit"
BIGVGAN = "token2wav_bigvgan"
AUDIO_FRAMES = 250          # log-mel frames: one full 200-frame chunk (n_window 100) and a partial one
VISION_GRID = (1, 8, 12)    # (t, h, w) patches: 24 merged tokens, several (partial) 112-px windows
TALKER_TOKENS = 8           # random thinker-space prefill through the talker decoder
DIT_CODES, DIT_TIME = 13, 0.5  # one velocity evaluation with the guidance rows (conditioned + unconditioned)
BIGVGAN_FRAMES = 16         # mel frames through the vocoder


def reference_module(ckpt: Checkpoint, cls, config, prefixes: tuple[str, ...]):
    """transformers ``cls(config)`` (fp32, eval, sdpa) holding the checkpoint's tensors under ``prefixes``
    (prefix stripped, loaded strictly), built without initialising weights: only this module is read."""
    import copy

    import torch
    from transformers.initialization import no_init_weights

    names = {}
    for name in ckpt.weight_map:
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is not None:
            names[name] = name[len(prefix):]
    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"
    with no_init_weights():
        module = cls(config)
    module.load_state_dict(ckpt.read(names, torch.float32), strict=True, assign=True)
    return module.float().eval()


def _metrics(actual, reference) -> dict:
    max_abs, rel = _errors(actual, reference)
    return {"max_abs": max_abs, "rel_rms": rel}


def _run_graph(pool, name: str, feeds: dict) -> list[np.ndarray]:
    """Run graph ``name`` once and release its session."""
    try:
        return pool.get(name).run(None, feeds)
    finally:
        pool.release(name)


def _check_audio(manifest, pool, ckpt: Checkpoint, rng, scale: float, say: Callable) -> dict:
    import torch
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

    from omni_runtime.media.audio_prep import encoder_inputs

    from omni_export.modules.audio import PREFIXES

    block = manifest.config["audio"]
    n_mels = int(block["num_mel_bins"])
    features = (rng.standard_normal((n_mels, AUDIO_FRAMES)) * 0.5).astype(np.float32)  # log-mel-like range
    say(f"bundle: {AUDIO}")
    (ours,) = _run_graph(pool, AUDIO, encoder_inputs([features], n_window=int(block["n_window"]), n_mels=n_mels))
    say(f"reference: {AUDIO}")
    tower = reference_module(ckpt, Qwen2_5OmniAudioEncoder, ckpt.config.thinker_config.audio_config, PREFIXES)
    lens = torch.tensor([AUDIO_FRAMES])
    with torch.no_grad():  # as Qwen2_5OmniThinkerModel.get_audio_features calls the tower
        after_cnn, _ = tower._get_feat_extract_output_lengths(lens)
        ref = tower(torch.from_numpy(features), feature_lens=lens, aftercnn_lens=after_cnn).last_hidden_state.numpy()
    return {AUDIO: _metrics(ours, ref)}


def _check_vision(manifest, pool, ckpt: Checkpoint, rng, scale: float, say: Callable) -> dict:
    import torch
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniVisionEncoder

    from omni_runtime.media.vision_prep import VisionConfig, encoder_inputs

    from omni_export.modules.vision import PREFIXES

    cfg = VisionConfig.from_manifest(manifest.config)
    t, h, w = VISION_GRID
    patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    pixels = rng.standard_normal((t * h * w, patch_dim)).astype(np.float32)  # normalized-pixel range
    say(f"bundle: {VISION}")
    (ours,) = _run_graph(pool, VISION, {"pixel_values": pixels, **encoder_inputs([VISION_GRID], cfg)})
    say(f"reference: {VISION}")
    visual = reference_module(ckpt, Qwen2_5OmniVisionEncoder, ckpt.config.thinker_config.vision_config, PREFIXES)
    with torch.no_grad():
        ref = visual(torch.from_numpy(pixels), grid_thw=torch.tensor([VISION_GRID])).pooler_output.numpy()
    return {VISION: _metrics(ours, ref)}


def _check_talker(manifest, pool, ckpt: Checkpoint, rng, scale: float, say: Callable) -> dict:
    import torch
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniTalkerForConditionalGeneration

    from omni_runtime.stages.kv_decoder import KVDecoder
    from omni_runtime.prompt.rope import text_position_ids
    from omni_runtime.bundle.sessions import import_onnxruntime

    from omni_export.export.talker_decoder import PREFIX

    config = ckpt.config.talker_config
    ids = rng.choice(config.vocab_size, min(EMBEDDING_SAMPLES, config.vocab_size), replace=False).astype(np.int64)
    embeds = (rng.standard_normal((1, TALKER_TOKENS, config.embedding_size)) * scale).astype(np.float32)
    positions = text_position_ids(np.ones((1, TALKER_TOKENS), dtype=np.int64))
    ours = {}
    if TALKER_EMBEDDING in manifest.graphs:
        say(f"bundle: {TALKER_EMBEDDING}")
        ours[TALKER_EMBEDDING] = _run_graph(pool, TALKER_EMBEDDING, {"input_ids": ids[None]})[0][0]
    if TALKER_DECODER in manifest.graphs:
        say(f"bundle: {TALKER_DECODER}")
        try:
            decoder = KVDecoder(pool.get(TALKER_DECODER), manifest.graph(TALKER_DECODER), import_onnxruntime())
            ours[TALKER_DECODER] = decoder.step(decoder.new_cache(TALKER_TOKENS), embeds, positions, want_hidden=True)
            del decoder
        finally:
            pool.release(TALKER_DECODER)
    say("reference: talker")
    talker = reference_module(ckpt, Qwen2_5OmniTalkerForConditionalGeneration, config, (PREFIX,))
    report = {}
    with torch.no_grad():
        if TALKER_EMBEDDING in ours:
            report[TALKER_EMBEDDING] = _metrics(ours[TALKER_EMBEDDING],
                                                talker.get_input_embeddings()(torch.from_numpy(ids)).numpy())
        if TALKER_DECODER in ours:
            out = talker(inputs_embeds=torch.from_numpy(embeds), position_ids=torch.from_numpy(positions),
                         use_cache=False, output_hidden_states=True)
            logits, hidden = ours[TALKER_DECODER]
            report[TALKER_DECODER] = _metrics(hidden, out.hidden_states[-1].numpy())
            logits_max_abs, logits_rel = _errors(logits, out.logits[0, -1].numpy())
            report[TALKER_DECODER].update(logits_max_abs=logits_max_abs, logits_rel_rms=logits_rel)
    return report


def _check_dit(manifest, pool, ckpt: Checkpoint, rng, scale: float, say: Callable) -> dict:
    import torch
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniToken2WavDiTModel

    from omni_export.modules import REGISTRY
    from omni_export.modules.token2wav import DIT_PREFIX
    from omni_export.build.recipes import load_recipe

    block = manifest.config["token2wav"]
    speaker = block["default_speaker"]
    stored = {k: np.load(manifest.path(v), allow_pickle=False) for k, v in block["speakers"][speaker].items()
              if k != "bos_token"}
    spk = REGISTRY["token2wav"](ckpt, load_recipe("fp32").module("token2wav")).speakers()[speaker]
    config = ckpt.config.token2wav_config.dit_config
    frames = DIT_CODES * config.repeats
    codes = rng.integers(0, config.num_embeds + 1, (1, DIT_CODES)).astype(np.int64)
    x = rng.standard_normal((1, frames, config.mel_dim)).astype(np.float32)
    # classifier-free guidance's two rows, as the runtime feeds them (tests/test_token2wav_dit_parity.py)
    feeds = {"x": np.concatenate([x, x]), "codes": np.concatenate([codes, np.zeros_like(codes)]),
             "time": np.full(2, DIT_TIME, np.float32),
             "speaker_embedding": np.stack([stored["speaker_embedding"], np.zeros_like(stored["speaker_embedding"])]),
             "reference_embedding": np.stack([stored["reference_embedding"], stored["null_reference_embedding"]])}
    say(f"bundle: {DIT}")
    (ours,) = _run_graph(pool, DIT, feeds)
    say(f"reference: {DIT}")
    dit = reference_module(ckpt, Qwen2_5OmniToken2WavDiTModel, config, (DIT_PREFIX,))
    cond = torch.from_numpy(spk["cond"])
    with torch.no_grad():
        ref = dit(hidden_states=torch.from_numpy(x), condition_vector=torch.from_numpy(spk["ref_mel"])[None],
                  speaker_embedding=cond[None, None].repeat(1, frames, 1), quantized_code=torch.from_numpy(codes),
                  time_step=torch.tensor(DIT_TIME), apply_cfg=True).numpy()
    return {DIT: _metrics(ours, ref)}


def _check_bigvgan(manifest, pool, ckpt: Checkpoint, rng, scale: float, say: Callable) -> dict:
    import torch
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniToken2WavBigVGANModel

    from omni_export.modules.token2wav import BIGVGAN_PREFIX

    config = ckpt.config.token2wav_config.bigvgan_config
    mel = (rng.standard_normal((1, config.mel_dim, BIGVGAN_FRAMES)) * 1.7 - 0.5).astype(np.float32)
    say(f"bundle: {BIGVGAN}")
    (ours,) = _run_graph(pool, BIGVGAN, {"mel": mel})
    say(f"reference: {BIGVGAN}")
    vocoder = reference_module(ckpt, Qwen2_5OmniToken2WavBigVGANModel, config, (BIGVGAN_PREFIX,))
    with torch.no_grad():
        ref = vocoder(torch.from_numpy(mel)).numpy().reshape(-1)
    return {BIGVGAN: _metrics(ours.reshape(-1), ref)}


#: (graphs, check) in report order; a check runs when the bundle has any of its graphs
MODULE_CHECKS = (((AUDIO,), _check_audio), ((VISION,), _check_vision),
                 ((TALKER_EMBEDDING, TALKER_DECODER), _check_talker), ((DIT,), _check_dit),
                 ((BIGVGAN,), _check_bigvgan))


def verify_modules(manifest, ckpt: Checkpoint, scale: float, progress: Progress | None = None) -> dict:
    """``{graph: {"max_abs", "rel_rms"}}`` for each of the bundle's non-thinker graphs against its
    transformers module on one seeded sample input (module docstring); graphs the bundle lacks are
    skipped. One reference module is in memory at a time, after its graph's session is released."""
    from omni_runtime.bundle.sessions import CPU, SessionPool

    checks = [(names, check) for names, check in MODULE_CHECKS if any(n in manifest.graphs for n in names)]
    pool = SessionPool(manifest, [CPU])
    report = {}
    step = 0

    def say(description: str) -> None:
        nonlocal step
        if progress is not None:
            progress(description, step, sum(len(names) + 1 for names, _ in checks))
        step += 1

    for names, check in checks:
        report.update(check(manifest, pool, ckpt, np.random.default_rng(SEED), scale, say))
        gc.collect()  # drop the reference module before the next one is read
    pool.release_all()
    return report
