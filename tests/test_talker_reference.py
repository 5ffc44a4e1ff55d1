"""The runtime's greedy talker against transformers 4.57.3's ``generate``: the released model's behaviour.

Which transformers is the oracle for what (docs/reference-versions.md): single forward passes of every
module against the installed 5.23 (the other parity tests); the talker's generation against 4.57.3
(``omni_export.testkit.reference_4_57``, a subprocess with ``make ref-env``'s directory first on the
path), called as a user calls it: ``generate(input_ids, attention_mask, speaker, return_audio=True,
thinker_do_sample=False, talker_do_sample=False)`` with the talker's other defaults.

Checkpoints: the tiny seed-0 model (its special prefill rows, codec pad/bos/eos/mask and the
speakers' bos, drawn at the thinker states' scale: ``tiny_model.special_rows``) and a copy whose
thinker lm_head gives ``<|im_end|>`` the row of the token the thinker first picks at reply step 3
of PROMPT (so that reply stops on eos) and whose codec head gives the codec eos the row of the code
the talker first picks at step 5 of SHORT (so that row's talker stops on eos). Every case must give
4.57.3's codes exactly: no near-tie excuse.

Pinned differences (each test says what its failure would mean):
- 5.23's generate, called the same way, hands the talker no attention mask, so its talker skips the
  codec pad/bos rows: other first-step logits and codes; everything else it builds for the talker is
  4.57.3's to the bit (its batch reply-stream rewrite changes nothing for one prompt);
- 4.57.3 hands token2wav ``talker_tokens[:-1]`` even when the talker stopped on length (the last
  code is dropped); the runtime (like 5.23) keeps every code then and drops only a stop id.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from omni_export.testkit import reference_4_57 as ref
from omni_runtime.bundle.manifest import load_manifest
from omni_runtime.bundle.sessions import SessionPool
from omni_runtime.stages import talker as talker_stage
from omni_runtime.stages.sampling import SamplingConfig
from omni_runtime.stages.talker import Talker
from omni_runtime.stages.thinker import ThinkerGenerator

THINKER_NEW = 12
TALKER_NEW = 48
PROMPT = [151644, 872, 198, 9707, 11, 1246, 525, 498, 30, 151645, 198, 151644, 77091, 198]
SHORT = [151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198]
SPEAKER = "Chelsie"
IM_END = 151645
CODEC_EOS = 8294
THINKER_STOP_STEP, TALKER_STOP_STEP = 3, 5
LOGITS_TOL = 1e-4  # onnxruntime fp32 against torch fp32, as the talker decoder's parity test
RECIPE = """schema_version: 2
name: thinker-talker
description: the graphs the talker's generation needs
modules:
  thinker: {weights: float32, method: none, embeddings: float32, lm_head: float32}
  talker: {weights: float32}
"""


def speaker_bos(checkpoint: Path, name: str = SPEAKER) -> int:
    return int(torch.load(checkpoint / "spk_dict.pt", weights_only=True)[name]["bos_token"])


class RecordingDecoder(talker_stage.KVDecoder):
    """The talker's KVDecoder, recording the logits of its first step (the prefill)."""

    first_logits: list[np.ndarray] = []

    def step(self, cache, embeds, position_ids, want_hidden=False):
        logits, hidden = super().step(cache, embeds, position_ids, want_hidden)
        if cache.length == embeds.shape[1]:  # the prefill: the cache was empty before
            RecordingDecoder.first_logits.append(np.array(logits, dtype=np.float32))
        return logits, hidden


def runtime_speech(bundle: Path, checkpoint: Path, prompt: list[int], monkeypatch) -> dict:
    """The runtime's greedy thinker, then its greedy talker: reply, finish reasons, codes, first logits."""
    manifest = load_manifest(bundle)
    pool = SessionPool(manifest, ["CPUExecutionProvider"])
    thinker = ThinkerGenerator(manifest, pool).generate([prompt], THINKER_NEW, SamplingConfig(), keep_states=True)
    monkeypatch.setattr(talker_stage, "KVDecoder", RecordingDecoder)
    RecordingDecoder.first_logits = []
    talker = Talker(manifest, pool)
    codes = talker.generate(thinker.states[0], speaker_bos(checkpoint), talker.default_sampling(do_sample=False),
                            max_new_tokens=TALKER_NEW)
    monkeypatch.undo()
    assert len(RecordingDecoder.first_logits) == 1
    return {"reply": thinker.token_ids[0], "thinker_finish": thinker.finish_reasons[0], "codes": codes,
            "first_logits": RecordingDecoder.first_logits[0]}


def request(checkpoint: Path, prompt: list[int], generation: dict, **kwargs) -> ref.Request:
    return ref.Request(checkpoint, prompt, THINKER_NEW, TALKER_NEW, speaker=SPEAKER,
                       thinker_eos_token_id=generation["eos_token_ids"],
                       thinker_pad_token_id=generation["pad_token_id"], **kwargs)


@pytest.fixture(scope="module")
def generation(tiny_bundle) -> dict:
    return load_manifest(tiny_bundle).generation


@pytest.fixture(scope="module")
def stop_case(tiny, tmp_path_factory):
    """(checkpoint, bundle) of the seed-0 copy whose thinker stops on eos for PROMPT and whose talker
    stops on eos for SHORT (rows chosen from the runtime's own greedy run on seed 0, which
    test_greedy_codes_equal_transformers_4_57 holds equal to 4.57.3's)."""
    from safetensors.numpy import load_file, save_file

    from omni_export.build.pipeline import build_bundle

    checkpoint, bundle = tiny
    manifest = load_manifest(bundle)
    pool = SessionPool(manifest, ["CPUExecutionProvider"])
    gen = ThinkerGenerator(manifest, pool)
    prompt_reply = gen.generate([PROMPT], THINKER_NEW, SamplingConfig()).token_ids[0]
    short = gen.generate([SHORT], THINKER_NEW, SamplingConfig(), keep_states=True)
    talker = Talker(manifest, pool)
    short_codes = talker.generate(short.states[0], speaker_bos(checkpoint), talker.default_sampling(do_sample=False),
                                  max_new_tokens=TALKER_NEW)
    token, code = prompt_reply[THINKER_STOP_STEP], short_codes[TALKER_STOP_STEP]
    assert token not in prompt_reply[:THINKER_STOP_STEP] and token not in short.token_ids[0], "pick another step"
    assert code not in short_codes[:TALKER_STOP_STEP], "pick another step"

    base = tmp_path_factory.mktemp("talker-stops")
    model = base / "model"
    shutil.copytree(checkpoint, model)
    tensors = load_file(model / "model.safetensors")
    for name, a, b in (("thinker.lm_head.weight", token, IM_END), ("talker.codec_head.weight", code, CODEC_EOS)):
        tensors[name][[a, b]] = tensors[name][[b, a]]
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    (base / "thinker-talker.yaml").write_text(RECIPE)
    return model, build_bundle(model, base / "thinker-talker.yaml", base / "bundle", memory_check=False)


#: case name -> (checkpoint fixture, prompt, expected thinker finish, expected talker finish)
CASES = {
    "prompt": ("tiny", PROMPT, "length", "length"),
    "short": ("tiny", SHORT, "length", "length"),
    "thinker-eos": ("stop_case", PROMPT, "eos", None),  # the talker may stop or not: whatever 4.57.3 does
    "talker-eos": ("stop_case", SHORT, "length", "eos"),
}


@pytest.fixture(scope="module")
def reference(tiny, stop_case, generation):
    """Every case (and PROMPT without attention_mask) through 4.57.3, in one subprocess."""
    cases = {"tiny": tiny, "stop_case": stop_case}
    requests = [request(cases[fixture][0], prompt, generation) for fixture, prompt, _, _ in CASES.values()]
    requests.append(request(tiny[0], PROMPT, generation, attention_mask=False))
    runs = ref.generate(requests)
    return dict(zip([*CASES, "prompt-no-mask"], runs))


def test_reference_environment_is_transformers_4_57_3(reference):
    for run in reference.values():
        assert run.transformers_version == "4.57.3"
        assert Path(run.transformers_file).resolve().is_relative_to(ref.check_env().resolve())
        assert run.torch_version == torch.__version__  # torch (and numpy, safetensors) come from .venv


def test_a_missing_reference_environment_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(ref.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(ref.ReferenceEnvError, match="no transformers 4.57.3") as err:
        ref.generate([])
    assert "make ref-env" in err.value.fix and err.value.path == str(tmp_path / "nowhere")


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_codes_equal_transformers_4_57(case, tiny, stop_case, reference, monkeypatch):
    fixture, prompt, thinker_finish, talker_finish = CASES[case]
    checkpoint, bundle = {"tiny": tiny, "stop_case": stop_case}[fixture]
    want = reference[case]
    assert want.thinker_finish == thinker_finish
    assert talker_finish is None or want.talker_finish == talker_finish
    ours = runtime_speech(bundle, checkpoint, prompt, monkeypatch)
    assert ours["reply"] == want.reply and ours["thinker_finish"] == want.thinker_finish
    stop = want.talker_tokens[-1:] if want.talker_finish == "eos" else []
    assert ours["codes"] + stop == want.talker_tokens, (
        f"{case}: codes differ from 4.57.3's at code "
        f"{next((k for k, (a, b) in enumerate(zip(ours['codes'], want.talker_tokens)) if a != b), None)}")
    assert len(ours["codes"]) == (TALKER_NEW if want.talker_finish == "length" else len(want.talker_tokens) - 1)
    np.testing.assert_allclose(ours["first_logits"], want.first_logits, rtol=0, atol=LOGITS_TOL)


def test_a_call_without_attention_mask_is_the_same_in_4_57(reference):
    """4.57.3's talker.generate makes an all-ones mask when none is given (its pad id is its eos, so none
    is inferred), so a user who leaves attention_mask out still gets the codec rows."""
    with_mask, without = reference["prompt"], reference["prompt-no-mask"]
    assert without.talker_tokens == with_mask.talker_tokens
    np.testing.assert_array_equal(without.first_logits, with_mask.first_logits)


def test_4_57_drops_the_last_code_on_a_length_stop(reference):
    """Pinned: 4.57.3's generate hands token2wav ``talker_tokens[:-1]`` (it assumes a stop id last), so a
    talker stopped on length loses its last code there; the runtime keeps it (as 5.23 does), so
    ``max_speech_seconds`` gives exactly S * 50 codes. On an eos stop both drop only the stop id."""
    for case in ("prompt", "short"):
        run = reference[case]
        assert run.talker_finish == "length" and len(run.talker_tokens) == TALKER_NEW
        assert run.token2wav_codes == run.talker_tokens[:-1]
    run = reference["talker-eos"]
    assert run.token2wav_codes == run.talker_tokens[:-1] and run.talker_tokens[-1] == CODEC_EOS


@pytest.fixture(scope="module")
def model_5_23(tiny_checkpoint):
    from transformers import Qwen2_5OmniForConditionalGeneration

    return Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="sdpa",
                                                                 dtype="float32").eval()


def generate_5_23(model, prompt: list[int], generation: dict, hand_back_mask: bool) -> dict:
    """5.23's generate called as 4.57.3's is; ``hand_back_mask`` passes the talker the all-ones mask
    5.23 drops (what the released code does). Records what the talker got and its first logits."""
    recorded = {"masks": []}
    talker_generate, talker_forward = model.talker.generate, model.talker.forward
    talker_prepare = model.talker.prepare_inputs_for_generation

    def recording_generate(*args, **kwargs):
        recorded["prefill_embeds"] = kwargs["inputs_embeds"].detach().clone()
        recorded["reply_part"] = kwargs["thinker_reply_part"].detach().clone()
        out = talker_generate(*args, **kwargs, output_logits=True, return_dict_in_generate=True)
        recorded["tokens"] = out.sequences[0, kwargs["input_ids"].shape[1]:].tolist()
        recorded["first_logits"] = out.logits[0][0].float().numpy()
        return out.sequences

    @functools.wraps(talker_forward)
    def recording_forward(*args, **kwargs):
        recorded["masks"].append(kwargs.get("attention_mask"))
        return talker_forward(*args, **kwargs)

    @functools.wraps(talker_prepare)
    def prepare(input_ids, *args, **kwargs):
        if hand_back_mask and kwargs.get("attention_mask") is None:
            kwargs["attention_mask"] = torch.ones_like(input_ids)
        return talker_prepare(input_ids, *args, **kwargs)

    ids = torch.tensor([prompt])
    model.talker.generate, model.talker.forward = recording_generate, recording_forward
    model.talker.prepare_inputs_for_generation = prepare
    model.token2wav.forward = lambda code, **kwargs: torch.zeros(code.shape[1] * 480)
    try:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), speaker=SPEAKER,
                           thinker_max_new_tokens=THINKER_NEW, thinker_do_sample=False, talker_do_sample=False,
                           talker_max_new_tokens=TALKER_NEW, thinker_eos_token_id=generation["eos_token_ids"],
                           thinker_pad_token_id=generation["pad_token_id"])
    finally:
        del model.talker.generate, model.talker.forward, model.talker.prepare_inputs_for_generation
        del model.token2wav.forward
    return recorded


def test_transformers_5_23_generate_skips_the_codec_rows(model_5_23, reference, generation):
    """Pinned: why 5.23's generate is not the talker's oracle. Called as a user calls it, its talker's
    prefill forward gets no attention mask, so it skips the codec pad/bos rows: its first-step logits
    and codes are not 4.57.3's. Everything else it hands the talker (prefill embeddings, the reply
    stream with the text eos and pads) is 4.57.3's exactly, and with the mask handed back its talker
    is 4.57.3's. If this test fails because 5.23 passes the mask again, 5.23 may be the oracle again."""
    want = reference["prompt"]
    plain = generate_5_23(model_5_23, PROMPT, generation, hand_back_mask=False)
    assert plain["masks"][0] is None, "5.23 hands the talker a mask again: see docs/reference-versions.md"
    np.testing.assert_array_equal(plain["prefill_embeds"][0].numpy(), want.prefill_embeds)
    np.testing.assert_array_equal(plain["reply_part"][0].numpy(), want.reply_part)
    gap = float(np.abs(plain["first_logits"] - want.first_logits).max())
    assert gap > 100 * LOGITS_TOL, gap  # 0.47 on seed 0 with the special rows at the states' scale
    assert plain["tokens"][0] != want.talker_tokens[0]

    handed = generate_5_23(model_5_23, PROMPT, generation, hand_back_mask=True)
    assert handed["masks"][0] is not None
    np.testing.assert_allclose(handed["first_logits"], want.first_logits, rtol=0, atol=1e-5)
    assert handed["tokens"] == want.talker_tokens
