"""One KV-cached decoder step runner, driven by the manifest's graph IO names.

A decoder graph (the thinker's now, the talker's with the speech issue) takes
``inputs_embeds [batch, sequence, hidden]``, ``position_ids [3, batch, sequence]``,
``seqlens_k [batch]``, ``total_sequence_length []`` and ``past_key_values.{i}.key/value``, and
returns ``logits``, ``last_hidden_state`` and ``present.{i}.key/value`` (docs/bundle-format.md).

The cache of one sequence is a pair of preallocated buffers per layer,
``[1, kv_heads, capacity, head_dim]``, bound with IO binding as both ``past`` and ``present``:
GroupQueryAttention writes the new positions in place, so a decode step moves one position
per layer, not the whole cache. Buffers live on the session's device (CUDA when the first
provider is CUDA, else CPU: the same code path runs in the tests). Only the logits, and the
hidden states when asked, come back to the host.

Long prompts are fed in chunks of ``prefill_chunk`` tokens; attention then never materialises
more than ``heads x chunk x total`` scores, so prefill memory grows linearly with the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import BundleError, InputError
from .manifest import GraphSpec

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
DEFAULT_PREFILL_CHUNK = 256


@dataclass
class KVCache:
    """Preallocated K/V buffers of one sequence and how many positions are filled."""

    buffers: list  # [(key OrtValue, value OrtValue)] per layer
    capacity: int
    length: int = 0


class KVDecoder:
    """Runs one decoder graph step by step over ``KVCache`` buffers bound in place."""

    def __init__(self, session, spec: GraphSpec, ort, device: str = "cpu", prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        self.session = session
        self.spec = spec
        self.ort = ort
        self.device = device
        if prefill_chunk < 1:
            raise InputError(f"prefill_chunk must be >= 1, got {prefill_chunk}", fix="pass a positive chunk size")
        self.prefill_chunk = prefill_chunk
        inputs = {t.name: t for t in spec.inputs}
        self.past_names = [t.name for t in spec.inputs if t.name.startswith("past_key_values.")]
        self.present_names = [t.name for t in spec.outputs if t.name.startswith("present.")]
        needed = {"inputs_embeds", "position_ids", "seqlens_k", "total_sequence_length"}
        if not needed <= inputs.keys() or not self.past_names or len(self.past_names) != len(self.present_names):
            raise BundleError(f"graph {spec.name!r} is not a KV decoder (inputs {sorted(inputs)})",
                              fix="rebuild the bundle with this omni-export version")
        first = inputs[self.past_names[0]]
        self.kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.kv_dtype = NUMPY_DTYPES[first.dtype]
        self.embed_dtype = NUMPY_DTYPES[inputs["inputs_embeds"].dtype]
        self.layers = len(self.past_names) // 2

    def new_cache(self, capacity: int) -> KVCache:
        """Empty K/V buffers for a sequence of at most ``capacity`` positions."""
        shape = [1, self.kv_heads, int(capacity), self.head_dim]

        def buffer():
            return self.ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, self.device, 0)

        return KVCache([(buffer(), buffer()) for _ in range(self.layers)], int(capacity))

    def step(self, cache: KVCache, embeds: np.ndarray, position_ids: np.ndarray,
             want_hidden: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Append ``embeds [1, S, hidden]`` at ``position_ids [3, 1, S]``; logits of the last position.

        Prompts longer than ``prefill_chunk`` are fed in chunks. Returns ``(logits [vocab],
        hidden [1, S, hidden] or None)``.
        """
        seq = embeds.shape[1]
        if cache.length + seq > cache.capacity:
            raise InputError(f"the KV cache holds {cache.capacity} positions, {cache.length + seq} were asked",
                             fix="allocate the cache for the prompt plus max_new_tokens")
        hidden = []
        logits = None
        for start in range(0, seq, self.prefill_chunk):
            stop = min(seq, start + self.prefill_chunk)
            logits, h = self._run(cache, embeds[:, start:stop], position_ids[:, :, start:stop], want_hidden)
            if want_hidden:
                hidden.append(h)
        return logits[0, -1], (np.concatenate(hidden, axis=1) if want_hidden else None)

    def _run(self, cache: KVCache, embeds, position_ids, want_hidden):
        seq = embeds.shape[1]
        total = cache.length + seq
        binding = self.session.io_binding()
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=self.embed_dtype))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        binding.bind_cpu_input("seqlens_k", np.array([total - 1], dtype=np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        binding.bind_output("logits", "cpu")  # bound first: get_outputs() follows the binding order
        binding.bind_output("last_hidden_state", "cpu")
        for i, (key, value) in enumerate(cache.buffers):
            binding.bind_ortvalue_input(self.past_names[2 * i], key)
            binding.bind_ortvalue_input(self.past_names[2 * i + 1], value)
            binding.bind_ortvalue_output(self.present_names[2 * i], key)
            binding.bind_ortvalue_output(self.present_names[2 * i + 1], value)
        self.session.run_with_iobinding(binding)
        logits, hidden = binding.get_outputs()[:2]
        cache.length = total
        return logits.numpy(), (hidden.numpy() if want_hidden else None)
