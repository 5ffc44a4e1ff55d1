"""``omni-export verify``: every graph of a bundle against its PyTorch (transformers) module, fp32.

The driver checks its inputs, then walks the module registry (``omni_export.modules.REGISTRY``)
in order: each module with any of its graphs in the bundle is built for reference
(``cls.reference(ckpt)``) and runs its own check (``module.verify(ctx)``, in
``omni_export/verify/checks/<module name>.py``, whose docstring says what is compared), given a
``VerifyContext``: the manifest, the checkpoint, a CPU session pool over the bundle, the seed, the
scale of random thinker-space inputs (the std of the checkpoint's embedding table) and the
thinker's teacher-forcing settings. ONE MODULE AT A TIME: within a check the bundle runs first
(its sessions are then released), the reference after, so the two never hold their weights at the
same time; the module is dropped before the next one. Graphs the bundle lacks are skipped.

Reported (``verify_bundle``)::

    {"graphs": {"thinker_embedding": {"max_abs", "rel_rms"},
                "thinker_decoder": {"max_abs", "rel_rms", "logits_max_abs", "logits_rel_rms"},
                "audio_encoder", "vision_encoder", "talker_embedding", "token2wav_dit",
                "token2wav_bigvgan": {"max_abs", "rel_rms"},
                "talker_decoder": {"max_abs", "rel_rms", "logits_max_abs", "logits_rel_rms"}},
     "thinker": {"top1_agreement", "mean_kl", "max_kl", "positions"},
     "bundle", "model", "recipe", "seconds", "settings"}

``graphs`` holds every module's graphs (``ModuleReport.graphs``; ``rel_rms = rms(bundle - ref) /
rms(ref)``; each with its ``dtype`` and ``runs_on``: a float16 graph runs on onnxruntime's CPU
provider with the float32 Casts onnxruntime inserts where it lacks float16 kernels, listed in
``cpu_float32_ops``), a module's summary (``ModuleReport.summary``: the thinker's teacher-forced
distributions) stands under the module's name, and ``settings`` holds the counts asked, each
check's own constants and the seed.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from omni_runtime.request import check_count

from omni_export.checkpoint.reader import Checkpoint
from omni_export.verify.context import SEED, VerifyContext, VerifyError, embedding_scale

Progress = Callable[[str, int, int], None]  # (description, done, total)

__all__ = ["Progress", "VerifyError", "verify_bundle", "verify_modules"]


def verify_bundle(bundle_dir: str | Path, model_dir: str | Path, prompts: int = 4, tokens: int = 32,
                  progress: Progress | None = None) -> dict:
    """Compare every graph of the bundle with transformers on the checkpoint ``model_dir``
    (module docstring); ``progress(description, done, total)`` is told what runs."""
    check_count(prompts, "prompts", 1, "pass prompts >= 1")
    check_count(tokens, "tokens", 1, "pass tokens >= 1")
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # config-validation chatter is not for users
    try:
        return _verify(Path(bundle_dir), Path(model_dir), prompts, tokens, progress)
    finally:
        transformers_logging.set_verbosity(verbosity)


def _verify(bundle_dir: Path, model_dir: Path, prompts: int, tokens: int, progress: Progress | None) -> dict:
    from omni_runtime.bundle.manifest import load_manifest

    started = time.perf_counter()
    say = progress or (lambda description, done, total: None)
    manifest = load_manifest(bundle_dir)
    ckpt = Checkpoint.open(model_dir)
    say("reading the embedding table", 0, 1)
    graphs, summaries, settings = _run_checks(manifest, ckpt, embedding_scale(ckpt), progress, prompts, tokens)
    say("done", 1, 1)
    return {
        "bundle": str(manifest.root),
        "model": str(ckpt.root),
        "recipe": manifest.recipe.get("name"),
        "graphs": graphs,
        **summaries,
        "settings": {"prompts": prompts, "tokens": tokens, **settings, "seed": SEED},
        "seconds": round(time.perf_counter() - started, 2),
    }


def verify_modules(manifest, ckpt: Checkpoint, scale: float, progress: Progress | None = None) -> dict:
    """``{graph: {"max_abs", "rel_rms", ...}}`` of the bundle's graphs whose check needs no
    teacher-forcing settings (a check that scores prompts reports nothing without them), each
    against its transformers module on a seeded sample input; graphs the bundle lacks are skipped."""
    return _run_checks(manifest, ckpt, scale, progress)[0]


def _run_checks(manifest, ckpt: Checkpoint, scale: float, progress: Progress | None = None,
                prompts: int | None = None, tokens: int | None = None) -> tuple[dict, dict, dict]:
    """(graphs, {module name: summary}, settings) of every registered module the bundle has
    graphs of, in registry order, one module at a time."""
    from omni_runtime.bundle.sessions import CPU, SessionPool, SessionSettings

    from omni_export.modules import REGISTRY

    classes = [cls for cls in REGISTRY.values() if any(name in manifest.graphs for name in cls.graphs)]
    # A float16 graph runs on onnxruntime's CPU provider too: the nodes without a float16 CPU kernel
    # through Casts onnxruntime inserts (float32 compute, float16 weights and storage between
    # them). verify says so per graph (``runs_on``), never silently.
    pool = SessionPool(manifest, [CPU], SessionSettings(allow_cpu_casts=True))
    shared = VerifyContext(manifest, ckpt, pool, scale, SEED, prompts, tokens)
    graphs, summaries, settings = {}, {}, {}
    try:
        for done, cls in enumerate(classes):
            ctx = replace(shared, say=_say(progress, done, len(classes)))
            module = cls.reference(ckpt)
            report = module.verify(ctx)
            del module, ctx
            pool.release_all()
            gc.collect()  # drop the reference module before the next one is read
            for name, entry in report.graphs.items():
                graphs[name] = {**entry, **_how_run(manifest, name)}
            if report.summary is not None:
                summaries[cls.name] = report.summary
            settings.update(report.settings)
    finally:
        pool.release_all()
    return graphs, summaries, settings


def _how_run(manifest, name: str) -> dict:
    """What a graph's figures mean: its ``dtype`` and where it ran (``runs_on``): onnxruntime's
    CPU provider, for a float16 graph with the float32 Casts onnxruntime inserts before the
    nodes it has no float16 CPU kernel for (``omni_export.verify.precision.cpu_casts``)."""
    spec = manifest.graphs.get(name)
    if spec is None:
        return {}
    out = {"dtype": spec.dtype, "runs_on": "onnxruntime-cpu"}
    if spec.dtype == "float16":
        from omni_export.verify.precision import cpu_casts

        ops = cpu_casts(manifest.path(spec.file))
        if ops:
            out["runs_on"] = "onnxruntime-cpu, float32 casts inserted"
            out["cpu_float32_ops"] = ops
    return out


def _say(progress: Progress | None, done: int, total: int) -> Callable[[str], None]:
    if progress is None:
        return lambda description: None
    return lambda description: progress(description, done, total)

