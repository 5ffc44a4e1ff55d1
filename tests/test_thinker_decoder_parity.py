"""thinker_decoder.onnx against transformers' thinker text model + lm_head.

Tolerance: max abs diff <= 1e-4 in fp32 on logits (last position), the post-norm hidden
state and every present K/V, at past 0 and past > 0, batch 1 and 2, a long prompt, and a
left-padded batch (positions from the host's rope module, as the runtime feeds them).
"""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers.cache_utils import DynamicCache

from omni_runtime.rope import text_position_ids

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def session(tiny_bundle):
    return ort.InferenceSession(str(tiny_bundle / "thinker_decoder.onnx"), providers=["CPUExecutionProvider"])


def make_inputs(config, batch, sequence, past, seed, left_pad=0):
    """Random embeds/past, positions continuing after the past; row 0 left-padded by left_pad."""
    g = torch.Generator().manual_seed(seed)
    head_dim = config.hidden_size // config.num_attention_heads
    embeds = torch.randn(batch, sequence, config.hidden_size, generator=g)
    mask = np.ones((batch, past + sequence), dtype=np.int64)
    mask[0, :left_pad] = 0
    positions = text_position_ids(mask)[:, :, past:]
    past_kv = [torch.randn(batch, config.num_key_value_heads, past, head_dim, generator=g)
               for _ in range(2 * config.num_hidden_layers)]
    return embeds, mask, positions, past_kv


def reference(thinker, embeds, mask, positions, past_kv):
    config = thinker.config.text_config
    cache = DynamicCache(config=config)
    for i in range(config.num_hidden_layers):
        cache.update(past_kv[2 * i].clone(), past_kv[2 * i + 1].clone(), i)
    with torch.no_grad():
        out = thinker.model.language_model(inputs_embeds=embeds, attention_mask=torch.from_numpy(mask),
                                           position_ids=torch.from_numpy(positions), past_key_values=cache,
                                           use_cache=True)
        logits = thinker.lm_head(out.last_hidden_state)[:, -1:]
    presents = [t.numpy() for layer in cache.layers for t in (layer.keys, layer.values)]
    return logits.numpy(), out.last_hidden_state.numpy(), presents


@pytest.mark.parametrize(
    "batch,sequence,past,left_pad",
    [
        (1, 6, 0, 0),     # prefill, batch 1
        (2, 3, 0, 0),     # prefill, batch 2
        (2, 1, 9, 0),     # decode step with a cache
        (1, 4, 5, 0),     # chunk after a cache
        (1, 512, 0, 0),   # long prompt
        (2, 7, 0, 3),     # left-padded batch, prefill
        (2, 1, 10, 3),    # left-padded batch, decode
    ],
)
def test_decoder_matches_transformers(session, reference_thinker, batch, sequence, past, left_pad):
    config = reference_thinker.config.text_config
    embeds, mask, positions, past_kv = make_inputs(config, batch, sequence, past, seed=sequence + 10 * past,
                                                   left_pad=left_pad)
    feeds = {"inputs_embeds": embeds.numpy(), "attention_mask": mask, "position_ids": positions}
    for i in range(config.num_hidden_layers):
        feeds[f"past_key_values.{i}.key"] = past_kv[2 * i].numpy()
        feeds[f"past_key_values.{i}.value"] = past_kv[2 * i + 1].numpy()
    logits, hidden, *presents = session.run(None, feeds)
    ref_logits, ref_hidden, ref_presents = reference(reference_thinker, embeds, mask, positions, past_kv)

    assert logits.shape == (batch, 1, config.vocab_size)
    assert np.abs(logits - ref_logits).max() <= TOLERANCE
    # Left-padded query positions attend to nothing: their hidden state is not defined, skip them.
    valid = mask[:, past:].astype(bool)
    assert hidden.shape == ref_hidden.shape
    assert np.abs(hidden[valid] - ref_hidden[valid]).max() <= TOLERANCE
    # K/V at padded positions are never attended (masked); above layer 0 they derive from the
    # undefined hidden states of padded queries, so only attended positions are compared.
    attended = mask.astype(bool)
    assert len(presents) == 2 * config.num_hidden_layers
    for ours, ref in zip(presents, ref_presents):
        assert ours.shape == (batch, config.num_key_value_heads, past + sequence, ref.shape[-1])
        diff = np.abs(ours - ref).transpose(0, 2, 1, 3)  # [batch, total, heads, head_dim]
        assert diff[attended].max() <= TOLERANCE
