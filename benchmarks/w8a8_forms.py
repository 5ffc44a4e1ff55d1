"""Which W8A8 graph form is fastest on the CPU: standard ``MatMulInteger`` (uint8 or int8 activations) vs the contrib ``MatMulIntegerToFloat``.

One graph per form holds one thinker layer's quantized linears at the real 7B widths
(``--hidden 3584``: q/k/v packed 3584 -> 4608, o_proj 3584 -> 3584, gate/up packed 3584 ->
37888; down_proj is float in the w8a8 recipe and left out), each linear with its own input,
built by ``omni_export.export.w8a8_linear.W8A8GraphBuilder`` exactly as the decoder builds
them (per-token activation quantization included). A float32 MatMul graph of the same linears is
the baseline, and the int4 recipes' form (``MatMulNBits``, group 128, accuracy level 4) the
weight-only comparison. Each is run on ``--tokens`` rows (1: a decode step; 64 / 256: prefill), one warm-up
then ``--repeats`` timed runs (median, min, max) taken round robin over the forms (a shared
machine's load falls on all of them alike), CPU provider, all threads.

Prints a table and writes ``--json``. Example (2 cores, nice'd):

    nice -n 10 .venv/bin/python benchmarks/w8a8_forms.py --repeats 5 --json w8a8_forms.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FORMS = ("float32", "int4-matmulnbits", "matmulinteger_u8", "matmulinteger", "matmulintegertofloat")


def layer_shapes(hidden: int, intermediate: int, heads: int, kv_heads: int) -> dict[str, int]:
    head_dim = hidden // heads
    return {"qkv": hidden + 2 * kv_heads * head_dim, "o": hidden, "gate_up": 2 * intermediate}


def build(form: str, out: Path, hidden: int, shapes: dict[str, int], seed: int = 0) -> Path:
    from omni_export.export.onnx_graph import GraphBuilder, Linear
    from omni_export.export.w8a8_linear import W8A8GraphBuilder
    from omni_export.quant.w8a8 import quantize_weight

    from omni_export.quant.rtn import quantize

    rng = np.random.default_rng(seed)
    if form == "float32":
        g = GraphBuilder(out, f"{form}.onnx")
    elif form == "int4-matmulnbits":  # the awq / int4-rtn recipes' linears (accuracy level 4: int8 compute)
        g = GraphBuilder(out, f"{form}.onnx", emit="matmulnbits", accuracy_level=4)
    else:
        g = W8A8GraphBuilder(out, f"{form}.onnx", emit=form)
    for name, n in shapes.items():
        w = (rng.standard_normal((n, hidden), dtype=np.float32) * 0.02).astype(np.float32)
        x = g.float_input(f"x_{name}", ("batch", "sequence", hidden))
        weight = (w if form == "float32" else quantize(w, 128) if form == "int4-matmulnbits"
                  else quantize_weight(w))
        g.float_output(g.linear(x, Linear(weight), name), f"y_{name}", ("batch", "sequence", n))
        del w, weight
    g.save()
    return out / f"{form}.onnx"


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_forms(sessions: dict, hidden: int, tokens_list: list[int], repeats: int, shapes: dict[str, int]) -> list:
    """Round robin: each repeat runs every form at every length once, so a shared machine's load
    falls on all forms alike; one warm-up run of each first."""
    rng = np.random.default_rng(0)
    feeds = {t: {f"x_{name}": rng.standard_normal((1, t, hidden), dtype=np.float32) for name in shapes}
             for t in tokens_list}
    times = {(form, t): [] for form in sessions for t in tokens_list}
    for form, s in sessions.items():
        for t in tokens_list:
            s.run(None, feeds[t])
    for _ in range(repeats):
        for t in tokens_list:
            for form, s in sessions.items():
                started = time.perf_counter()
                s.run(None, feeds[t])
                times[(form, t)].append(time.perf_counter() - started)
    return [{"form": form, "tokens": t, "median_ms": 1000 * statistics.median(v), "min_ms": 1000 * min(v),
             "max_ms": 1000 * max(v), "runs": repeats} for (form, t), v in times.items()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=3584)
    parser.add_argument("--intermediate", type=int, default=18944)
    parser.add_argument("--heads", type=int, default=28)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error("--repeats must be >= 3 (medians of at least 3 runs)")
    import onnxruntime as ort

    shapes = layer_shapes(args.hidden, args.intermediate, args.heads, args.kv_heads)
    with tempfile.TemporaryDirectory(prefix="w8a8-forms-") as tmp:
        sessions = {}
        for form in FORMS:
            folder = Path(tmp) / form
            folder.mkdir()
            sessions[form] = session(build(form, folder, args.hidden, shapes))
            print(f"  built {form}", file=sys.stderr)
        results = time_forms(sessions, args.hidden, args.tokens, args.repeats, shapes)
    print(f"\nW8A8 forms, one 7B-width thinker layer's quantized linears (hidden {args.hidden}, "
          f"linears {shapes}), onnxruntime {ort.__version__} CPU, median of {args.repeats} runs (ms):")
    header = f"{'form':22s}" + "".join(f"{f'{t} tok':>12s}" for t in args.tokens)
    print(header)
    for form in FORMS:
        row = {r["tokens"]: r["median_ms"] for r in results if r["form"] == form}
        print(f"{form:22s}" + "".join(f"{row[t]:12.2f}" for t in args.tokens))
    report = {"onnxruntime": ort.__version__, "hidden": args.hidden, "linears": shapes, "repeats": args.repeats,
              "results": results}
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
