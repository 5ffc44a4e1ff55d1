"""Load benchmark of ``omni-runtime serve``: throughput and p50/p95 time to first token and first audio
for 1, 2 and 4 concurrent clients (streamed chat completions over HTTP, as the ``openai`` client sends).

    # against a running server
    python benchmarks/server_load.py --url http://127.0.0.1:8000 --requests 8 --max-tokens 32 [--audio]
    # or start one on a bundle (a subprocess: `omni-runtime serve BUNDLE --workers W ...`)
    python benchmarks/server_load.py --bundle /tmp/b7/awq --workers 2 --memory resident --audio \
        --max-speech-seconds 4 --json server_load.json

Each client sends ``--requests`` requests one after the other (greedy, ``max_tokens``); the
table shows, per concurrency, requests/s, generated tokens/s (from ``usage``), and the p50/p95
of the seconds to the first text token and (with ``--audio``) to the first audio chunk, as the
client sees them. ``--json`` writes the same figures.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

PROMPT = "Tell me a short story about the sea."


def percentile(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def one_request(url: str, args, headers: dict) -> dict:
    body = {"model": args.model, "messages": [{"role": "user", "content": args.prompt}], "temperature": 0,
            "max_tokens": args.max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    if args.audio:
        body.update(modalities=["text", "audio"], audio={"voice": args.voice, "format": "pcm16"})
        if args.max_speech_seconds:
            body["max_speech_seconds"] = args.max_speech_seconds
    started = time.perf_counter()
    ttft = first_audio = None
    tokens = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=None) as r:
        if r.status_code != 200:
            r.read()
            return {"status": r.status_code, "error": r.text[:300]}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"status": 500, "error": chunk["error"]["message"]}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                delta = choice["delta"]
                if delta.get("content") and ttft is None:
                    ttft = time.perf_counter() - started
                if delta.get("audio", {}).get("data") and first_audio is None:
                    first_audio = time.perf_counter() - started
    return {"status": 200, "seconds": time.perf_counter() - started, "ttft": ttft, "first_audio": first_audio,
            "tokens": tokens}


def run_level(url: str, clients: int, args, headers: dict) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client():
        for _ in range(args.requests):
            out = one_request(url, args, headers)
            with lock:
                results.append(out)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ok = [r for r in results if r["status"] == 200]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    audio = [r["first_audio"] for r in ok if r["first_audio"] is not None]
    return {"clients": clients, "requests": len(results), "failed": len(results) - len(ok),
            "errors": sorted({r.get("error", "") for r in results if r["status"] != 200})[:3],
            "wall_seconds": wall, "requests_per_second": len(ok) / wall,
            "tokens_per_second": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50": percentile(ttft, 50), "ttft_p95": percentile(ttft, 95),
            "first_audio_p50": percentile(audio, 50), "first_audio_p95": percentile(audio, 95)}


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "omni_runtime.cli", "serve", args.bundle, "--port", str(port), "--workers",
           str(args.workers), "--memory", args.memory, "--device", args.device, "--max-queue", "64",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the server did not start within 600 s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server")
    where.add_argument("--bundle", help="start `omni-runtime serve BUNDLE` for the run")
    p.add_argument("--workers", type=int, default=2, help="--workers of the started server (default: 2)")
    p.add_argument("--memory", default="resident", help="--memory of the started server (default: resident)")
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default=None, help="model id (default: the server's)")
    p.add_argument("--api-key", default=os.environ.get("OMNI_API_KEY"))
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=4, help="requests per client (default: 4)")
    p.add_argument("--clients", default="1,2,4", help="concurrency levels (default: 1,2,4)")
    p.add_argument("--audio", action="store_true", help="ask for speech too (first-audio latency)")
    p.add_argument("--voice", default="Chelsie")
    p.add_argument("--max-speech-seconds", type=float, default=None)
    p.add_argument("--warmup", type=int, default=1, help="requests before measuring (default: 1)")
    p.add_argument("--json", dest="json_out", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    proc = None
    url = args.url
    if args.bundle:
        proc, url = start_server(args)
    try:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        if args.model is None:
            args.model = httpx.get(url + "/v1/models", headers=headers).json()["data"][0]["id"]
        for _ in range(args.warmup):
            one_request(url, args, headers)
        levels = [run_level(url, int(c), args, headers) for c in args.clients.split(",")]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    print(f"{'clients':>7} {'reqs':>5} {'fail':>4} {'req/s':>7} {'tok/s':>7} {'ttft p50':>9} {'ttft p95':>9}"
          f" {'audio p50':>10} {'audio p95':>10}")
    for r in levels:
        print(f"{r['clients']:>7} {r['requests']:>5} {r['failed']:>4} {r['requests_per_second']:>7.2f} "
              f"{r['tokens_per_second']:>7.1f} {r['ttft_p50']:>9.3f} {r['ttft_p95']:>9.3f} "
              f"{r['first_audio_p50']:>10.3f} {r['first_audio_p95']:>10.3f}")
        for e in r["errors"]:
            print(f"        error: {e}")
    if args.json_out:
        report = {"url": url, "bundle": args.bundle, "workers": args.workers if args.bundle else None,
                  "memory": args.memory if args.bundle else None, "max_tokens": args.max_tokens,
                  "audio": args.audio, "requests_per_client": args.requests, "levels": levels}
        tmp = Path(args.json_out).with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, args.json_out)
    return 0 if all(r["failed"] == 0 for r in levels) else 1


if __name__ == "__main__":
    sys.exit(main())
