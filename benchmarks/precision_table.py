"""The precision table of recipes/README.md: every float module at every precision against PyTorch.

For one checkpoint (``omni-export tiny`` or ``--preset 7b-shape``) this builds the audio and vision
encoders, the talker and token2wav at each precision (float32, float16, int8; the talker also
int4) into ``--out`` (the thinker's config block only: ``build_bundle(config_only=...)``), then per
graph:

- ``max_abs`` / ``rel_rms`` against transformers (each module's verify check, onnxruntime's CPU
  provider: a float16 graph runs its nodes without a float16 CPU kernel in float32 through the
  Casts onnxruntime inserts, ``cpu_float32_ops``); ``--reference`` adds ``ref_rel_rms`` from
  ``onnx.reference`` (float16 arithmetic between every op; slow, use it on tiny);
- the talker's greedy codes against its float32 build (``teacher_forced``, ``free_running``);
- token2wav's waveform error: the BigVGAN graph's ``max_abs`` is the waveform error at full scale
  ([-1, 1] audio), ``rel_rms`` relative to the model's own waveform;
- ``bytes``: the graph's files, and ``bytes_7b``: projected to the real Qwen2.5-Omni-7B layer
  counts (``REAL_LAYERS``) by parameters, assuming the measured bytes per parameter hold for the
  missing layers (the 7b-shape preset has the real widths and 2 layers per stack).

Each bundle but the float32 one (the talker's code reference) is removed after its row. Prints a
table and writes ``--json``.

    .venv/bin/python benchmarks/precision_table.py --model /tmp/b7/model --out /tmp/B/table7b --json b7.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

#: decoder / encoder layers of the real Qwen2.5-Omni-7B (its config.json): audio encoder_layers,
#: vision depth, talker num_hidden_layers, DiT num_hidden_layers
REAL_LAYERS = {"audio": 32, "vision": 32, "talker": 24, "token2wav": 22}
#: module -> the local path of its layer list (under the module's prefixes)
LAYER_PATHS = {"audio": "layers", "vision": "blocks", "talker": "model.layers", "token2wav": "transformer_blocks"}
MODULES = ("audio", "vision", "talker", "token2wav")
PRECISIONS = {"float32": {}, "float16": {"weights": "float16"}, "int8": {"weights": "int8"},
              "int8+float16": {"weights": "int8", "dtype": "float16"}, "int4": {"weights": "int4"},
              "w8a8": {"weights": "int8", "activations": "int8_per_token"}}
#: the modules each precision is built for (int4 and W8A8: the talker only)
BUILT = {"int4": ("talker",), "w8a8": ("talker",)}


def project(ckpt, module: str, graph_bytes: int, graph_share: float) -> int:
    """``graph_bytes`` projected to the real layer count: the module's parameters at the real
    count over its parameters here, times the bytes (``graph_share``: this graph's part of the
    module's layers; token2wav's layers are the DiT's alone)."""
    from omni_export.modules import REGISTRY

    cls = REGISTRY[module]
    names = ckpt.tensor_names(cls.prefixes)
    prefix = LAYER_PATHS[module] + "."
    if module == "token2wav":  # the DiT's layers: local names under token2wav.code2wav_dit_model.
        names = ckpt.tensor_names(cls.dit_prefixes)
        total = ckpt.numel(ckpt.tensor_names(cls.prefixes).values())
    else:
        total = ckpt.numel(names.values())
    layer_names = [n for local, n in names.items() if local.startswith(prefix)]
    layers = {local[len(prefix):].split(".")[0] for local in names if local.startswith(prefix)}
    per_layer = ckpt.numel(layer_names) / max(1, len(layers))
    if graph_share <= 0:  # a graph without layers (the BigVGAN, an embedding table): as it is
        return graph_bytes
    extra = per_layer * (REAL_LAYERS[module] - len(layers))
    bytes_per_param = graph_bytes / (total * graph_share)
    return int(graph_bytes + extra * bytes_per_param)


def graph_share(module: str, graph: str, ckpt) -> float:
    """The part of the module's parameters a graph holds (for :func:`project`): 0 for graphs
    without the module's layers."""
    from omni_export.modules import REGISTRY

    if graph in ("talker_embedding", "token2wav_bigvgan"):
        return 0.0
    if module == "token2wav":  # the DiT's share of token2wav
        cls = REGISTRY[module]
        dit = ckpt.numel(ckpt.tensor_names(cls.dit_prefixes).values())
        return dit / ckpt.numel(ckpt.tensor_names(cls.prefixes).values())
    if module == "talker":  # all but the codec table
        names = ckpt.tensor_names(REGISTRY[module].prefixes)
        table = ckpt.numel([n for local, n in names.items() if local == "model.embed_tokens.weight"])
        return 1.0 - table / ckpt.numel(names.values())
    return 1.0


def run(model: Path, out: Path, precisions: list[str], reference: bool, steps: int) -> list[dict]:
    from omni_runtime.bundle.manifest import load_manifest

    from omni_export.build.pipeline import build_bundle
    from omni_export.build.recipes import parse_recipe
    from omni_export.checkpoint.reader import Checkpoint
    from omni_export.verify.precision import code_agreement, cpu_casts, module_errors

    ckpt = Checkpoint.open(model)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for precision in precisions:
        modules = BUILT.get(precision, MODULES)
        settings = PRECISIONS[precision]
        bundle = out / precision
        if bundle.exists():
            shutil.rmtree(bundle)
        needs = {m: dict(settings) for m in modules}
        if "token2wav" in needs and "talker" not in needs:
            needs["talker"] = {}
        recipe = parse_recipe({"schema_version": 2, "name": "table", "modules": {"thinker": {}, **needs}}, "table")
        started = time.perf_counter()
        build_bundle(model, recipe, bundle, config_only=("thinker",))
        built = time.perf_counter() - started
        manifest = load_manifest(bundle)
        errors = module_errors(bundle, model, list(modules))
        ref_errors = module_errors(bundle, model, [m for m in modules if m != "vision"], runner="reference") \
            if reference and precision != "float32" else {}
        codes = code_agreement(bundle, out / "float32", steps=steps) if "talker" in modules and \
            precision != "float32" else None
        for module in modules:
            from omni_export.modules import REGISTRY

            for graph in REGISTRY[module].graphs:
                spec = manifest.graph(graph)
                size = sum(manifest.files[f]["bytes"] for f in spec.files)
                row = {"model": model.name, "module": module, "precision": precision, "graph": graph,
                       "dtype": spec.dtype, "weights": (spec.quantization or {}).get("weights", spec.dtype),
                       **{k: v for k, v in errors[graph].items()}, "bytes": size,
                       "bytes_7b": project(ckpt, module, size, graph_share(module, graph, ckpt)),
                       "build_seconds": round(built, 1)}
                if graph in ref_errors:
                    row["ref_rel_rms"] = ref_errors[graph]["rel_rms"]
                    row["ref_max_abs"] = ref_errors[graph]["max_abs"]
                if spec.dtype == "float16":
                    row["cpu_float32_ops"] = cpu_casts(manifest.path(spec.file))
                if graph == "talker_decoder" and codes is not None:
                    row["codes"] = codes
                rows.append(row)
                print(_line(row), flush=True)
        if precision != "float32":
            shutil.rmtree(bundle)
    return rows


def _line(row: dict) -> str:
    codes = row.get("codes")
    code_text = f" codes tf {codes['teacher_forced']:.2f} free {codes['free_running']:.2f}" if codes else ""
    ref = f" ref {row['ref_rel_rms']:.1e}" if "ref_rel_rms" in row else ""
    return (f"{row['module']:9s} {row['precision']:12s} {row['graph']:18s} max_abs {row['max_abs']:.2e} "
            f"rel_rms {row['rel_rms']:.2e}{ref}{code_text} bytes {row['bytes'] / 1e6:8.1f} MB "
            f"7B {row['bytes_7b'] / 1e9:6.2f} GB")


def totals(rows: list[dict]) -> dict:
    """Bytes at 7B of encoders + talker + token2wav per precision, and the ratio to float32."""
    by = {}
    for row in rows:
        by.setdefault(row["precision"], {})[row["graph"]] = row["bytes_7b"]
    base = sum(by.get("float32", {}).values())
    return {p: {"bytes_7b": sum(g.values()), "ratio": sum(g.values()) / base if base else None,
                "graphs": len(g)} for p, g in by.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="working directory for the bundles")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--reference", action="store_true", help="also run onnx.reference (slow: tiny only)")
    parser.add_argument("--steps", type=int, default=64, help="greedy talker codes compared")
    args = parser.parse_args()
    if args.precisions[0] != "float32" and "float32" in args.precisions:
        args.precisions.remove("float32")
        args.precisions.insert(0, "float32")
    rows = run(args.model, args.out, args.precisions, args.reference, args.steps)
    summary = totals(rows)
    for p, t in summary.items():
        ratio = f"{t['ratio']:.3f}x float32" if t["ratio"] is not None else ""
        print(f"total {p:12s} {t['bytes_7b'] / 1e9:6.2f} GB at 7B ({t['graphs']} graphs) {ratio}")
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_text(json.dumps({"model": str(args.model), "rows": rows, "totals": summary}, indent=1) + "\n")
    tmp.replace(args.json)


if __name__ == "__main__":
    main()
