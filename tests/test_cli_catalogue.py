"""A catalogue of bad inputs through the real command lines (``omni-export``, ``omni-runtime``).

Every case runs the entry point in a subprocess and must: exit with code 2, print one message
that names the offending file or value and a ``fix:``, print no traceback, leave nothing new in
its temporary directory, and not import torch (input errors are found before the heavy imports,
so they are reported in well under a second).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from conftest import link_copy

# The tiny model's chat template and default system prompt take ~118 tokens before the user's text.
SMALL_CONTEXT = 64


def cli(tool: str, *args) -> subprocess.CompletedProcess:
    """Run ``omni-export`` or ``omni-runtime`` with ``-X importtime`` (to see what was imported)."""
    module = {"omni-export": "omni_export.cli", "omni-runtime": "omni_runtime.cli"}[tool]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-X", "importtime", "-m", module, *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=env)


def snapshot(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")} | {"<root>"}


def edit_manifest(bundle: Path, change: Callable[[dict], None]) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def cuda_available() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@dataclass
class Ctx:
    tmp: Path
    ckpt: Path
    bundle: Path


@dataclass
class Case:
    id: str
    make: Callable[[Ctx], tuple]  # ctx -> (tool, args, expected substrings of stderr)
    skip: str | None = None


def _dir_with(ctx: Ctx, name: str, files: dict[str, str]) -> Path:
    path = ctx.tmp / name
    path.mkdir(parents=True)
    for rel, text in files.items():
        (path / rel).write_text(text)
    return path


def _file(ctx: Ctx, name: str, text: str = "x\n") -> Path:
    path = ctx.tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _small_context(ctx: Ctx) -> Path:
    bundle = link_copy(ctx.bundle, ctx.tmp / "small")
    edit_manifest(bundle, lambda m: m["config"]["thinker"].update(max_position_embeddings=SMALL_CONTEXT))
    return bundle


def _schema_99(ctx: Ctx) -> Path:
    bundle = link_copy(ctx.bundle, ctx.tmp / "old")
    edit_manifest(bundle, lambda m: m.update(schema_version=99))
    return bundle


def _missing_data(ctx: Ctx) -> Path:
    bundle = link_copy(ctx.bundle, ctx.tmp / "b")
    (bundle / "thinker_decoder.onnx.data").unlink()
    return bundle


def _corrupt_tokenizer(ctx: Ctx) -> Path:
    bundle = link_copy(ctx.bundle, ctx.tmp / "b", real=("manifest.json", "tokenizer.json"))
    path = bundle / "tokenizer.json"
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    return bundle


def _no_weights(ctx: Ctx) -> Path:
    model = link_copy(ctx.ckpt, ctx.tmp / "model", real=())
    (model / "model.safetensors").unlink()
    return model


def _text_only(ctx: Ctx) -> Path:
    """The bundle without its talker and token2wav (as built from a model without a talker)."""
    bundle = link_copy(ctx.bundle, ctx.tmp / "text-only")

    def drop_speech(manifest: dict) -> None:
        for name in [g for g in manifest["graphs"] if g.startswith(("talker", "token2wav"))]:
            del manifest["graphs"][name]
        for key in ("talker", "token2wav"):
            manifest["config"].pop(key, None)
        manifest["modules"]["built"] = [m for m in manifest["modules"]["built"] if m not in ("talker", "token2wav")]

    edit_manifest(bundle, drop_speech)
    return bundle


def _tiny_image(ctx: Ctx) -> Path:
    from omni_export.testkit import media

    return media.write_image(ctx.tmp / "dot.png", 1, 1)


def _frameless_video(ctx: Ctx) -> Path:
    from omni_export.testkit import media

    return media.write_empty_video(ctx.tmp / "empty.mp4")


def _silent_video(ctx: Ctx) -> Path:
    from omni_export.testkit import media

    return media.write_video(ctx.tmp / "silent.mp4", seconds=1.0, fps=10)


def _gptq_checkpoint(ctx: Ctx) -> Path:
    """The tiny checkpoint claiming GPTQ quantization (not AutoAWQ GEMM 4-bit)."""
    model = link_copy(ctx.ckpt, ctx.tmp / "gptq", real=("config.json",))
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (model / "config.json").write_text(json.dumps(config))
    return model


def _awq_3bit_checkpoint(ctx: Ctx) -> Path:
    model = link_copy(ctx.ckpt, ctx.tmp / "awq3", real=("config.json",))
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "version": "gemm", "bits": 3, "group_size": 128,
                                     "zero_point": True}
    (model / "config.json").write_text(json.dumps(config))
    return model


BAD_GROUP = ("schema_version: 2\nname: g\nmodules:\n  thinker:\n    weights: int4\n    method: rtn\n"
             "    group_size: 100\n")
BAD_YAML = "schema_version: 2\nname: [oops\n"
UNKNOWN_KEY = "schema_version: 2\nname: mine\nmodules:\n  thinker:\n    weights: float32\n    turbo: true\n"

CASES = [
    # ------------------------------------------------------------------ tiny
    Case("tiny-out-not-empty", lambda c: ("omni-export", ["tiny", _dir_with(c, "busy", {"keep.txt": "x"})],
                                          ["busy", "already exists", "not empty"])),
    Case("tiny-out-is-file", lambda c: ("omni-export", ["tiny", _file(c, "f")], ["f: exists and is a file"])),
    Case("tiny-out-under-file", lambda c: ("omni-export", ["tiny", _file(c, "f") / "m"], ["f is a file"])),
    Case("tiny-out-bracketed", lambda c: ("omni-export", ["tiny", _dir_with(c, "t[bold]x[/x]", {"a": "x"})],
                                          ["t[bold]x[/x]", "already exists"])),
    Case("tiny-out-unwritable", lambda c: ("omni-export", ["tiny", "/proc/omni-test/m"], ["/proc", "write access"]),
         skip=None if Path("/proc").is_dir() else "no /proc"),
    Case("tiny-bad-preset", lambda c: ("omni-export", ["tiny", c.tmp / "m", "--preset", "huge"], ["'huge'", "7b-shape"])),
    Case("tiny-bad-layers", lambda c: ("omni-export", ["tiny", c.tmp / "m", "--layers", "0"], ["layers", "0"])),
    Case("tiny-negative-seed", lambda c: ("omni-export", ["tiny", c.tmp / "m", "--seed", "-1"], ["--seed", "-1"])),
    Case("tiny-layers-not-int", lambda c: ("omni-export", ["tiny", c.tmp / "m", "--layers", "abc"], ["--layers"])),
    Case("tiny-missing-out", lambda c: ("omni-export", ["tiny"], ["out_dir", "omni-export tiny --help"])),
    Case("tiny-bad-hidden", lambda c: ("omni-export", ["tiny", c.tmp / "m", "--hidden", "100"], ["multiple of 16"])),
    Case("tiny-huge-hidden", lambda c: ("omni-export", ["tiny", c.tmp / "m", "--hidden", "1048576"], ["1024", "7b-shape"])),
    Case("tiny-outliers-7b-shape", lambda c: ("omni-export", ["tiny", c.tmp / "m", "--preset", "7b-shape", "--outliers"],
                                              ["--outliers", "--preset tiny"])),
    # ------------------------------------------------------------------ build
    Case("build-model-missing", lambda c: ("omni-export", ["build", "--model", c.tmp / "none", "--out", c.tmp / "b"],
                                           ["none", "model directory does not exist", "omni-export tiny"])),
    Case("build-model-bracketed", lambda c: ("omni-export", ["build", "--model", c.tmp / "m[/x]", "--out", c.tmp / "b"],
                                             ["m[/x]"])),
    Case("build-model-no-config", lambda c: ("omni-export", ["build", "--model", _dir_with(c, "empty", {}),
                                                             "--out", c.tmp / "b"], ["empty", "config.json"])),
    Case("build-model-not-omni", lambda c: ("omni-export", [
        "build", "--model", _dir_with(c, "llama", {"config.json": '{"model_type": "llama"}'}), "--out", c.tmp / "b"],
        ["config.json", "'llama'", "qwen2_5_omni"])),
    Case("build-model-no-weights", lambda c: ("omni-export", ["build", "--model", _no_weights(c), "--out", c.tmp / "b"],
                                              ["model.safetensors"])),
    Case("build-recipe-unknown", lambda c: ("omni-export", ["build", "--model", c.ckpt, "--recipe", "int3",
                                                            "--out", c.tmp / "b"], ["int3", "fp32"])),
    Case("build-recipe-file-missing", lambda c: ("omni-export", ["build", "--model", c.ckpt, "--recipe",
                                                                 c.tmp / "r[1].yaml", "--out", c.tmp / "b"],
                                                 ["r[1].yaml", "does not exist"])),
    Case("build-recipe-bad-yaml", lambda c: ("omni-export", ["build", "--model", c.ckpt, "--recipe",
                                                             _file(c, "bad.yaml", BAD_YAML), "--out", c.tmp / "b"],
                                             ["bad.yaml", "name: [oops", "YAML"])),
    Case("build-recipe-unknown-key", lambda c: ("omni-export", ["build", "--model", c.ckpt, "--recipe",
                                                                _file(c, "mine.yaml", UNKNOWN_KEY), "--out", c.tmp / "b"],
                                                ["mine.yaml", "turbo"])),
    Case("build-out-exists", lambda c: ("omni-export", ["build", "--model", c.ckpt, "--out", c.bundle],
                                        [str(c.bundle), "already exists", "--force"])),
    Case("build-out-is-file-force", lambda c: ("omni-export", ["build", "--model", c.ckpt, "--out", _file(c, "f"),
                                                               "--force"], ["f: exists and is a file"])),
    Case("build-out-not-a-bundle", lambda c: ("omni-export", ["build", "--model", c.ckpt, "--out",
                                                              _dir_with(c, "precious", {"notes.txt": "keep"}), "--force"],
                                              ["precious", "not a bundle"])),
    Case("build-out-under-file", lambda c: ("omni-export", ["build", "--model", c.ckpt, "--out", _file(c, "f") / "b"],
                                            ["f is a file"])),
    Case("build-out-unwritable", lambda c: ("omni-export", ["build", "--model", c.ckpt, "--out", "/proc/omni-test/b"],
                                            ["/proc", "write access"]),
         skip=None if Path("/proc").is_dir() else "no /proc"),
    Case("build-missing-out", lambda c: ("omni-export", ["build", "--model", c.ckpt], ["--out"])),
    Case("build-quantized-not-autoawq", lambda c: ("omni-export", ["build", "--model", _gptq_checkpoint(c),
                                                                   "--recipe", "awq", "--out", c.tmp / "b"],
                                                   ["config.json", "gptq"])),
    Case("build-autoawq-not-4bit", lambda c: ("omni-export", ["build", "--model", _awq_3bit_checkpoint(c),
                                                              "--recipe", "awq", "--out", c.tmp / "b"],
                                              ["config.json", "3"])),
    Case("build-group-size-not-16x", lambda c: ("omni-export", ["build", "--model", c.ckpt, "--recipe",
                                                                _file(c, "g.yaml", BAD_GROUP), "--out", c.tmp / "b"],
                                                ["g.yaml", "group_size", "multiple of 16"])),
    Case("build-calib-not-jsonl", lambda c: ("omni-export", ["build", "--model", c.ckpt, "--recipe", "awq",
                                                             "--calib", _file(c, "calib.jsonl", "hello world\n"),
                                                             "--out", c.tmp / "b"], ["calib.jsonl", "line 1"])),
    Case("build-calib-with-fp32", lambda c: ("omni-export", ["build", "--model", c.ckpt, "--recipe", "fp32",
                                                             "--calib", _file(c, "calib.jsonl", "[]\n"),
                                                             "--out", c.tmp / "b"], ["calib.jsonl", "awq"])),
    # ------------------------------------------------------------------ run
    Case("run-bundle-bracketed", lambda c: ("omni-export", ["run", c.tmp / "a[/x]b", "--prompt", "hi"],
                                            ["a[/x]b", "does not exist", "omni-export build"])),
    Case("run-bundle-bold", lambda c: ("omni-export", ["run", c.tmp / "my[bold]bundle", "--prompt", "hi"],
                                       ["my[bold]bundle"])),
    Case("run-bundle-is-file", lambda c: ("omni-export", ["run", _file(c, "f"), "--prompt", "hi"],
                                          ["f: not a directory"])),
    Case("run-partial-dir", lambda c: ("omni-export", ["run", _dir_with(c, ".b.partial-1-x", {}), "--prompt", "hi"],
                                       [".b.partial-1-x", "interrupted"])),
    Case("run-other-schema", lambda c: ("omni-export", ["run", _schema_99(c), "--prompt", "hi"],
                                        ["manifest.json", "99"])),
    Case("run-missing-file", lambda c: ("omni-export", ["run", _missing_data(c), "--prompt", "hi"],
                                        ["thinker_decoder.onnx.data", "missing"])),
    Case("run-huge-max-new-tokens", lambda c: ("omni-export", ["run", c.bundle, "--prompt", "hi",
                                                               "--max-new-tokens", "1000000000"],
                                               ["--max-new-tokens 1000000000", "at most", "--max-new-tokens <="])),
    Case("run-zero-max-new-tokens", lambda c: ("omni-export", ["run", c.bundle, "--prompt", "hi",
                                                               "--max-new-tokens", "0"], ["--max-new-tokens", "0"])),
    Case("run-max-new-tokens-not-int", lambda c: ("omni-export", ["run", c.bundle, "--prompt", "hi",
                                                                  "--max-new-tokens", "abc"], ["--max-new-tokens", "'abc'"])),
    Case("run-prompt-exceeds-context", lambda c: ("omni-export", ["run", _small_context(c), "--prompt", "hi"],
                                                  ["prompt", f"{SMALL_CONTEXT} positions", "shorten"])),
    Case("run-greedy-and-sample", lambda c: ("omni-export", ["run", c.bundle, "--prompt", "hi", "--greedy", "--sample"],
                                             ["--greedy", "--sample"])),
    Case("run-greedy-and-seed", lambda c: ("omni-export", ["run", c.bundle, "--prompt", "hi", "--greedy", "--seed", "1"],
                                           ["--greedy", "--seed"])),
    Case("run-greedy-and-temperature", lambda c: ("omni-export", ["run", c.bundle, "--prompt", "hi", "--greedy",
                                                                  "--temperature", "0.7"], ["--greedy", "--temperature"])),
    Case("run-top-p-out-of-range", lambda c: ("omni-export", ["run", c.bundle, "--prompt", "hi", "--top-p", "1.5"],
                                              ["--top-p", "1.5", "(0, 1]"])),
    Case("run-temperature-nan", lambda c: ("omni-export", ["run", c.bundle, "--prompt", "hi", "--temperature", "nan"],
                                           ["--temperature", "'nan'"])),
    Case("run-temperature-zero-sampling", lambda c: ("omni-export", ["run", c.bundle, "--prompt", "hi", "--sample",
                                                                     "--temperature", "0"], ["--temperature", "0.0"])),
    Case("run-negative-seed", lambda c: ("omni-export", ["run", c.bundle, "--prompt", "hi", "--seed", "-3"],
                                         ["--seed", "-3"])),
    Case("run-empty-prompt", lambda c: ("omni-export", ["run", c.bundle, "--prompt", "   "], ["prompt is empty"])),
    Case("run-missing-prompt", lambda c: ("omni-export", ["run", c.bundle], ["--prompt", "--audio"])),
    # media (--audio, --image, --video): checked before any graph runs
    Case("run-audio-missing", lambda c: ("omni-export", ["run", c.bundle, "--prompt", "hi", "--audio",
                                                         c.tmp / "no[/x]such.wav"],
                                         ["no[/x]such.wav", "audio file does not exist"])),
    Case("run-image-unsupported-type", lambda c: ("omni-export", ["run", c.bundle, "--prompt", "hi", "--image",
                                                                  _file(c, "notes.txt", "not a picture\n")],
                                                  ["notes.txt", "not an image file", "PNG"])),
    Case("run-audio-unsupported-type", lambda c: ("omni-export", ["run", c.bundle, "--audio",
                                                                  _file(c, "notes.txt", "not a sound\n")],
                                                  ["notes.txt", "cannot decode the audio"])),
    Case("run-image-1x1", lambda c: ("omni-export", ["run", c.bundle, "--prompt", "hi", "--image", _tiny_image(c)],
                                     ["dot.png", "1x1 px", "at least 28 px"])),
    Case("run-video-no-frames", lambda c: ("omni-export", ["run", c.bundle, "--prompt", "hi", "--video",
                                                           _frameless_video(c)], ["empty.mp4", "no frames"])),
    Case("run-audio-in-silent-video", lambda c: ("omni-export", ["run", c.bundle, "--prompt", "hi", "--video",
                                                                 _silent_video(c), "--use-audio-in-video"],
                                                 ["silent.mp4", "no audio track", "leave out --use-audio-in-video"])),
    Case("run-audio-in-video-without-video", lambda c: ("omni-export", ["run", c.bundle, "--prompt", "hi",
                                                                        "--use-audio-in-video"],
                                                        ["--use-audio-in-video needs a --video"])),
    # speech (--wav, --speaker): checked before any graph runs, no WAV file left behind
    Case("run-wav-missing-dir", lambda c: ("omni-export", ["run", c.bundle, "--prompt", "hi", "--wav",
                                                           c.tmp / "no[/x]dir" / "a.wav"],
                                           ["no[/x]dir", "does not exist", "--wav", "'a.wav'"])),
    Case("run-wav-is-dir", lambda c: ("omni-export", ["run", c.bundle, "--prompt", "hi", "--wav",
                                                      _dir_with(c, "out[x]", {})], ["out[x]", "is a directory"])),
    Case("run-wav-under-file", lambda c: ("omni-export", ["run", c.bundle, "--prompt", "hi", "--wav",
                                                          _file(c, "f") / "a.wav"], ["f: is a file", "--wav"])),
    Case("run-unknown-speaker", lambda c: ("omni-export", ["run", c.bundle, "--prompt", "hi", "--wav", c.tmp / "a.wav",
                                                           "--speaker", "Nobody"],
                                           ["unknown --speaker 'Nobody'", "Chelsie, Ethan"])),
    Case("run-speaker-without-wav", lambda c: ("omni-export", ["run", c.bundle, "--prompt", "hi", "--speaker", "Ethan"],
                                               ["--speaker needs --wav"])),
    Case("run-stream-audio-without-wav", lambda c: ("omni-export", ["run", c.bundle, "--prompt", "hi",
                                                                    "--stream-audio"], ["--stream-audio needs --wav"])),
    Case("run-wav-text-only-bundle", lambda c: ("omni-export", ["run", _text_only(c), "--prompt", "hi", "--wav",
                                                                c.tmp / "a.wav"],
                                                ["manifest.json", "no speech output", "leave out --wav"])),
    Case("run-unknown-device", lambda c: ("omni-export", ["run", c.bundle, "--prompt", "hi", "--device", "tpu"],
                                          ["'tpu'", "cuda"])),
    Case("run-cuda-unavailable", lambda c: ("omni-export", ["run", c.bundle, "--prompt", "hi", "--device", "cuda"],
                                            ["CUDAExecutionProvider", "pip install omni-runtime[gpu]", "--device cpu"]),
         skip="CUDA is available here" if cuda_available() else None),
    Case("run-bad-memory", lambda c: ("omni-export", ["run", c.bundle, "--prompt", "hi", "--memory", "6XB"],
                                      ["--memory 6XB is not lazy, resident or a byte size", "6.5GiB"])),
    Case("run-memory-below-thinker", lambda c: ("omni-export", ["run", c.bundle, "--prompt", "hi", "--memory", "1MB"],
                                                ["--memory 1MB (1.00 MB) is smaller than the thinker stage",
                                                 "thinker_decoder", "--memory lazy"])),
    # ------------------------------------------------------------------ inspect
    Case("inspect-bracketed-missing", lambda c: ("omni-export", ["inspect", c.tmp / "x[/y]z"], ["x[/y]z"])),
    Case("inspect-no-manifest", lambda c: ("omni-export", ["inspect", _dir_with(c, "half", {"a.onnx": "x"})],
                                           ["half", "manifest.json"])),
    Case("inspect-bad-json", lambda c: ("omni-export", ["inspect", _dir_with(c, "b", {"manifest.json": "{[oops"})],
                                        ["manifest.json", "invalid JSON"])),
    Case("inspect-verify-corrupt", lambda c: ("omni-export", ["inspect", _corrupt_tokenizer(c), "--verify"],
                                              ["tokenizer.json", "sha256"])),
    Case("inspect-unknown-option", lambda c: ("omni-export", ["inspect", c.bundle, "--bogus[/x]"], ["--bogus[/x]"])),
    Case("unknown-command", lambda c: ("omni-export", ["frobnicate"], ["frobnicate"])),
    # ------------------------------------------------------------------ verify
    Case("verify-bundle-missing", lambda c: ("omni-export", ["verify", c.tmp / "b[/x]", "--model", c.ckpt],
                                             ["b[/x]", "does not exist"])),
    Case("verify-model-missing", lambda c: ("omni-export", ["verify", c.bundle, "--model", c.tmp / "none"],
                                            ["none", "model directory does not exist"])),
    # ------------------------------------------------------------------ omni-runtime
    Case("runtime-bundle-missing", lambda c: ("omni-runtime", ["run", c.tmp / "a[/x]b", "--prompt", "hi"],
                                              ["a[/x]b", "does not exist"])),
    Case("runtime-huge-max-new-tokens", lambda c: ("omni-runtime", ["run", c.bundle, "--prompt", "hi",
                                                                    "--max-new-tokens", "99999999"],
                                                   ["--max-new-tokens 99999999", "at most"])),
    Case("runtime-greedy-and-sample", lambda c: ("omni-runtime", ["run", c.bundle, "--prompt", "hi", "--greedy",
                                                                  "--sample"], ["--greedy", "--sample"])),
    Case("runtime-bad-top-k", lambda c: ("omni-runtime", ["run", c.bundle, "--prompt", "hi", "--top-k", "-5"],
                                         ["--top-k", "-5"])),
    Case("runtime-missing-prompt", lambda c: ("omni-runtime", ["run", c.bundle], ["--prompt"])),
    Case("runtime-video-fps-zero", lambda c: ("omni-runtime", ["run", c.bundle, "--video", _silent_video(c),
                                                               "--video-fps", "0"], ["--video-fps", "> 0"])),
    Case("runtime-wav-missing-dir", lambda c: ("omni-runtime", ["run", c.bundle, "--prompt", "hi", "--wav",
                                                                c.tmp / "none" / "a.wav"], ["none", "does not exist"])),
    Case("runtime-unknown-speaker", lambda c: ("omni-runtime", ["run", c.bundle, "--prompt", "hi", "--wav",
                                                                c.tmp / "a.wav", "--speaker", "chelsie"],
                                               ["'chelsie'", "Chelsie, Ethan"])),
    Case("runtime-unknown-command", lambda c: ("omni-runtime", ["chat", c.bundle], ["'chat'"])),
]

TORCH_IMPORT = re.compile(r"^import time:.*\|\s+(torch|transformers)(\.|$)", re.M)


@pytest.fixture
def ctx(tmp_path, tiny_checkpoint, tiny_bundle) -> Ctx:
    work = tmp_path / "work"
    work.mkdir()
    return Ctx(tmp=work, ckpt=tiny_checkpoint, bundle=tiny_bundle)


def test_catalogue_is_large_enough():
    assert len(CASES) >= 30
    assert len({case.id for case in CASES}) == len(CASES)
    commands = " ".join(case.id for case in CASES)
    for command in ("tiny", "build", "run", "inspect", "runtime"):
        assert command in commands


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, ctx: Ctx):
    if case.skip:
        pytest.skip(case.skip)
    tool, args, expected = case.make(ctx)
    before = snapshot(ctx.tmp)
    bundle_before = snapshot(ctx.bundle)
    proc = cli(tool, *args)
    messages = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("import time:"))
    assert proc.returncode == 2, (proc.returncode, proc.stdout, messages)
    assert "Traceback" not in messages + proc.stdout, messages
    assert "error:" in messages and "fix:" in messages, messages
    for text in expected:
        assert text in messages, (text, messages)
    assert snapshot(ctx.tmp) == before, "the command left files behind"
    assert snapshot(ctx.bundle) == bundle_before
    imported = TORCH_IMPORT.findall(proc.stderr)
    assert not imported, f"an input error imported {sorted({m[0] for m in imported})}"
