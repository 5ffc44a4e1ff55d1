"""Build memory and time of ``omni-export build`` versus thinker layer count, projected to 28 layers.

For each layer count (default 2 4 8) of a random-weight checkpoint (preset ``7b-shape``: the
real 7B widths), writes the checkpoint once (``omni-export tiny DIR --preset P --layers N``,
reused when present under ``--work`` or given with ``--reuse``), then runs
``omni-export build --model DIR --recipe R --out BUNDLE --force`` in its own process and
measures its peak RSS (``os.wait4``'s ru_maxrss, the figure ``/usr/bin/time -v`` prints) and
wall time. A least-squares line through (layers, peak RSS) and (layers, seconds) projects
both to the real 28 layers. A build that fails, times out or passes the RSS limit (default:
available memory at start - 2 GB) is reported and the next layer count still runs. Example:

    python benchmarks/build_memory.py --recipe awq --layers 2 4 8 --work /tmp/bench --json build_memory.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import GB, available_memory, default_rss_limit, machine_info, run_measured, write_json  # noqa: E402

REAL_LAYERS = 28


def omni_export_cmd() -> list[str]:
    script = Path(sys.executable).parent / "omni-export"
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from omni_export.cli import main; main()"]


def checkpoint_layers(model_dir: Path) -> int | None:
    """Thinker text layer count of a checkpoint directory (None if it is not one)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
        return int(config["thinker_config"]["text_config"]["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def linear_fit(xs: list[float], ys: list[float], at: float) -> dict | None:
    """Least-squares line y = slope * x + intercept and its value at ``at`` (None under 2 distinct xs)."""
    if len(set(xs)) < 2:
        return None
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return {"slope": float(slope), "intercept": float(intercept), "at": at, "projected": float(slope * at + intercept)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8], help="thinker layer counts")
    parser.add_argument("--recipe", default="awq", help="recipe name or YAML path passed to omni-export build")
    parser.add_argument("--preset", default="7b-shape", choices=["7b-shape", "tiny"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench"), help="checkpoints and bundles go here")
    parser.add_argument("--reuse", type=Path, action="append", default=[],
                        help="an existing checkpoint to use for its layer count (repeatable)")
    parser.add_argument("--delete-bundles", action="store_true", help="remove each bundle once measured")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per build")
    parser.add_argument("--rss-limit-gb", type=float,
                        help="kill a build whose RSS passes this (default: available memory at start - 2 GB)")
    parser.add_argument("--json", type=Path, default=Path("build_memory.json"))
    args = parser.parse_args()

    rss_limit = int(args.rss_limit_gb * GB) if args.rss_limit_gb else default_rss_limit()
    reuse = {checkpoint_layers(p): p for p in args.reuse if checkpoint_layers(p) is not None}
    recipe_tag = Path(args.recipe).stem
    args.work.mkdir(parents=True, exist_ok=True)
    cli = omni_export_cmd()
    rows = []
    for layers in args.layers:
        row: dict = {"layers": layers, "ok": False}
        rows.append(row)
        model = reuse.get(layers) or args.work / f"{args.preset}-L{layers}"
        row["model"] = str(model)
        if checkpoint_layers(model) != layers:
            shutil.rmtree(model, ignore_errors=True)  # a half-written directory of an earlier run
            print(f"writing the {args.preset} checkpoint with {layers} layers to {model}", file=sys.stderr)
            made = run_measured([*cli, "tiny", str(model), "--preset", args.preset, "--layers", str(layers)],
                                timeout=args.timeout, rss_limit=rss_limit, poll_s=0.5)
            row["checkpoint_s"] = made.wall_s
            if not made.ok:
                row["error"] = f"omni-export tiny: {made.failure()}"
                print(f"  {layers} layers: FAILED {row['error']}", file=sys.stderr)
                continue
        bundle = args.work / f"{args.preset}-L{layers}-{recipe_tag}"
        cmd = [*cli, "build", "--model", str(model), "--recipe", args.recipe, "--out", str(bundle), "--force"]
        row["cmd"] = " ".join(cmd)
        print(f"building: {row['cmd']} (available memory {(available_memory() or 0) / GB:.1f} GB)", file=sys.stderr)
        run = run_measured(cmd, timeout=args.timeout, rss_limit=rss_limit, poll_s=0.5)
        row.update({"build_s": run.wall_s, "peak_rss_bytes": run.peak_rss_bytes, "ok": run.ok,
                    "error": run.failure() or None})
        if run.ok:
            manifest = json.loads((bundle / "manifest.json").read_text())
            row["bundle"] = str(bundle)
            row["bundle_bytes"] = sum(f["bytes"] for f in manifest["files"].values())
            row["s_per_layer"] = run.wall_s / layers
            if args.delete_bundles:
                shutil.rmtree(bundle, ignore_errors=True)
        print(f"  {layers} layers: " + (f"{run.wall_s:.0f} s, peak RSS {run.peak_rss_bytes / GB:.2f} GB"
                                       if run.ok else f"FAILED {row['error']}"), file=sys.stderr)

    good = [r for r in rows if r["ok"]]
    fits = {"peak_rss_bytes": linear_fit([r["layers"] for r in good], [r["peak_rss_bytes"] for r in good], REAL_LAYERS),
            "build_s": linear_fit([r["layers"] for r in good], [r["build_s"] for r in good], REAL_LAYERS),
            "bundle_bytes": linear_fit([r["layers"] for r in good], [r["bundle_bytes"] for r in good], REAL_LAYERS)}

    print(f"omni-export build --recipe {args.recipe}, preset {args.preset}; RSS limit {rss_limit / GB:.1f} GB")
    print(f"{'layers':>6} {'peak RSS GB':>12} {'build s':>9} {'s/layer':>8} {'bundle GB':>10}  status")
    for r in rows:
        if r["ok"]:
            print(f"{r['layers']:6d} {r['peak_rss_bytes'] / GB:12.2f} {r['build_s']:9.1f} {r['s_per_layer']:8.1f} "
                  f"{r['bundle_bytes'] / GB:10.3f}  ok")
        else:
            rss = f"{r['peak_rss_bytes'] / GB:12.2f}" if "peak_rss_bytes" in r else f"{'-':>12}"
            print(f"{r['layers']:6d} {rss} {'-':>9} {'-':>8} {'-':>10}  {r['error']}")
    if fits["peak_rss_bytes"]:
        rss_fit, time_fit, size_fit = fits["peak_rss_bytes"], fits["build_s"], fits["bundle_bytes"]
        print(f"linear fit to {REAL_LAYERS} layers: peak RSS {rss_fit['projected'] / GB:.1f} GB "
              f"({rss_fit['slope'] / GB:+.2f} GB/layer), build {time_fit['projected']:.0f} s "
              f"({time_fit['slope']:+.1f} s/layer), bundle {size_fit['projected'] / GB:.2f} GB")
    else:
        print(f"linear fit to {REAL_LAYERS} layers: needs two successful layer counts")
    result = {"recipe": args.recipe, "preset": args.preset, "runs": rows, "fit": fits,
              "projected_28_layers": {k: (v["projected"] if v else None) for k, v in fits.items()},
              "settings": {"layers": args.layers, "work": str(args.work), "timeout_s": args.timeout,
                           "rss_limit_bytes": rss_limit, "machine": machine_info()}}
    write_json(args.json, result)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
