"""Shared fixtures: random-weight tiny checkpoints, bundles built from them, the oracle.

The oracle is transformers' own Qwen2.5-Omni thinker, loaded with ``from_pretrained`` from
the checkpoint directory (independently of omni-export's loader).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Remembered sha256 checks (omni_runtime.bundle.hash_cache) go to a cache of this test run, not
# the user's: subprocesses inherit it.
os.environ["OMNI_RUNTIME_CACHE_DIR"] = tempfile.mkdtemp(prefix="omni-runtime-cache-")
# it also holds the optimized copies of the graphs loaded (omni_runtime.bundle.ort_cache): removed at exit
atexit.register(shutil.rmtree, os.environ["OMNI_RUNTIME_CACHE_DIR"], ignore_errors=True)


def build_tiny(tmp_path_factory, seed: int) -> tuple[Path, Path]:
    """Write a tiny checkpoint with ``seed`` and build an fp32 bundle from it."""
    from omni_export.build.pipeline import build_bundle
    from omni_export.testkit.tiny_model import write_tiny_checkpoint

    base = tmp_path_factory.mktemp(f"tiny-seed{seed}")
    ckpt = write_tiny_checkpoint(base / "model", preset="tiny", seed=seed)
    bundle = build_bundle(ckpt, "fp32", base / "bundle")
    return ckpt, bundle


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint dir, bundle dir) for seed 0."""
    return build_tiny(tmp_path_factory, 0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny) -> Path:
    return tiny[0]


@pytest.fixture(scope="session")
def tiny_bundle(tiny) -> Path:
    return tiny[1]


def load_reference_thinker(checkpoint: Path):
    """transformers' Qwen2.5-Omni thinker from the checkpoint directory, fp32, eval, sdpa."""
    from transformers import Qwen2_5OmniForConditionalGeneration

    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="sdpa",
                                                                  dtype="float32")
    return model.thinker.eval()


@pytest.fixture(scope="session")
def reference_thinker(tiny_checkpoint):
    return load_reference_thinker(tiny_checkpoint)


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``omni-export ARGS`` in a subprocess (the real entry point), capturing output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "omni_export.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def link_copy(src: Path, dest: Path, real: tuple[str, ...] = ("manifest.json",)) -> Path:
    """A copy of directory ``src`` whose files are hard links (copies where linking fails), except
    the ``real`` ones, which are copied so a test may modify them."""
    dest.mkdir(parents=True)
    for path in sorted(src.rglob("*")):
        target = dest / path.relative_to(src)
        if path.is_dir():
            target.mkdir(exist_ok=True)
            continue
        if path.name in real:
            shutil.copyfile(path, target)
        else:
            try:
                os.link(path, target)
            except OSError:
                shutil.copyfile(path, target)
    return dest


def run_decoder_graph(session, embeds, positions, past_kv):
    """Run a KV decoder graph (``thinker_decoder``, ``talker_decoder``) once on torch ``embeds``
    [batch, seq, width], ``positions`` [3, batch, seq] and the torch ``past_kv`` list (key, value per
    layer, [batch, kv_heads, past, head_dim]); returns the session's outputs."""
    import numpy as np

    batch, sequence = embeds.shape[:2]
    total = past_kv[0].shape[2] + sequence
    feeds = {"inputs_embeds": embeds.numpy(), "position_ids": positions,
             "seqlens_k": np.full(batch, total - 1, dtype=np.int32),
             "total_sequence_length": np.array(total, dtype=np.int32)}
    for i in range(len(past_kv) // 2):
        feeds[f"past_key_values.{i}.key"] = past_kv[2 * i].numpy()
        feeds[f"past_key_values.{i}.value"] = past_kv[2 * i + 1].numpy()
    return session.run(None, feeds)
