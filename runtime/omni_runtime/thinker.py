"""Thinker text generation over the bundle's ``thinker_embedding`` and ``thinker_decoder`` graphs.

The host owns the KV cache (numpy arrays fed back as ``past_key_values.*``), the positions
(``omni_runtime.rope``) and the token choice (``omni_runtime.sampling``). Batches are left
padded, as transformers pads for generation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .manifest import Manifest
from .rope import next_position_ids, text_position_ids
from .sampling import SamplingConfig, next_tokens
from .sessions import SessionPool, import_onnxruntime, io_binding_enabled

EMBEDDING = "thinker_embedding"
DECODER = "thinker_decoder"

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class Generation:
    """Generated ids per row (each ends with its eos token when it stopped on one)."""

    token_ids: list[list[int]]
    finish_reasons: list[str]  # "eos" or "length"


class FeedDecoder:
    """Runs a decoder step with numpy feeds: the K/V cache round-trips through host memory."""

    def __init__(self, session, layers: int):
        self.session = session
        self.layers = layers

    def past(self, empty: np.ndarray):
        return [(empty, empty)] * self.layers

    def step(self, embeds, mask, positions, past):
        feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}
        for i in range(self.layers):
            feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = past[i]
        outputs = self.session.run(None, feeds)
        logits, presents = outputs[0], outputs[2:]
        return logits[:, -1, :], [(presents[2 * i], presents[2 * i + 1]) for i in range(self.layers)]


class BoundDecoder:
    """Runs a decoder step with IO binding: presents stay on the device and become the next past.

    Selected when the first provider is CUDA (only the logits cross to the host each step); it
    binds to the CPU device otherwise, which is how the same logic is tested without a GPU.
    """

    def __init__(self, session, layers: int, device: str):
        self.session = session
        self.layers = layers
        self.device = device
        self.ort = import_onnxruntime()
        self.output_names = [o.name for o in session.get_outputs()]

    def _value(self, array: np.ndarray):
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def past(self, empty: np.ndarray):
        value = self._value(empty)
        return [(value, value)] * self.layers

    def step(self, embeds, mask, positions, past):
        binding = self.session.io_binding()
        for name, array in (("inputs_embeds", embeds), ("attention_mask", mask), ("position_ids", positions)):
            binding.bind_ortvalue_input(name, self._value(array))
        for i in range(self.layers):
            binding.bind_ortvalue_input(f"past_key_values.{i}.key", past[i][0])
            binding.bind_ortvalue_input(f"past_key_values.{i}.value", past[i][1])
        for name in self.output_names:
            binding.bind_output(name, "cpu" if name == "logits" else self.device, 0)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits, presents = outputs[0].numpy(), outputs[2:]
        return logits[:, -1, :], [(presents[2 * i], presents[2 * i + 1]) for i in range(self.layers)]


class ThinkerGenerator:
    """Greedy or sampled generation with a KV cache for one bundle.

    ``io_binding`` None follows the providers (on for CUDA); True/False forces it.
    """

    def __init__(self, manifest: Manifest, pool: SessionPool, io_binding: bool | None = None):
        self.manifest = manifest
        self.pool = pool
        self.io_binding = io_binding_enabled(pool.providers) if io_binding is None else io_binding
        cfg = manifest.config["thinker"]
        self.layers = int(cfg["num_hidden_layers"])
        self.kv_heads = int(cfg["num_key_value_heads"])
        self.head_dim = int(cfg["head_dim"])
        self.kv_dtype = NUMPY_DTYPES[cfg.get("kv_dtype", "float32")]
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

    def _decoder(self):
        session = self.pool.get(DECODER)
        if not self.io_binding:
            return FeedDecoder(session, self.layers)
        device = "cuda" if io_binding_enabled(self.pool.providers) else "cpu"
        return BoundDecoder(session, self.layers, device)

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        sampling: SamplingConfig = SamplingConfig(),
        seed: int | None = None,
        on_step: Callable[[np.ndarray], None] | None = None,
    ) -> Generation:
        """Generate up to ``max_new_tokens`` for each prompt; ``on_step`` sees each new id batch."""
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}", fix="pass --max-new-tokens 1 or more")
        sampling.validate()
        rng = np.random.default_rng(seed)
        ids, mask = self._pad(prompts)
        batch = ids.shape[0]
        embed = self.pool.get(EMBEDDING)
        decoder = self._decoder()
        past = decoder.past(np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype))
        positions = text_position_ids(mask)
        embeds = embed.run(None, {"input_ids": ids})[0]
        sequences = ids
        generated = [[] for _ in range(batch)]
        finished = np.zeros(batch, dtype=bool)
        reasons = ["length"] * batch
        for _ in range(max_new_tokens):
            logits, past = decoder.step(embeds, mask, positions, past)
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
            if finished.all():
                break
            sequences = np.concatenate([sequences, new[:, None]], axis=1)
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            positions = next_position_ids(positions[:, :, -1])
            embeds = embed.run(None, {"input_ids": new[:, None]})[0]
        return Generation(generated, reasons)
