"""An interrupted or failed build leaves nothing that looks like a bundle."""

import pytest

from omni_export.build import pipeline as build_module
from omni_export.export import thinker_decoder
from omni_export.build.pipeline import build_bundle
from omni_export.build.bundle_writer import BundleWriteError
from omni_runtime.bundle.manifest import load_manifest


def test_failed_build_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash during the decoder export")

    monkeypatch.setattr(thinker_decoder, "build_graph", boom)
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError, match="simulated"):
        build_bundle(tiny_checkpoint, "fp32", out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no .partial- directory left behind


def test_existing_output_is_kept_without_force(tiny_checkpoint, tiny_bundle):
    before = sorted(p.name for p in tiny_bundle.iterdir())
    with pytest.raises(BundleWriteError, match="already exists"):
        build_bundle(tiny_checkpoint, "fp32", tiny_bundle)
    assert sorted(p.name for p in tiny_bundle.iterdir()) == before


def test_force_replaces_bundle_and_manifest_lists_every_file(tiny_checkpoint, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text("{}")  # an old bundle
    build_bundle(tiny_checkpoint, "fp32", out, force=True)
    manifest = load_manifest(out)
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest.files) == on_disk
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_refuses_to_replace_a_non_bundle_directory(tiny_checkpoint, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(BundleWriteError, match="not a bundle"):
        build_bundle(tiny_checkpoint, "fp32", out, force=True)
    assert (out / "notes.txt").read_text() == "keep me"


def test_memory_check_refuses_before_any_work(tiny_checkpoint, tmp_path, monkeypatch):
    from omni_export.checkpoint.reader import CheckpointError

    monkeypatch.setattr(build_module, "available_memory", lambda: 1000)  # 1 kB free
    out = tmp_path / "bundle"
    with pytest.raises(CheckpointError, match="GB of RAM") as info:
        build_bundle(tiny_checkpoint, "fp32", out)
    assert "--no-memory-check" in str(info.value)
    assert list(tmp_path.iterdir()) == []
