"""Speech codes from the thinker's reply: the talker over ``talker_embedding`` and ``talker_decoder``.

The host logic is transformers' ``Qwen2_5OmniForConditionalGeneration.generate`` (talker part)
and ``Qwen2_5OmniTalkerForConditionalGeneration.forward``, for one row:

- thinker side (``ThinkerStates``, from ``ThinkerGenerator.generate(..., keep_states=True)``):
  per token the thinker ran on, its post-norm hidden state + its input embedding (placeholder
  positions of audio/image/video zeroed); call their sum ``s``. The prompt has P tokens; the
  reply's tokens r0, r1, ... (the last reply token is never fed to the thinker, so it has no state).
- prefill, P + 2 positions: ``s(prompt)``, then the speaker's bos token (a thinker-vocabulary
  id from spk_dict.pt) embedded by ``thinker_embedding`` + the codec pad embedding, then
  ``s(r0)`` + the codec bos embedding;
- positions: the prompt's TMRoPE positions, then two text positions after their maximum;
  every decode step continues at ``cache length + rope delta`` (the next position);
- dual-track feeding: decode step k feeds ``codec_embedding(code k) + reply[k]`` where reply is
  ``s(r1), s(r2), ...``, then the thinker embedding of the talker's text eos, then of its text
  pad for every later step;
- token choice: repetition penalty over every id so far (P codec mask ids, codec pad, codec
  bos, then the codes), the codec bos suppressed, then temperature / top-k / top-p when
  sampling (transformers' processor order); stop on ``eos_token_ids`` (codec pad and codec
  eos). The returned codes exclude the stop id, as token2wav receives them.

Defaults (``config.talker.sampling``) are transformers' ``generate`` talker defaults: sampling
with top_k 40, top_p 0.8, temperature 0.9, repetition penalty 1.05, up to 4096 codes.

The talker's sessions are loaded when speech is asked for; after the codes the talker tells the
pool it is done with them (``release=True``) and the memory policy frees or keeps them. The
three thinker embedding rows it needs are kept per speaker (``text_embeddings``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from numbers import Integral

import numpy as np

from omni_runtime.bundle.config import TalkerConfig
from omni_runtime.errors import BundleError, InputError
from omni_runtime.stages.kv_decoder import DEFAULT_PREFILL_CHUNK, KVDecoder
from omni_runtime.bundle.manifest import Manifest
from omni_runtime.stages.sampling import SamplingConfig, next_tokens, process_logits
from omni_runtime.bundle.sessions import SessionPool, import_onnxruntime, io_binding_enabled
from omni_runtime.bundle.names import THINKER_EMBEDDING
from omni_runtime.stages.thinker import ThinkerStates

from omni_runtime.bundle.names import MODULE_GRAPHS
from omni_runtime.bundle.names import TALKER_DECODER as DECODER
from omni_runtime.bundle.names import TALKER_EMBEDDING as EMBEDDING

GRAPHS = MODULE_GRAPHS["talker"]

NO_TALKER_FIX = ("build the bundle from a checkpoint with a talker (enable_audio_output true and its talker "
                 "weights) and a recipe with modules.talker, or ask for text only")


def talker_config(manifest: Manifest) -> TalkerConfig:
    """The bundle's ``config.talker``, typed; BundleError when the bundle has no talker."""
    config = manifest.configs.talker
    if config is None or not config.enable_audio_output or any(name not in manifest.graphs for name in GRAPHS):
        raise BundleError("this bundle has no talker (it was built text-only), so it cannot produce speech",
                          path=manifest.manifest_path, fix=NO_TALKER_FIX)
    return config


def has_talker(manifest: Manifest) -> bool:
    """True if the bundle can produce speech codes (talker graphs and ``config.talker``)."""
    try:
        talker_config(manifest)
    except BundleError:
        return False
    return True


class Talker:
    """Speech codes for one thinker reply, with the talker's KV cache on the first provider's device."""

    def __init__(self, manifest: Manifest, pool: SessionPool, prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        self.manifest = manifest
        self.pool = pool
        self.config = talker_config(manifest)
        self.device = "cuda" if io_binding_enabled(pool.providers) else "cpu"
        self.prefill_chunk = prefill_chunk
        self._text_rows: dict[int, np.ndarray] = {}  # speaker bos -> text_embeddings

    def text_embeddings(self, speaker_bos: int) -> np.ndarray:
        """The thinker embeddings of the speaker's bos token, the text eos and the text pad
        ``[3, embedding_size]``, the talker's only use of ``thinker_embedding``. Kept per speaker,
        so once the runner has asked for them (before the thinker's sessions are done) the
        talker stage needs no thinker graph."""
        rows = self._text_rows.get(int(speaker_bos))
        if rows is None:
            cfg = self.config
            # in use by the thinker stage (the runner asks before the thinker is done): leave it
            # to that stage; otherwise this stage took it and gives it back
            held = THINKER_EMBEDDING in getattr(self.pool, "in_use", ())
            try:
                ids = np.array([[speaker_bos, cfg.text_eos, cfg.text_pad]], dtype=np.int64)
                rows = np.asarray(self.pool.get(THINKER_EMBEDDING).run(None, {"input_ids": ids})[0][0],
                                  dtype=np.float32)
            finally:
                if not held:
                    self.pool.done(THINKER_EMBEDDING)
            self._text_rows[int(speaker_bos)] = rows
        return rows

    def default_sampling(self, do_sample: bool | None = None) -> SamplingConfig:
        """The bundle's talker sampling defaults; ``do_sample=False`` keeps only the repetition
        penalty (transformers' ``talker_do_sample=False`` with the other defaults)."""
        cfg = self.config.sampling
        if do_sample is None or do_sample == cfg.do_sample:
            return cfg
        return dataclasses.replace(cfg, do_sample=do_sample)

    def generate(
        self,
        thinker_outputs: ThinkerStates,
        speaker_bos: int,
        sampling: SamplingConfig | None = None,
        seed: int | None = None,
        max_new_tokens: int | None = None,
        on_codes: Callable[[list[int]], None] | None = None,
        release: bool = True,
    ) -> list[int]:
        """The codec codes of ``thinker_outputs``' reply spoken with the speaker whose bos token is
        ``speaker_bos``; ``on_codes`` receives each step's new codes as they come (for streaming).

        ``sampling`` defaults to the bundle's talker defaults, ``max_new_tokens`` (codes including
        the stop id) to its ``max_new_tokens``. A reply of fewer than 2 tokens has nothing to
        speak (transformers' generate cannot run the talker on it): no codes.
        """
        cfg = self.config
        if not isinstance(thinker_outputs, ThinkerStates):
            raise InputError(f"thinker_outputs must be a ThinkerStates, got {type(thinker_outputs).__name__}",
                             fix="generate the reply with ThinkerGenerator.generate(..., keep_states=True) and pass "
                                 "Generation.states[row]", param="thinker_outputs")
        sampling = self.default_sampling() if sampling is None else sampling
        sampling.validate()
        max_new_tokens = cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not isinstance(max_new_tokens, Integral) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}",
                             fix="ask the talker for 1 or more codes", param="max_new_tokens")
        thinker_vocab = self.manifest.configs.thinker.vocab_size
        if not isinstance(speaker_bos, Integral) or isinstance(speaker_bos, bool) or \
                not 0 <= speaker_bos < thinker_vocab:
            raise InputError(f"speaker_bos must be a thinker token id in [0, {thinker_vocab}), got {speaker_bos!r}",
                             fix="pass the speaker's bos_token from the bundle's speakers", param="speaker_bos")
        prompt_len, reply = len(thinker_outputs.prompt_ids), list(thinker_outputs.token_ids)
        if len(reply) < 2:
            return []
        states = self._states(thinker_outputs)
        try:
            return self._generate(states, prompt_len, thinker_outputs.prompt_positions, int(speaker_bos), sampling,
                                  seed, int(max_new_tokens), on_codes)
        finally:
            if release:
                for name in GRAPHS:
                    self.pool.done(name)

    def _states(self, out: ThinkerStates) -> np.ndarray:
        """hidden + embeds per fed thinker token, [P + R - 1, embedding_size] float32, checked."""
        fed = len(out.prompt_ids) + len(out.token_ids) - 1
        width = self.config.embedding_size
        for name in ("embeds", "hidden"):
            shape = np.shape(getattr(out, name))
            if shape != (fed, width):
                raise InputError(f"thinker_outputs.{name} has shape {shape}, expected ({fed}, {width}) for "
                                 f"{len(out.prompt_ids)} prompt and {len(out.token_ids)} reply tokens",
                                 fix="pass Generation.states[row] of ThinkerGenerator.generate(..., keep_states=True)",
                                 param="thinker_outputs")
        if np.shape(out.prompt_positions) != (3, len(out.prompt_ids)):
            raise InputError(f"thinker_outputs.prompt_positions has shape {np.shape(out.prompt_positions)}, "
                             f"expected (3, {len(out.prompt_ids)})", fix="pass Generation.states[row] unchanged",
                             param="thinker_outputs")
        return np.asarray(out.hidden, dtype=np.float32) + np.asarray(out.embeds, dtype=np.float32)

    def _generate(self, states, prompt_len, prompt_positions, speaker_bos, sampling, seed, max_new_tokens, on_codes):
        cfg = self.config
        rng = np.random.default_rng(seed)
        text = self.text_embeddings(speaker_bos)
        codec_embed = self.pool.get(EMBEDDING)

        def codec(ids) -> np.ndarray:
            return codec_embed.run(None, {"input_ids": np.asarray(ids, dtype=np.int64).reshape(1, -1)})[0][0]

        # prefill: the prompt's states, speaker bos + codec pad, first reply state + codec bos
        prefill = np.concatenate([states[:prompt_len], text[0:1], states[prompt_len:prompt_len + 1]])
        prefill[-2:] += codec([cfg.codec_pad, cfg.codec_bos])
        top = int(np.max(prompt_positions)) if prompt_len else -1
        positions = np.concatenate([np.asarray(prompt_positions, dtype=np.int64),
                                    np.broadcast_to(np.array([top + 1, top + 2], dtype=np.int64), (3, 2))], axis=1)
        # dual track: the rest of the reply, the text eos, then the text pad for ever after
        reply = np.concatenate([states[prompt_len + 1:], text[1:2]])
        delta = top + 3 - (prompt_len + 2)  # decode position = cache length + delta

        decoder = KVDecoder(self.pool.get(DECODER), self.manifest.graph(DECODER), import_onnxruntime(),
                            device=self.device, prefill_chunk=self.prefill_chunk,
                            device_id=getattr(self.pool, "device_id", 0))
        cache = decoder.new_cache(prefill.shape[0] + max_new_tokens)
        logits, _ = decoder.step(cache, prefill[None], positions[:, None, :])
        history = np.array([[cfg.codec_mask] * prompt_len + [cfg.codec_pad, cfg.codec_bos]], dtype=np.int64)
        penalty = SamplingConfig(repetition_penalty=sampling.repetition_penalty)
        warp = dataclasses.replace(sampling, repetition_penalty=1.0)
        suppress = np.array([t for t in cfg.suppress_tokens if 0 <= t < cfg.vocab_size], dtype=np.int64)
        fed = {"steps": 0}

        def choose(step_logits, seen, mask):
            # transformers' order: repetition penalty, suppressed tokens, then the sampling warpers
            scores = process_logits(step_logits, seen, penalty, attention_mask=mask)
            scores[:, suppress] = -np.inf
            return next_tokens(scores, seen, warp, rng)

        def next_inputs(new, live):
            k = fed["steps"]
            fed["steps"] += 1
            extra = reply[k] if k < len(reply) else text[2]
            embeds = (codec(new[:1]) + extra)[None]  # [1, 1, embedding_size]
            return [(embeds, np.full((3, 1, 1), cache.length + delta, dtype=np.int64))]

        def on_step(new):
            if on_codes is not None and int(new[0]) not in cfg.eos_token_ids:
                on_codes([int(new[0])])

        decoded = decoder.decode([cache], logits[None], history, choose, next_inputs, max_new_tokens,
                                 cfg.eos_token_ids, cfg.codec_pad, on_step=on_step)
        codes = decoded.token_ids[0]
        if decoded.finish_reasons[0] == "eos":
            codes = codes[:-1]
        return codes
