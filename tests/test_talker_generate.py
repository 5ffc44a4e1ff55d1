"""The runtime's talker: its inputs from the thinker, streaming, sessions, errors.

The generate-level comparison (greedy codes against ``Qwen2_5OmniForConditionalGeneration.generate``)
is in test_talker_reference.py, against transformers 4.57.3: the released model's behaviour, which
transformers 5.23's generate no longer has (docs/reference-versions.md). Here, against the installed
5.23 where the two versions agree:

- the thinker states handed to the talker (input embeddings, post-norm hidden states) against
  transformers' ``thinker.generate(output_hidden_states=True)`` (<= 1e-4), and placeholder zeroing;
- the runtime alone: the streaming callback sees the returned codes, a row of a batched thinker run
  gets the codes it gets alone, sessions are released, the errors of bad inputs and of a bundle
  without a talker, sampled codes reproducible with a seed.
"""

import numpy as np
import pytest
import torch

from omni_runtime.errors import BundleError, InputError
from omni_runtime.bundle.manifest import Manifest, load_manifest
from omni_runtime.stages.sampling import SamplingConfig
from omni_runtime.bundle.sessions import SessionPool
from omni_runtime.stages.talker import Talker
from omni_runtime.stages.thinker import ThinkerGenerator

TOLERANCE = 1e-4
THINKER_NEW = 12
TALKER_NEW = 48
PROMPT = [151644, 872, 198, 9707, 11, 1246, 525, 498, 30, 151645, 198, 151644, 77091, 198]
SHORT = [151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198]
SPEAKER = "Chelsie"


def speaker_bos(checkpoint, name=SPEAKER) -> int:
    return int(torch.load(checkpoint / "spk_dict.pt", weights_only=True)[name]["bos_token"])


def load_reference(checkpoint):
    from transformers import Qwen2_5OmniForConditionalGeneration

    return Qwen2_5OmniForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="sdpa",
                                                                 dtype="float32").eval()


def runtime_speech(bundle, checkpoint, prompts, on_codes=None):
    """The runtime's thinker on ``prompts`` (a batch), then the talker per row."""
    manifest = load_manifest(bundle)
    pool = SessionPool(manifest, ["CPUExecutionProvider"])
    thinker = ThinkerGenerator(manifest, pool).generate(prompts, THINKER_NEW, SamplingConfig(), keep_states=True)
    talker = Talker(manifest, pool)
    codes = [talker.generate(states, speaker_bos(checkpoint), talker.default_sampling(do_sample=False),
                             max_new_tokens=TALKER_NEW, on_codes=on_codes if row == 0 else None)
             for row, states in enumerate(thinker.states)]
    return thinker, codes, pool


@pytest.fixture(scope="module")
def reference_model(tiny_checkpoint):
    return load_reference(tiny_checkpoint)


@pytest.fixture(scope="module")
def generation(tiny_bundle):
    return load_manifest(tiny_bundle).generation


def test_streamed_codes_batch_rows_and_release(tiny):
    """on_codes sees exactly the returned codes; each row of a batched thinker run gets the codes it
    gets alone (its states do not depend on the batch); the talker's sessions are released after."""
    checkpoint, bundle = tiny
    streamed = []
    thinker, codes, pool = runtime_speech(bundle, checkpoint, [PROMPT, SHORT], on_codes=streamed.extend)
    assert streamed == codes[0] and len(codes[0]) == TALKER_NEW  # random weights: no eos within the limit
    assert not {"talker_decoder", "talker_embedding"} & set(pool.loaded)
    for row, prompt in enumerate([PROMPT, SHORT]):
        alone_thinker, alone, _ = runtime_speech(bundle, checkpoint, [prompt])
        assert alone_thinker.token_ids[0] == thinker.token_ids[row]
        assert alone[0] == codes[row], f"row {row}"


def test_thinker_states_match_transformers_hidden_states(tiny_bundle, reference_model, generation):
    """keep_states: per fed token, the input embedding and post-norm hidden state that transformers'
    generate(output_hidden_states=True) gives (prompt step, then one per fed reply token)."""
    manifest = load_manifest(tiny_bundle)
    out = ThinkerGenerator(manifest, SessionPool(manifest, ["CPUExecutionProvider"])).generate(
        [PROMPT], THINKER_NEW, SamplingConfig(), keep_states=True)
    states = out.states[0]
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ref = reference_model.thinker.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                               max_new_tokens=THINKER_NEW, do_sample=False,
                                               eos_token_id=generation["eos_token_ids"],
                                               pad_token_id=generation["pad_token_id"], output_hidden_states=True,
                                               return_dict_in_generate=True)
    assert ref.sequences[0, len(PROMPT):].tolist() == out.token_ids[0] == states.token_ids
    ref_embeds = torch.cat([step[0][0] for step in ref.hidden_states]).numpy()
    ref_hidden = torch.cat([step[-1][0] for step in ref.hidden_states]).numpy()
    assert states.prompt_ids == PROMPT
    assert states.embeds.shape == states.hidden.shape == ref_embeds.shape == (len(PROMPT) + THINKER_NEW - 1, 64)
    assert np.abs(states.embeds - ref_embeds).max() <= TOLERANCE
    assert np.abs(states.hidden - ref_hidden).max() <= TOLERANCE
    assert np.array_equal(states.prompt_positions, np.broadcast_to(np.arange(len(PROMPT)), (3, len(PROMPT))))


def test_thinker_states_zero_placeholder_embeddings(tiny_bundle, reference_model):
    """Audio/image/video placeholder rows of the kept embeddings are zero (as transformers'
    generate zeroes them before the talker); the hidden states still see the real features."""
    manifest = load_manifest(tiny_bundle)
    special = manifest.special_tokens
    prompt = [151644, 872, 198, special["audio_bos"], special["audio"], special["audio"], special["audio_eos"],
              special["vision_bos"], special["image"], special["vision_eos"], 151645, 198, 151644, 77091, 198]
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((len(prompt), 64)).astype(np.float32)
    positions = np.broadcast_to(np.arange(len(prompt)), (3, len(prompt))).astype(np.int64)
    out = ThinkerGenerator(manifest, SessionPool(manifest, ["CPUExecutionProvider"])).generate(
        [prompt], 2, SamplingConfig(), prompt_embeds=[embeds], prompt_positions=[positions], rope_deltas=[0],
        keep_states=True)
    states = out.states[0]
    placeholder = np.isin(prompt, [special["audio"], special["image"], special["video"]])
    assert placeholder.sum() == 3
    assert np.all(states.embeds[:len(prompt)][placeholder] == 0)
    assert np.array_equal(states.embeds[:len(prompt)][~placeholder], embeds[~placeholder])
    with torch.no_grad():
        ref = reference_model.thinker.model.language_model(inputs_embeds=torch.from_numpy(embeds)[None],
                                                           position_ids=torch.from_numpy(positions)[:, None])
    assert np.abs(states.hidden[:len(prompt)] - ref.last_hidden_state[0].numpy()).max() <= TOLERANCE


def test_bundle_without_talker_is_a_clear_error(tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    data = {**manifest.data, "config": {k: v for k, v in manifest.config.items() if k != "talker"}}
    graphs = {k: v for k, v in manifest.graphs.items() if not k.startswith("talker")}
    text_only = Manifest(manifest.root, data, graphs)
    with pytest.raises(BundleError, match="no talker") as info:
        Talker(text_only, SessionPool(text_only, ["CPUExecutionProvider"]))
    assert "manifest.json" in str(info.value) and info.value.fix


def test_bad_talker_inputs_are_input_errors(tiny):
    checkpoint, bundle = tiny
    manifest = load_manifest(bundle)
    pool = SessionPool(manifest, ["CPUExecutionProvider"])
    out = ThinkerGenerator(manifest, pool).generate([PROMPT], 3, SamplingConfig(), keep_states=True)
    talker = Talker(manifest, pool)
    with pytest.raises(InputError, match="keep_states"):
        talker.generate(None, speaker_bos(checkpoint))  # e.g. Generation.states without keep_states
    with pytest.raises(InputError, match="speaker_bos"):
        talker.generate(out.states[0], -1)
    with pytest.raises(InputError, match="max_new_tokens"):
        talker.generate(out.states[0], speaker_bos(checkpoint), max_new_tokens=0)
    truncated = out.states[0]
    truncated = type(truncated)(truncated.prompt_ids, truncated.token_ids, truncated.embeds[:-1], truncated.hidden,
                                truncated.prompt_positions)
    with pytest.raises(InputError, match="embeds"):
        talker.generate(truncated, speaker_bos(checkpoint))
    one = type(truncated)(PROMPT, out.token_ids[0][:1], out.states[0].embeds[:len(PROMPT)],
                          out.states[0].hidden[:len(PROMPT)], out.states[0].prompt_positions)
    assert talker.generate(one, speaker_bos(checkpoint)) == []  # a one-token reply has nothing to speak


def test_sampled_codes_are_reproducible_with_a_seed(tiny):
    checkpoint, bundle = tiny
    manifest = load_manifest(bundle)
    pool = SessionPool(manifest, ["CPUExecutionProvider"])
    out = ThinkerGenerator(manifest, pool).generate([PROMPT], 6, SamplingConfig(), keep_states=True)
    talker = Talker(manifest, pool)
    assert talker.default_sampling() == SamplingConfig(do_sample=True, temperature=0.9, top_k=40, top_p=0.8,
                                                       repetition_penalty=1.05)
    a = talker.generate(out.states[0], speaker_bos(checkpoint), seed=3, max_new_tokens=16)
    b = talker.generate(out.states[0], speaker_bos(checkpoint), seed=3, max_new_tokens=16)
    assert a == b and len(a) >= 1 and 8293 not in a
