"""Soak: N sequential speech requests in one process (lazy sessions by default): RSS and fd growth.

One ``OmniRunner`` answers ``--requests`` (default 200) requests in a row, each a whole request
with speech out (talker + streamed token2wav), optionally with ``--audio`` / ``--image`` /
``--video`` in the prompt. After every request the script reads this process's RSS
(``VmRSS`` in /proc/self/status) and its open file descriptors (entries of /proc/self/fd),
and reports the growth from the end of the first request (which loads the libraries, warms
the allocator and writes the hash and optimized-graph caches) to the end of the last:

- RSS growth: (RSS after the last - RSS after the first) / RSS after the first; target <= 5 %;
- fd growth: fds after the last - fds after the first; target 0.

Each request is the same, greedy, so every one does the same work; a leak of anything per
request (sessions, buffers, threads, files) shows as steady growth. A table of every
``--every``-th request is printed and all of them are written as JSON. Example::

    .venv/bin/omni-export tiny /tmp/soak/model && .venv/bin/omni-export build --model /tmp/soak/model --out /tmp/soak/bundle
    .venv/bin/python benchmarks/soak.py --bundle /tmp/soak/bundle --requests 200 --json soak.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import threading
import time
from pathlib import Path

RSS_TARGET = 0.05  # the target: at most 5 % growth over 200 requests
FD_TARGET = 0


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def request_of(args, runner):
    from omni_runtime.request import ChatRequest

    sampling = dataclasses.replace(runner.default_sampling(), do_sample=False)
    speech = dict(speech=True, stream=True, max_speech_seconds=args.max_speech_seconds, noise_seed=0,
                  talker_sampling=runner.default_talker_sampling(False))
    content = ([{"type": "audio", "audio": str(f)} for f in args.audio]
               + [{"type": "image", "image": str(f)} for f in args.image]
               + [{"type": "video", "video": str(f)} for f in args.video])
    if not content:
        return ChatRequest(prompt=args.prompt, max_new_tokens=args.max_new_tokens, sampling=sampling, **speech)
    content.append({"type": "text", "text": args.prompt})
    return ChatRequest(messages=[{"role": "user", "content": content}], max_new_tokens=args.max_new_tokens,
                       sampling=sampling, **speech)


def soak(args) -> dict:
    from omni_runtime.runner import OmniRunner

    kwargs = {"device": "cpu", "threads": args.threads}
    import inspect

    if "memory" in inspect.signature(OmniRunner).parameters:
        kwargs["memory"] = args.memory
    elif args.memory != "lazy":
        raise SystemExit("this omni_runtime's OmniRunner takes no memory policy")
    start_rss, start_fds = rss_bytes(), open_fds()
    runner = OmniRunner(args.bundle, **kwargs)
    request = request_of(args, runner)
    rows = []
    started = time.perf_counter()
    for i in range(args.requests):
        t0 = time.perf_counter()
        chunks = []
        result = runner.chat(request, on_audio=lambda pcm, last: chunks.append(len(pcm)))
        seconds = time.perf_counter() - t0
        if args.gc:
            gc.collect()
        rows.append({"request": i + 1, "seconds": seconds, "rss_bytes": rss_bytes(), "open_fds": open_fds(),
                     "threads": threading.active_count(), "codes": len(result.codes or []),
                     "audio_seconds": result.audio_seconds, "loaded_sessions": len(runner.pool.loaded)})
        if args.progress and ((i + 1) % args.every == 0 or i == 0):
            r = rows[-1]
            print(f"  {i + 1}/{args.requests}: RSS {r['rss_bytes'] / 1e6:.1f} MB, {r['open_fds']} fds, "
                  f"{r['threads']} threads, {seconds:.2f} s", file=sys.stderr)
    first, last = rows[0], rows[-1]
    rss_growth = (last["rss_bytes"] - first["rss_bytes"]) / first["rss_bytes"]
    fd_growth = last["open_fds"] - first["open_fds"]
    return {
        "bundle": str(args.bundle),
        "requests": args.requests,
        "memory_policy": args.memory,
        "request": {"prompt": args.prompt, "audio": [str(f) for f in args.audio], "image": [str(f) for f in args.image],
                    "video": [str(f) for f in args.video], "max_new_tokens": args.max_new_tokens,
                    "max_speech_seconds": args.max_speech_seconds, "speech": True, "stream": True, "greedy": True},
        "rss_before_runner_bytes": start_rss,
        "fds_before_runner": start_fds,
        "rss_after_first_bytes": first["rss_bytes"],
        "rss_after_last_bytes": last["rss_bytes"],
        "rss_max_bytes": max(r["rss_bytes"] for r in rows),
        "rss_growth": rss_growth,
        "rss_growth_target": RSS_TARGET,
        "fds_after_first": first["open_fds"],
        "fds_after_last": last["open_fds"],
        "fd_growth": fd_growth,
        "fd_growth_target": FD_TARGET,
        "threads_after_first": first["threads"],
        "threads_after_last": last["threads"],
        "ok": rss_growth <= RSS_TARGET and fd_growth <= FD_TARGET,
        "seconds": time.perf_counter() - started,
        "rows": rows,
    }


def print_report(result: dict, every: int) -> None:
    print(f"soak: {result['requests']} speech requests in one process, memory {result['memory_policy']}, "
          f"bundle {result['bundle']}")
    print(f"{'request':>8} {'seconds':>8} {'RSS MB':>9} {'vs 1st':>8} {'fds':>5} {'threads':>8} {'sessions':>9} {'codes':>6}")
    first = result["rows"][0]
    for r in result["rows"]:
        if r["request"] in (1, result["requests"]) or r["request"] % every == 0:
            print(f"{r['request']:8d} {r['seconds']:8.2f} {r['rss_bytes'] / 1e6:9.1f} "
                  f"{(r['rss_bytes'] - first['rss_bytes']) / first['rss_bytes']:+8.2%} {r['open_fds']:5d} "
                  f"{r['threads']:8d} {r['loaded_sessions']:9d} {r['codes']:6d}")
    print(f"RSS growth {result['rss_growth']:+.2%} (target <= {RSS_TARGET:.0%}: "
          f"{'met' if result['rss_growth'] <= RSS_TARGET else 'MISSED'}), max {result['rss_max_bytes'] / 1e6:.1f} MB; "
          f"fd growth {result['fd_growth']:+d} (target {FD_TARGET}: {'met' if result['fd_growth'] <= FD_TARGET else 'MISSED'}); "
          f"threads {result['threads_after_first']} -> {result['threads_after_last']}; {result['seconds']:.0f} s")


def write_json(path: Path, data: dict) -> None:
    """Atomically: a temporary file beside ``path``, renamed over it."""
    from omni_runtime.atomic import write_json_atomic

    write_json_atomic(path, data)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a bundle with speech (talker and token2wav)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--memory", default="lazy", help="session policy (lazy, resident or a byte budget)")
    parser.add_argument("--prompt", default="Say something nice about the sea.")
    parser.add_argument("--audio", type=Path, action="append", default=[])
    parser.add_argument("--image", type=Path, action="append", default=[])
    parser.add_argument("--video", type=Path, action="append", default=[])
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--max-speech-seconds", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--gc", action="store_true", help="gc.collect() after each request before reading RSS")
    parser.add_argument("--every", type=int, default=20, help="print every N-th request")
    parser.add_argument("--quiet", dest="progress", action="store_false", help="no progress lines on stderr")
    parser.add_argument("--json", type=Path, default=Path("soak.json"))
    args = parser.parse_args(argv)
    if not (args.bundle / "manifest.json").is_file():
        parser.error(f"{args.bundle} is not a bundle (no manifest.json): build one with `omni-export build`")
    for f in (*args.audio, *args.image, *args.video):
        if not f.is_file():
            parser.error(f"{f}: no such media file")
    if args.requests < 2:
        parser.error("--requests must be >= 2 (growth is measured from the first request's end)")
    if not args.json.resolve().parent.is_dir():
        parser.error(f"{args.json.resolve().parent}: the directory of --json does not exist")
    args.every = max(1, args.every)
    result = soak(args)
    print_report(result, args.every)
    write_json(args.json, result)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
