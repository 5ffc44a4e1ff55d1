"""thinker_decoder.onnx against transformers' thinker text model + lm_head.

Tolerance: max abs diff <= 1e-4 in fp32 on logits (last position), the post-norm hidden
state and every present K/V: prefill at batch 1 and 2, a decode step and a chunk after a
cache, a 512-token prompt, and multimodal positions (different t/h/w position ids, as TMRoPE
gives image and audio tokens). The cache is fed as ``past`` tensors here; the runtime's
in-place buffer mode is tested in test_kv_decoder.py against the same reference.
"""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers.cache_utils import DynamicCache

from conftest import run_decoder_graph

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def session(tiny_bundle):
    return ort.InferenceSession(str(tiny_bundle / "thinker_decoder.onnx"), providers=["CPUExecutionProvider"])


def make_inputs(config, batch, sequence, past, seed, multimodal=False):
    """Random embeds/past; positions continue after the past (distinct per axis if multimodal)."""
    g = torch.Generator().manual_seed(seed)
    head_dim = config.hidden_size // config.num_attention_heads
    embeds = torch.randn(batch, sequence, config.hidden_size, generator=g)
    positions = np.broadcast_to(np.arange(past, past + sequence), (3, batch, sequence)).copy()
    if multimodal:
        positions = positions + torch.randint(0, 40, (3, batch, sequence), generator=g).numpy()
    past_kv = [torch.randn(batch, config.num_key_value_heads, past, head_dim, generator=g)
               for _ in range(2 * config.num_hidden_layers)]
    return embeds, positions.astype(np.int64), past_kv


def reference(thinker, embeds, positions, past_kv):
    config = thinker.config.text_config
    cache = DynamicCache(config=config)
    for i in range(config.num_hidden_layers):
        cache.update(past_kv[2 * i].clone(), past_kv[2 * i + 1].clone(), i)
    with torch.no_grad():
        out = thinker.model.language_model(inputs_embeds=embeds, position_ids=torch.from_numpy(positions),
                                           past_key_values=cache, use_cache=True)
        logits = thinker.lm_head(out.last_hidden_state)[:, -1:]
    presents = [t.numpy() for layer in cache.layers for t in (layer.keys, layer.values)]
    return logits.numpy(), out.last_hidden_state.numpy(), presents


@pytest.mark.parametrize(
    "batch,sequence,past,multimodal",
    [
        (1, 6, 0, False),     # prefill, batch 1
        (2, 3, 0, False),     # prefill, batch 2
        (2, 1, 9, False),     # decode step with a cache
        (1, 4, 5, False),     # chunk after a cache
        (1, 512, 0, False),   # long prompt
        (1, 9, 0, True),      # multimodal positions, prefill
        (1, 2, 7, True),      # multimodal positions after a cache (GQA: batch 1 when a chunk follows a cache)
    ],
)
def test_decoder_matches_transformers(session, reference_thinker, batch, sequence, past, multimodal):
    config = reference_thinker.config.text_config
    embeds, positions, past_kv = make_inputs(config, batch, sequence, past, seed=sequence + 10 * past,
                                             multimodal=multimodal)
    total = past + sequence
    logits, hidden, *presents = run_decoder_graph(session, embeds, positions, past_kv)
    ref_logits, ref_hidden, ref_presents = reference(reference_thinker, embeds, positions, past_kv)

    assert logits.shape == (batch, 1, config.vocab_size)
    assert np.abs(logits - ref_logits).max() <= TOLERANCE
    assert hidden.shape == ref_hidden.shape
    assert np.abs(hidden - ref_hidden).max() <= TOLERANCE
    assert len(presents) == 2 * config.num_hidden_layers
    for ours, ref in zip(presents, ref_presents):
        assert ours.shape == ref.shape == (batch, config.num_key_value_heads, total, ref.shape[-1])
        assert np.abs(ours - ref).max() <= TOLERANCE


def test_decoder_io_read_from_graph(tiny_bundle, session):
    """The manifest's IO for the decoder is the graph's own (names, dtypes, shapes)."""
    from omni_runtime.bundle.manifest import load_manifest
    from omni_runtime.bundle.sessions import ORT_DTYPES

    spec = load_manifest(tiny_bundle).graph("thinker_decoder")
    for ours, theirs in ((spec.inputs, session.get_inputs()), (spec.outputs, session.get_outputs())):
        assert [t.name for t in ours] == [t.name for t in theirs]
        assert [t.dtype for t in ours] == [ORT_DTYPES[t.type] for t in theirs]
        assert [list(t.shape) for t in ours] == [list(t.shape) for t in theirs]
