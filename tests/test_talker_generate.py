"""The runtime's talker against transformers' ``Qwen2_5OmniForConditionalGeneration.generate``.

Reference: transformers' whole generate (greedy thinker, ``talker_do_sample=False`` with the
other talker defaults: repetition penalty 1.05, codec bos suppressed, eos 8292/8294) on the
tiny checkpoint, with ``token2wav.forward`` replaced by a stub that records the codes it is
given (each row's talker output trimmed at its eos, exactly what transformers vocalises) and
``talker.generate`` wrapped to record its processed scores (for near-tie reporting).

The reference runs a left-padded batch of two prompts. transformers 5 drops an all-ones
attention mask before the forward pass, and the talker's forward adds the codec pad/bos
embeddings to the last two prefill positions and computes its TMRoPE positions only when it
receives a mask: so an unpadded single prompt skips them (unlike transformers 4.5x and the
official Qwen2.5-Omni code, which always pass the mask), while a padded batch takes the
intended path for every row. The runtime implements the intended path; each of its rows,
generated alone, must give the codes of its row in the batch.

Runtime: ``ThinkerGenerator.generate(..., keep_states=True)`` then ``Talker.generate`` per row.
A code step may be excused only where the reference's top-2 processed-score margin is below
1e-4 (a near-tie fp32 rounding may flip); the codes before it must be equal.

Also: the thinker states handed to the talker (input embeddings, post-norm hidden states)
against transformers' ``output_hidden_states`` (<= 1e-4), placeholder zeroing, eos handling on
a checkpoint whose codec head makes the talker stop, streaming callback, session release, and
the error of a bundle without a talker.
"""

import shutil

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
MARGIN = 1e-4
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


def reference_speech(model, prompts, eos, pad):
    """transformers' generate on the left-padded batch ``prompts``: per row (thinker reply ids,
    codes token2wav receives, per-step top-2 margins of the talker's processed scores)."""
    captured = {"codes": []}

    def token2wav_stub(code, conditioning=None, reference_mel=None, **kwargs):
        captured["codes"].append(code[0].tolist())
        return torch.zeros(240)

    talker_generate = model.talker.generate

    def recording_generate(*args, **kwargs):
        out = talker_generate(*args, **kwargs, output_scores=True, return_dict_in_generate=True)
        captured["scores"] = out.scores
        return out.sequences

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    model.token2wav.forward = token2wav_stub
    model.talker.generate = recording_generate
    try:
        with torch.no_grad():
            sequences, _ = model.generate(input_ids=ids, attention_mask=mask, speaker=SPEAKER,
                                          thinker_max_new_tokens=THINKER_NEW, thinker_do_sample=False,
                                          thinker_eos_token_id=eos, thinker_pad_token_id=pad,
                                          talker_do_sample=False, talker_max_new_tokens=TALKER_NEW)
    finally:
        del model.token2wav.forward, model.talker.generate
    rows = []
    for row in range(len(prompts)):
        reply = []
        for token in sequences[row, width:].tolist():
            reply.append(token)
            if token in eos:
                break
        margins = []
        for scores in captured["scores"]:
            top2 = torch.topk(scores[row].float(), 2).values
            margins.append(float(top2[0] - top2[1]))
        rows.append((reply, captured["codes"][row], margins))
    return rows


def runtime_speech(bundle, checkpoint, prompts, on_codes=None):
    """The runtime's thinker on ``prompts`` (a batch, as transformers), then the talker per row."""
    manifest = load_manifest(bundle)
    pool = SessionPool(manifest, ["CPUExecutionProvider"])
    thinker = ThinkerGenerator(manifest, pool).generate(prompts, THINKER_NEW, SamplingConfig(), keep_states=True)
    talker = Talker(manifest, pool)
    codes = [talker.generate(states, speaker_bos(checkpoint), talker.default_sampling(do_sample=False),
                             max_new_tokens=TALKER_NEW, on_codes=on_codes if row == 0 else None)
             for row, states in enumerate(thinker.states)]
    return thinker, codes, pool


def assert_same_codes(ours, ref, margins, label):
    for step, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            assert margins[step] < MARGIN, (
                f"{label}: code {step} differs ({a} vs {b}) with reference top-2 margin {margins[step]:.2e}")
            print(f"{label}: code {step} excused: reference top-2 margin {margins[step]:.2e} < {MARGIN}")
            return
    assert ours == ref, f"{label}: codes differ ({len(ours)} vs {len(ref)} codes)"


@pytest.fixture(scope="module")
def reference_model(tiny_checkpoint):
    return load_reference(tiny_checkpoint)


@pytest.fixture(scope="module")
def generation(tiny_bundle):
    return load_manifest(tiny_bundle).generation


@pytest.fixture(scope="module")
def reference_run(reference_model, generation):
    return reference_speech(reference_model, [PROMPT, SHORT], generation["eos_token_ids"],
                            generation["pad_token_id"])


def test_greedy_codes_match_transformers(tiny, reference_run):
    checkpoint, bundle = tiny
    streamed = []
    thinker, codes, pool = runtime_speech(bundle, checkpoint, [PROMPT, SHORT], on_codes=streamed.extend)
    for row, (ref_reply, ref_codes, margins) in enumerate(reference_run):
        assert thinker.token_ids[row] == ref_reply
        assert len(ref_codes) == TALKER_NEW  # random weights: no eos within the limit (the eos case is below)
        assert_same_codes(codes[row], ref_codes, margins, f"tiny seed 0, row {row}")
    assert streamed == codes[0]
    assert not {"talker_decoder", "talker_embedding"} & set(pool.loaded)  # released after speech


def test_greedy_codes_stop_on_eos_like_transformers(tiny, tmp_path, reference_run, generation):
    """A checkpoint whose codec head gives the codec eos the logits of a code the talker picks
    early, so generation stops there: the stop id is not a code, the codes before it match."""
    from safetensors.numpy import load_file, save_file

    from omni_export.build.pipeline import build_bundle

    checkpoint, _ = tiny
    ref_codes = reference_run[0][1]
    model_dir = tmp_path / "model"
    shutil.copytree(checkpoint, model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    head = tensors["talker.codec_head.weight"]
    chosen, eos = ref_codes[5], 8294
    head[[chosen, eos]] = head[[eos, chosen]]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    bundle = build_bundle(model_dir, "fp32", tmp_path / "bundle")

    ref = reference_speech(load_reference(model_dir), [PROMPT, SHORT], generation["eos_token_ids"],
                           generation["pad_token_id"])
    thinker, codes, _ = runtime_speech(bundle, model_dir, [PROMPT, SHORT])
    assert len(ref[0][1]) < TALKER_NEW and eos not in ref[0][1]  # the reference row stopped on its eos
    for row, (ref_reply, ref_codes, margins) in enumerate(ref):
        assert thinker.token_ids[row] == ref_reply
        assert_same_codes(codes[row], ref_codes, margins, f"eos checkpoint, row {row}")


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
