"""Speech out end to end: ``OmniRunner.chat(speech=True)`` / ``speak()`` and ``run --wav`` against
transformers' ``Qwen2_5OmniForConditionalGeneration.generate``.

Reference: transformers 4.57.3's whole generate (``omni_export.testkit.reference_4_57``, the oracle for
the talker's generation: the released model's behaviour, docs/reference-versions.md) with
``thinker_do_sample=False`` and ``talker_do_sample=False`` (the talker keeps its repetition penalty
1.05), speaker Chelsie, on one prompt with its attention mask, as a user calls it: the text ids and
codes. The waveform is a module forward, so it comes from the installed 5.23's token2wav on those
codes, from the noise the runtime documents for a seed
(``numpy.random.default_rng(seed).standard_normal((frames, 80))`` in place of ``torch.randn``).
The codes compared are the talker's (its stop id removed): on a length stop 4.57.3 hands token2wav
one code fewer (pinned in test_talker_reference.py).

The checkpoints are tiny random models with two changes both sides read (``speech_checkpoint``):
token2wav weights redrawn at audible scale (``token2wav_refs.loud_checkpoint``: the tiny
model's give ~1e-7 waveforms, where 1e-3 proves nothing), and the talker's codec head rows of
the ids token2wav cannot take (8194.. 8447: the codec's special ids and unused ids) zeroed, so
the talker speaks token2wav's codebook (a random head picks those ids too, and transformers'
token2wav then fails on them). For the command-line case the codec eos row is swapped with the
row of a code the talker first picks late, so generation stops on the eos there.

Streaming: the chunks ``on_audio`` receives equal ``Token2Wav.stream`` on the same codes (that
one is tested against the official chunked algorithm in torch in test_token2wav_parity.py), and
the first chunk comes out before the talker has finished: checked on the order of events
recorded by the talker's code callback and ``on_audio``, not on times.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from omni_runtime.errors import BundleError, InputError
from omni_runtime.runner import OmniRunner
from omni_runtime.stages.sampling import SamplingConfig
from omni_runtime.stages.talker import Talker
from omni_runtime.stages.token2wav import Token2Wav

from conftest import run_cli
from omni_export.testkit import reference_4_57
from omni_export.testkit.token2wav_refs import loud_checkpoint, reference_model, torch_threads

TOL = 1e-3
MEL = 80
DIT_CODEBOOK = 8194  # token2wav's codes are 0..num_embeds (8193)
CODEC_EOS = 8294
SPEAKER = "Chelsie"
PROMPT = "Say something nice about the sea."
THINKER_NEW = 12
API_SEED, CLI_SEED = 21, 23  # tiny checkpoints no other test builds
GREEDY = SamplingConfig(do_sample=False)
TALKER_THREAD = "omni-runtime-talker"


# ---------------------------------------------------------------------------------- references
def speech_checkpoint(base: Path, seed: int) -> Path:
    """A tiny checkpoint (``seed``) with audible token2wav weights whose talker speaks only token2wav's
    codebook (codec head rows >= 8194 zeroed: their logits are 0, below the best of 8194 random ones)."""
    from safetensors.numpy import load_file, save_file

    from omni_export.testkit.tiny_model import write_tiny_checkpoint

    tiny = write_tiny_checkpoint(base / "tiny", preset="tiny", seed=seed)
    model = loud_checkpoint(Path(tiny), base / "model", seed=seed)
    shutil.rmtree(base / "tiny")
    tensors = load_file(model / "model.safetensors")
    tensors["talker.codec_head.weight"][DIT_CODEBOOK:] = 0.0
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    return model


def swap_codec_rows(src: Path, dst: Path, code: int) -> Path:
    """A copy of ``src`` whose codec head gives the codec eos the row of ``code`` (and ``code`` the zero row)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    head = tensors["talker.codec_head.weight"]
    head[[code, CODEC_EOS]] = head[[CODEC_EOS, code]]
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def build(model: Path, out: Path) -> Path:
    from omni_export.build.pipeline import build_bundle

    return build_bundle(model, "fp32", out, memory_check=False)


def hf_prompt_ids(checkpoint: Path, prompt: str) -> list[int]:
    """The chat prompt from transformers' tokenizer and the checkpoint's chat template."""
    from transformers import AutoTokenizer

    from omni_runtime.prompt.chat import DEFAULT_SYSTEM_PROMPT, build_messages

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    messages = build_messages(prompt, system=DEFAULT_SYSTEM_PROMPT)
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


@contextlib.contextmanager
def seeded_noise(seed: int):
    """``torch.randn([1, frames, 80])`` returns the runtime's documented noise for ``seed``."""
    real = torch.randn

    def fake(*size, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (list, tuple, torch.Size)) else size
        assert len(shape) == 3 and shape[0] == 1 and shape[2] == MEL, shape
        rows = np.random.default_rng(seed).standard_normal((shape[1], MEL), dtype=np.float32)
        return torch.from_numpy(rows)[None].to(kwargs.get("dtype") or torch.float32)

    torch.randn = fake
    try:
        yield
    finally:
        torch.randn = real


def reference_codes(checkpoint: Path, prompt_ids: list[int], eos: list[int], pad: int,
                    talker_new: int | None = None) -> tuple[list[int], list[int]]:
    """transformers 4.57.3's generate, greedy thinker and talker: (reply ids, codes without the stop id)."""
    run = reference_4_57.generate([reference_4_57.Request(
        checkpoint, prompt_ids, THINKER_NEW, talker_new, speaker=SPEAKER, thinker_eos_token_id=eos,
        thinker_pad_token_id=pad)])[0]
    return run.reply, run.talker_tokens[:-1] if run.talker_finish == "eos" else run.talker_tokens


def reference_speech(checkpoint: Path, model, prompt_ids: list[int], eos: list[int], pad: int, noise_seed: int,
                     talker_new: int | None = None):
    """(reply ids, codes) of :func:`reference_codes` and the waveform of ``model``'s (5.23) token2wav on
    those codes from the runtime's noise for ``noise_seed``."""
    reply, codes = reference_codes(checkpoint, prompt_ids, eos, pad, talker_new)
    speaker = model.speaker_map[SPEAKER]
    with seeded_noise(noise_seed), torch.no_grad(), torch_threads():
        waveform = model.token2wav(torch.tensor([codes]), conditioning=speaker["cond"].float(),
                                   reference_mel=speaker["ref_mel"].float())
    return reply, codes, waveform.reshape(-1).numpy()


def talker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == TALKER_THREAD]


def speech_sessions(pool) -> set[str]:
    return {name for name in pool.loaded if name.startswith(("talker", "token2wav"))}


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def api_case(tmp_path_factory):
    """(checkpoint, bundle, transformers model) for the API tests: no eos, the talker is bounded."""
    base = tmp_path_factory.mktemp(f"speech-seed{API_SEED}")
    model_dir = speech_checkpoint(base, API_SEED)
    return model_dir, build(model_dir, base / "bundle"), reference_model(model_dir)


@pytest.fixture(scope="module")
def runner(api_case):
    return OmniRunner(api_case[1], device="cpu")


@pytest.fixture(scope="module")
def greedy_talker(runner):
    return runner.default_talker_sampling(do_sample=False)


# ---------------------------------------------------------------------------------- whole generate
def test_chat_speech_equals_transformers_generate(api_case, runner, greedy_talker):
    """chat(speech=True), unstreamed (RK4, one token2wav run): transformers' text ids, codes and
    waveform (<= 1e-3) for the same noise; the speech sessions are released after."""
    checkpoint, _, model = api_case
    talker_new = 70
    result = runner.chat(PROMPT, max_new_tokens=THINKER_NEW, sampling=GREEDY, speech=True,
                         talker_sampling=greedy_talker, talker_max_new_tokens=talker_new, solver="rk4",
                         noise_seed=7)
    gen = runner.manifest.generation
    assert result.prompt_ids == hf_prompt_ids(checkpoint, PROMPT)
    reply, codes, waveform = reference_speech(checkpoint, model, result.prompt_ids, gen["eos_token_ids"],
                                              gen["pad_token_id"], noise_seed=7, talker_new=talker_new)
    assert result.token_ids == reply
    assert len(codes) == talker_new  # the zeroed eos row: no stop, the limit ends the codes
    assert result.codes == codes
    assert result.sample_rate == 24000 and result.speaker == SPEAKER
    assert result.audio.dtype == np.float32 and result.audio.shape == waveform.shape == (talker_new * 2 * 240,)
    assert np.abs(waveform).mean() > 0.05  # audible: 1e-3 means something
    np.testing.assert_allclose(result.audio, waveform, rtol=0, atol=TOL)
    assert result.audio_seconds == pytest.approx(talker_new * 2 * 240 / 24000)
    assert 0 < result.first_audio_seconds
    assert not speech_sessions(runner.pool)
    body = result.to_json()
    assert body["codes"] == codes and "audio" not in body and body["audio_seconds"] == result.audio_seconds
    json.dumps(body)


def test_text_chat_has_no_speech_fields(runner):
    result = runner.chat(PROMPT, max_new_tokens=3, sampling=GREEDY)
    assert result.codes is None and result.audio is None
    assert set(result.to_json()) == {"text", "prompt_ids", "token_ids", "finish_reason", "prompt"}
    assert not speech_sessions(runner.pool)


# ---------------------------------------------------------------------------------- streaming
class Events:
    """Events of the talker thread (each code) and of the caller (each audio chunk), in order."""

    def __init__(self):
        self.lock = threading.Lock()
        self.items: list[tuple] = []

    def add(self, *item):
        with self.lock:
            self.items.append(item)


@pytest.fixture
def recorded_talker(monkeypatch):
    """Talker.generate records ("code", n) per code and ("talker done",) when it returns."""
    events = Events()
    real = Talker.generate

    def generate(self, *args, on_codes=None, **kwargs):
        def record(new):
            for code in new:
                events.add("code", code)
            if on_codes is not None:
                on_codes(new)

        codes = real(self, *args, on_codes=record, **kwargs)
        events.add("talker done")
        return codes

    monkeypatch.setattr(Talker, "generate", generate)
    return events


STREAM_CODES = 150  # > 60 + 48 + 1: the talker cannot be done when the first chunk (after 60 codes) comes


def test_streamed_speech_equals_token2wav_stream_and_starts_before_the_talker_ends(runner, greedy_talker,
                                                                                  recorded_talker):
    events = recorded_talker
    chunks = []

    def on_audio(pcm, last):
        chunks.append((pcm.copy(), last))
        events.add("audio", len(pcm), last)

    result = runner.chat(PROMPT, max_new_tokens=THINKER_NEW, sampling=GREEDY, talker_sampling=greedy_talker,
                         talker_max_new_tokens=STREAM_CODES, noise_seed=3, on_audio=on_audio)
    kinds = [item[0] for item in events.items]
    first_audio, talker_done = kinds.index("audio"), kinds.index("talker done")
    assert first_audio < talker_done, "the first chunk came only after the talker had finished"
    assert kinds.count("code") == STREAM_CODES and "code" in kinds[first_audio:]  # codes still came after it
    assert [c for kind, *rest in events.items if kind == "code" for c in rest] == result.codes

    # the same chunks as token2wav's own streaming on the same codes (Euler, Chelsie, the same noise)
    t2w = Token2Wav(runner.manifest, runner.pool)
    expected = list(t2w.stream(result.codes, seed=3))
    assert len(chunks) == len(expected) > 2
    assert [last for _, last in chunks] == [False] * (len(chunks) - 1) + [True]
    for (pcm, _), (want, _) in zip(chunks, expected):
        assert pcm.dtype == np.float32
        np.testing.assert_allclose(pcm, want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(result.audio, np.concatenate([pcm for pcm, _ in chunks]))
    assert result.audio.shape == (STREAM_CODES * 2 * 240,)
    assert 0 < result.first_audio_seconds
    assert not speech_sessions(runner.pool) and not talker_threads()


def test_greedy_codes_do_not_depend_on_streaming(runner, greedy_talker):
    streamed = runner.chat(PROMPT, max_new_tokens=THINKER_NEW, sampling=GREEDY, talker_sampling=greedy_talker,
                           talker_max_new_tokens=80, noise_seed=3, speech=True, stream=True)
    whole = runner.chat(PROMPT, max_new_tokens=THINKER_NEW, sampling=GREEDY, talker_sampling=greedy_talker,
                        talker_max_new_tokens=80, noise_seed=3, speech=True)
    assert streamed.codes == whole.codes and len(whole.codes) == 80
    assert streamed.audio.shape == whole.audio.shape
    assert np.abs(streamed.audio - whole.audio).max() > 1e-3  # Euler in chunks vs RK4 at once: not the same audio


def test_speak_iterates_the_stream(runner, greedy_talker):
    texts = []
    kwargs = dict(max_new_tokens=THINKER_NEW, sampling=GREEDY, talker_sampling=greedy_talker,
                  talker_max_new_tokens=STREAM_CODES, noise_seed=3)
    chunks_api = []
    reference = runner.chat(PROMPT, on_audio=lambda pcm, last: chunks_api.append(pcm.copy()), **kwargs)
    with runner.speak(PROMPT, on_text=texts.append, **kwargs) as stream:
        assert stream.result is None
        got = list(stream)
    assert stream.result.codes == reference.codes and stream.result.text == reference.text == "".join(texts)
    assert [last for _, last in got] == [False] * (len(got) - 1) + [True]
    for (pcm, _), want in zip(got, chunks_api):
        np.testing.assert_allclose(pcm, want, rtol=0, atol=1e-6)
    assert not speech_sessions(runner.pool) and not talker_threads()


def test_closing_the_stream_early_stops_the_talker(runner, recorded_talker):
    stream = runner.speak(PROMPT, max_new_tokens=THINKER_NEW, sampling=GREEDY, talker_max_new_tokens=4096, seed=1)
    pcm, last = next(stream)
    assert not last and len(pcm) > 0 and talker_threads()
    stream.close()
    assert not talker_threads() and not speech_sessions(runner.pool)
    codes = sum(1 for item in recorded_talker.items if item[0] == "code")
    assert ("talker done",) not in recorded_talker.items and codes < 4096  # stopped, not run to the end
    assert stream.result is None


def test_an_error_in_on_audio_stops_the_talker(runner):
    def on_audio(pcm, last):
        raise RuntimeError("speaker unplugged")

    with pytest.raises(RuntimeError, match="speaker unplugged"):
        runner.chat(PROMPT, max_new_tokens=THINKER_NEW, sampling=GREEDY, talker_max_new_tokens=4096, seed=2,
                    on_audio=on_audio)
    assert not talker_threads() and not speech_sessions(runner.pool)


# ---------------------------------------------------------------------------------- errors
def text_only_copy(bundle: Path, dest: Path) -> Path:
    """A hard-linked copy of ``bundle`` whose manifest has no talker and no token2wav."""
    dest.mkdir()
    for path in bundle.rglob("*"):
        target = dest / path.relative_to(bundle)
        if path.is_dir():
            target.mkdir(exist_ok=True)
        elif path.name != "manifest.json":
            os.link(path, target)
    manifest = json.loads((bundle / "manifest.json").read_text())
    for name in [g for g in manifest["graphs"] if g.startswith(("talker", "token2wav"))]:
        del manifest["graphs"][name]
    for key in ("talker", "token2wav"):
        manifest["config"].pop(key, None)
    manifest["modules"]["built"] = [m for m in manifest["modules"]["built"] if m not in ("talker", "token2wav")]
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_bad_speech_arguments_fail_before_any_graph(api_case, tmp_path):
    fresh = OmniRunner(api_case[1], device="cpu")
    with pytest.raises(InputError) as err:
        fresh.chat(PROMPT, speech=True, speaker="Nobody")
    assert err.value.param == "speaker" and "Nobody" in err.value.problem and "Chelsie, Ethan" in err.value.fix
    with pytest.raises(InputError, match="solver") as err:
        fresh.chat(PROMPT, speech=True, solver="midpoint")
    assert "rk4, euler" in err.value.fix
    with pytest.raises(InputError, match="talker_max_new_tokens"):
        fresh.chat(PROMPT, speech=True, talker_max_new_tokens=0)
    with pytest.raises(InputError, match="talker_max_new_tokens"):  # more mel than one token2wav run takes
        fresh.chat(PROMPT, speech=True, talker_max_new_tokens=10 ** 6)
    with pytest.raises(InputError, match="talker_sampling"):
        fresh.chat(PROMPT, speech=True, talker_sampling="greedy")
    with pytest.raises(InputError, match="speaker only apply to speech"):
        fresh.chat(PROMPT, speaker="Ethan")
    with pytest.raises(InputError, match="on_audio"):
        fresh.chat(PROMPT, on_audio="out.wav")
    with pytest.raises(InputError, match="speaker"):
        fresh.speak(PROMPT, speaker="Nobody")  # checked when speak() is called, not at the first chunk
    assert fresh.pool.loaded == {}
    text_only = OmniRunner(text_only_copy(api_case[1], tmp_path / "text-only"), device="cpu")
    assert not text_only.has_speech and fresh.has_speech
    with pytest.raises(BundleError, match="no speech output") as err:
        text_only.chat(PROMPT, speech=True)
    assert err.value.path.endswith("manifest.json") and "text only" in err.value.fix
    assert text_only.chat(PROMPT, max_new_tokens=2).codes is None  # text still works
    assert "talker_decoder" not in text_only.pool.loaded


@pytest.fixture(scope="module")
def off_codebook_bundle(tiny_checkpoint, tmp_path_factory):
    """A tiny model whose codec head can only pick 8200 or 8201 (rows w and -w, every other row 0):
    codec ids token2wav has no entry for (a random talker, unlike a trained one, could emit them)."""
    from safetensors.numpy import load_file, save_file

    base = tmp_path_factory.mktemp("off-codebook")
    model = base / "model"
    shutil.copytree(tiny_checkpoint, model)
    tensors = load_file(model / "model.safetensors")
    head = tensors["talker.codec_head.weight"]
    row = head[5].copy()
    head[:] = 0
    head[8200], head[8201] = row, -row
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    return build(model, base / "bundle")


@pytest.mark.parametrize("stream", [False, True])
def test_a_talker_off_the_codebook_is_a_clear_error(off_codebook_bundle, stream):
    """A talker that picks codec ids token2wav has no entry for: a BundleError naming the code,
    sessions released, the talker thread gone."""
    tiny = OmniRunner(off_codebook_bundle, device="cpu")
    with pytest.raises(BundleError, match="outside token2wav's codebook 0..8193") as err:
        tiny.chat(PROMPT, max_new_tokens=4, sampling=GREEDY, speech=True, stream=stream, noise_seed=0)
    assert err.value.path.endswith("manifest.json")
    assert not talker_threads() and not speech_sessions(tiny.pool)


# ---------------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def cli_case(tmp_path_factory):
    """(checkpoint, bundle) whose greedy talker stops on the codec eos, for the command-line run: the
    eos gets the codec-head row of the last code the talker first picks within 120 codes."""
    base = tmp_path_factory.mktemp(f"speech-seed{CLI_SEED}")
    open_model = speech_checkpoint(base / "open", CLI_SEED)
    eos, pad = [151645, 151643], 151643  # the thinker's <|im_end|>, <|endoftext|> (manifest.generation)
    _, codes = reference_codes(open_model, hf_prompt_ids(open_model, PROMPT), eos, pad, talker_new=120)
    firsts = [k for k, code in enumerate(codes) if code not in codes[:k]]
    stop = firsts[-1]
    assert stop >= 30, firsts  # a long enough answer (more than one 24-code DiT block)
    model_dir = swap_codec_rows(open_model, base / "model", codes[stop])
    return model_dir, build(model_dir, base / "bundle"), stop


@pytest.mark.slow
def test_cli_wav_equals_transformers(cli_case, tmp_path):
    """`omni-export run BUNDLE --prompt ... --greedy --wav out.wav --json`: transformers' text ids,
    codes (stopped on the codec eos) and waveform (<= 1e-3, read back from the WAV file)."""
    import soundfile

    checkpoint, bundle, stop = cli_case
    out = tmp_path / "out dir" / "answer.wav"
    out.parent.mkdir()
    proc = run_cli("run", bundle, "--prompt", PROMPT, "--greedy", "--max-new-tokens", THINKER_NEW, "--wav", out,
                   "--json")
    assert proc.returncode == 0, proc.stderr
    body = json.loads(proc.stdout)
    assert body["wav"] == str(out) and sorted(os.listdir(out.parent)) == ["answer.wav"]
    gen = json.loads((bundle / "manifest.json").read_text())["generation"]
    assert body["prompt_ids"] == hf_prompt_ids(checkpoint, PROMPT)
    reply, codes, waveform = reference_speech(checkpoint, reference_model(checkpoint), body["prompt_ids"],
                                              gen["eos_token_ids"], gen["pad_token_id"],
                                              noise_seed=0)  # no --seed: noise seed 0
    assert body["token_ids"] == reply
    assert len(codes) == stop and CODEC_EOS not in codes  # transformers stopped on the eos too
    assert body["codes"] == codes
    audio, rate = soundfile.read(out, dtype="float32", always_2d=True)
    info = soundfile.info(out)
    assert rate == 24000 and audio.shape[1] == 1 and info.subtype == "FLOAT" and info.format == "WAV"
    assert audio.shape[0] == waveform.shape[0] == len(codes) * 2 * 240
    assert np.abs(waveform).mean() > 0.05
    np.testing.assert_allclose(audio[:, 0], waveform, rtol=0, atol=TOL)
    assert body["audio_seconds"] == pytest.approx(len(codes) * 480 / 24000)
    assert 0 < body["first_audio_seconds"] and body["speaker"] == SPEAKER and body["sample_rate"] == 24000


@pytest.mark.slow
def test_cli_stream_audio_and_speaker(cli_case, tmp_path):
    """--stream-audio writes the streamed waveform (token2wav.stream on the same codes), --speaker
    picks the voice, and without --json the text goes to stdout and a note to stderr."""
    import soundfile

    _, bundle, stop = cli_case
    out = tmp_path / "ethan.wav"
    # the eos row was placed for Chelsie's codes: Ethan's may never reach it, so his speech is bounded
    proc = run_cli("run", bundle, "--prompt", PROMPT, "--greedy", "--max-new-tokens", THINKER_NEW, "--wav", out,
                   "--speaker", "Ethan", "--stream-audio", "--max-speech-seconds", 2, "--json")
    assert proc.returncode == 0, proc.stderr
    body = json.loads(proc.stdout)
    assert body["speaker"] == "Ethan" and body["speech_finish_reason"] in ("eos", "seconds")
    assert 0 < len(body["codes"]) <= 100  # 2 s at 50 codes per second
    runner = OmniRunner(bundle, device="cpu")
    chelsie = runner.chat(PROMPT, max_new_tokens=THINKER_NEW, sampling=GREEDY, speech=True,
                          talker_sampling=runner.default_talker_sampling(do_sample=False))
    assert len(chelsie.codes) == stop
    n = min(len(chelsie.codes), len(body["codes"]))
    assert body["codes"][:n] != chelsie.codes[:n]  # Ethan's bos row: other codes
    expected = np.concatenate([pcm for pcm, _ in Token2Wav(runner.manifest, runner.pool).stream(
        body["codes"], "Ethan", seed=0)])
    audio, _ = soundfile.read(out, dtype="float32")
    np.testing.assert_allclose(audio, expected, rtol=0, atol=1e-6)
    proc = run_cli("run", bundle, "--prompt", PROMPT, "--greedy", "--max-new-tokens", THINKER_NEW, "--wav", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and f"wrote {out}" in proc.stderr


def test_cli_wav_error_mid_run_leaves_nothing(off_codebook_bundle, tmp_path):
    """An error after the work started (off-codebook codes): exit 2, no WAV and no temporary file."""
    out_dir = tmp_path / "wavs"
    out_dir.mkdir()
    proc = run_cli("run", off_codebook_bundle, "--prompt", "hi", "--greedy", "--max-new-tokens", 3, "--wav",
                   out_dir / "a.wav")
    assert proc.returncode == 2, proc.stderr
    assert "outside token2wav's codebook" in proc.stderr and "Traceback" not in proc.stderr
    assert list(out_dir.iterdir()) == []


def test_cli_ctrl_c_while_speaking_leaves_nothing(api_case, tmp_path):
    """SIGINT while the talker and token2wav stream: exit 130 promptly, no WAV, no temporary file."""
    out_dir = tmp_path / "wavs"
    out_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "omni_runtime.cli", "run", str(api_case[1]), "--prompt", PROMPT,
                             "--max-new-tokens", "4", "--wav", str(out_dir / "a.wav"), "--stream-audio"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"})
    try:
        assert proc.stdout.read(1), "no text came out"  # the thinker answered: speech is being made now
        time.sleep(0.5)
        assert proc.poll() is None, "the command ended before the signal"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(out_dir.iterdir()) == []


def test_write_wav_is_atomic(tmp_path, monkeypatch):
    """A failure or Ctrl-C while the file is written leaves neither the target nor the temporary file."""
    import soundfile

    from omni_runtime.cli import write_wav

    target = tmp_path / "a.wav"
    real = soundfile.write

    def interrupted(path, *args, **kwargs):
        Path(path).write_bytes(b"RIFF partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(soundfile, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_wav(str(target), np.zeros(240, np.float32), 24000)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(soundfile, "write", real)
    target.write_bytes(b"old")
    write_wav(str(target), np.linspace(-1, 1, 480, dtype=np.float32), 24000)
    audio, rate = soundfile.read(target, dtype="float32")
    assert rate == 24000 and np.array_equal(audio, np.linspace(-1, 1, 480, dtype=np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["a.wav"]
