"""talker_decoder.onnx / talker_embedding.onnx against transformers' talker.

The reference is ``Qwen2_5OmniTalkerForConditionalGeneration.forward`` itself (thinker-space
``inputs_embeds`` -> ``thinker_to_talker_proj`` -> decoder -> ``codec_head``) with a
``DynamicCache`` holding the past, loaded by transformers' ``from_pretrained`` from the tiny
checkpoint (the bundle's graphs), and a talker whose heads x head_dim differs from its hidden
size (as the real 7B talker: 12 x 128 != 896), exported here from its state dict.

Tolerance: max abs diff <= 1e-4 in fp32 on the logits (last position), the post-norm hidden
state and every present K/V: prefill, a decode step after a cache, a chunk after a cache,
multimodal positions; the codec embedding graph is compared exactly with ``embed_tokens``.
"""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers.cache_utils import DynamicCache

from conftest import run_decoder_graph

TOLERANCE = 1e-4
CASES = [
    (1, 7, 0, False),    # prefill
    (2, 3, 0, False),    # prefill, batch 2
    (1, 1, 9, False),    # decode step with a cache
    (2, 1, 6, False),    # decode step, batch 2
    (1, 4, 5, False),    # chunk after a cache
    (1, 9, 0, True),     # multimodal positions (TMRoPE axes differ), prefill
    (1, 1, 8, True),     # multimodal positions, decode
]


@pytest.fixture(scope="module")
def reference_talker(tiny_checkpoint):
    from transformers import Qwen2_5OmniForConditionalGeneration

    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="sdpa",
                                                                  dtype="float32")
    return model.talker.eval()


@pytest.fixture(scope="module")
def session(tiny_bundle):
    return ort.InferenceSession(str(tiny_bundle / "talker_decoder.onnx"), providers=["CPUExecutionProvider"])


def make_inputs(config, batch, sequence, past, seed, multimodal=False):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, sequence, config.embedding_size, generator=g)
    positions = np.broadcast_to(np.arange(past, past + sequence), (3, batch, sequence)).copy()
    if multimodal:
        positions = positions + torch.randint(0, 40, (3, batch, sequence), generator=g).numpy()
    past_kv = [torch.randn(batch, config.num_key_value_heads, past, config.head_dim, generator=g)
               for _ in range(2 * config.num_hidden_layers)]
    return embeds, positions.astype(np.int64), past_kv


def reference(talker, embeds, positions, past_kv):
    config = talker.config
    cache = DynamicCache(config=config)
    for i in range(config.num_hidden_layers):
        cache.update(past_kv[2 * i].clone(), past_kv[2 * i + 1].clone(), i)
    with torch.no_grad():
        out = talker(inputs_embeds=embeds.clone(), position_ids=torch.from_numpy(positions), past_key_values=cache,
                     use_cache=True, output_hidden_states=True)
    presents = [t.numpy() for layer in cache.layers for t in (layer.keys, layer.values)]
    return out.logits[:, -1:].numpy(), out.hidden_states[-1].numpy(), presents


def check_case(session, talker, batch, sequence, past, multimodal, seed):
    config = talker.config
    embeds, positions, past_kv = make_inputs(config, batch, sequence, past, seed, multimodal)
    logits, hidden, *presents = run_decoder_graph(session, embeds, positions, past_kv)
    ref_logits, ref_hidden, ref_presents = reference(talker, embeds, positions, past_kv)
    assert logits.shape == (batch, 1, config.vocab_size)
    assert hidden.shape == ref_hidden.shape == (batch, sequence, config.hidden_size)
    errors = [np.abs(logits - ref_logits).max(), np.abs(hidden - ref_hidden).max()]
    assert len(presents) == 2 * config.num_hidden_layers
    for ours, ref in zip(presents, ref_presents):
        assert ours.shape == ref.shape == (batch, config.num_key_value_heads, past + sequence, config.head_dim)
        errors.append(np.abs(ours - ref).max())
    print(f"batch {batch} sequence {sequence} past {past} multimodal {multimodal}: max abs diff {max(errors):.2e}")
    assert max(errors) <= TOLERANCE


@pytest.mark.parametrize("batch,sequence,past,multimodal", CASES)
def test_talker_decoder_matches_transformers(session, reference_talker, batch, sequence, past, multimodal):
    check_case(session, reference_talker, batch, sequence, past, multimodal, seed=sequence + 10 * past + batch)


def test_talker_embedding_matches_transformers(tiny_bundle, reference_talker):
    sess = ort.InferenceSession(str(tiny_bundle / "talker_embedding.onnx"), providers=["CPUExecutionProvider"])
    config = reference_talker.config
    ids = np.array([[config.tts_codec_pad_token_id, config.tts_codec_start_token_id, 0, 17, 8291],
                    [config.tts_codec_mask_token_id, config.tts_codec_end_token_id, 5, 8447, 3]], dtype=np.int64)
    ours = sess.run(None, {"input_ids": ids})[0]
    with torch.no_grad():
        ref = reference_talker.get_input_embeddings()(torch.from_numpy(ids)).numpy()
    assert ours.shape == (2, 5, config.embedding_size)
    assert np.array_equal(ours, ref)


def test_talker_graph_io_in_manifest(tiny_bundle, session):
    """The manifest lists both talker graphs with the graphs' own IO, and config.talker's shapes."""
    from omni_runtime.bundle.manifest import load_manifest
    from omni_runtime.bundle.sessions import ORT_DTYPES

    manifest = load_manifest(tiny_bundle)
    spec = manifest.graph("talker_decoder")
    for ours, theirs in ((spec.inputs, session.get_inputs()), (spec.outputs, session.get_outputs())):
        assert [t.name for t in ours] == [t.name for t in theirs]
        assert [t.dtype for t in ours] == [ORT_DTYPES[t.type] for t in theirs]
    cfg = manifest.config["talker"]
    assert spec.inputs[0].shape[-1] == cfg["embedding_size"] == manifest.config["thinker"]["hidden_size"]
    assert manifest.graph("talker_embedding").outputs[0].shape[-1] == cfg["embedding_size"]
    assert cfg["codec"] == {"bos": 8293, "eos": 8294, "pad": 8292, "mask": 8296}
    assert cfg["eos_token_ids"] == [8292, 8294] and cfg["suppress_tokens"] == [8293]


def test_talker_with_wide_heads_matches_transformers(tmp_path):
    """heads x head_dim != hidden_size (the real talker's shape), exported from a state dict."""
    from transformers import Qwen2_5OmniTalkerConfig, Qwen2_5OmniTalkerForConditionalGeneration

    from omni_export.export import talker_decoder
    from omni_export.export.decoder_graph import LINEARS, DecoderLayer
    from omni_export.export.onnx_graph import Linear

    config = Qwen2_5OmniTalkerConfig(embedding_size=40, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=300,
                                     rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                      "rope_theta": 10000.0})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    talker = Qwen2_5OmniTalkerForConditionalGeneration(config).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in talker.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.2)
    sd = {k: v.numpy() for k, v in talker.state_dict().items()}

    def linear(prefix):
        return Linear(sd[f"{prefix}.weight"], sd.get(f"{prefix}.bias"))

    layers = (DecoderLayer(sd[f"model.layers.{i}.input_layernorm.weight"],
                           sd[f"model.layers.{i}.post_attention_layernorm.weight"],
                           **{field: linear(f"model.layers.{i}.{path}") for field, path in LINEARS.items()})
              for i in range(config.num_hidden_layers))
    talker_decoder.build_graph(talker_decoder.talker_dims(config), layers, sd["model.norm.weight"],
                               lambda: linear("codec_head"), tmp_path, input_proj=linear("thinker_to_talker_proj"),
                               input_width=config.embedding_size)
    sess = ort.InferenceSession(str(tmp_path / talker_decoder.FILE_NAME), providers=["CPUExecutionProvider"])
    for batch, sequence, past, multimodal in CASES:
        check_case(sess, talker, batch, sequence, past, multimodal, seed=7 + sequence + past)
