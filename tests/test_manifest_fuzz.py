"""Fuzz the manifest loader: thousands of mutated manifests, each accepted or a BundleError.

A seeded random mutator takes the manifest of a real bundle (the session's tiny bundle) and
applies one to three mutations: deleted or renamed keys, values of the wrong type, unsafe
paths, huge numbers, NaN and infinities, deep nesting, unicode (including unpaired surrogates
and invalid UTF-8), plus damage to the raw text (truncation, byte flips, a BOM). The mutated
``manifest.json`` is written into a directory holding the bundle's real files, so file checks
(existence, size, paths resolving inside the bundle) run for real. No other exception type is
acceptable: a user must always get a message naming the file and the fix.

The mutations also run against the contract itself, ``manifest.schema.json``, with a plain
``jsonschema.Draft202012Validator`` (what another host would use): every manifest ``load_manifest``
accepts is valid, so a manifest the schema rejects is rejected by ``load_manifest`` too.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from omni_runtime.errors import BundleError
from omni_runtime.bundle.manifest import MANIFEST_NAME, SCHEMA_PATH, Manifest, load_manifest

CASES = 3000
SEED = 20240611

EVIL_STRINGS = [
    "", " ", ".", "..", "../manifest.json", "../../etc/passwd", "/etc/passwd", "a/../b", "a//b", "a/./b",
    "C:\\x.onnx", "C:x", "a\\b", "x\x00y", "\ud800", "a\udcffb", "ファイル.onnx", "😀", "\u202e.onnx",
    "x" * 300, "/".join(["d"] * 200), "a" * 5000, "NaN", "null", "thinker_decoder.onnx",
    "tokenizer.json", "manifest.json", "float32", "batch", "0" * 64, "g" * 64,
]
EVIL_NUMBERS = [0, -1, 1, 2**31, 2**63, 2**64 + 1, -(2**63), 10**300, 1e308, -1e308, 1e-320, 0.5, -0.0, 3.7]


def _deep(depth: int):
    value = "leaf"
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def evil_value(rng: random.Random, old):
    kind = rng.randrange(12)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice(EVIL_NUMBERS)
    if kind == 2:
        return rng.choice(EVIL_STRINGS)
    if kind == 3:
        return rng.choice([[], {}, [None], {"": None}, [[[]]], list(range(50))])
    if kind == 4:
        return rng.choice([float("nan"), float("inf"), float("-inf")])
    if kind == 5:
        return _deep(rng.choice([10, 200, 600]))  # deeper: see the raw texts
    if kind == 6:  # same value, other type
        return rng.choice([str(old), [old], {"value": old}])
    if kind == 7 and isinstance(old, bool):
        return int(old)
    if kind == 7 and isinstance(old, (int, float)):
        return rng.choice([old + 1, old - 1, -old, old * 10**12, float(old), str(old)])
    if kind == 8 and isinstance(old, str):
        return rng.choice([old + "/..", "/" + old, old + "\ud800", old.upper(), old * 3, old[:-1], "../" + old,
                           old + "\x00", old.replace("/", "\\") if old else "\\"])
    if kind == 9 and isinstance(old, list):
        return old + old if rng.random() < 0.5 else old[::-1]
    if kind == 10 and isinstance(old, dict) and old:
        keys = list(old)
        return {k: old[k] for k in keys[: rng.randrange(len(keys))]}
    return rng.choice(EVIL_STRINGS + EVIL_NUMBERS + [None, [], {}])


def containers(node, path=()):
    """Every (path, container) in the JSON tree, down to depth 8."""
    if len(path) > 8:
        return
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from containers(value, path + (key,))
    elif isinstance(node, list):
        yield path, node
        for i, value in enumerate(node):
            yield from containers(value, path + (i,))


def mutate(rng: random.Random, data: dict) -> tuple[object, list[str]]:
    data = copy.deepcopy(data)
    done = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.03:
            data = evil_value(rng, data)
            done.append("replaced the whole manifest")
        found = list(containers(data))
        if not found:
            break
        path, node = rng.choice(found)
        op = rng.randrange(5)
        if isinstance(node, dict) and node:
            key = rng.choice(list(node))
            if op == 0:
                del node[key]
                done.append(f"deleted {path + (key,)}")
            elif op == 1:
                new_key = rng.choice(EVIL_STRINGS + [key + "x", key.upper(), "../" + key])
                node[new_key] = node.pop(key)
                done.append(f"renamed {path + (key,)} to {new_key!r}")
            elif op == 2:
                node[rng.choice(EVIL_STRINGS)] = evil_value(rng, None)
                done.append(f"added a key at {path}")
            else:
                node[key] = evil_value(rng, node[key])
                done.append(f"changed {path + (key,)}")
        elif isinstance(node, list) and node:
            i = rng.randrange(len(node))
            if op == 0:
                del node[i]
                done.append(f"deleted {path + (i,)}")
            elif op == 1:
                node.insert(i, evil_value(rng, node[i]))
                done.append(f"inserted at {path + (i,)}")
            else:
                node[i] = evil_value(rng, node[i])
                done.append(f"changed {path + (i,)}")
    return data, done


def serialise(rng: random.Random, data) -> tuple[bytes, str]:
    """The manifest bytes; sometimes damaged as raw text."""
    text = json.dumps(data, indent=rng.choice([None, 2]), ensure_ascii=rng.random() < 0.5)
    raw = text.encode("utf-8", errors="surrogatepass")  # lone surrogates -> invalid UTF-8
    roll = rng.random()
    if roll < 0.04:
        return raw[: rng.randrange(len(raw) + 1)], "truncated"
    if roll < 0.07:
        damaged = bytearray(raw)
        for _ in range(rng.randint(1, 5)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        return bytes(damaged), "byte flips"
    if roll < 0.08:
        return b"\xef\xbb\xbf" + raw, "BOM"
    if roll < 0.09:
        return rng.choice([b"", b"null", b"[]", b"1e999", b"NaN", b"[" * 100000, b'{"a":' * 5000,
                           b"9" * 5000, b'"\\ud800"']), "raw text"
    return raw, "json"


@pytest.fixture(scope="module")
def fuzz_bundle(tiny_bundle, tmp_path_factory) -> tuple[Path, dict]:
    """A directory holding the tiny bundle's files (hard links where possible) and its manifest."""
    root = tmp_path_factory.mktemp("fuzz") / "bundle"
    root.mkdir()
    for path in tiny_bundle.rglob("*"):
        target = root / path.relative_to(tiny_bundle)
        if path.is_dir():
            target.mkdir(exist_ok=True)
        elif path.name != MANIFEST_NAME:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copyfile(path, target)
    return root, json.loads((tiny_bundle / MANIFEST_NAME).read_text(encoding="utf-8"))


def test_unmutated_manifest_is_accepted(fuzz_bundle):
    root, data = fuzz_bundle
    (root / MANIFEST_NAME).write_text(json.dumps(data), encoding="utf-8")
    manifest = load_manifest(root)
    assert isinstance(manifest, Manifest) and manifest.graphs


def test_mutated_manifests_are_accepted_or_bundle_errors(fuzz_bundle):
    root, data = fuzz_bundle
    validator = Draft202012Validator(json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))
    assert validator.is_valid(data)
    rng = random.Random(SEED)
    outcomes = {"accepted": 0, "BundleError": 0}
    started = time.monotonic()
    for case in range(CASES):
        mutated, done = mutate(rng, data)
        raw, how = serialise(rng, mutated)
        (root / MANIFEST_NAME).write_bytes(raw)
        try:
            manifest = load_manifest(root)
        except BundleError as exc:
            outcomes["BundleError"] += 1
            text = str(exc)
            assert "fix:" in text and exc.path, (case, done, how, text)
            continue
        except BaseException as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"case {case} ({how}; {'; '.join(done)[:300]}): {type(exc).__name__}: {exc!s:.300}")
        outcomes["accepted"] += 1
        # What load_manifest accepts, the schema accepts (so what the schema rejects, it rejects).
        error = best_match(validator.iter_errors(manifest.data))
        assert error is None, (case, done, how, f"the schema rejects it: {error.message:.300}")
        # An accepted manifest must be usable: every graph file resolves inside the bundle.
        for spec in manifest.graphs.values():
            for rel in spec.files:
                assert manifest.path(rel).is_file(), (case, done, rel)
    elapsed = time.monotonic() - started
    # Both outcomes occur (mutations of unchecked keys are accepted, the rest rejected).
    assert outcomes["accepted"] > 50 and outcomes["BundleError"] > CASES // 2, outcomes
    assert elapsed < 60, f"{CASES} cases took {elapsed:.0f} s"


@pytest.mark.parametrize("raw", [b"[" * 100000, b'{"a":' * 100000, b"9" * 5000, b"1e999", b"NaN",
                                 b'{"schema": Infinity}', b"\xff\xfe", b'"\\ud800"', b""])
def test_pathological_texts(fuzz_bundle, raw):
    root, _ = fuzz_bundle
    (root / MANIFEST_NAME).write_bytes(raw)
    with pytest.raises(BundleError, match="manifest.json"):
        load_manifest(root)


@pytest.mark.parametrize("where, value, expected", [
    (("config", "thinker", "max_position_embeddings"), 0, "max_position_embeddings must be >= 1"),
    (("config", "thinker", "num_hidden_layers"), -2, "num_hidden_layers must be >= 1"),
    (("config", "thinker", "rope_theta"), float("nan"), "NaN is not a JSON number"),
    (("generation", "temperature"), float("inf"), "Infinity is not a JSON number"),
    (("generation", "max_new_tokens"), 0, "max_new_tokens must be >= 1"),
    (("generation", "top_p"), 1.5, "top_p must be <= 1"),
    (("generation", "top_k"), -1, "top_k must be >= 0"),
    (("config", "thinker", "kv_dtype"), "float33", "kv_dtype"),
    (("tokenizer", "file"), "tok\ud800.json", "unpaired surrogate"),
])
def test_out_of_range_values_are_bundle_errors(fuzz_bundle, where, value, expected):
    root, data = fuzz_bundle
    data = copy.deepcopy(data)
    node = data
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    (root / MANIFEST_NAME).write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(BundleError, match=expected):
        load_manifest(root)


def test_listed_file_with_unencodable_or_too_long_name(fuzz_bundle):
    root, data = fuzz_bundle
    for name in ("a\udcff.bin", "n" * 300, "/".join(["d" * 200] * 30)):
        mutated = copy.deepcopy(data)
        mutated["files"][name] = {"bytes": 1, "sha256": "0" * 64}
        (root / MANIFEST_NAME).write_text(json.dumps(mutated), encoding="utf-8")
        with pytest.raises(BundleError):
            load_manifest(root)
