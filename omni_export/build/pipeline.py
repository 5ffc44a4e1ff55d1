"""``omni-export build``: checkpoint + recipe -> bundle, one registered module at a time.

Inputs are validated first (recipe, checkpoint directory, output path, every module's
settings, memory), before any heavy import or work; then each module of the recipe, in the
registry's order (``omni_export.modules.REGISTRY``), writes its graphs into the bundle's
temporary directory and hands back its ``config`` block and its build info; the manifest is
written last. No module is named here.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

from omni_runtime.prompt.chat import DEFAULT_SYSTEM_PROMPT

from omni_export.build.bundle_writer import BundleWriter
from omni_export.checkpoint.reader import Checkpoint, CheckpointError
from omni_export.checkpoint.info import chat_template, generation_defaults, special_tokens
from omni_export.build.recipes import DEFAULT_TARGET, Recipe, load_recipe


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes, or None where that is not readable."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(ckpt: Checkpoint, modules: list) -> int:
    """Refuse, before any work, a build whose largest module would not fit in memory."""
    need = max(module.memory_estimate() for module in modules)
    have = available_memory()
    if have is not None and need > have:
        raise CheckpointError(
            f"building needs about {need / 1e9:.1f} GB of RAM, only {have / 1e9:.1f} GB is available",
            path=ckpt.root,
            fix="close other programs or use a machine with more memory; --no-memory-check skips this check")
    return need


def session_config(quantization: dict | None) -> dict[str, str]:
    """The onnxruntime session config entries a graph needs (manifest ``session_config``): the
    MatMulNBits accuracy level of DequantizeLinear + MatMul pairs onnxruntime fuses (int4 / int8
    weights written as ``qdq``); none for a float graph."""
    if not quantization or quantization.get("emit", "qdq") != "qdq" or quantization.get("accuracy_level") is None:
        return {}
    return {"session.qdq_matmulnbits_accuracy_level": str(quantization["accuracy_level"])}


def prepare(model_dir: str | Path, recipe: str | Recipe, calib: str | Path | None = None,
            target: str = DEFAULT_TARGET):
    """Validate the recipe (for the build ``target``), the checkpoint and every module's settings;
    no heavy work. A ``Recipe`` object is used as resolved (its own ``target``)."""
    from omni_export.modules import REGISTRY

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, target=target)
    if calib is not None:
        recipe = recipe.with_calibration_file(calib)
    ckpt = Checkpoint.open(model_dir)
    modules, skipped = [], {}
    for name, cls in REGISTRY.items():
        if name not in recipe.modules:
            continue
        module = cls(ckpt, recipe.modules[name], calibration=recipe.calibration)
        reason = module.skip_reason()
        if reason is None and any(dep in skipped for dep in module.requires):
            reason = f"needs {', '.join(d for d in module.requires if d in skipped)}, which is skipped"
        if reason is not None:
            skipped[name] = reason
            continue
        module.check()
        modules.append(module)
    return recipe, ckpt, modules, skipped


def build_bundle(model_dir: str | Path, recipe: str | Recipe, out: str | Path, force: bool = False,
                 console=None, memory_check: bool = True, calib: str | Path | None = None,
                 target: str = DEFAULT_TARGET, config_only: tuple[str, ...] = ()) -> Path:
    """Compile ``model_dir`` with ``recipe`` for the build ``target`` (``cpu`` or ``cuda``: the
    recipe's ``targets`` section) into the bundle directory ``out`` (atomically).

    ``config_only``: modules whose manifest config block is written but not their graphs (for
    benchmarks that measure other modules: benchmarks/precision_table.py leaves out the thinker,
    whose config block every manifest needs); such a bundle does not chat."""
    recipe, ckpt, modules, skipped = prepare(model_dir, recipe, calib, target)
    for name, reason in skipped.items():
        if console is not None:
            console.print(f"{name} skipped: {reason}", markup=False, highlight=False)
    writer = BundleWriter(Path(out), force=force)  # checks the output path before any work
    if memory_check:
        check_memory(ckpt, modules)
    tokens = special_tokens(ckpt)
    template = chat_template(ckpt)
    generation = generation_defaults(ckpt, tokens)

    from transformers.utils import logging as transformers_logging

    from omni_export.modules import BuildContext

    transformers_logging.set_verbosity_error()  # config-validation chatter is not for users
    progress = _progress(console)
    started = time.perf_counter()
    with writer, progress:
        task = progress.add_task("exporting", total=1)

        def on_progress(description: str, done: int, total: int) -> None:
            progress.update(task, description=description, completed=done, total=total)

        ctx = BuildContext(ckpt=ckpt, recipe=recipe, out_dir=writer.dir, progress=on_progress,
                           say=(console.print if console is not None else (lambda message: None)))
        config, info = {}, {}
        for module in modules:
            if module.name in config_only:
                config[module.name] = module.config()
                continue
            result = module.build(ctx)
            if tuple(result.graphs) != module.graphs:
                raise RuntimeError(f"the {module.name} module wrote graphs {list(result.graphs)}, "
                                   f"not the {list(module.graphs)} it declares")
            for name, (graph, quantization) in result.graphs.items():
                writer.add_graph(name, graph, graph.dtype, quantization, session_config(quantization))
            config[module.name] = module.config()
            info[module.name] = result.info
            gc.collect()
        progress.update(task, description="writing tokenizer and manifest")
        writer.copy_file(ckpt.root / "tokenizer.json", "tokenizer.json")
        writer.write_text("chat_template.jinja", template)
        manifest = {
            "model": {"family": "qwen2_5_omni", "source": ckpt.root.resolve().name,
                      "architectures": ckpt.raw_config.get("architectures") or []},
            "target": recipe.target,
            "recipe": recipe.to_json(),
            "tokenizer": {"file": "tokenizer.json", "chat_template_file": "chat_template.jinja",
                          "default_system_prompt": DEFAULT_SYSTEM_PROMPT},
            "special_tokens": {**tokens, "pad": generation["pad_token_id"]},
            "generation": generation,
            "config": config,
            "modules": {"built": [m.name for m in modules if m.name not in config_only], "skipped": skipped},
            "build": {"seconds": round(time.perf_counter() - started, 2), "modules": info},
        }
        path = writer.commit(manifest)
    return path


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return 0

    def update(self, *args, **kwargs):
        pass


class _LineProgress(_NoProgress):
    """Progress for logs and pipes: one line per step, with the elapsed time."""

    def __init__(self, console):
        self.console = console
        self.started = time.perf_counter()
        self.last = None

    def update(self, task, description=None, completed=None, total=None, **kwargs):
        if description is None or description == self.last:
            return
        self.last = description
        step = f"[{completed}/{total}] " if completed is not None and total else ""
        self.console.print(f"{time.perf_counter() - self.started:7.1f}s  {step}{description}", markup=False,
                           highlight=False)


def _progress(console):
    if console is None:
        return _NoProgress()
    if not console.is_terminal:
        return _LineProgress(console)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)
