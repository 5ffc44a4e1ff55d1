"""One KV-cached decoder runner (steps and the token loop), driven by the manifest's graph IO names.

A decoder graph (``thinker_decoder``, ``talker_decoder``) takes
``inputs_embeds [batch, sequence, width]``, ``position_ids [3, batch, sequence]``,
``seqlens_k [batch]``, ``total_sequence_length []`` and ``past_key_values.{i}.key/value``, and
returns ``logits``, ``last_hidden_state`` and ``present.{i}.key/value`` (docs/bundle-format.md).

The cache of one sequence is a pair of preallocated buffers per layer,
``[1, kv_heads, capacity, head_dim]``, bound with IO binding as both ``past`` and ``present``:
GroupQueryAttention writes the new positions in place, so a decode step moves one position
per layer, not the whole cache. Buffers live on the session's device (CUDA when the first
provider is CUDA, else CPU: the same code path runs in the tests). On CUDA they come from the
session's own allocator (``InferenceSession.create_ortvalue_from_shape_and_type``, where the
installed onnxruntime has it): they count against its arena's ``gpu_mem_limit`` and are freed with the cache and the
session, whereas the process-wide CUDA allocator behind ``OrtValue.ortvalue_from_shape_and_type``
is an arena that lives as long as the process. Only the logits, and the hidden states when asked,
come back to the host; an unwanted ``last_hidden_state`` stays on the device.

The hidden states the talker needs do cross to the host, one ``[1, hidden]`` row per token
(14 KB at 7B, next to the 600 KB of logits that cross every step anyway): the talker's inputs
are sums formed on the host (thinker state + embedding + codec embedding), and no graph of the
bundle adds them on the device.

Long prompts are fed in chunks of ``prefill_chunk`` tokens; attention then never materialises
more than ``heads x chunk x total`` scores, so prefill memory grows linearly with the prompt.

``KVDecoder.decode`` is the one token loop of every decoder (the thinker's text, the talker's
speech codes): choose the next ids from the logits, stop rows on their eos, and feed each live
row the inputs a per-step callback supplies (the thinker: the token's embedding; the talker:
the codec embedding plus the thinker's reply state). Callers do their own prefill with ``step``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from omni_runtime.errors import BundleError, InputError
from omni_runtime.bundle.manifest import GraphSpec

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
DEFAULT_PREFILL_CHUNK = 256


@dataclass
class KVCache:
    """Preallocated K/V buffers of one sequence and how many positions are filled."""

    buffers: list  # [(key OrtValue, value OrtValue)] per layer
    capacity: int
    length: int = 0


@dataclass
class Decoded:
    """What ``KVDecoder.decode`` produced: new ids per row and why each row stopped."""

    token_ids: list[list[int]]  # each ends with its eos id when it stopped on one
    finish_reasons: list[str]  # "eos" or the caller's limit reason


#: ``choose(logits [batch, vocab], history [batch, length], mask [batch, length]) -> ids [batch]``
ChooseFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
#: ``next_inputs(new ids [batch], live rows) -> [(embeds [1, S, width], position_ids [3, 1, S])]``, one per live row
NextInputsFn = Callable[[np.ndarray, np.ndarray], Sequence[tuple[np.ndarray, np.ndarray]]]


class KVDecoder:
    """Runs one decoder graph step by step over ``KVCache`` buffers bound in place."""

    def __init__(self, session, spec: GraphSpec, ort, device: str = "cpu", prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 device_id: int = 0):
        self.session = session
        self.spec = spec
        self.ort = ort
        self.device = device
        self.device_id = int(device_id)
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
            if self.device != "cpu" and hasattr(self.session, "create_ortvalue_from_shape_and_type"):
                return self.session.create_ortvalue_from_shape_and_type(shape, self.kv_dtype, self.device,
                                                                        self.device_id)
            return self.ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, self.device, self.device_id)

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

    def decode(
        self,
        caches: list[KVCache],
        logits: np.ndarray,
        history: np.ndarray,
        choose: ChooseFn,
        next_inputs: NextInputsFn,
        max_new_tokens: int,
        eos_ids,
        pad_id: int,
        mask: np.ndarray | None = None,
        on_step: Callable[[np.ndarray], None] | None = None,
        on_hidden: Callable[[int, np.ndarray], None] | None = None,
        limit_reason: str = "length",
    ) -> Decoded:
        """Generate up to ``max_new_tokens`` ids per row, one decoder step per live row and token.

        ``logits [batch, vocab]`` are the prefill's (last position of each row); ``history
        [batch, length]`` the ids so far (left-padded; ``mask`` 0 marks padding) that ``choose``
        sees, and to which each step's ids are appended (``pad_id`` for finished rows).
        ``on_step`` gets each step's ids (-1 for rows already finished); ``on_hidden(row,
        hidden [1, S, hidden])`` the decoder's post-norm hidden state of each fed input (the
        decoder then returns it). A row's last id (its eos, or the one reaching the limit) is
        not fed back.
        """
        batch = len(caches)
        logits = np.array(logits, dtype=np.float32).reshape(batch, -1)
        history = np.asarray(history, dtype=np.int64).reshape(batch, -1)
        mask = np.ones_like(history) if mask is None else np.asarray(mask, dtype=np.int64)
        eos_ids = np.asarray(list(eos_ids), dtype=np.int64)
        generated: list[list[int]] = [[] for _ in range(batch)]
        finished = np.zeros(batch, dtype=bool)
        reasons = [limit_reason] * batch
        for step in range(max_new_tokens):
            new = np.asarray(choose(logits, history, mask), dtype=np.int64).reshape(batch)
            new = np.where(finished, pad_id, new)
            for row in np.flatnonzero(~finished):
                generated[row].append(int(new[row]))
            if on_step is not None:
                on_step(np.where(finished, -1, new))
            hit = np.isin(new, eos_ids) & ~finished
            for row in np.flatnonzero(hit):
                reasons[row] = "eos"
            finished |= hit
            if finished.all() or step == max_new_tokens - 1:
                break
            history = np.concatenate([history, new[:, None]], axis=1)
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            live = np.flatnonzero(~finished)
            inputs = next_inputs(new, live)
            if len(inputs) != len(live):
                raise ValueError(f"next_inputs returned {len(inputs)} inputs for {len(live)} live rows")
            for row, (embeds, positions) in zip(live, inputs):
                logits[row], hidden = self.step(caches[row], embeds, positions, want_hidden=on_hidden is not None)
                if on_hidden is not None:
                    on_hidden(int(row), hidden)
        return Decoded(generated, reasons)

    def _run(self, cache: KVCache, embeds, position_ids, want_hidden):
        seq = embeds.shape[1]
        total = cache.length + seq
        binding = self.session.io_binding()
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=self.embed_dtype))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        binding.bind_cpu_input("seqlens_k", np.array([total - 1], dtype=np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        binding.bind_output("logits", "cpu")  # bound first: get_outputs() follows the binding order
        # the hidden states cross to the host only when asked for (the talker's input)
        if want_hidden:
            binding.bind_output("last_hidden_state", "cpu")
        else:
            binding.bind_output("last_hidden_state", self.device, self.device_id)
        for i, (key, value) in enumerate(cache.buffers):
            binding.bind_ortvalue_input(self.past_names[2 * i], key)
            binding.bind_ortvalue_input(self.past_names[2 * i + 1], value)
            binding.bind_ortvalue_output(self.present_names[2 * i], key)
            binding.bind_ortvalue_output(self.present_names[2 * i + 1], value)
        self.session.run_with_iobinding(binding)
        logits, hidden = binding.get_outputs()[:2]
        cache.length = total
        return logits.numpy(), (hidden.numpy() if want_hidden else None)
