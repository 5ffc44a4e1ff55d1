"""Thinker prefill memory and time of a bundle at long prompts (1k, 4k, 16k tokens by default).

Each prompt length runs in its own process through the runtime's Python API
(``OmniRunner(bundle).thinker.generate([ids], 1)``, greedy: one generated token, so the run is
the prefill): random ordinary token ids, batch 1. Measured per length: the process's peak RSS
(``os.wait4``'s ru_maxrss, the figure ``/usr/bin/time -v`` prints), the peak RSS after the
sessions are loaded (so the prefill's own share is visible), load and prefill wall time. A run
that times out, passes the RSS limit (default: available memory at start - 2 GB) or fails is
reported as such and the next length still runs. Example:

    python benchmarks/prefill_memory.py --bundle /tmp/bench/s7-fp32 --lengths 1024 4096 --json prefill.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import GB, default_rss_limit, machine_info, run_measured, write_json  # noqa: E402


def vm_hwm_bytes() -> int:
    """This process's peak RSS so far (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(bundle: Path, length: int, threads: int, seed: int, prefill_chunk: int | None) -> dict:
    from omni_runtime.runner import OmniRunner
    from omni_runtime.stages.sampling import SamplingConfig
    from omni_runtime.stages.thinker import DECODER, EMBEDDING

    start = time.perf_counter()
    runner = OmniRunner(bundle, device="cpu", threads=threads)
    runner.pool.get(EMBEDDING)
    runner.pool.get(DECODER)
    load_s = time.perf_counter() - start
    load_peak = vm_hwm_bytes()
    if prefill_chunk is not None:
        if not hasattr(runner.thinker, "prefill_chunk"):
            raise SystemExit("this omni_runtime's ThinkerGenerator has no prefill_chunk")
        runner.thinker.prefill_chunk = prefill_chunk
    special = runner.manifest.special_tokens
    vocab = int(runner.manifest.config["thinker"]["vocab_size"])
    high = min(vocab, int(special.get("endoftext", vocab)))  # ordinary tokens only
    ids = np.random.default_rng(seed).integers(0, high, size=length).tolist()
    start = time.perf_counter()
    out = runner.thinker.generate([ids], 1, SamplingConfig())
    prefill_s = time.perf_counter() - start
    return {"length": length, "load_s": load_s, "prefill_s": prefill_s, "load_peak_rss_bytes": load_peak,
            "own_peak_rss_bytes": vm_hwm_bytes(), "token": out.token_ids[0][0],
            "prefill_chunk": getattr(runner.thinker, "prefill_chunk", None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384], help="prompt lengths in tokens")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads, 0 = onnxruntime default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefill-chunk", type=int,
                        help="set the runtime's ThinkerGenerator.prefill_chunk (default: the runtime's own)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per length")
    parser.add_argument("--rss-limit-gb", type=float,
                        help="kill a run whose RSS passes this (default: available memory at start - 2 GB)")
    parser.add_argument("--json", type=Path, default=Path("prefill_memory.json"))
    parser.add_argument("--child-length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child_length is not None:
        print(json.dumps(child(args.bundle, args.child_length, args.threads, args.seed, args.prefill_chunk)))
        return
    if not (args.bundle / "manifest.json").is_file():
        parser.error(f"{args.bundle} is not a bundle (no manifest.json): build one with `omni-export build`")
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    cfg = manifest["config"]["thinker"]
    rss_limit = int(args.rss_limit_gb * GB) if args.rss_limit_gb else default_rss_limit()
    rows = []
    for length in args.lengths:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--bundle", str(args.bundle), "--child-length",
               str(length), "--threads", str(args.threads), "--seed", str(args.seed)]
        if args.prefill_chunk is not None:
            cmd += ["--prefill-chunk", str(args.prefill_chunk)]
        run = run_measured(cmd, timeout=args.timeout, rss_limit=rss_limit)
        row = {"length": length, "ok": run.ok, "error": run.failure() or None, "wall_s": run.wall_s,
               "peak_rss_bytes": run.peak_rss_bytes}
        if run.ok:
            row.update(run.last_json())
            row["prefill_rss_over_load_bytes"] = row["peak_rss_bytes"] - row["load_peak_rss_bytes"]
            row["prefill_tok_s"] = length / row["prefill_s"]
        rows.append(row)
        print(f"  {length} tokens: " + (f"prefill {row['prefill_s']:.2f} s, peak RSS {run.peak_rss_bytes / GB:.2f} GB"
                                       if run.ok else f"FAILED {row['error']}"), file=sys.stderr)

    print(f"bundle {args.bundle} ({manifest['recipe']['name']}), thinker layers {cfg['num_hidden_layers']}, "
          f"hidden {cfg['hidden_size']}; batch 1, 1 generated token; RSS limit {rss_limit / GB:.1f} GB")
    print(f"{'tokens':>7} {'prefill s':>10} {'prefill tok/s':>14} {'load s':>7} {'peak RSS GB':>12} "
          f"{'after load GB':>14} {'prefill +GB':>12}  status")
    for r in rows:
        if r["ok"]:
            print(f"{r['length']:7d} {r['prefill_s']:10.2f} {r['prefill_tok_s']:14.1f} {r['load_s']:7.2f} "
                  f"{r['peak_rss_bytes'] / GB:12.2f} {r['load_peak_rss_bytes'] / GB:14.2f} "
                  f"{r['prefill_rss_over_load_bytes'] / GB:12.2f}  ok")
        else:
            print(f"{r['length']:7d} {'-':>10} {'-':>14} {'-':>7} {r['peak_rss_bytes'] / GB:12.2f} {'-':>14} "
                  f"{'-':>12}  {r['error']}")
    result = {"bundle": str(args.bundle), "recipe": manifest["recipe"], "thinker_config": cfg, "runs": rows,
              "settings": {"lengths": args.lengths, "threads": args.threads, "seed": args.seed,
                           "prefill_chunk": args.prefill_chunk, "timeout_s": args.timeout, "rss_limit_bytes": rss_limit,
                           "machine": machine_info()}}
    write_json(args.json, result)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
