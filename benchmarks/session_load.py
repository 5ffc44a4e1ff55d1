"""Session creation per graph and its share of a whole request, with and without optimized copies.

Every measurement runs in its own process (``benchutil.run_measured``), so each load is a first
load of that process; the sha256 of the bundle's files is remembered beforehand (one warm-up
pass), as after any earlier run. Per graph, ``--repeats`` times each:

- ``bundle``: the session created from the bundle's graph, optimizations on (before optimized
  copies: ``OMNI_RUNTIME_OPTIMIZED_COPIES=off``);
- ``first``: the first load with copies on: optimizes, then writes and hashes the copy (the
  graph's copy is deleted before each repeat);
- ``copy``: a later load, from the copy with optimizations off.

Then the request of the issue (``omni-export run BUNDLE --prompt Hi --max-new-tokens 32 --wav
OUT --max-speech-seconds 3 --json``, lazy policy) through the API in a child (total seconds and the
session-creation seconds from ``SessionPool.load_log``), copies off and on, and the same command
line's wall time. Prints tables, writes JSON (median and range)::

    .venv/bin/python benchmarks/session_load.py /tmp/b7/awq --repeats 3 --json /tmp/C/session_load.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from benchutil import machine_info, run_measured, summarize, write_json  # noqa: E402

PY = sys.executable


def child_load(bundle: str, graph: str) -> None:
    from omni_runtime import load_manifest
    from omni_runtime.bundle.device import rss_bytes
    from omni_runtime.bundle.sessions import CPU, SessionPool, SessionSettings

    import onnxruntime  # noqa: F401  (imported before the clock starts, as OmniRunner() does)

    pool = SessionPool(load_manifest(bundle), [CPU], SessionSettings())
    before = rss_bytes()
    pool.get(graph)
    print(json.dumps({**pool.load_log[-1], "rss_delta": rss_bytes() - before}))


def child_request(bundle: str, wav: str) -> None:
    from omni_runtime.cli import RunOptions, chat_request, sampling_for
    from omni_runtime.runner import OmniRunner
    from dataclasses import replace

    started = time.perf_counter()
    runner = OmniRunner(bundle, device="cpu", memory="lazy")
    opts = RunOptions(bundle=bundle, prompt="Hi", max_new_tokens=32, wav=wav, max_speech_seconds=3.0, json=True)
    request = replace(chat_request(opts), sampling=sampling_for(opts, runner.default_sampling()))
    result = runner.chat(request)
    total = time.perf_counter() - started
    loads = runner.pool.load_log
    print(json.dumps({"seconds": total, "load_seconds": sum(e["seconds"] for e in loads),
                      "loads": loads, "first_audio_seconds": result.first_audio_seconds,
                      "tokens": len(result.token_ids), "audio_seconds": result.audio_seconds}))


def drop_copies(cache: Path, graph_file: Path) -> None:
    base = cache / "optimized"
    if not base.is_dir():
        return
    for entry in base.iterdir():
        try:
            meta = json.loads((entry / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        if str(meta.get("source", "")).startswith(f"{graph_file.resolve()}|"):
            shutil.rmtree(entry, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="OUT")
    parser.add_argument("--cache", metavar="DIR", help="runtime cache directory (default: a new temporary one)")
    parser.add_argument("--graphs", nargs="*", help="graphs to measure (default: all)")
    parser.add_argument("--skip-request", action="store_true")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        (child_load if kind == "load" else child_request)(args.bundle, *rest)
        return 0

    from omni_runtime import load_manifest

    manifest = load_manifest(args.bundle)
    cache = Path(args.cache or tempfile.mkdtemp(prefix="omni-session-load-"))
    env_on = {**os.environ, "OMNI_RUNTIME_CACHE_DIR": str(cache), "OMNI_RUNTIME_OPTIMIZED_COPIES": "on"}
    env_off = {**env_on, "OMNI_RUNTIME_OPTIMIZED_COPIES": "off"}
    me = [PY, str(Path(__file__).resolve()), args.bundle, "--child"]

    def measure(cmd, env) -> dict:
        run = run_measured(cmd, env=env, timeout=1800)
        if not run.ok:
            raise SystemExit(f"{' '.join(cmd)}: {run.failure()}")
        return {**run.last_json(), "wall_s": run.wall_s, "peak_rss_bytes": run.peak_rss_bytes}

    graphs = args.graphs or list(manifest.graphs)
    for graph in graphs:  # warm-up: the sha256 of every file remembered, as after any earlier run
        measure(me + ["load", graph], env_off)
    rows = {}
    for graph in graphs:
        spec = manifest.graph(graph)
        runs = {"bundle": [], "first": [], "copy": []}
        for _ in range(args.repeats):
            runs["bundle"].append(measure(me + ["load", graph], env_off))
            drop_copies(cache, manifest.path(spec.file))
            runs["first"].append(measure(me + ["load", graph], env_on))
            runs["copy"].append(measure(me + ["load", graph], env_on))
        if any(r["cached"] for r in runs["first"]) or not all(r["cached"] for r in runs["copy"]):
            raise SystemExit(f"{graph}: the copy was not written or not read (disk full? {cache})")
        rows[graph] = {"bytes": runs["bundle"][0]["bytes"],
                       **{k: summarize([r["seconds"] for r in v]) for k, v in runs.items()},
                       "rss_delta_bytes": {k: summarize([r["rss_delta"] for r in v]) for k, v in runs.items()}}

    print(f"\nsession creation per graph, seconds (median, range of {args.repeats}; sha256 remembered)")
    print(f"{'graph':<20}{'MB':>8}{'bundle':>18}{'first (writes copy)':>24}{'from copy':>18}{'RSS MB':>9}")
    for graph, row in rows.items():
        cell = {k: f"{row[k]['median']:.2f} ({row[k]['min']:.2f}-{row[k]['max']:.2f})" for k in ("bundle", "first", "copy")}
        print(f"{graph:<20}{row['bytes'] / 1e6:>8.0f}{cell['bundle']:>18}{cell['first']:>24}{cell['copy']:>18}"
              f"{row['rss_delta_bytes']['copy']['median'] / 1e6:>9.0f}")

    request = {}
    if not args.skip_request:
        wav = str(cache / "x.wav")
        for mode, env in (("copies off", env_off), ("copies on", env_on)):
            runs = [measure(me + ["request", wav], env) for _ in range(args.repeats)]
            request[mode] = {"seconds": summarize([r["seconds"] for r in runs]),
                             "load_seconds": summarize([r["load_seconds"] for r in runs]),
                             "load_share": summarize([r["load_seconds"] / r["seconds"] for r in runs]),
                             "first_audio_seconds": summarize([r["first_audio_seconds"] for r in runs]),
                             "peak_rss_bytes": summarize([r["peak_rss_bytes"] for r in runs]),
                             "loads": runs[-1]["loads"]}
        cli = [str(Path(PY).parent / "omni-export"), "run", args.bundle, "--prompt", "Hi", "--max-new-tokens", "32",
               "--wav", wav, "--max-speech-seconds", "3", "--json"]
        for mode, env in (("cli copies off", env_off), ("cli copies on", env_on)):
            walls = []
            for _ in range(args.repeats):
                run = run_measured(cli, env=env, timeout=1800)
                if not run.ok:
                    raise SystemExit(f"{' '.join(cli)}: {run.failure()}")
                walls.append(run.wall_s)
            request[mode] = {"wall_seconds": summarize(walls)}
        print(f"\nrequest: --prompt Hi --max-new-tokens 32 --wav --max-speech-seconds 3, lazy, CPU "
              f"(median, range of {args.repeats})")
        print(f"{'mode':<16}{'request s':>20}{'session creation s':>22}{'share':>16}")
        for mode in ("copies off", "copies on"):
            r = request[mode]
            print(f"{mode:<16}{r['seconds']['median']:>10.2f} ({r['seconds']['min']:.2f}-{r['seconds']['max']:.2f})"
                  f"{r['load_seconds']['median']:>12.2f} ({r['load_seconds']['min']:.2f}-{r['load_seconds']['max']:.2f})"
                  f"{r['load_share']['median']:>10.1%} ({r['load_share']['min']:.0%}-{r['load_share']['max']:.0%})")
        for mode in ("cli copies off", "cli copies on"):
            w = request[mode]["wall_seconds"]
            print(f"{mode:<16}{w['median']:>10.2f} ({w['min']:.2f}-{w['max']:.2f})  (whole command, wall)")
    if args.json:
        write_json(Path(args.json), {"bundle": args.bundle, "repeats": args.repeats, "machine": machine_info(),
                                     "graphs": rows, "request": request})
    return 0


if __name__ == "__main__":
    sys.exit(main())
