"""The ``omni-export`` command line (typer).

Every user-facing failure is an ``OmniError``: printed as one message naming the file and the
fix, exit code 2, no traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from omni_runtime.errors import OmniError

app = typer.Typer(
    name="omni-export",
    help="Compile Qwen2.5-Omni checkpoints into ONNX bundles and run them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


def fail(exc: OmniError) -> None:
    err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def tiny(
    out_dir: Path = typer.Argument(..., help="Directory to create (must not exist or be empty)."),
    preset: str = typer.Option("tiny", help="tiny (seconds, for tests and the demo) or 7b-shape (real 7B widths, few layers)."),
    seed: int = typer.Option(0, help="Random seed of the weights."),
    layers: Optional[int] = typer.Option(None, help="Thinker layer count (default: 2 for tiny, 4 for 7b-shape)."),
) -> None:
    """Write a random-weight Qwen2.5-Omni checkpoint in the real on-disk layout."""
    from .tiny_model import PRESETS, write_tiny_checkpoint

    if preset not in PRESETS:
        fail(OmniError(f"unknown preset {preset!r}", fix=f"use one of: {', '.join(PRESETS)}"))
    try:
        path = write_tiny_checkpoint(out_dir, preset=preset, seed=seed, layers=layers, progress=True)
    except FileExistsError:
        fail(OmniError("already exists and is not empty", path=out_dir, fix="choose a new directory or remove it first"))
    except ValueError as exc:
        fail(OmniError(str(exc), fix="see `omni-export tiny --help`"))
    err.print(f"wrote random-weight {preset} checkpoint to {path}")


@app.command()
def build(
    model: Path = typer.Option(..., "--model", help="Qwen2.5-Omni checkpoint directory (config.json, *.safetensors, tokenizer)."),
    recipe: str = typer.Option("fp32", "--recipe", help="Built-in recipe name (see recipes/) or a recipe YAML path."),
    out: Path = typer.Option(..., "--out", help="Bundle directory to create."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle at --out."),
    memory_check: bool = typer.Option(True, "--memory-check/--no-memory-check",
                                      help="Refuse up front an export that would not fit in RAM."),
) -> None:
    """Export the model's graphs into a bundle with a manifest."""
    from .build import build_bundle

    try:
        path = build_bundle(model, recipe, out, force=force, console=err, memory_check=memory_check)
    except OmniError as exc:
        fail(exc)
    err.print(f"bundle written to {path}")


@app.command()
def run(
    bundle: Path = typer.Argument(..., help="Bundle directory (with manifest.json)."),
    prompt: str = typer.Option(..., "--prompt", help="User prompt text."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt (default: the Qwen2.5-Omni one)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Generation limit (default: the bundle's)."),
    greedy: bool = typer.Option(False, "--greedy", help="Greedy decoding (overrides the sampling options)."),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Top-k filter (0 = off)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Top-p (nucleus) filter."),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty", help="Repetition penalty (1 = off)."),
    seed: Optional[int] = typer.Option(None, help="Sampling seed."),
    device: str = typer.Option("auto", help="auto (CUDA when available), cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (text, prompt_ids, token_ids, ...)."),
) -> None:
    """Chat with a bundle: renders the chat template, generates and streams the answer."""
    from dataclasses import replace

    from omni_runtime.runner import OmniRunner

    try:
        runner = OmniRunner(bundle, device=device)
        sampling = runner.default_sampling()
        changes = {k: v for k, v in {"temperature": temperature, "top_k": top_k, "top_p": top_p,
                                     "repetition_penalty": repetition_penalty}.items() if v is not None}
        if changes:
            sampling = replace(sampling, do_sample=True, **changes)
        if greedy:
            sampling = replace(sampling, do_sample=False)

        def stream(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        result = runner.chat(prompt, system=system, max_new_tokens=max_new_tokens, sampling=sampling,
                             seed=seed, on_text=None if as_json else stream)
    except OmniError as exc:
        fail(exc)
    if as_json:
        body = result.to_json()
        body.pop("prompt", None)
        print(json.dumps(body, ensure_ascii=False))
    else:
        sys.stdout.write("\n")


@app.command()
def inspect(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
    verify: bool = typer.Option(False, "--verify", help="Also check every file's sha256."),
) -> None:
    """Show a bundle's manifest: model, recipe, graphs and their IO."""
    from omni_runtime.manifest import load_manifest, verify_file

    try:
        manifest = load_manifest(bundle)
        if verify:
            for rel in manifest.files:
                verify_file(manifest, rel)
    except OmniError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(manifest.data, indent=2))
        return
    out = Console()
    data = manifest.data
    out.print(f"[bold]{manifest.root}[/]  schema {data['schema']} v{data['schema_version']}, "
              f"producer {data['producer']['name']} {data['producer']['version']}")
    out.print(f"model {data['model']['family']} ({data['model']['source']}), recipe {data['recipe']['name']} "
              f"({data['recipe']['dtype']}, quantization {data['recipe']['quantization']})")
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
    consts = Table(title="config.thinker")
    consts.add_column("key")
    consts.add_column("value")
    for key, value in data["config"]["thinker"].items():
        consts.add_row(key, str(value))
    out.print(consts)
    out.print("special tokens: " + ", ".join(f"{k}={v}" for k, v in data["special_tokens"].items()))
    if verify:
        out.print(f"[green]all {len(manifest.files)} files match their sha256[/]")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
