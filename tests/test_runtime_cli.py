"""The ``omni-runtime`` command line, the bounds of generation and explicit sampling.

* ``omni-runtime run`` is a complete chat command without omni-export, typer, rich or torch;
  its greedy ids equal transformers' ``generate(do_sample=False)``, and ``omni-export run`` is
  the same command (same output).
* Prompt + new tokens never exceed ``config.thinker.max_position_embeddings``: an explicit
  ``max_new_tokens`` that does not fit or a prompt that leaves no room is an InputError before any
  graph runs; the bundle's default is clamped (finish_reason ``"context"``).
* Errors of the Python API speak in API terms; the command lines show flags.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from omni_runtime import __version__ as runtime_version
from omni_runtime.cli import RunOptions, cli_message, sampling_for
from omni_runtime.errors import InputError
from omni_runtime.runner import OmniRunner
from omni_runtime.stages.sampling import SamplingConfig

from omni_export import __version__ as export_version

from conftest import link_copy, run_cli

PROMPT = "Tell me about the sea."
NEW = 6


def runtime_cli(*args, importtime: bool = False) -> subprocess.CompletedProcess:
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, "-m", "omni_runtime.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "NO_COLOR": "1"})


def with_manifest(src, dest, change):
    bundle = link_copy(src, dest)
    data = json.loads((bundle / "manifest.json").read_text())
    change(data)
    (bundle / "manifest.json").write_text(json.dumps(data))
    return bundle


@pytest.fixture(scope="module")
def greedy_run(tiny_bundle):
    """``omni-runtime run --greedy --json`` for PROMPT, NEW tokens."""
    proc = runtime_cli("run", tiny_bundle, "--prompt", PROMPT, "--greedy", "--max-new-tokens", NEW, "--json",
                       importtime=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


@pytest.fixture(scope="module")
def reference_ids(greedy_run, reference_thinker, tiny_bundle):
    """transformers' greedy continuation of the same prompt ids (NEW tokens, no early stop)."""
    body, _ = greedy_run
    ids = torch.tensor([body["prompt_ids"]])
    with torch.no_grad():
        out = reference_thinker.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                         min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


# ------------------------------------------------------------------------------------ the command


def test_versions_and_help():
    for proc, name, version in ((runtime_cli("--version"), "omni-runtime", runtime_version),
                                (run_cli("--version"), "omni-export", export_version)):
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"{name} {version}"
    for proc in (runtime_cli("-h"), runtime_cli("run", "-h"), run_cli("-h"), run_cli("run", "-h"), run_cli("build", "-h")):
        assert proc.returncode == 0, proc.stderr
        assert "usage" in proc.stdout.lower()
    # One implementation: the same options and the same documented sampling rules in both.
    ours, theirs = runtime_cli("run", "-h").stdout, run_cli("run", "-h").stdout
    assert " ".join(ours.replace("omni-runtime run", "omni-export run").split()) == " ".join(theirs.split())
    assert "--seed S" in ours and "implies --sample" in ours and "conflict with --greedy" in ours
    assert "--memory POLICY" in ours and "least recently used" in ours


def test_memory_errors_speak_in_flags():
    from omni_runtime.bundle.memory import MemoryPolicy

    with pytest.raises(InputError) as info:
        MemoryPolicy.parse("six gigs")
    assert str(info.value).startswith("memory='six gigs' is not lazy")  # the API's own words
    assert cli_message(info.value).startswith("--memory six gigs is not lazy, resident or a byte size")


def test_greedy_run_matches_transformers_and_imports_no_heavy_package(greedy_run, reference_ids):
    body, importtime = greedy_run
    assert set(body) == {"text", "prompt_ids", "token_ids", "finish_reason"}
    assert body["token_ids"] == reference_ids[: len(body["token_ids"])]
    assert body["finish_reason"] == ("length" if len(body["token_ids"]) == NEW else "eos")
    heavy = re.findall(r"^import time:.*\|\s+(torch|transformers|typer|rich|omni_export)(?:\.|$)", importtime, re.M)
    assert not heavy, sorted(set(heavy))


def test_omni_export_run_is_the_same_command(greedy_run, tiny_bundle):
    proc = run_cli("run", tiny_bundle, "--prompt", PROMPT, "--greedy", "--max-new-tokens", NEW, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == greedy_run[0]


def test_streamed_text_is_the_json_text(greedy_run, tiny_bundle):
    proc = runtime_cli("run", tiny_bundle, "--prompt", PROMPT, "--greedy", "--max-new-tokens", NEW)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == greedy_run[0]["text"] + "\n"


# ------------------------------------------------------------------------------------ sampling flags


DEFAULTS = SamplingConfig(do_sample=False, temperature=0.9, top_k=50, top_p=0.8, repetition_penalty=1.05)


@pytest.mark.parametrize("options, do_sample", [
    ({}, False),
    ({"greedy": True}, False),
    ({"sample": True}, True),
    ({"seed": 0}, True),
    ({"temperature": 0.7}, True),
    ({"top_k": 5}, True),
    ({"top_p": 0.5}, True),
    ({"repetition_penalty": 1.3}, False),
    ({"greedy": True, "repetition_penalty": 1.3}, False),
])
def test_sampling_flags(options, do_sample):
    sampling = sampling_for(RunOptions(bundle="b", prompt="p", **options), DEFAULTS)
    assert sampling.do_sample is do_sample
    expected = {k: options.get(k, getattr(DEFAULTS, k)) for k in ("temperature", "top_k", "top_p", "repetition_penalty")}
    assert {k: getattr(sampling, k) for k in expected} == expected


def test_sample_uses_bundle_defaults_and_seed_samples(tiny_bundle, greedy_run):
    def run(*flags):
        proc = runtime_cli("run", tiny_bundle, "--prompt", PROMPT, "--max-new-tokens", NEW, "--json", *flags)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["token_ids"]

    seeded = run("--seed", "0")
    assert seeded == run("--sample", "--seed", "0")  # --seed alone samples (documented in --help)
    assert seeded != greedy_run[0]["token_ids"]
    assert run("--sample", "--seed", "1") != seeded


# ------------------------------------------------------------------------------------ context bound


@pytest.fixture(scope="module")
def runner(tiny_bundle):
    return OmniRunner(tiny_bundle, device="cpu")


def prompt_tokens(runner) -> int:
    return len(runner.encode(runner.render(PROMPT)))


def test_explicit_max_new_tokens_beyond_context_is_an_input_error(runner):
    context = runner.manifest.config["thinker"]["max_position_embeddings"]
    room = context - prompt_tokens(runner)
    with pytest.raises(InputError) as info:
        runner.chat(PROMPT, max_new_tokens=room + 1)
    assert info.value.param == "max_new_tokens"
    assert f"at most {room} new tokens" in str(info.value) and "--" not in str(info.value)
    assert not runner.pool._sessions, "a graph was loaded before the input was checked"
    assert runner.token_budget(prompt_tokens(runner), room) == (room, "length")


def test_default_is_clamped_to_the_context(tiny_bundle, tmp_path, reference_ids):
    probe = OmniRunner(tiny_bundle, device="cpu")
    room = 3
    bundle = with_manifest(tiny_bundle, tmp_path / "b", lambda m: m["config"]["thinker"].update(
        max_position_embeddings=prompt_tokens(probe) + room))
    result = OmniRunner(bundle, device="cpu").chat(PROMPT, sampling=SamplingConfig())
    assert result.token_ids == reference_ids[:room]
    assert result.finish_reason == "context"
    assert len(result.prompt_ids) + len(result.token_ids) <= prompt_tokens(probe) + room
    # Through the command line: same clamp, same reason.
    proc = runtime_cli("run", bundle, "--prompt", PROMPT, "--greedy", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["finish_reason"] == "context"


def test_prompt_that_does_not_fit_is_an_input_error(tiny_bundle, tmp_path):
    probe = OmniRunner(tiny_bundle, device="cpu")
    bundle = with_manifest(tiny_bundle, tmp_path / "b", lambda m: m["config"]["thinker"].update(
        max_position_embeddings=prompt_tokens(probe)))
    runner = OmniRunner(bundle, device="cpu")
    with pytest.raises(InputError, match=f"the prompt is {prompt_tokens(probe)} tokens") as info:
        runner.chat(PROMPT)
    assert info.value.param == "prompt"
    assert not runner.pool._sessions


def test_eos_finish_reason(tiny_bundle, tmp_path, reference_ids):
    first = reference_ids[0]
    bundle = with_manifest(tiny_bundle, tmp_path / "b", lambda m: m["generation"].update(eos_token_ids=[first]))
    result = OmniRunner(bundle, device="cpu").chat(PROMPT, max_new_tokens=NEW, sampling=SamplingConfig())
    assert result.token_ids == [first] and result.finish_reason == "eos"


# ------------------------------------------------------------------------------------ API wording


@pytest.mark.parametrize("kwargs, api_text, cli_text", [
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1", "--max-new-tokens must be an integer >= 1"),
    ({"seed": -1}, "seed must be an integer >= 0", "--seed must be an integer >= 0"),
    ({"sampling": SamplingConfig(top_p=2.0)}, "top_p must be in (0, 1]", "--top-p must be in (0, 1]"),
    ({"sampling": SamplingConfig(do_sample=True, temperature=0.0)}, "temperature must be > 0",
     "--temperature must be > 0"),
])
def test_api_errors_use_api_names_and_the_cli_translates(runner, kwargs, api_text, cli_text):
    with pytest.raises(InputError) as info:
        runner.chat(PROMPT, **kwargs)
    assert api_text in str(info.value)
    assert not re.search(r"(?<![\w-])--\w", str(info.value)), str(info.value)
    assert cli_text in cli_message(info.value)


def test_cli_message_translation_leaves_paths_alone():
    exc = InputError("max_new_tokens=5 does not fit", path="/data/max_new_tokens/top_p",
                     fix="pass max_new_tokens <= 3, or do_sample=False")
    assert cli_message(exc) == ("/data/max_new_tokens/top_p: --max-new-tokens 5 does not fit\n"
                                "  fix: pass --max-new-tokens <= 3, or --greedy")
