"""The runtime's KV decoder: in-place cache buffers, chunked prefill, device choice.

The reference is transformers' thinker (full forward over the whole sequence, sdpa): the
runtime's step-by-step logits through preallocated buffers must match it within 1e-4 for any
prefill chunk size, and the cache buffers must be the same objects before and after a step
(written in place, never reallocated or copied).
"""

import numpy as np
import pytest
import torch

from omni_runtime.stages.kv_decoder import KVDecoder
from omni_runtime.bundle.manifest import load_manifest
from omni_runtime.bundle.sessions import SessionPool, import_onnxruntime
from omni_runtime.stages.thinker import ThinkerGenerator

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def decoder_parts(tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    pool = SessionPool(manifest, ["CPUExecutionProvider"])
    return manifest, pool


def reference_logits(thinker, embeds, positions):
    with torch.no_grad():
        out = thinker.model.language_model(inputs_embeds=torch.from_numpy(embeds),
                                           position_ids=torch.from_numpy(positions), use_cache=False)
        return thinker.lm_head(out.last_hidden_state)[0].numpy()


@pytest.mark.parametrize("chunk", [1, 3, 256])
def test_chunked_prefill_and_decode_match_transformers(decoder_parts, reference_thinker, chunk):
    manifest, pool = decoder_parts
    decoder = KVDecoder(pool.get("thinker_decoder"), manifest.graph("thinker_decoder"), import_onnxruntime(),
                        prefill_chunk=chunk)
    hidden = manifest.config["thinker"]["hidden_size"]
    rng = np.random.default_rng(chunk)
    prompt, steps = 11, 4
    embeds = rng.standard_normal((1, prompt + steps, hidden)).astype(np.float32)
    positions = np.broadcast_to(np.arange(prompt + steps), (3, 1, prompt + steps)).astype(np.int64).copy()
    positions[1:, :, 4:8] += 3  # an "image" span: height/width axes differ from the temporal one
    ref = reference_logits(reference_thinker, embeds, positions)
    cache = decoder.new_cache(prompt + steps)
    buffers = [id(v) for pair in cache.buffers for v in pair]
    logits, states = decoder.step(cache, embeds[:, :prompt], positions[:, :, :prompt], want_hidden=True)
    assert states.shape == (1, prompt, hidden)
    assert np.abs(logits - ref[prompt - 1]).max() <= TOLERANCE
    for t in range(prompt, prompt + steps):
        logits, _ = decoder.step(cache, embeds[:, t:t + 1], positions[:, :, t:t + 1])
        assert np.abs(logits - ref[t]).max() <= TOLERANCE
    assert cache.length == prompt + steps
    assert [id(v) for pair in cache.buffers for v in pair] == buffers


def test_cache_overflow_is_an_input_error(decoder_parts):
    from omni_runtime.errors import InputError

    manifest, pool = decoder_parts
    decoder = KVDecoder(pool.get("thinker_decoder"), manifest.graph("thinker_decoder"), import_onnxruntime())
    cache = decoder.new_cache(2)
    embeds = np.zeros((1, 3, manifest.config["thinker"]["hidden_size"]), np.float32)
    with pytest.raises(InputError, match="holds 2 positions"):
        decoder.step(cache, embeds, np.zeros((3, 1, 3), np.int64))


def test_cache_device_follows_providers(tiny_bundle):
    """CUDA first -> K/V buffers on the CUDA device; CPU otherwise (the code path tested here)."""
    manifest = load_manifest(tiny_bundle)
    cuda = ThinkerGenerator(manifest, SessionPool(manifest, ["CUDAExecutionProvider", "CPUExecutionProvider"]))
    cpu = ThinkerGenerator(manifest, SessionPool(manifest, ["CPUExecutionProvider"]))
    assert (cuda.device, cpu.device) == ("cuda", "cpu")


@pytest.mark.parametrize("chunk", [2, 256])
def test_generation_independent_of_prefill_chunk(decoder_parts, chunk):
    manifest, pool = decoder_parts
    prompts = [[151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198], [151644, 9707, 198]]
    a = ThinkerGenerator(manifest, pool, prefill_chunk=chunk).generate(prompts, 8)
    b = ThinkerGenerator(manifest, pool, prefill_chunk=1).generate(prompts, 8)
    assert a.token_ids == b.token_ids and all(len(r) >= 1 for r in a.token_ids)
