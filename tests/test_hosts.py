"""The C++ and C# hosts (runtime/cpp ``build/hosts/omni-host``, runtime/csharp ``build/hosts/OmniHost.exe``
under mono) against the Python runtime, on tiny bundles; every test runs for both hosts.

The host runs a bundle from its manifest alone (docs/hosts.md); tokenization stays in Python
(``omni-export tokenize`` writes the expanded prompt ids and, for media, the encoders' prepared
inputs). The Python runtime (``OmniRunner.chat``) is the reference, with the same settings the
host's flags select:

- greedy token ids: exactly equal, for a text prompt (also one longer than the 256-token prefill
  chunk, with a repetition penalty, and on an awq bundle) and for an audio + image prompt (the host computes the
  TMRoPE positions and rope delta itself from the grids and audio lengths);
- seeded sampling: the host draws from numpy's PCG64 stream of the same seed, so the sampled ids
  are equal (a draw could only differ on a float32 rounding tie of the softmax, ~1e-7 per step);
- speech on a tiny checkpoint whose talker speaks token2wav's codebook (as test_speech_generate.py
  builds it): codes exactly equal, the WAV within 1e-4 of the runtime's waveform, whole (RK4) and
  streamed (the official chunks, Euler), from the noise ``tokenize --noise-seed`` writes (the
  runtime's ``numpy.random.default_rng(seed)`` rows) or, without that file, from the hosts' own
  draws of numpy's float32 standard normal stream (PCG64 + numpy's ziggurat) for the same seed;
- bad input: one ``error:`` message on stderr, exit code 2, no traceback, no WAV.

The hosts are built with ``make hosts`` (npm headers, the wheel's libonnxruntime, g++/cmake,
nlohmann-json3-dev, libssl-dev, mono-mcs). Without that toolchain the tests skip, saying what is missing;
CI installs it and sets OMNI_REQUIRE_HOSTS=1, which turns a missing toolchain into a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, link_copy
from omni_runtime.runner import OmniRunner
from omni_runtime.stages.sampling import SamplingConfig

HOSTS = ROOT / "build" / "hosts"
HOST = HOSTS / "omni-host"
CSHARP_HOST = HOSTS / "OmniHost.exe"
NEW_TOKENS = 12
WAV_TOL = 1e-4
DIT_CODEBOOK = 8194  # token2wav's codes are 0..num_embeds (8193)
GREEDY = SamplingConfig(do_sample=False)


def _missing_toolchain(kind: str) -> str | None:
    """Why the ``kind`` host (cpp, csharp) cannot be built here, or None."""
    for tool in ("g++", "cmake", "make", "cc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install g++ cmake make)"
    for header, package in (("/usr/include/nlohmann/json.hpp", "nlohmann-json3-dev"),
                            ("/usr/include/openssl/evp.h", "libssl-dev")):
        if not Path(header).exists():
            return f"{header} is missing (apt-get install {package})"
    if not (HOSTS / "include" / "onnxruntime_cxx_api.h").exists() and shutil.which("npm") is None:
        return "npm is not installed, so the ONNX Runtime headers cannot be fetched (apt-get install npm)"
    if kind == "csharp":
        for tool in ("mcs", "mono"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed (apt-get install mono-mcs)"
    return None


_BUILT: list[bool] = []


def _make_hosts() -> None:
    if not _BUILT:
        done = subprocess.run(["nice", "-n", "10", "make", "-s", "hosts"], cwd=ROOT, capture_output=True, text=True,
                              timeout=1200)
        assert done.returncode == 0, f"make hosts failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        _BUILT.append(True)


@pytest.fixture(scope="session", params=["cpp", "csharp"])
def host(request) -> list[str]:
    """The command of a host, built (incrementally) with ``make hosts``: ``build/hosts/omni-host`` (C++)
    or ``mono build/hosts/OmniHost.exe`` (C#)."""
    missing = _missing_toolchain(request.param)
    if missing is not None:
        if os.environ.get("OMNI_REQUIRE_HOSTS") == "1":
            pytest.fail(f"OMNI_REQUIRE_HOSTS=1 but the {request.param} host toolchain is missing: {missing}")
        pytest.skip(f"{request.param} host toolchain missing: {missing}")
    _make_hosts()
    if request.param == "cpp":
        assert HOST.exists()
        return [str(HOST)]
    assert CSHARP_HOST.exists()
    return ["mono", str(CSHARP_HOST)]


def run_host(host: list[str], *args, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([*host, *map(str, args)], capture_output=True, text=True, timeout=900)
    if check:
        assert done.returncode == 0, f"{host[-1]} failed ({done.returncode}):\n{done.stderr}"
    return done


def host_json(host: list[str], *args) -> dict:
    done = run_host(host, *args, "--json")
    return json.loads(done.stdout)


def ids_arg(ids) -> str:
    return ",".join(map(str, ids))


@pytest.fixture(scope="module")
def runner(tiny_bundle):
    return OmniRunner(tiny_bundle, device="cpu")


# ---------------------------------------------------------------------------------- text
@pytest.mark.parametrize("prompt, penalty", [
    ("Tell me about the sea.", None),
    (" ".join(["waves"] * 300), None),  # longer than the 256-token prefill chunk
    ("Tell me about the sea.", 1.3),
])
def test_text_greedy_ids_equal_python(host, tiny_bundle, runner, prompt, penalty):
    from omni_export.hosts import tokenize

    ids = tokenize(tiny_bundle, prompt).prompt_ids
    sampling = GREEDY if penalty is None else SamplingConfig(do_sample=False, repetition_penalty=penalty)
    expected = runner.chat(prompt, max_new_tokens=NEW_TOKENS, sampling=sampling)
    assert expected.prompt_ids == ids
    extra = () if penalty is None else ("--repetition-penalty", penalty)
    got = host_json(host, tiny_bundle, "--prompt-ids", ids_arg(ids), "--max-new-tokens", NEW_TOKENS, "--greedy", *extra)
    assert got["prompt_ids"] == ids
    assert got["token_ids"] == expected.token_ids
    assert got["finish_reason"] == expected.finish_reason
    assert got["codes"] is None


def test_default_limit_is_clamped_to_the_context(host, tiny_bundle, runner):
    """Without --max-new-tokens the bundle's default (512) is shortened to fit the context."""
    context = runner.context_length
    ids = [100] * (context - 3)
    got = host_json(host, tiny_bundle, "--prompt-ids", ids_arg(ids), "--greedy")
    assert len(got["token_ids"]) <= 3
    assert got["finish_reason"] in ("context", "eos")
    if got["finish_reason"] == "context":
        assert len(got["token_ids"]) == 3


def test_seeded_sampling_equals_python(host, tiny_bundle, runner):
    from omni_export.hosts import tokenize

    prompt = "Tell me about the sea."
    ids = tokenize(tiny_bundle, prompt).prompt_ids
    for seed, flags, sampling in (
        (3, (), SamplingConfig(do_sample=True, top_k=50)),  # the bundle's defaults with --sample
        (11, ("--temperature", 0.7, "--top-p", 0.9), SamplingConfig(do_sample=True, temperature=0.7, top_k=50,
                                                                    top_p=0.9)),
    ):
        expected = runner.chat(prompt, max_new_tokens=NEW_TOKENS, sampling=sampling, seed=seed)
        got = host_json(host, tiny_bundle, "--prompt-ids", ids_arg(ids), "--max-new-tokens", NEW_TOKENS, "--sample",
                        "--seed", seed, *flags)
        assert got["token_ids"] == expected.token_ids, (seed, flags)


@pytest.fixture(scope="module")
def awq_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint built with the awq recipe (int4 MatMulNBits, accuracy_level 4 in the session config)."""
    from omni_export.build.pipeline import build_bundle

    return build_bundle(tiny_checkpoint, "awq", tmp_path_factory.mktemp("host-awq") / "bundle")


def test_awq_bundle_greedy_ids_equal_python(host, awq_bundle):
    from omni_export.hosts import tokenize

    prompt = "Tell me about the sea."
    ids = tokenize(awq_bundle, prompt).prompt_ids
    expected = OmniRunner(awq_bundle, device="cpu").chat(prompt, max_new_tokens=NEW_TOKENS, sampling=GREEDY)
    got = host_json(host, awq_bundle, "--prompt-ids", ids_arg(ids), "--max-new-tokens", NEW_TOKENS, "--greedy")
    assert got["token_ids"] == expected.token_ids
    assert got["finish_reason"] == expected.finish_reason


# ---------------------------------------------------------------------------------- media
@pytest.fixture(scope="module")
def media_files(tmp_path_factory):
    from omni_export.testkit import media

    folder = tmp_path_factory.mktemp("host-media")
    audio = media.write_audio(folder / "tone.wav", media.tone(1.7, freqs=(330.0, 660.0)), 16000)
    image = media.write_image(folder / "picture.png", 160, 120)
    return audio, image


def test_audio_image_prompt_equals_python(host, tiny_bundle, runner, media_files, tmp_path):
    from omni_export.hosts import tokenize

    audio, image = media_files
    prompt = "What do you hear and see?"
    tokenized = tokenize(tiny_bundle, prompt, audio=[str(audio)], image=[str(image)], out=tmp_path / "inputs")
    messages = [{"role": "user", "content": [{"type": "audio", "audio": str(audio)},
                                             {"type": "image", "image": str(image)},
                                             {"type": "text", "text": prompt}]}]
    expected = runner.chat(messages=messages, max_new_tokens=NEW_TOKENS, sampling=GREEDY)
    assert tokenized.prompt_ids == expected.prompt_ids
    inputs = json.loads(tokenized.inputs.read_text())
    assert set(inputs["encoders"]) == {"audio_encoder", "vision_encoder"}
    assert inputs["rope"]["image_grid_thw"] and inputs["rope"]["audio_seqlens"]
    # the TMRoPE positions differ from text positions here (an image grid), so the delta is not 0
    prepared = runner.prompt_inputs(messages=messages)
    assert prepared.rope_delta != 0
    got = host_json(host, tiny_bundle, "--inputs", tokenized.inputs, "--max-new-tokens", NEW_TOKENS, "--greedy")
    assert got["prompt_ids"] == expected.prompt_ids
    assert got["token_ids"] == expected.token_ids
    assert got["finish_reason"] == expected.finish_reason


# ---------------------------------------------------------------------------------- speech
@pytest.fixture(scope="module")
def speech_bundle(tmp_path_factory) -> Path:
    """A tiny checkpoint with audible token2wav weights whose talker speaks only token2wav's codebook
    (codec head rows >= 8194 zeroed), built fp32 (as test_speech_generate.py's ``speech_checkpoint``)."""
    from safetensors.numpy import load_file, save_file

    from omni_export.build.pipeline import build_bundle
    from omni_export.testkit.tiny_model import write_tiny_checkpoint
    from omni_export.testkit.token2wav_refs import loud_checkpoint

    base = tmp_path_factory.mktemp("host-speech")
    tiny = write_tiny_checkpoint(base / "tiny", preset="tiny", seed=31)
    model = loud_checkpoint(Path(tiny), base / "model", seed=31)
    shutil.rmtree(base / "tiny")
    tensors = load_file(model / "model.safetensors")
    tensors["talker.codec_head.weight"][DIT_CODEBOOK:] = 0.0
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    return build_bundle(model, "fp32", base / "bundle", memory_check=False)


@pytest.mark.parametrize("stream, noise_file", [(False, True), (True, True), (False, False), (True, False)],
                         ids=["whole-rk4-noise-file", "streamed-euler-noise-file", "whole-rk4-seed",
                              "streamed-euler-seed"])
def test_speech_codes_and_wav_equal_python(host, speech_bundle, tmp_path, stream, noise_file):
    """With ``tokenize --noise-seed 5`` (the noise rows as a file) or without a file, where the host
    draws numpy's standard normal stream itself from the noise seed (0 when greedy: no --seed)."""
    import soundfile

    from omni_export.hosts import tokenize

    prompt, codes_limit = "Say something nice about the sea.", 130 if stream else 40
    seed = 5 if noise_file else 0
    tokenized = tokenize(speech_bundle, prompt, out=tmp_path / "inputs", noise_seed=seed if noise_file else None,
                         noise_frames=2 * codes_limit if noise_file else None)
    runner = OmniRunner(speech_bundle, device="cpu")
    expected = runner.chat(prompt, max_new_tokens=NEW_TOKENS, sampling=GREEDY, speech=True, stream=stream,
                           talker_sampling=runner.default_talker_sampling(False),
                           talker_max_new_tokens=codes_limit, noise_seed=seed)
    wav = tmp_path / "host.wav"
    got = host_json(host, speech_bundle, "--inputs", tokenized.inputs, "--max-new-tokens", NEW_TOKENS, "--greedy",
                    "--wav", wav, "--talker-max-new-tokens", codes_limit, *(("--stream-audio",) if stream else ()))
    assert got["token_ids"] == expected.token_ids
    assert len(expected.codes) > (60 if stream else 0)  # streamed: more than one DiT chunk
    assert got["codes"] == expected.codes
    assert got["speech_finish_reason"] == expected.speech_finish_reason
    audio, rate = soundfile.read(wav, dtype="float32")
    assert rate == expected.sample_rate == 24000
    assert audio.shape == expected.audio.shape
    assert np.abs(expected.audio).mean() > 0.01  # audible: the tolerance means something
    np.testing.assert_allclose(audio, expected.audio, rtol=0, atol=WAV_TOL)


# ---------------------------------------------------------------------------------- bad input
def _edit(bundle: Path, change) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _bad_cases(tiny_bundle: Path, tmp: Path, context: int):
    ok_ids = "151644,8948,198"
    yield "missing bundle", [tmp / "nowhere", "--prompt-ids", ok_ids], "does not exist"
    old = link_copy(tiny_bundle, tmp / "old")
    _edit(old, lambda d: d.update(schema_version=1))
    yield "schema version", [old, "--prompt-ids", ok_ids], "schema_version"
    leaving = link_copy(tiny_bundle, tmp / "leaving")

    def escape(d):
        d["graphs"]["thinker_decoder"]["file"] = "../thinker_decoder.onnx"
    _edit(leaving, escape)
    yield "path leaving the bundle", [leaving, "--prompt-ids", ok_ids], "'..'"
    symlinked = link_copy(tiny_bundle, tmp / "symlinked")
    outside = tmp / "outside.json"
    outside.write_text((symlinked / "tokenizer.json").read_text())
    (symlinked / "tokenizer.json").unlink()
    (symlinked / "tokenizer.json").symlink_to(outside)
    yield "symlink leaving the bundle", [symlinked, "--prompt-ids", ok_ids], "outside the bundle"
    corrupt = link_copy(tiny_bundle, tmp / "corrupt")

    def flip(d):
        entry = d["files"]["thinker_embedding.onnx.data"]
        entry["sha256"] = ("0" if entry["sha256"][0] != "0" else "1") + entry["sha256"][1:]
    _edit(corrupt, flip)
    yield "sha256 mismatch", [corrupt, "--prompt-ids", ok_ids], "sha256 mismatch"
    yield "id out of vocabulary", [tiny_bundle, "--prompt-ids", "1,152064,3"], "outside the vocabulary"
    yield "negative id", [tiny_bundle, "--prompt-ids", "1,-4"], "outside the vocabulary"
    yield "prompt longer than context", [tiny_bundle, "--prompt-ids", ",".join(["7"] * context)], "context"
    yield "max-new-tokens over the context", [tiny_bundle, "--prompt-ids", ",".join(["7"] * (context - 2)),
                                               "--max-new-tokens", 5], "at most 2 new tokens"
    yield "not an id", [tiny_bundle, "--prompt-ids", "1,x"], "invalid integer"
    yield "unknown flag", [tiny_bundle, "--prompt-ids", ok_ids, "--bogus"], "unknown option"
    yield "unknown speaker", [tiny_bundle, "--prompt-ids", ok_ids, "--wav", tmp / "x.wav", "--speaker", "Nobody"], \
        "unknown speaker"
    yield "missing inputs file", [tiny_bundle, "--inputs", tmp / "none.json"], "cannot read the inputs file"


def test_bad_input_one_message_exit_2(host, tiny_bundle, runner, tmp_path):
    for name, args, needle in _bad_cases(tiny_bundle, tmp_path, runner.context_length):
        before = {p.name for p in tmp_path.iterdir()}
        done = run_host(host, *args, check=False)
        assert done.returncode == 2, (name, done.returncode, done.stderr)
        assert done.stderr.startswith("error: "), (name, done.stderr)
        assert needle in done.stderr, (name, done.stderr)
        assert done.stderr.count("error:") == 1 and "Traceback" not in done.stderr, (name, done.stderr)
        assert done.stdout == "", (name, done.stdout)
        after = {p.name for p in tmp_path.iterdir()}
        assert not [n for n in after - before if n.endswith((".wav", ".partial"))], (name, after - before)


def test_sha256_mismatch_leaves_no_wav(host, speech_bundle, tmp_path):
    corrupt = link_copy(speech_bundle, tmp_path / "corrupt")

    def flip(d):
        entry = d["files"]["token2wav_bigvgan.onnx.data"]
        entry["sha256"] = ("0" if entry["sha256"][0] != "0" else "1") + entry["sha256"][1:]
    _edit(corrupt, flip)
    wav = tmp_path / "out.wav"
    done = run_host(host, corrupt, "--prompt-ids", "151644,8948,198", "--max-new-tokens", 4, "--greedy", "--wav", wav,
                    "--talker-max-new-tokens", 8, check=False)
    assert done.returncode == 2 and "sha256 mismatch" in done.stderr, done.stderr
    assert not wav.exists() and not list(tmp_path.glob(".out.wav.*"))


# ---------------------------------------------------------------------------------- tokenize CLI
def test_tokenize_and_detokenize_commands(tiny_bundle, runner, tmp_path):
    from conftest import run_cli

    done = run_cli("tokenize", tiny_bundle, "--prompt", "Hello there", "--json")
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["prompt_ids"] == runner.chat("Hello there", max_new_tokens=1, sampling=GREEDY).prompt_ids
    text = runner.tokenizer.decode(body["prompt_ids"], skip_special_tokens=True)
    done = run_cli("detokenize", tiny_bundle, ids_arg(body["prompt_ids"]))
    assert done.returncode == 0, done.stderr
    assert done.stdout == text + "\n"
    done = run_cli("detokenize", tiny_bundle, "1,999999999")
    assert done.returncode == 2 and "outside the vocabulary" in done.stderr
    done = run_cli("tokenize", tiny_bundle, "--prompt", "Hi", "--image", tmp_path / "none.png")
    assert done.returncode == 2 and "--out" in done.stderr
