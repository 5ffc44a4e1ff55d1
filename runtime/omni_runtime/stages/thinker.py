"""Thinker text generation over the bundle's ``thinker_embedding`` and ``thinker_decoder`` graphs.

The sessions stay loaded after ``generate`` (``verify`` scores many prompts in a row); the
runner calls ``done`` after the text of a request, and the pool's memory policy decides.

The host owns the KV cache (``omni_runtime.stages.kv_decoder``: preallocated buffers updated in place),
the positions (``omni_runtime.prompt.rope``) and the token choice (``omni_runtime.stages.sampling``). Each row
of a batch has its own cache and is stepped in lockstep with the others; the token choice sees
the batch as transformers' left-padded generation does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from omni_runtime.errors import InputError
from omni_runtime.bundle.manifest import Manifest
from omni_runtime.prompt.rope import next_position_ids, text_position_ids
from omni_runtime.request import check_max_new_tokens
from omni_runtime.stages.sampling import SamplingConfig, next_tokens
from omni_runtime.stages.kv_decoder import DEFAULT_PREFILL_CHUNK, KVDecoder
from omni_runtime.bundle.sessions import SessionPool, import_onnxruntime, io_binding_enabled

from omni_runtime.bundle.names import THINKER_DECODER as DECODER
from omni_runtime.bundle.names import THINKER_EMBEDDING as EMBEDDING

GRAPHS = (EMBEDDING, DECODER)


@dataclass
class ThinkerStates:
    """One row's thinker states, what the talker is fed (``generate(..., keep_states=True)``).

    One entry per token the thinker ran on: the prompt, then every reply token but the last
    (the last is never fed back), as transformers' ``output_hidden_states`` gives them.
    ``embeds`` are the decoder's input embeddings with audio/image/video placeholder
    positions zeroed (as ``Qwen2_5OmniForConditionalGeneration.generate`` does before handing
    them to the talker); ``hidden`` are the post-norm last hidden states.
    """

    prompt_ids: list[int]
    token_ids: list[int]  # the reply, as in Generation.token_ids
    embeds: np.ndarray  # [len(prompt_ids) + max(len(token_ids) - 1, 0), hidden] float32
    hidden: np.ndarray  # same shape
    prompt_positions: np.ndarray  # [3, len(prompt_ids)] int64: the prompt's TMRoPE positions


@dataclass
class Generation:
    """Generated ids per row (each ends with its eos token when it stopped on one)."""

    token_ids: list[list[int]]
    finish_reasons: list[str]  # "eos" or "length"
    states: list[ThinkerStates] | None = None  # per row, with keep_states=True
    #: per row, the logits [steps, vocab] each token was chosen from (with forced_ids)
    logits: list[np.ndarray] | None = None


class ThinkerGenerator:
    """Greedy or sampled generation with a KV cache for one bundle.

    The K/V buffers live on the device of the first provider (CUDA or CPU); ``prefill_chunk``
    bounds the prompt tokens fed per decoder run.
    """

    def __init__(self, manifest: Manifest, pool: SessionPool, prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        self.manifest = manifest
        self.pool = pool
        self.device = "cuda" if io_binding_enabled(pool.providers) else "cpu"
        self.prefill_chunk = prefill_chunk
        gen = manifest.configs.generation
        self.eos_ids = np.array(gen.eos_token_ids, dtype=np.int64)
        self.pad_id = gen.pad_token_id

    def done(self) -> None:
        """Tell the pool this stage is done with the thinker's graphs (the policy frees or keeps them)."""
        for name in GRAPHS:
            self.pool.done(name)

    def _pad(self, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InputError("every prompt needs at least one token", fix="pass a non-empty prompt")
        width = max(len(p) for p in prompts)
        ids = np.full((len(prompts), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(prompts), width), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = prompt
            mask[row, width - len(prompt):] = 1
        return ids, mask

    def _decoder(self) -> KVDecoder:
        return KVDecoder(self.pool.get(DECODER), self.manifest.graph(DECODER), import_onnxruntime(),
                         device=self.device, prefill_chunk=self.prefill_chunk,
                         device_id=getattr(self.pool, "device_id", 0))

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        sampling: SamplingConfig = SamplingConfig(),
        seed: int | None = None,
        on_step: Callable[[np.ndarray], None] | None = None,
        limit_reason: str = "length",
        prompt_embeds: list[np.ndarray] | None = None,
        prompt_positions: list[np.ndarray] | None = None,
        rope_deltas: list[int] | None = None,
        keep_states: bool = False,
        forced_ids: list[list[int]] | None = None,
    ) -> Generation:
        """Generate up to ``max_new_tokens`` for each prompt; ``on_step`` sees each new id batch.

        ``limit_reason`` is the finish reason of a row that reaches ``max_new_tokens``
        (``"context"`` when the caller clamped the limit to the model's context).

        For multimodal prompts the caller passes, per row, the merged ``prompt_embeds``
        ``[seq, hidden]`` (encoder features spliced in at their placeholders), the TMRoPE
        ``prompt_positions`` ``[3, seq]`` and the ``rope_deltas`` (``omni_runtime.prompt.rope.rope_index``);
        decode positions then continue at ``cache length + delta``. Text prompts need none of them.

        ``keep_states`` also returns, per row, the input embeddings and post-norm hidden states
        the talker needs (``Generation.states``, see ``ThinkerStates``).

        ``forced_ids`` (teacher forcing, one list of ``max_new_tokens`` ids per row) feeds those
        ids instead of choosing, eos included, and returns the logits each was scored with
        (``Generation.logits``): what ``score`` and ``omni-export verify`` compare.
        """
        check_max_new_tokens(max_new_tokens)
        sampling.validate()
        rng = np.random.default_rng(seed)
        ids, mask = self._pad(prompts)
        forced, scored = None, []
        if forced_ids is not None:
            if len(forced_ids) != len(prompts) or any(len(f) != max_new_tokens for f in forced_ids):
                raise InputError(f"forced_ids needs {max_new_tokens} ids for each of the {len(prompts)} prompts",
                                 fix="pass one list of max_new_tokens ids per prompt", param="forced_ids")
            forced = np.asarray(forced_ids, dtype=np.int64).reshape(len(prompts), max_new_tokens)
        batch = ids.shape[0]
        embed = self.pool.get(EMBEDDING)
        decoder = self._decoder()
        caches, logits = [], []
        deltas = [0] * batch if rope_deltas is None else [int(d) for d in rope_deltas]
        kept_embeds: list[list[np.ndarray]] = [[] for _ in range(batch)]
        kept_hidden: list[list[np.ndarray]] = [[] for _ in range(batch)]
        kept_positions = []
        for row, prompt in enumerate(prompts):
            cache = decoder.new_cache(len(prompt) + max_new_tokens)
            row_ids = np.asarray([prompt], dtype=np.int64)
            if prompt_embeds is None:
                embeds = embed.run(None, {"input_ids": row_ids})[0]
            else:
                embeds = np.asarray(prompt_embeds[row])[None]
            if prompt_positions is None:
                positions = text_position_ids(np.ones_like(row_ids))
            else:
                positions = np.asarray(prompt_positions[row], dtype=np.int64)[:, None, :]
            if embeds.shape[1] != len(prompt) or positions.shape[2] != len(prompt):
                raise InputError(f"row {row}: {len(prompt)} prompt ids but {embeds.shape[1]} embeddings and "
                                 f"{positions.shape[2]} positions", fix="pass one embedding and position per id")
            row_logits, hidden = decoder.step(cache, embeds, positions, want_hidden=keep_states)
            if keep_states:
                kept_embeds[row].append(self._talker_embeds(row_ids[0], embeds[0]))
                kept_hidden[row].append(hidden[0])
                kept_positions.append(positions[:, 0, :].copy())
            caches.append(cache)
            logits.append(row_logits)

        def choose(step_logits, history, history_mask):
            if forced is not None:
                scored.append(np.array(step_logits, dtype=np.float32))
                return forced[:, len(scored) - 1]
            return next_tokens(step_logits, history, sampling, rng, attention_mask=history_mask)

        def next_inputs(new, live):
            step_embeds = embed.run(None, {"input_ids": new[:, None]})[0]
            out = []
            for row in live:
                if keep_states:
                    kept_embeds[row].append(step_embeds[row])
                positions = next_position_ids(np.full((3, 1), caches[row].length - 1 + deltas[row], dtype=np.int64))
                out.append((step_embeds[row:row + 1], positions))
            return out

        def on_hidden(row, hidden):
            kept_hidden[row].append(hidden[0])

        eos_ids = self.eos_ids if forced is None else ()  # forced rows run to the end
        decoded = decoder.decode(caches, np.stack(logits), ids, choose, next_inputs, max_new_tokens, eos_ids,
                                 self.pad_id, mask=mask, on_step=on_step, on_hidden=on_hidden if keep_states else None,
                                 limit_reason=limit_reason)
        states = None
        if keep_states:
            states = [ThinkerStates(list(prompt), decoded.token_ids[row], np.concatenate(kept_embeds[row]),
                                    np.concatenate(kept_hidden[row]), kept_positions[row])
                      for row, prompt in enumerate(prompts)]
        row_logits = None if forced is None else list(np.stack(scored, axis=1))
        return Generation(decoded.token_ids, decoded.finish_reasons, states, row_logits)

    def score(self, prompt: list[int], continuation: list[int]) -> np.ndarray:
        """Teacher forcing: the logits ``[len(continuation), vocab]`` predicting each continuation
        token after ``prompt`` and the continuation tokens before it (one prefill, then one
        cached step per token, as generation runs)."""
        out = self.generate([list(prompt)], len(continuation), forced_ids=[list(continuation)])
        return out.logits[0]

    def _talker_embeds(self, prompt_ids: np.ndarray, embeds: np.ndarray) -> np.ndarray:
        """The prompt embeddings with audio/image/video placeholder positions zeroed (a copy)."""
        special = self.manifest.special_tokens
        placeholders = [special[name] for name in ("audio", "image", "video") if name in special]
        out = np.array(embeds, dtype=np.float32)
        out[np.isin(prompt_ids, placeholders)] = 0.0
        return out
