"""Thinker text generation over the bundle's ``thinker_embedding`` and ``thinker_decoder`` graphs.

The host owns the KV cache (``omni_runtime.kv_decoder``: preallocated buffers updated in place),
the positions (``omni_runtime.rope``) and the token choice (``omni_runtime.sampling``). Each row
of a batch has its own cache and is stepped in lockstep with the others; the token choice sees
the batch as transformers' left-padded generation does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .manifest import Manifest
from .rope import next_position_ids, text_position_ids
from .sampling import SamplingConfig, next_tokens
from .kv_decoder import DEFAULT_PREFILL_CHUNK, KVDecoder
from .sessions import SessionPool, import_onnxruntime, io_binding_enabled

EMBEDDING = "thinker_embedding"
DECODER = "thinker_decoder"


@dataclass
class Generation:
    """Generated ids per row (each ends with its eos token when it stopped on one)."""

    token_ids: list[list[int]]
    finish_reasons: list[str]  # "eos" or "length"


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
        gen = manifest.generation
        self.eos_ids = np.array(gen["eos_token_ids"], dtype=np.int64)
        self.pad_id = int(gen["pad_token_id"])

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
                         device=self.device, prefill_chunk=self.prefill_chunk)

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
    ) -> Generation:
        """Generate up to ``max_new_tokens`` for each prompt; ``on_step`` sees each new id batch.

        ``limit_reason`` is the finish reason of a row that reaches ``max_new_tokens``
        (``"context"`` when the caller clamped the limit to the model's context).

        For multimodal prompts the caller passes, per row, the merged ``prompt_embeds``
        ``[seq, hidden]`` (encoder features spliced in at their placeholders), the TMRoPE
        ``prompt_positions`` ``[3, seq]`` and the ``rope_deltas`` (``omni_runtime.rope.rope_index``);
        decode positions then continue at ``cache length + delta``. Text prompts need none of them.
        """
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}", fix="ask for 1 or more new tokens")
        sampling.validate()
        rng = np.random.default_rng(seed)
        ids, mask = self._pad(prompts)
        batch = ids.shape[0]
        embed = self.pool.get(EMBEDDING)
        decoder = self._decoder()
        caches, logits = [], []
        deltas = [0] * batch if rope_deltas is None else [int(d) for d in rope_deltas]
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
            row_logits, _ = decoder.step(cache, embeds, positions)
            caches.append(cache)
            logits.append(row_logits)
        logits = np.stack(logits)
        sequences = ids
        generated = [[] for _ in range(batch)]
        finished = np.zeros(batch, dtype=bool)
        reasons = [limit_reason] * batch
        for step in range(max_new_tokens):
            new = next_tokens(logits, sequences, sampling, rng, attention_mask=mask)
            new = np.where(finished, self.pad_id, new)
            for row in np.flatnonzero(~finished):
                generated[row].append(int(new[row]))
            if on_step is not None:
                on_step(np.where(finished, -1, new))
            hit = np.isin(new, self.eos_ids) & ~finished
            for row in np.flatnonzero(hit):
                reasons[row] = "eos"
            finished |= hit
            if finished.all() or step == max_new_tokens - 1:
                break
            sequences = np.concatenate([sequences, new[:, None]], axis=1)
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            embeds = embed.run(None, {"input_ids": new[:, None]})[0]
            for row in np.flatnonzero(~finished):
                cache = caches[row]
                positions = next_position_ids(np.full((3, 1), cache.length - 1 + deltas[row], dtype=np.int64))
                logits[row], _ = decoder.step(cache, embeds[row:row + 1], positions)
        return Generation(generated, reasons)
