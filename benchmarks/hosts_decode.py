"""Decode tok/s of the C++ host (build/hosts/omni-host) against the Python runtime, same bundle and prompt.

Each measured run is a fresh process; both decode greedily ``--tokens`` new tokens from the same
chat prompt with their sessions already created (load time excluded), and report the prefill
time (up to the first token) and the decode time of the tokens after the first. The greedy ids
of both are compared (they must be equal). Prints a table; ``--json`` writes the figures.

    .venv/bin/omni-export tiny /tmp/bench/s7 --preset 7b-shape --layers 4
    .venv/bin/omni-export build --model /tmp/bench/s7 --recipe awq --out /tmp/bench/s7-awq
    make hosts
    .venv/bin/python benchmarks/hosts_decode.py --bundle /tmp/bench/s7-awq --tokens 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST = ROOT / "build" / "hosts" / "omni-host"
CSHARP_HOST = ROOT / "build" / "hosts" / "OmniHost.exe"


def python_worker(bundle: str, ids: list[int], tokens: int, threads: int) -> dict:
    """One Python runtime run (in this process): the thinker's prefill and decode times."""
    from omni_runtime.runner import OmniRunner
    from omni_runtime.stages.sampling import SamplingConfig

    runner = OmniRunner(bundle, device="cpu", threads=threads, memory="resident")
    runner.pool.get("thinker_embedding")
    runner.pool.get("thinker_decoder")
    times: list[float] = []
    started = time.perf_counter()
    out = runner.thinker.generate([ids], tokens, SamplingConfig(do_sample=False),
                                  on_step=lambda new: times.append(time.perf_counter()))
    ended = time.perf_counter()
    return {"token_ids": out.token_ids[0], "prefill_seconds": times[0] - started, "decode_seconds": ended - times[0]}


def run_python(bundle: str, ids: list[int], tokens: int, threads: int) -> dict:
    code = ("import json, sys; sys.path.insert(0, %r); from hosts_decode import python_worker; "
            "print(json.dumps(python_worker(%r, %r, %d, %d)))"
            % (str(Path(__file__).parent), bundle, ids, tokens, threads))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_host(bundle: str, ids: list[int], tokens: int, threads: int, command: list[str] | None = None) -> dict:
    done = subprocess.run([*(command or [str(HOST)]), bundle, "--prompt-ids", ",".join(map(str, ids)),
                           "--max-new-tokens", str(tokens), "--greedy", "--threads", str(threads), "--json"],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--prompt", default="Tell me a long story about the sea and its ships.")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads of both (0: the library default)")
    parser.add_argument("--csharp", action="store_true",
                        help="also measure the C# host (mono build/hosts/OmniHost.exe)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not HOST.exists():
        sys.exit(f"error: {HOST} is missing\n  fix: run `make hosts`")
    sys.path.insert(0, str(ROOT))
    from omni_export.hosts import tokenize

    ids = tokenize(args.bundle, args.prompt).prompt_ids
    rows = {"python": [], "cpp": [], **({"csharp": []} if args.csharp else {})}
    for _ in range(args.repeats):
        rows["python"].append(run_python(args.bundle, ids, args.tokens, args.threads))
        rows["cpp"].append(run_host(args.bundle, ids, args.tokens, args.threads))
        if args.csharp:
            rows["csharp"].append(run_host(args.bundle, ids, args.tokens, args.threads, ["mono", str(CSHARP_HOST)]))
    result = {"bundle": args.bundle, "prompt_tokens": len(ids), "tokens": args.tokens, "repeats": args.repeats,
              "threads": args.threads}
    reference = rows["python"][0]["token_ids"]
    for name, runs in rows.items():
        rates = [(len(r["token_ids"]) - 1) / r["decode_seconds"] for r in runs if r["decode_seconds"] > 0]
        result[name] = {"decode_tok_s_median": statistics.median(rates), "decode_tok_s": rates,
                        "prefill_seconds_median": statistics.median(r["prefill_seconds"] for r in runs),
                        "ids_equal_python": all(r["token_ids"] == reference for r in runs)}
    ratio = result["cpp"]["decode_tok_s_median"] / result["python"]["decode_tok_s_median"]
    result["cpp_over_python"] = ratio
    print(f"bundle {args.bundle}: prompt {len(ids)} tokens, {args.tokens} new, {args.repeats} repeats")
    print(f"{'engine':8} {'decode tok/s (median)':>22} {'runs':>30} {'prefill s':>10} {'ids = python':>13}")
    for name in rows:
        r = result[name]
        print(f"{name:8} {r['decode_tok_s_median']:22.1f} {' '.join(f'{x:.1f}' for x in r['decode_tok_s']):>30} "
              f"{r['prefill_seconds_median']:10.3f} {str(r['ids_equal_python']):>13}")
    print(f"cpp / python decode: {ratio:.2f}x")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
