"""``omni-export bench``: checks, the measured processes, the result.

Every repeat is one whole request in a fresh process (``runtime_side``; with ``--model`` also
``pytorch_side``, round robin, never at the same time): nothing is shared between repeats
(sessions, page cache aside), and every figure, peak RSS included, is per process and per
policy. The result's figures are medians with their range over the repeats that succeeded;
the ratios against PyTorch are those of the medians of this same run.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omni_runtime.errors import BundleError, InputError, OmniError

from omni_export.bench import STAGES, report
from omni_export.bench.process import default_rss_limit, run_child

DEFAULT_PROMPT = "Describe what you hear and see."
DEFAULT_TEXT_PROMPT = "Tell me a short story about the sea."
DEFAULT_MAX_NEW_TOKENS = 32
#: a random talker never says its stop code: 4 s of codes keeps a 7b-shape repeat to about a minute
DEFAULT_MAX_SPEECH_SECONDS = 4.0


@dataclass
class BenchOptions:
    bundle: Path
    model: Path | None = None
    audio: list[Path] = field(default_factory=list)
    image: list[Path] = field(default_factory=list)
    video: list[Path] = field(default_factory=list)
    prompt: str | None = None
    speech: bool = False
    memory: str = "lazy"
    repeats: int = 3
    json_out: Path | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_speech_seconds: float = DEFAULT_MAX_SPEECH_SECONDS
    speaker: str | None = None
    threads: int = 0
    device: str = "cpu"
    ignore_eos: bool = True
    timeout: float = 1800.0
    rss_limit: int | None = None


def parse_memory(value: str):
    """``lazy``, ``resident`` or a byte budget (int); InputError naming ``--memory`` otherwise."""
    try:
        from omni_runtime.bundle.memory import MemoryPolicy
    except ImportError:  # a runtime without memory policies: only the words are known
        word = value.strip().lower()
        if word in ("lazy", "resident"):
            return word
        if word.isdigit() and int(word) > 0:
            return int(word)
        raise InputError(f"--memory {value!r} is not lazy, resident or a number of bytes",
                         fix="pass --memory lazy, --memory resident or --memory BYTES") from None
    try:
        policy = MemoryPolicy.parse(value)
    except InputError as exc:
        raise InputError(exc.problem.replace("memory=", "--memory "), fix=exc.fix) from None
    return policy.budget_bytes if policy.budget_bytes is not None else policy.mode


def check(options: BenchOptions):
    """Every check that needs no measured process: the bundle, the media files, the model, the
    options, the JSON path. Returns the loaded manifest."""
    from omni_runtime.bundle.manifest import load_manifest

    manifest = load_manifest(options.bundle)  # BundleError naming the missing/corrupt file
    for flag, files in (("--audio", options.audio), ("--image", options.image), ("--video", options.video)):
        for f in files:
            path = Path(f)
            if not path.exists():
                raise InputError(f"{flag} file does not exist", path=path, fix=f"check the path given to {flag}")
            if not path.is_file():
                raise InputError(f"{flag} is not a file", path=path, fix=f"pass a media file to {flag}")
    if options.repeats < 1:
        raise InputError(f"--repeats must be >= 1, got {options.repeats}", fix="pass --repeats 3 (or more)")
    from omni_runtime.bundle.sessions import select_providers

    try:
        select_providers(options.device)  # cuda without onnxruntime-gpu: said once, before any process
    except InputError as exc:
        raise InputError(exc.problem, fix=exc.fix.replace('device="cpu"', "--device cpu")) from None
    if options.max_new_tokens < 2:
        raise InputError(f"--max-new-tokens must be >= 2 to measure decoding, got {options.max_new_tokens}",
                         fix="pass --max-new-tokens 32")
    if not options.max_speech_seconds > 0:
        raise InputError(f"--max-speech-seconds must be > 0, got {options.max_speech_seconds}",
                         fix="pass e.g. --max-speech-seconds 4")
    if options.speech:
        from omni_runtime.stages.speech import has_speech

        if not has_speech(manifest):
            raise BundleError("this bundle has no speech output (no talker or token2wav graphs), so --wav cannot be "
                              "measured", path=manifest.manifest_path,
                              fix="leave out --wav, or rebuild the bundle with a recipe that exports modules.talker "
                                  "and modules.token2wav")
    elif options.speaker is not None:
        raise InputError("--speaker needs --wav", fix="add --wav to measure speech out, or drop --speaker")
    if options.model is not None:
        from omni_export.checkpoint.reader import Checkpoint

        Checkpoint.open(options.model)  # a directory that is not Qwen2.5-Omni: CheckpointError naming it
    if options.json_out is not None:
        parent = Path(options.json_out).resolve().parent
        if not parent.is_dir():
            raise InputError("the directory of --json does not exist", path=parent,
                             fix="create it first, or choose another --json path")
        if Path(options.json_out).is_dir():
            raise InputError("--json is a directory", path=options.json_out, fix="pass a file name, e.g. bench.json")
    return manifest


def spec_of(options: BenchOptions) -> dict:
    """What each measured process is told (JSON)."""
    has_media = bool(options.audio or options.image or options.video)
    prompt = options.prompt if options.prompt is not None else (DEFAULT_PROMPT if has_media else DEFAULT_TEXT_PROMPT)
    return {"bundle": str(Path(options.bundle).resolve()),
            "model": str(Path(options.model).resolve()) if options.model else None,
            "prompt": prompt,
            "audio": [str(Path(f).resolve()) for f in options.audio],
            "image": [str(Path(f).resolve()) for f in options.image],
            "video": [str(Path(f).resolve()) for f in options.video],
            "speech": options.speech, "max_new_tokens": options.max_new_tokens,
            "max_speech_seconds": options.max_speech_seconds, "speaker": options.speaker, "noise_seed": 0,
            "memory": options.memory, "threads": options.threads, "device": options.device,
            "ignore_eos": options.ignore_eos}


def _input_error(child) -> InputError | None:
    """The InputError a runtime child reported for the request (exit code 2, runtime_side.main)."""
    if child.returncode != 2 or child.killed is not None:
        return None
    try:
        error = child.record().get("input_error")
    except (ValueError, AttributeError):
        return None
    return None if not error else InputError(error["problem"], path=error.get("path"), fix=error.get("fix"))


def _child_cmd(side: str, spec: dict) -> list[str]:
    return [sys.executable, "-m", f"omni_export.bench.{side}_side", json.dumps(spec)]


def run(options: BenchOptions, log=lambda message: None) -> dict:
    """Check, measure every repeat, and return the result (module docstring); writes ``json_out``."""
    manifest = check(options)
    options.memory = parse_memory(str(options.memory))
    spec = spec_of(options)
    rss_limit = options.rss_limit if options.rss_limit is not None else default_rss_limit()
    sides = ["runtime"] + (["pytorch"] if options.model is not None else [])
    records: dict[str, list[dict]] = {side: [] for side in sides}
    failures: list[str] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for rep in range(options.repeats):
        for side in sides:
            child = run_child(_child_cmd(side, spec), timeout=options.timeout, rss_limit=rss_limit, env=env)
            bad = _input_error(child) if side == "runtime" else None
            if bad is not None:
                raise bad  # e.g. a media file the runtime cannot decode: every repeat would fail alike
            if not child.ok:
                failures.append(f"{side} repeat {rep + 1}: {child.failure()}")
                log(f"{side} repeat {rep + 1}/{options.repeats}: FAILED {child.failure()}")
                continue
            try:
                record = child.record()
            except ValueError as exc:
                failures.append(f"{side} repeat {rep + 1}: unreadable output ({exc})")
                continue
            records[side].append(record)
            f = report.figures(record)["request"]
            log(f"{side} repeat {rep + 1}/{options.repeats}: request {f['request_seconds']:.2f} s, "
                f"peak RSS {(f['peak_rss_bytes'] or 0) / 1e9:.2f} GB ({child.wall_s:.0f} s process)")
    if not records["runtime"]:
        raise OmniError(f"every runtime repeat failed: {failures[0]}", path=options.bundle,
                        fix="run the same request with `omni-export run` to see the error")
    result = assemble(options, manifest, spec, records, failures, rss_limit)
    if options.json_out is not None:
        write_json(options.json_out, result)
    return result


def assemble(options: BenchOptions, manifest, spec: dict, records: dict, failures: list[str],
             rss_limit: int | None) -> dict:
    runtime = report.summarize_side([report.figures(r) for r in records["runtime"]])
    pytorch = None
    if records.get("pytorch"):
        pytorch = report.summarize_side([report.figures(r) for r in records["pytorch"]])
    ratios = report.ratios(runtime, pytorch)
    first = records["runtime"][0]
    applied = all(r.get("memory_policy_applied") for r in records["runtime"])
    notes = []
    if not applied:
        notes.append("this omni_runtime's OmniRunner takes no memory policy: measured with its default session "
                     "handling, whatever --memory says")
    if options.model is not None and not records.get("pytorch"):
        notes.append("every PyTorch repeat failed: no ratios")
    if spec["ignore_eos"]:
        notes.append(f"both sides generate exactly {spec['max_new_tokens']} tokens (eos ignored; a speed figure, "
                     "not an answer)")
    kv = report.kv_cache_bytes(manifest, first["prompt_tokens"], spec["max_new_tokens"], first.get("codes"))
    result = {
        "bundle": spec["bundle"],
        "recipe": manifest.data["recipe"]["name"],
        "model": spec["model"],
        "memory_policy": spec["memory"],
        "memory_policy_applied": applied,
        "repeats": options.repeats,
        "measured": "one whole request per repeat, each in a fresh process (runtime and PyTorch round robin); "
                    "figures are medians with their range over the repeats",
        "request": {k: spec[k] for k in ("prompt", "audio", "image", "video", "speech", "max_new_tokens",
                                         "max_speech_seconds", "speaker", "noise_seed", "ignore_eos")},
        "decode_ratio_vs_pytorch": ratios.get("decode_ratio_vs_pytorch"),
        **{k: v for k, v in ratios.items() if k != "decode_ratio_vs_pytorch"},
        "first_audio_seconds": runtime.get("first_audio_seconds"),
        "token2wav_rtf": runtime.get("token2wav_rtf"),
        "peak_rss_bytes": runtime.get("peak_rss_bytes"),
        **{k: v for k, v in runtime.items() if k not in ("first_audio_seconds", "token2wav_rtf", "peak_rss_bytes",
                                                          "stages")},
        "stages": runtime["stages"],
        "memory_check": report.memory_check(runtime, kv),
        "pytorch": pytorch,
        "failures": failures,
        "notes": notes,
        "settings": {"threads": options.threads, "device": options.device, "providers": first.get("providers"),
                     "peak_method": first["trace"]["peak_method"], "rss_limit_bytes": rss_limit,
                     "timeout_s": options.timeout, "cpu_count": os.cpu_count()},
        "runs": records,
    }
    return result


def write_json(path: Path, data: dict) -> None:
    """Atomically: a temporary file beside ``path``, renamed over it."""
    from omni_runtime.atomic import write_json_atomic

    write_json_atomic(path, data)


__all__ = ["BenchOptions", "STAGES", "run", "check", "parse_memory"]
