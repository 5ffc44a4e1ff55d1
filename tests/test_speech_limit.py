"""Bounded speech: ``max_speech_seconds`` / ``--max-speech-seconds`` stops the talker after that many
seconds of codes, and ``speech_finish_reason`` says why the speech ended.

The tiny model's random talker never picks its stop code, so without a bound it talks until
``talker_max_new_tokens`` (4096 codes, 82 s): exactly the case the bound is for. Qwen2.5-Omni's
token2wav makes ``mel_per_code * hop_length`` = 2 * 240 samples per code at 24 kHz, i.e. 50 codes
per second of audio.
"""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from omni_runtime.errors import InputError
from omni_runtime.request import ChatRequest
from omni_runtime.runner import OmniRunner
from omni_runtime.stages.sampling import SamplingConfig

GREEDY = SamplingConfig(do_sample=False)
CODES_PER_SECOND = 50


@pytest.fixture(scope="module")
def runner(tiny_bundle):
    return OmniRunner(tiny_bundle, device="cpu")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("seconds, codes", [(0.5, 25), (0.13, 6)])
def test_speech_stops_after_the_seconds_asked(runner, stream, seconds, codes):
    result = runner.chat("Say hello.", max_new_tokens=3, sampling=GREEDY, speech=True, stream=stream,
                         max_speech_seconds=seconds, noise_seed=0,
                         talker_sampling=runner.default_talker_sampling(False))
    assert len(result.codes) == codes
    assert result.speech_finish_reason == "seconds"
    assert result.audio_seconds == pytest.approx(codes / CODES_PER_SECOND)
    assert result.to_json()["speech_finish_reason"] == "seconds"


def test_the_code_limit_reports_length_and_the_tighter_bound_wins(runner):
    common = dict(max_new_tokens=2, sampling=GREEDY, speech=True, noise_seed=0)
    by_codes = runner.chat("Hi", talker_max_new_tokens=4, max_speech_seconds=10.0, **common)
    assert (len(by_codes.codes), by_codes.speech_finish_reason) == (4, "length")
    by_seconds = runner.chat(ChatRequest(prompt="Hi", talker_max_new_tokens=40, max_speech_seconds=0.2, **common))
    assert (len(by_seconds.codes), by_seconds.speech_finish_reason) == (10, "seconds")
    text = runner.chat("Hi", max_new_tokens=2, sampling=GREEDY)
    assert text.speech_finish_reason is None and "speech_finish_reason" not in text.to_json()


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), "3", True])
def test_bad_max_speech_seconds_is_an_input_error(value):
    with pytest.raises(InputError) as err:
        ChatRequest(prompt="hi", speech=True, max_speech_seconds=value)
    assert err.value.param == "max_speech_seconds" and "number > 0" in err.value.problem


def test_max_speech_seconds_without_speech_is_an_input_error():
    with pytest.raises(InputError, match="max_speech_seconds only apply to speech") as err:
        ChatRequest(prompt="hi", max_speech_seconds=0)
    assert err.value.param == "max_speech_seconds"


def test_command_line(tiny_bundle, tmp_path):
    wav = tmp_path / "out.wav"
    proc = run_cli("run", tiny_bundle, "--prompt", "hi", "--max-new-tokens", "2", "--greedy", "--wav", wav,
                   "--max-speech-seconds", "0.4", "--json")
    assert proc.returncode == 0, proc.stderr
    body = json.loads(proc.stdout)
    assert len(body["codes"]) == 20 and body["speech_finish_reason"] == "seconds"
    assert body["audio_seconds"] == pytest.approx(0.4)
    for args, text in ((["--max-speech-seconds", "1"], "--max-speech-seconds needs --wav"),
                       (["--wav", tmp_path / "b.wav", "--max-speech-seconds", "0"],
                        "--max-speech-seconds must be a number > 0")):
        proc = run_cli("run", tiny_bundle, "--prompt", "hi", *args)
        assert proc.returncode == 2 and text in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "b.wav").exists()
