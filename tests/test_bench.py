"""``omni-export bench`` on the tiny bundle: the table prints, the JSON has every field the issue
asks for with values that agree with each other, bad input is a clear error. No speed is
asserted (figures come from benchmark runs, not tests; docs/bench.md).

Consistency checked on the JSON: every figure is ``{median, min, max, runs}`` with min <= median
<= max and one run per repeat; the stages are the shared names, in request order, and only those
the request has; the thinker decode stage counts max_new_tokens - 1 tokens (the first comes
from the prefill) and the prefill the prompt's tokens; the speech codes and audio agree with
--max-speech-seconds (50 codes a second, 0.02 s each); the process peak is at least every
stage's peak of the same repeat; the first token comes before the first audio, and both within
the request.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli
from omni_export.bench import STAGES
from omni_export.testkit import media

REPEATS = 2
NEW_TOKENS = 4
SPEECH_SECONDS = 0.4  # 20 codes: one token2wav chunk
TOP_LEVEL = ("decode_ratio_vs_pytorch", "first_audio_seconds", "token2wav_rtf", "peak_rss_bytes", "memory_policy",
             "stages")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-media")
    return {"audio": media.write_audio(folder / "tone.wav", media.chirp(1.0), 16000),
            "image": media.write_image(folder / "picture.png", 84, 56),
            "folder": folder}


def bench(*args, timeout: float = 300):
    return run_cli("bench", *map(str, args), timeout=timeout)


def is_summary(value, runs: int) -> bool:
    return (isinstance(value, dict) and set(value) == {"median", "min", "max", "runs"} and len(value["runs"]) == runs
            and value["min"] <= value["median"] <= value["max"] and min(value["runs"]) == value["min"]
            and max(value["runs"]) == value["max"])


def summaries(node, path=""):
    """Every {median, min, max, runs} dict under ``node``, with its path."""
    if isinstance(node, dict):
        if "median" in node and "runs" in node:
            yield path, node
            return
        for key, value in node.items():
            if key != "runs":
                yield from summaries(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from summaries(value, f"{path}[{i}]")


@pytest.fixture(scope="module")
def lazy_run(tiny_bundle, files):
    out = files["folder"] / "bench.json"
    proc = bench(tiny_bundle, "--audio", files["audio"], "--image", files["image"], "--wav", "--repeats", REPEATS,
                 "--max-new-tokens", NEW_TOKENS, "--max-speech-seconds", SPEECH_SECONDS, "--json", out)
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(out.read_text())


def test_table_prints_every_stage(lazy_run):
    proc, _ = lazy_run
    for name in STAGES:
        assert name in proc.stdout
    for heading in ("session load s", "tok/s", "token2wav RTF", "peak RSS GB", "first audio s", "request"):
        assert heading in proc.stdout
    assert "wrote" in proc.stderr


def test_json_fields_and_consistency(lazy_run, files):
    _, result = lazy_run
    for key in TOP_LEVEL:
        assert key in result
    assert result["memory_policy"] == "lazy" and result["memory_policy_applied"] is True
    assert result["decode_ratio_vs_pytorch"] is None and result["pytorch"] is None  # no --model
    assert result["repeats"] == REPEATS and not result["failures"]
    for key in ("first_audio_seconds", "token2wav_rtf", "peak_rss_bytes", "request_seconds",
                "time_to_first_token_seconds", "session_load_seconds"):
        assert is_summary(result[key], REPEATS), key
    found = list(summaries(result))
    assert len(found) > 30
    for path, summary in found:
        assert is_summary(summary, REPEATS), path

    stages = {s["name"]: s for s in result["stages"]}
    assert [s["name"] for s in result["stages"]] == list(STAGES)  # audio + image + speech: all five, in order
    assert stages["thinker_decode"]["tokens"]["runs"] == [NEW_TOKENS - 1] * REPEATS
    assert stages["thinker_prefill"]["tokens"]["runs"] == result["prompt_tokens"]["runs"]
    assert stages["audio_encoder"]["tokens"]["median"] == 25  # 1 s of audio: 25 tokens
    assert stages["vision_encoder"]["tokens"]["median"] == 6  # 84x56 pixels: 3x2 tokens of 28x28
    speech = stages["speech"]
    codes = speech["codes"]["runs"]
    assert all(1 <= c <= SPEECH_SECONDS * 50 for c in codes)
    assert np.allclose(speech["audio_seconds"]["runs"], [c * 0.02 for c in codes])
    for i in range(REPEATS):
        for name, stage in stages.items():
            assert result["peak_rss_bytes"]["runs"][i] >= stage["peak_rss_bytes"]["runs"][i], name
        ttft = result["time_to_first_token_seconds"]["runs"][i]
        first_audio = result["first_audio_seconds"]["runs"][i]
        assert 0 < ttft < first_audio <= result["request_seconds"]["runs"][i]
    # the encoders' and the thinker's sessions are loaded in their own stages, the speech's in speech
    assert set(stages["thinker_prefill"]["sessions_loaded"]) >= {"thinker_embedding", "thinker_decoder"}
    assert {"talker_decoder", "token2wav_dit", "token2wav_bigvgan"} <= set(speech["sessions_loaded"])
    assert result["token2wav_alone"]["seconds"]["median"] > 0
    check = result["memory_check"]
    assert check["peak_rss_bytes"] == result["peak_rss_bytes"]["median"] and check["kv_cache_bytes"]["thinker"] > 0
    assert result["request"]["max_new_tokens"] == NEW_TOKENS and result["request"]["speech"] is True


def test_resident_policy_in_the_json(tiny_bundle, files):
    out = files["folder"] / "resident.json"
    proc = bench(tiny_bundle, "--memory", "resident", "--repeats", 1, "--max-new-tokens", NEW_TOKENS, "--json", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["memory_policy"] == "resident" and result["memory_policy_applied"] is True
    assert [s["name"] for s in result["stages"]] == ["thinker_prefill", "thinker_decode"]  # text in, text out
    assert result["first_audio_seconds"] is None and result["token2wav_rtf"] is None
    assert result["runs"]["runtime"][0]["loaded_after"] == ["thinker_embedding", "thinker_decoder"]  # kept


@pytest.mark.parametrize("case", ["no-bundle", "no-audio", "bad-memory", "repeats", "json-dir", "model-dir",
                                  "device", "not-audio"])
def test_errors_name_the_problem(case, tiny_bundle, files, tmp_path):
    if case == "device":
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            pytest.skip("this onnxruntime has CUDA: --device cuda is no error here")
    args = {
        "no-bundle": ([tmp_path / "nothing"], "nothing"),
        "no-audio": ([tiny_bundle, "--audio", tmp_path / "missing.wav"], "missing.wav"),
        "bad-memory": ([tiny_bundle, "--memory", "lots"], "--memory"),
        "repeats": ([tiny_bundle, "--repeats", 0], "--repeats"),
        "json-dir": ([tiny_bundle, "--json", tmp_path / "no" / "out.json"], "--json"),
        "model-dir": ([tiny_bundle, "--model", tmp_path], str(tmp_path)),
        # CUDA where onnxruntime has none (this machine): said once, before any measured process
        "device": ([tiny_bundle, "--device", "cuda"], "--device cpu"),
        # found only by the measured process (the runtime decodes the media): its InputError, once
        "not-audio": ([tiny_bundle, "--audio", files["folder"] / "picture.png"], "has no audio track"),
    }[case]
    proc = bench(*args[0], timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "error:" in proc.stderr and "fix:" in proc.stderr and args[1] in proc.stderr
    assert "Traceback" not in proc.stderr


def test_pytorch_side_fields(tiny, files):
    """--model: the same request through transformers in its own process; the JSON fields only."""
    checkpoint, bundle = tiny
    out = files["folder"] / "pytorch.json"
    proc = bench(bundle, "--model", checkpoint, "--image", files["image"], "--wav", "--repeats", 1,
                 "--max-new-tokens", NEW_TOKENS, "--max-speech-seconds", 0.2, "--json", out)
    assert proc.returncode == 0, proc.stderr
    assert "PyTorch eager float32" in proc.stdout
    result = json.loads(out.read_text())
    for key in ("decode_ratio_vs_pytorch", "prefill_ratio_vs_pytorch", "first_audio_ratio_vs_pytorch",
                "token2wav_ratio_vs_pytorch", "request_ratio_vs_pytorch"):
        assert isinstance(result[key], float) and result[key] > 0, key
    torch_side = result["pytorch"]
    assert [s["name"] for s in torch_side["stages"]] == ["vision_encoder", "thinker_prefill", "thinker_decode",
                                                         "speech"]
    stages = {s["name"]: s for s in torch_side["stages"]}
    # same request: the same prompt, the same number of new tokens and speech codes on both sides
    assert torch_side["prompt_tokens"]["median"] == result["prompt_tokens"]["median"]
    assert stages["thinker_decode"]["tokens"]["median"] == NEW_TOKENS - 1
    assert stages["speech"]["codes"]["median"] <= 10
    assert torch_side["token2wav_alone"]["solver"] == "euler" == result["token2wav_alone"]["solver"]
    assert torch_side["token2wav_alone"]["steps"] == result["token2wav_alone"]["steps"]
    for path, summary in summaries(torch_side):
        assert is_summary(summary, 1), path
