"""sha256 checks remembered across processes (``omni_runtime.bundle.hash_cache``): a file is hashed
once, and hashed again after any change to it, so corruption is still caught."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from conftest import link_copy
from omni_runtime.bundle import hash_cache, manifest as manifest_module
from omni_runtime.bundle.manifest import load_manifest, verify_file
from omni_runtime.errors import BundleError

REL = "thinker_embedding.onnx.data"


@pytest.fixture
def bundle(tiny_bundle, tmp_path, monkeypatch):
    """A copy of the tiny bundle (its own files, so they may be changed) and a fresh cache."""
    monkeypatch.setenv("OMNI_RUNTIME_CACHE_DIR", str(tmp_path / "cache"))
    return link_copy(tiny_bundle, tmp_path / "bundle", real=("manifest.json", REL))  # REL is changed here


@pytest.fixture
def hashed(monkeypatch):
    """The files ``verify_file`` reads to hash, in order."""
    seen = []
    real_open = open

    def spy(path, mode="r", *args, **kwargs):
        if mode == "rb":
            seen.append(os.path.basename(str(path)))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(manifest_module, "open", spy, raising=False)
    return seen


def test_a_file_is_hashed_once_then_remembered(bundle, hashed):
    manifest = load_manifest(bundle)
    verify_file(manifest, REL)
    verify_file(load_manifest(bundle), REL)  # as another process would: a new manifest, the cache on disk
    assert hashed == [REL]
    entry = json.loads(hash_cache.cache_path().read_text())[str((bundle / REL).resolve())]
    assert entry["sha256"] == manifest.files[REL]["sha256"]
    verify_file(manifest, REL, remembered=False)  # inspect --verify hashes whatever the cache says
    assert hashed == [REL, REL]


@pytest.mark.parametrize("change", ["flip a byte", "same bytes rewritten", "old mtime restored", "replaced"])
def test_any_change_is_hashed_again_and_corruption_caught(bundle, hashed, change):
    manifest = load_manifest(bundle)
    verify_file(manifest, REL)
    path = bundle / REL
    before = os.stat(path)
    data = bytearray(path.read_bytes())
    if change == "same bytes rewritten":
        path.write_bytes(bytes(data))
    else:
        data[-1] ^= 0x01
        if change == "replaced":
            tmp = path.with_suffix(".new")
            tmp.write_bytes(bytes(data))
            os.replace(tmp, path)
        else:
            path.write_bytes(bytes(data))
        if change == "old mtime restored":
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    if change == "same bytes rewritten":
        verify_file(manifest, REL)  # hashed again (its ctime changed) and still right
        assert hashed == [REL, REL]
        return
    with pytest.raises(BundleError, match="corrupt: sha256 mismatch"):
        verify_file(manifest, REL)
    assert hashed == [REL, REL]


def test_another_expected_hash_is_not_taken_from_the_cache(bundle, hashed):
    manifest = load_manifest(bundle)
    verify_file(manifest, REL)
    assert not hash_cache.known(bundle / REL, hashlib.sha256(b"other").hexdigest())
    assert hash_cache.known(bundle / REL, manifest.files[REL]["sha256"])


@pytest.mark.parametrize("value", ["off", "0", ""])
def test_remembering_can_be_turned_off(bundle, hashed, monkeypatch, value):
    monkeypatch.setenv("OMNI_RUNTIME_CACHE_DIR", value)
    manifest = load_manifest(bundle)
    verify_file(manifest, REL)
    verify_file(manifest, REL)
    assert hashed == [REL, REL] and hash_cache.cache_path() is None


def test_a_corrupt_or_unwritable_cache_only_means_hashing_again(bundle, hashed, tmp_path, monkeypatch):
    cache = tmp_path / "cache" / hash_cache.CACHE_FILE
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("{not json")
    manifest = load_manifest(bundle)
    verify_file(manifest, REL)
    verify_file(manifest, REL)  # the corrupt cache was replaced by a good one
    assert hashed == [REL]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("OMNI_RUNTIME_CACHE_DIR", str(blocker / "sub"))  # cannot be created
    verify_file(manifest, REL)
    verify_file(manifest, REL)
    assert hashed == [REL, REL, REL]
