"""Thinker text decoding speed: an omni-export bundle (ONNX Runtime) vs PyTorch eager.

Both sides run the same weights, greedy, the same prompt length and number of new tokens,
one after the other, each in its own process (so they neither compete for the cores nor
share a peak-memory figure). Prints a table and writes JSON. Example:

    omni-export tiny /tmp/m7 --preset 7b-shape --layers 4
    omni-export build --model /tmp/m7 --out /tmp/b7
    python benchmarks/thinker_decode.py --bundle /tmp/b7 --model /tmp/m7 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def prompt_ids(length: int, seed: int = 0) -> list[int]:
    """A fixed random prompt of ordinary (non-special) token ids."""
    return np.random.default_rng(seed).integers(1000, 100000, size=length).tolist()


def bench_ort(bundle: Path, prompt: list[int], new_tokens: int, threads: int) -> dict:
    from omni_runtime.manifest import load_manifest
    from omni_runtime.sampling import SamplingConfig
    from omni_runtime.sessions import SessionPool, SessionSettings, select_providers
    from omni_runtime.thinker import DECODER, EMBEDDING, ThinkerGenerator

    manifest = load_manifest(bundle)
    pool = SessionPool(manifest, select_providers("auto"), SessionSettings(intra_op_threads=threads))
    start = time.perf_counter()
    pool.get(EMBEDDING)
    pool.get(DECODER)
    load_s = time.perf_counter() - start
    generator = ThinkerGenerator(manifest, pool)
    generator.eos_ids = np.array([], dtype=np.int64)  # run exactly new_tokens steps
    stamps: list[float] = []
    start = time.perf_counter()
    out = generator.generate([prompt], new_tokens, SamplingConfig(), on_step=lambda _: stamps.append(time.perf_counter()))
    first = stamps[0] - start
    decode_rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return {"engine": "omni-export (onnxruntime)", "providers": pool.providers, "load_s": load_s,
            "first_token_s": first, "decode_tok_s": decode_rate, "tokens": out.token_ids[0],
            "peak_rss_gb": peak_rss_gb()}


def bench_torch(model_dir: Path, prompt: list[int], new_tokens: int, threads: int, dtype: str) -> dict:
    import torch
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration, logging

    logging.set_verbosity_error()
    torch.set_num_threads(threads or torch.get_num_threads())
    start = time.perf_counter()
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                                      attn_implementation="sdpa").eval()
    load_s = time.perf_counter() - start
    ids = torch.tensor([prompt])
    stamps: list[float] = []

    def stamp(input_ids, scores):
        stamps.append(time.perf_counter())
        return scores

    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, logits_processor=[stamp],
                             eos_token_id=None, pad_token_id=0)
    first = stamps[0] - start
    decode_rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return {"engine": f"PyTorch eager {dtype}", "providers": ["torch-cpu"], "load_s": load_s,
            "first_token_s": first, "decode_tok_s": decode_rate, "tokens": out[0, len(prompt):].tolist(),
            "peak_rss_gb": peak_rss_gb()}


def run_engine_subprocess(engine: str, args) -> dict:
    """Run one engine in its own process so its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--engine", engine, "--bundle", str(args.bundle),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
           "--threads", str(args.threads), "--torch-dtype", args.torch_dtype]
    if args.model is not None:
        cmd += ["--model", str(args.model)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{engine} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--model", type=Path, help="checkpoint dir for the PyTorch reference (omit to skip)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="0 = library default")
    parser.add_argument("--torch-dtype", default="float32")
    parser.add_argument("--out", type=Path, default=Path("thinker_decode.json"))
    parser.add_argument("--engine", choices=["ort", "torch"], help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args()

    prompt = prompt_ids(args.prompt_tokens)
    if args.engine == "ort":
        print(json.dumps(bench_ort(args.bundle, prompt, args.new_tokens, args.threads)))
        return
    if args.engine == "torch":
        print(json.dumps(bench_torch(args.model, prompt, args.new_tokens, args.threads, args.torch_dtype)))
        return
    rows = [run_engine_subprocess("ort", args)]
    if args.model is not None:
        rows.append(run_engine_subprocess("torch", args))
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    bundle_bytes = sum(f["bytes"] for f in manifest["files"].values())
    same = len(rows) == 2 and rows[0]["tokens"] == rows[1]["tokens"]

    print(f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy; "
          f"bundle {bundle_bytes / 1e9:.2f} GB ({manifest['recipe']['name']}), "
          f"thinker layers {manifest['config']['thinker']['num_hidden_layers']}, "
          f"hidden {manifest['config']['thinker']['hidden_size']}")
    print(f"{'engine':32} {'load s':>7} {'1st token s':>12} {'decode tok/s':>13} {'peak RSS GB':>12}")
    for r in rows:
        print(f"{r['engine']:32} {r['load_s']:7.2f} {r['first_token_s']:12.3f} {r['decode_tok_s']:13.2f} "
              f"{r['peak_rss_gb']:12.2f}")
    if len(rows) == 2:
        print(f"same greedy ids: {same}; decode speed-up {rows[0]['decode_tok_s'] / rows[1]['decode_tok_s']:.2f}x")
    result = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "bundle_bytes": bundle_bytes,
              "thinker": manifest["config"]["thinker"], "same_greedy_ids": same,
              "results": [{k: v for k, v in r.items() if k != "tokens"} for r in rows]}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
