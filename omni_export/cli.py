"""The ``omni-export`` command line (typer).

Every user-facing failure is an ``OmniError``: printed as one message naming the file and the
fix, exit code 2, no traceback (usage errors too). Nothing the user or a bundle supplies (paths,
prompts, manifest values, messages) is read as rich markup: the consoles print with markup off.

``run`` is ``omni-runtime run`` (``omni_runtime.cli.run_main``): one implementation, one set of
options. ``build`` and ``tiny`` check their inputs and output path before torch is imported,
and turn SIGINT/SIGTERM into a clean exit that leaves no temporary directory behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from omni_runtime.errors import OmniError

from omni_export import __version__

app = typer.Typer(
    name="omni-export",
    help="Compile Qwen2.5-Omni checkpoints into ONNX bundles and run them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# markup=False: a path such as "a[/x]b" or a message with "[gpu]" is printed as it is.
err = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)


def say(message: str) -> None:
    err.print(message)


def error(message: str) -> None:
    err.print(Text.assemble(("error:", "bold red"), " ", message))


def warn(message: str) -> None:
    err.print(Text.assemble(("warning:", "bold yellow"), " ", message))


def fail(exc: OmniError) -> None:
    from omni_runtime.cli import cli_message

    error(cli_message(exc))
    raise typer.Exit(2)


@contextlib.contextmanager
def interruptible(what: str) -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP remove the temporary directories being written and exit 128+N."""
    from omni_export.build.bundle_writer import exit_on_signals

    def said(name: str) -> None:
        # Plain os.write, not the rich console: the signal may land while the console is printing
        # a progress line (its lock held, its state half-updated).
        text = f"{what} interrupted by {name}; its temporary files were removed and nothing was written"
        os.write(2, f"\x1b[?25h\nerror: {text}\n".encode() if err.is_terminal else f"\nerror: {text}\n".encode())

    with exit_on_signals(said):
        yield


def _version(value: bool) -> None:
    if value:
        print(f"omni-export {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                 help="Show the version and exit."),
) -> None:
    """Compile Qwen2.5-Omni checkpoints into ONNX bundles and run them."""


@app.command()
def tiny(
    out_dir: Path = typer.Argument(..., help="Directory to create (must not exist or be empty)."),
    preset: str = typer.Option("tiny", help="tiny (seconds, for tests and the demo) or 7b-shape (real 7B widths, few layers)."),
    seed: int = typer.Option(0, help="Random seed of the weights."),
    layers: Optional[int] = typer.Option(None, help="Thinker layer count (default: 2 for tiny, 4 for 7b-shape)."),
    hidden: Optional[int] = typer.Option(None, help="With --preset tiny: the thinker's hidden size (a multiple of 16; "
                                                    "default 64)."),
    outliers: bool = typer.Option(False, "--outliers", help="Plant outlier hidden channels and massive activations "
                                  "in the thinker, as real LLMs have them (what AWQ and SmoothQuant are for; "
                                  "omni_export/testkit/outliers.py)."),
    awq: bool = typer.Option(False, "--awq", help="Write an AutoAWQ GEMM int4 checkpoint (the Qwen2.5-Omni-7B-AWQ "
                                                  "layout: thinker decoder linears as qweight/qzeros/scales)."),
    w8a8_modelslim: bool = typer.Option(False, "--w8a8-modelslim", help="Write msModelSlim's AscendV1 W8A8_DYNAMIC "
                                        "output (quant_model_description.json + quant_model_weights*.safetensors; "
                                        "lm_head and mlp.down_proj FLOAT) with the float talker and token2wav."),
    modelslim_static: Optional[list[str]] = typer.Option(
        None, "--modelslim-static", metavar="PATTERN",
        help="With --w8a8-modelslim: thinker modules (fnmatch, e.g. 'model.layers.*.self_attn.*') written as "
             "msModelSlim's static W8A8 (per-tensor activation scale and offset from a calibration run). "
             "Repeatable."),
) -> None:
    """Write a random-weight Qwen2.5-Omni checkpoint in the real on-disk layout."""
    from omni_export.build.bundle_writer import check_output
    from omni_export.testkit.tiny_model import PRESETS, write_tiny_checkpoint

    if preset not in PRESETS:
        fail(OmniError(f"unknown preset {preset!r}", fix=f"use one of: {', '.join(PRESETS)}"))
    if seed < 0:
        fail(OmniError(f"--seed must be >= 0, got {seed}", fix="pass a seed >= 0"))
    try:
        check_output(out_dir, kind="checkpoint", flag="OUT")
    except OmniError as exc:
        fail(exc)
    if awq and w8a8_modelslim:
        fail(OmniError("--awq and --w8a8-modelslim are two checkpoint layouts", fix="pass one of them"))
    if modelslim_static and not w8a8_modelslim:
        fail(OmniError("--modelslim-static is a part of the --w8a8-modelslim layout", fix="add --w8a8-modelslim"))
    if (hidden is not None or outliers) and (w8a8_modelslim or preset != "tiny"):
        fail(OmniError("--hidden and --outliers shape the tiny float checkpoint",
                       fix="use them with --preset tiny, without --w8a8-modelslim"))
    with interruptible("tiny"):
        try:
            if w8a8_modelslim:
                from omni_export.testkit.modelslim_writer import write_modelslim_checkpoint

                path = write_modelslim_checkpoint(out_dir, preset=preset, seed=seed, layers=layers, progress=True,
                                                  static=tuple(modelslim_static or ()))
            else:
                from omni_export.testkit.outliers import OutlierSpec

                path = write_tiny_checkpoint(out_dir, preset=preset, seed=seed, layers=layers, progress=True, awq=awq,
                                             hidden=hidden, outliers=OutlierSpec() if outliers else None)
        except FileExistsError:
            fail(OmniError("already exists and is not empty", path=out_dir,
                           fix="choose a new directory or remove it first"))
        except ValueError as exc:
            fail(OmniError(str(exc), fix="see `omni-export tiny --help`"))
    kind = "AutoAWQ " if awq else "msModelSlim W8A8 " if w8a8_modelslim else ""
    say(f"wrote random-weight {preset} {kind}checkpoint to {path}")


@app.command()
def build(
    model: Path = typer.Option(..., "--model", help="Qwen2.5-Omni checkpoint directory (config.json, *.safetensors, tokenizer)."),
    recipe: str = typer.Option("fp32", "--recipe", help="Built-in recipe name (see recipes/) or a recipe YAML path."),
    out: Path = typer.Option(..., "--out", help="Bundle directory to create."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle at --out."),
    memory_check: bool = typer.Option(True, "--memory-check/--no-memory-check",
                                      help="Refuse up front an export that would not fit in RAM."),
    verify: bool = typer.Option(False, "--verify", help="Then compare the bundle with the PyTorch model "
                                                        "(as `omni-export verify`) and print the report."),
    emit: Optional[str] = typer.Option(None, "--emit", help="How int4 linears are written: qdq (standard "
                                                             "DequantizeLinear + MatMul, fused by onnxruntime) or "
                                                             "matmulnbits (the contrib op directly: faster load, "
                                                             "onnxruntime only); sets `emit` of every module whose "
                                                             "recipe section has it; default: the recipe's."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration data for AWQ / W8A8: a JSONL file, "
                                                               "one Qwen-style messages list per line, or an "
                                                               "msModelSlim index.json / index.jsonl of text, image, "
                                                               "audio and video samples (or a directory holding "
                                                               "one) (default: the built-in set; recipes/README.md)."),
    target: str = typer.Option("cpu", "--target", help="Device the bundle is for: cpu (float32 float parts) or "
                                                       "cuda (the recipe's targets.cuda settings: float16 / int8 "
                                                       "float parts in the built-in recipes); recorded in the "
                                                       "manifest."),
) -> None:
    """Export the model's graphs into a bundle with a manifest.

    An AutoAWQ GEMM checkpoint (quantization_config in config.json) built with an int4 recipe
    is imported exactly: its int4 weights, zero points and scales are not re-quantized."""
    # Cheap checks first, before torch is imported (seconds): output path, recipe, checkpoint.
    from omni_export.build.bundle_writer import check_output
    from omni_export.checkpoint.reader import Checkpoint
    from omni_export.build.recipes import load_recipe

    try:
        check_output(out, force=force, flag="--out")
        parsed = load_recipe(recipe, target=target)
        if calib is not None:
            parsed = parsed.with_calibration_file(calib)
        if emit is not None:
            parsed = parsed.with_setting("emit", emit, flag="--emit")
        Checkpoint.open(model)  # also refuses a quantization other than AutoAWQ GEMM 4-bit
    except OmniError as exc:
        fail(exc)
    with interruptible("build"):
        from omni_export.build.pipeline import build_bundle

        try:
            path = build_bundle(model, parsed, out, force=force, console=err, memory_check=memory_check)
        except OmniError as exc:
            fail(exc)
    say(f"bundle written to {path}")
    if verify:
        _verify_and_show(path, model)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def run(ctx: typer.Context) -> None:
    """Chat with a bundle: renders the chat template, generates and streams the answer (options: run -h)."""
    from omni_runtime.cli import run_main

    raise typer.Exit(run_main(list(ctx.args), prog="omni-export run"))


@app.command()
def inspect(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
    verify: bool = typer.Option(False, "--verify", help="Also check every file's sha256."),
) -> None:
    """Show a bundle's manifest: model, recipe, graphs and their IO."""
    from omni_runtime.bundle.manifest import load_manifest, verify_file

    from omni_export.build.recipes import recipe_summary

    try:
        manifest = load_manifest(bundle)
        if verify:
            for rel in manifest.files:
                verify_file(manifest, rel, remembered=False)  # --verify hashes every file
    except OmniError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(manifest.data, indent=2))
        return
    out = Console(markup=False, highlight=False)
    data = manifest.data
    out.print(Text.assemble((str(manifest.root), "bold"),
                            f"  schema {data['schema']} v{data['schema_version']}, "
                            f"producer {data['producer']['name']} {data['producer']['version']}"))
    out.print(f"model {data['model']['family']} ({data['model'].get('source')}), recipe {data['recipe']['name']} "
              f"({recipe_summary(data['recipe'])})")
    table = Table(title="graphs")
    for col in ("graph", "files", "MB", "dtype", "quantization", "opset"):
        table.add_column(col, overflow="fold")
    for name, spec in manifest.graphs.items():
        size = sum(manifest.files[f]["bytes"] for f in spec.files) / 1e6
        table.add_row(name, "\n".join(spec.files), f"{size:.1f}", spec.dtype, str(spec.quantization), str(spec.opset))
    out.print(table)
    for name, spec in manifest.graphs.items():
        io = Table(title=f"{name} IO")
        for col in ("", "name", "dtype", "shape"):
            io.add_column(col)
        for direction, items in (("in", spec.inputs), ("out", spec.outputs)):
            kv = [t for t in items if t.name.startswith(("past_key_values.", "present."))]
            for t in [t for t in items if t not in kv] + kv[:2]:
                io.add_row(direction, t.name, t.dtype, str(list(t.shape)))
            if len(kv) > 2:
                io.add_row(direction, f"... {len(kv) - 2} more K/V tensors", "", "")
        out.print(io)
    for module, block in data["config"].items():
        consts = Table(title=f"config.{module}")
        consts.add_column("key")
        consts.add_column("value", overflow="fold")
        for key, value in block.items():
            consts.add_row(key, str(value))
        out.print(consts)
    out.print("special tokens: " + ", ".join(f"{k}={v}" for k, v in data["special_tokens"].items()))
    if verify:
        out.print(Text(f"all {len(manifest.files)} files match their sha256", style="green"))


@app.command("verify")
def verify_command(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    model: Path = typer.Option(..., "--model", help="The checkpoint directory the bundle was built from."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    prompts: int = typer.Option(4, "--prompts", min=1, help="Built-in conversations to score end to end."),
    tokens: int = typer.Option(32, "--tokens", min=1, help="Teacher-forced answer tokens per conversation."),
) -> None:
    """Compare every graph of the bundle with its PyTorch module in fp32 on sample inputs (one decoder layer,
    one module at a time), and the thinker's next-token distributions."""
    from omni_runtime.bundle.manifest import load_manifest

    from omni_export.checkpoint.reader import Checkpoint

    try:  # cheap checks before torch is imported
        load_manifest(bundle)
        Checkpoint.open(model)
    except OmniError as exc:
        fail(exc)
    _verify_and_show(bundle, model, as_json, prompts, tokens)


def _verify_and_show(bundle: Path, model: Path, as_json: bool = False, prompts: int = 4, tokens: int = 32) -> None:
    """Run ``omni_export.verify.driver.verify_bundle`` with a progress bar; print a table or JSON."""
    from omni_export.build.pipeline import _progress
    from omni_export.verify.driver import verify_bundle

    failure = None
    with _progress(err) as progress:
        task = progress.add_task("verify", total=1)

        def on_progress(description: str, done: int, total: int) -> None:
            progress.update(task, description=description, completed=done, total=total)

        try:
            report = verify_bundle(bundle, model, prompts=prompts, tokens=tokens, progress=on_progress)
        except OmniError as exc:
            failure = exc
    if failure is not None:
        fail(failure)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    out = Console(markup=False, highlight=False)
    out.print(f"verify {report['bundle']} (recipe {report['recipe']}) against {report['model']}, "
              f"fp32 PyTorch reference, {report['seconds']:.1f} s")
    graphs = Table(title="graphs vs PyTorch (rel_rms = rms(diff) / rms(reference))")
    for col in ("graph", "max_abs", "rel_rms", "logits max_abs", "logits rel_rms"):
        graphs.add_column(col)
    for name, m in report["graphs"].items():
        graphs.add_row(name, *(f"{m[k]:.3g}" if k in m else "" for k in
                               ("max_abs", "rel_rms", "logits_max_abs", "logits_rel_rms")))
    out.print(graphs)
    from omni_export.modules import REGISTRY

    for name in REGISTRY:  # a module check's summary (e.g. the thinker's teacher-forced agreement)
        summary = report.get(name)
        if not isinstance(summary, dict) or not summary:
            continue
        table = Table(title=f"{name} summary")
        for key in summary:
            table.add_column(key.replace("_", " "))
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in summary.values()))
        out.print(table)


@app.command("bench")
def bench_command(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    model: Optional[Path] = typer.Option(None, "--model", help="The checkpoint the bundle was built from: also run "
                                                              "the request through transformers (PyTorch eager, "
                                                              "float32, CPU) in its own process, and the ratios."),
    audio: Optional[list[Path]] = typer.Option(None, "--audio", help="Audio file in the prompt; repeatable."),
    image: Optional[list[Path]] = typer.Option(None, "--image", help="Image file in the prompt; repeatable."),
    video: Optional[list[Path]] = typer.Option(None, "--video", help="Video file in the prompt; repeatable."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt text (default: a fixed question)."),
    wav: bool = typer.Option(False, "--wav", help="Also speak the answer (talker + streamed token2wav)."),
    memory: str = typer.Option("lazy", "--memory", help="Session policy: lazy, resident or a byte budget (6GB)."),
    repeats: int = typer.Option(3, "--repeats", help="Requests measured, each in a fresh process."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON to this file."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Thinker tokens generated (exactly, eos ignored)."),
    max_speech_seconds: float = typer.Option(4.0, "--max-speech-seconds",
                                             help="Stop the talker after this many seconds of codes."),
    speaker: Optional[str] = typer.Option(None, "--speaker", help="Voice for --wav (default: the bundle's)."),
    threads: int = typer.Option(0, "--threads", help="Intra-op threads of both sides (0: the library default)."),
    device: str = typer.Option("cpu", "--device", help="Runtime device: cpu, cuda or auto."),
    timeout: float = typer.Option(1800.0, "--timeout", help="Seconds allowed per measured process."),
) -> None:
    """Measure whole requests per stage (session load, prefill and decode tok/s, time to first token, first
    audio, token2wav real-time factor, peak RSS), and against PyTorch with --model."""
    from omni_export.bench.driver import BenchOptions, run as run_bench
    from omni_export.bench.report import print_tables

    options = BenchOptions(bundle=bundle, model=model, audio=list(audio or []), image=list(image or []),
                           video=list(video or []), prompt=prompt, speech=wav, memory=memory, repeats=repeats,
                           json_out=json_out, max_new_tokens=max_new_tokens, max_speech_seconds=max_speech_seconds,
                           speaker=speaker, threads=threads, device=device, timeout=timeout)
    try:
        result = run_bench(options, log=say)
    except OmniError as exc:
        fail(exc)
    print_tables(result, Console(markup=False, highlight=False, width=max(Console().width, 140)))
    if json_out is not None:
        say(f"wrote {json_out}")


@app.command("plan")
def plan_command(
    model: Path = typer.Option(..., "--model", help="Model directory: its config.json is enough (e.g. the published "
                                                    "Qwen2.5-Omni-7B or -3B config)."),
    recipe: str = typer.Option(..., "--recipe", help="Built-in recipe name, a recipe YAML path, or a bundle "
                                                     "directory (its own recipe and target)."),
    target: Optional[str] = typer.Option(None, "--target", help="Build target: cpu (default) or cuda."),
    video_seconds: float = typer.Option(0.0, "--video-seconds", help="A video of this many seconds with its audio "
                                                                     "track (qwen-omni-utils defaults: 2 fps, its "
                                                                     "pixel limits)."),
    video_size: Optional[str] = typer.Option(None, "--video-size", help="The video's WIDTHxHEIGHT before resizing "
                                                                        "(default 1280x720)."),
    audio_seconds: float = typer.Option(0.0, "--audio-seconds", help="An audio clip of this many seconds."),
    image: Optional[list[str]] = typer.Option(None, "--image", help="An image of WIDTHxHEIGHT; repeatable."),
    device_memory: Optional[str] = typer.Option(None, "--device-memory", help="Memory to fit in (8GB, 7.5GiB); "
                                                                              "default: this machine's RAM (cpu), "
                                                                              "the GPU's (cuda, NVML) or 8GB."),
    memory: str = typer.Option("lazy", "--memory", help="Session policy: lazy, resident or a byte budget (6GB)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Answer tokens (default: the "
                                                                                "runtime's, 512)."),
    max_speech_seconds: Optional[float] = typer.Option(None, "--max-speech-seconds",
                                                       help="Bound the talker (default: its 4096 codes, 82 s)."),
    speech: bool = typer.Option(True, "--speech/--no-speech", help="Speech out (talker + streamed token2wav)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Plan the peak memory of one request per stage (weights, KV cache, activations, arena, the runtime's
    base) from the config alone, and say whether it fits."""
    from omni_export.plan import make_plan
    from omni_export.plan.report import print_plan

    try:
        result = make_plan(model, recipe, target, video_seconds, video_size, audio_seconds, image, device_memory,
                           memory, max_new_tokens, max_speech_seconds, speech)
    except OmniError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
        return
    print_plan(result, Console(markup=False, highlight=False, width=max(Console().width, 140)))


@app.command("tokenize")
def tokenize_command(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="User prompt text (optional with media files)."),
    audio: Optional[list[str]] = typer.Option(None, "--audio", help="Audio file in the user message; repeatable."),
    image: Optional[list[str]] = typer.Option(None, "--image", help="Image file in the user message; repeatable."),
    video: Optional[list[str]] = typer.Option(None, "--video", help="Video file in the user message; repeatable."),
    use_audio_in_video: bool = typer.Option(False, "--use-audio-in-video", help="Also feed each video's audio track."),
    video_fps: Optional[float] = typer.Option(None, "--video-fps", help="Video frames sampled per second."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt (default: the bundle's)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory for inputs.json and the encoder inputs (.npy) "
                                                           "the C++/C# hosts read (needed with media)."),
    noise_seed: Optional[int] = typer.Option(None, "--noise-seed", help="Also write token2wav's initial noise for "
                                                                        "this seed (the Python runtime's)."),
    noise_frames: Optional[int] = typer.Option(None, "--noise-frames", help="Noise rows (default: the talker's code "
                                                                            "limit x mel frames per code)."),
    as_json: bool = typer.Option(False, "--json", help="Print prompt_ids (and the inputs file) as JSON."),
) -> None:
    """Expanded prompt ids for the C++/C# hosts (as `run` renders and tokenizes the prompt) and, with --out,
    the media encoders' prepared inputs as .npy files (docs/hosts.md)."""
    from omni_export.hosts import tokenize

    try:
        result = tokenize(bundle, prompt, audio, image, video, system, use_audio_in_video, video_fps, out,
                          noise_seed, noise_frames)
    except OmniError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        print(",".join(map(str, result.prompt_ids)))
        if result.inputs is not None:
            say(f"wrote {result.inputs} ({len(result.files)} files)")


@app.command("detokenize")
def detokenize_command(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    ids: str = typer.Argument(..., help="Comma-separated token ids, e.g. 1,2,3."),
    as_json: bool = typer.Option(False, "--json", help="Print {\"text\": ...}."),
) -> None:
    """The text of token ids (e.g. a host's token_ids), special tokens skipped."""
    from omni_export.hosts import detokenize, parse_ids

    try:
        text = detokenize(bundle, parse_ids(ids))
    except OmniError as exc:
        fail(exc)
    print(json.dumps({"text": text}, ensure_ascii=False) if as_json else text)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    from omni_export.build.bundle_writer import StalePartialWarning

    if issubclass(category, StalePartialWarning):
        warn(str(message))
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    """The ``omni-export`` entry point; returns the exit code (2 for any bad input)."""
    try:
        from typer._click.exceptions import ClickException
    except ImportError:  # pragma: no cover - typer versions that use click itself
        from click.exceptions import ClickException

    warnings.showwarning = _show_warning
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="omni-export", standalone_mode=False)
    except ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help was shown
            return exc.exit_code
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "omni-export"
        error(f"{exc.format_message()}\n  fix: see `{where} --help`")
        return exc.exit_code
    except typer.Abort:
        error("aborted")
        return 1
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
