"""Thinker text decoding speed and size: omni-export bundles (ONNX Runtime) vs PyTorch eager vs onnxruntime-genai.

Every engine runs the same weights, greedy, the same prompt ids and number of new tokens,
each run in its own fresh process (engines never compete for the cores nor share a peak-RSS
figure), ``--repeats`` times, round robin. Reported per engine: median and range of decode
tok/s and first-token latency, load time, peak RSS and the model's bytes on disk.

Engines:
- one ``omni-export <recipe>`` engine per ``--bundle`` (the runtime's ThinkerGenerator);
- ``pytorch-eager-<dtype>``: transformers' thinker ``generate`` on ``--model``;
- ``onnxruntime-genai-<precision>``: genai's own int4 CPU model of the same thinker text
  weights (see genai_model.py: a Qwen2 view of the checkpoint, built once with
  ``onnxruntime_genai.models.builder`` and cached under ``--work``). Needs ``--model`` and
  the ``bench`` extra (``pip install -e '.[bench]'``).

Sizes: a bundle's model bytes are its thinker graphs' files; its projection to the real 28
layers is bytes per decoder layer x 28 + embedding + lm_head + rest, compared with the 7B
thinker in fp16 (15.2 GB). Example:

    omni-export tiny /tmp/bench/s7 --preset 7b-shape --layers 4
    omni-export build --model /tmp/bench/s7 --out /tmp/bench/s7-fp32
    python benchmarks/thinker_decode.py --bundle /tmp/bench/s7-fp32 --model /tmp/bench/s7 \
        --work /tmp/bench/work --repeats 3 --json thinker_decode.json
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
from benchutil import GB, default_rss_limit, machine_info, run_measured, summarize, write_json  # noqa: E402

FP16_7B_THINKER_BYTES = 15.2e9  # the Qwen2.5-Omni-7B thinker in fp16
REAL_LAYERS = 28  # Qwen2.5-Omni-7B thinker decoder layers
ENGINE_KINDS = ("bundle", "torch", "genai")


def prompt_ids(length: int, seed: int = 0) -> list[int]:
    """A fixed random prompt of ordinary (non-special) token ids."""
    return np.random.default_rng(seed).integers(1000, 100000, size=length).tolist()


def own_peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rates(start: float, stamps: list[float]) -> tuple[float, float]:
    """First-token latency and decode tok/s from the per-token time stamps (same rule for every engine)."""
    first = stamps[0] - start
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return first, decode


# ------------------------------------------------------------------ engines (child processes)
def bench_bundle(bundle: Path, prompt: list[int], new_tokens: int, threads: int) -> dict:
    from omni_runtime.bundle.manifest import load_manifest
    from omni_runtime.stages.sampling import SamplingConfig
    from omni_runtime.bundle.sessions import SessionPool, SessionSettings, select_providers
    from omni_runtime.stages.thinker import DECODER, EMBEDDING, ThinkerGenerator

    start = time.perf_counter()
    manifest = load_manifest(bundle)
    pool = SessionPool(manifest, select_providers("auto"), SessionSettings(intra_op_threads=threads))
    pool.get(EMBEDDING)
    pool.get(DECODER)
    load_s = time.perf_counter() - start
    generator = ThinkerGenerator(manifest, pool)
    generator.eos_ids = np.array([], dtype=np.int64)  # run exactly new_tokens steps
    stamps: list[float] = []
    start = time.perf_counter()
    out = generator.generate([prompt], new_tokens, SamplingConfig(), on_step=lambda _: stamps.append(time.perf_counter()))
    first, decode = rates(start, stamps)
    return {"providers": pool.providers, "load_s": load_s, "first_token_s": first, "decode_tok_s": decode,
            "tokens": out.token_ids[0], "own_peak_rss_bytes": own_peak_rss()}


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
    first, decode = rates(start, stamps)
    return {"providers": ["torch-cpu"], "load_s": load_s, "first_token_s": first, "decode_tok_s": decode,
            "tokens": out[0, len(prompt):].tolist(), "own_peak_rss_bytes": own_peak_rss()}


def bench_genai(genai_dir: Path, prompt: list[int], new_tokens: int, threads: int) -> dict:
    import onnxruntime_genai as og

    start = time.perf_counter()
    config = og.Config(str(genai_dir))
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    load_s = time.perf_counter() - start
    params = og.GeneratorParams(model)
    total = len(prompt) + new_tokens  # min_length = max_length: exactly new_tokens, eos does not stop it
    params.set_search_options(do_sample=False, max_length=total, min_length=total, repetition_penalty=1.0,
                              num_beams=1)
    generator = og.Generator(model, params)
    stamps: list[float] = []
    tokens: list[int] = []
    start = time.perf_counter()
    generator.append_tokens(np.array([prompt], dtype=np.int32))  # prefill
    while not generator.is_done():
        generator.generate_next_token()
        stamps.append(time.perf_counter())
        tokens.append(int(generator.get_next_tokens()[0]))
    first, decode = rates(start, stamps)
    return {"providers": ["genai-cpu"], "load_s": load_s, "first_token_s": first, "decode_tok_s": decode,
            "tokens": tokens, "own_peak_rss_bytes": own_peak_rss()}


def child_main(args) -> None:
    prompt = prompt_ids(args.prompt_tokens)
    if args.engine == "bundle":
        result = bench_bundle(args.bundle[0], prompt, args.new_tokens, args.threads)
    elif args.engine == "torch":
        result = bench_torch(args.model, prompt, args.new_tokens, args.threads, args.torch_dtype)
    else:
        result = bench_genai(args.genai_dir, prompt, args.new_tokens, args.threads)
    print(json.dumps(result))


# ------------------------------------------------------------------ sizes
def graph_files_bytes(manifest: dict, graph: dict) -> int:
    return sum(manifest["files"][rel]["bytes"] for rel in [graph["file"], *graph.get("external_data", [])])


def thinker_model_bytes(manifest: dict) -> int:
    """Bytes of every ``thinker_*`` graph's files (graph + external data), as listed in ``files``."""
    return sum(graph_files_bytes(manifest, g) for name, g in manifest["graphs"].items() if name.startswith("thinker"))


def _initializer_bytes(tensor) -> int:
    import onnx

    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    if tensor.raw_data:
        return len(tensor.raw_data)
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def lm_head_bytes(bundle: Path, manifest: dict) -> tuple[int, str]:
    """Bytes of the decoder's lm_head weights, and how they were found.

    Read from the decoder graph: the first MatMul/Gemm (or quantized MatMul) on the way back from
    ``logits``, with every initializer that feeds its weight side (scales, zero points, a
    DequantizeLinear or Transpose in between). Falls back to vocab x hidden x the recipe's dtype size.
    """
    cfg = manifest["config"]["thinker"]
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}.get(manifest["recipe"].get("dtype"), 4)
    fallback = int(cfg["vocab_size"]) * int(cfg["hidden_size"]) * itemsize, "vocab x hidden x dtype size"
    try:
        import onnx

        model = onnx.load(str(bundle / manifest["graphs"]["thinker_decoder"]["file"]), load_external_data=False)
    except Exception:  # onnx missing (runtime-only env) or unreadable graph: use the formula
        return fallback
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    memo: dict[str, set | None] = {}

    def constant_inits(name: str) -> set | None:
        """Initializers a value is computed from, or None if it depends on a graph input."""
        if name in memo:
            return memo[name]
        memo[name] = None
        if name in inits:
            memo[name] = {name}
        elif name in producer:
            found: set = set()
            for inp in producer[name].input:
                sub = constant_inits(inp) if inp else set()
                if sub is None:
                    return None
                found |= sub
            memo[name] = found
        return memo[name]

    queue, seen = ["logits"], set()
    while queue:
        node = producer.get(queue.pop(0))
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type.startswith(("MatMul", "Gemm")):
            weights: set = set()
            for inp in node.input:
                weights |= (constant_inits(inp) or set()) if inp else set()
            if weights:
                return sum(_initializer_bytes(inits[n]) for n in weights), "decoder graph (lm_head MatMul initializers)"
        queue.extend(i for i in node.input if i)
    return fallback


def thinker_size_breakdown(bundle: Path, manifest: dict) -> dict:
    """Per-part bytes of a bundle's thinker: layers, bytes per layer, embedding, lm_head, rest.

    With the thinker's build info ``build.modules.thinker.weight_bytes`` (``per_layer`` list,
    ``embeddings``, ``lm_head_and_norm``) the parts are the manifest's figures and ``rest`` is
    whatever else the thinker graph files hold (graph protos, constants). Older manifests have no
    such figure there:
    bytes per decoder layer are then inferred as (decoder graph bytes - lm_head bytes) / layers
    (the final norm and the graph proto spread over the layers). This is the one function the
    projection depends on.
    """
    graphs = manifest["graphs"]
    cfg = manifest["config"]["thinker"]
    layers = int(cfg["num_hidden_layers"])
    total = thinker_model_bytes(manifest)
    decoder = graph_files_bytes(manifest, graphs["thinker_decoder"])
    sizes = manifest.get("build", {}).get("modules", {}).get("thinker", {}).get("weight_bytes")
    if sizes:
        per_layer = [int(b) for b in sizes["per_layer"]]
        embedding, head = int(sizes["embeddings"]), int(sizes["lm_head_and_norm"])
        return {"num_layers": layers, "per_layer_bytes": sum(per_layer) / len(per_layer), "embedding_bytes": embedding,
                "lm_head_bytes": head, "rest_bytes": total - sum(per_layer) - embedding - head,
                "decoder_bytes": decoder, "source": "manifest build.modules.thinker.weight_bytes"}
    embedding = graph_files_bytes(manifest, graphs["thinker_embedding"])
    head, head_source = lm_head_bytes(bundle, manifest)
    rest = total - decoder - embedding
    return {"num_layers": layers, "per_layer_bytes": (decoder - head) / layers, "embedding_bytes": embedding,
            "lm_head_bytes": head, "rest_bytes": rest, "decoder_bytes": decoder,
            "source": f"inferred: (decoder - lm_head) / layers; lm_head from {head_source}"}


def projected_bytes(breakdown: dict, layers: int = REAL_LAYERS) -> int:
    """Thinker bytes at ``layers`` decoder layers: per layer x layers + embedding + lm_head + rest."""
    return int(breakdown["per_layer_bytes"] * layers + breakdown["embedding_bytes"] + breakdown["lm_head_bytes"]
               + breakdown["rest_bytes"])


# ------------------------------------------------------------------ orchestration
class Engine:
    def __init__(self, name: str, kind: str, child_args: list[str], model_bytes: int | None, extra: dict):
        self.name, self.kind, self.child_args, self.model_bytes, self.extra = name, kind, child_args, model_bytes, extra
        self.runs: list[dict] = []
        self.failures: list[str] = []


def child_cmd(args, engine_args: list[str]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *engine_args, "--prompt-tokens", str(args.prompt_tokens),
            "--new-tokens", str(args.new_tokens), "--threads", str(args.threads), "--torch-dtype", args.torch_dtype]


def make_engines(args) -> tuple[list[Engine], list[str]]:
    engines, notes, names = [], [], set()
    if "bundle" in args.engines:
        for bundle in args.bundle:
            manifest = json.loads((bundle / "manifest.json").read_text())
            name = f"omni-export {manifest['recipe']['name']}"
            while name in names:
                name += "'"
            names.add(name)
            breakdown = thinker_size_breakdown(bundle, manifest)
            engines.append(Engine(name, "bundle", ["--engine", "bundle", "--bundle", str(bundle)],
                                  thinker_model_bytes(manifest),
                                  {"bundle": str(bundle), "recipe": manifest["recipe"], "size_breakdown": breakdown,
                                   "thinker_config": manifest["config"]["thinker"]}))
    if "torch" in args.engines:
        if args.model is None:
            notes.append("pytorch skipped: no --model")
        else:
            engines.append(Engine(f"pytorch-eager-{args.torch_dtype}", "torch",
                                  ["--engine", "torch", "--model", str(args.model)], None, {"model": str(args.model)}))
    if "genai" in args.engines:
        from genai_model import build_genai_model, genai_version

        if args.model is None:
            notes.append("onnxruntime-genai skipped: no --model")
        elif genai_version() is None:
            notes.append("onnxruntime-genai skipped: not installed (pip install -e '.[bench]')")
        else:
            work = args.work or (args.bundle[0] if args.bundle else args.model).resolve().parent
            try:
                genai_dir, record = build_genai_model(args.model, work, args.genai_precision,
                                                      timeout=args.timeout, rss_limit=args.rss_limit,
                                                      log=lambda m: print(m, file=sys.stderr))
            except RuntimeError as exc:
                notes.append(f"onnxruntime-genai skipped: {str(exc).splitlines()[0]}")
            else:
                engines.append(Engine(f"onnxruntime-genai-{args.genai_precision}", "genai",
                                      ["--engine", "genai", "--genai-dir", str(genai_dir)], record["model_bytes"],
                                      {"genai_dir": str(genai_dir), "build": record}))
    return engines, notes


def run_all(args, engines: list[Engine]) -> None:
    for rep in range(args.repeats):
        for engine in engines:
            run = run_measured(child_cmd(args, engine.child_args), timeout=args.timeout, rss_limit=args.rss_limit,
                               poll_s=0.5)
            if not run.ok:
                engine.failures.append(run.failure())
                print(f"  {engine.name} run {rep + 1}: FAILED {run.failure()}", file=sys.stderr)
                continue
            result = run.last_json()
            result["peak_rss_bytes"] = run.peak_rss_bytes
            engine.runs.append(result)
            print(f"  {engine.name} run {rep + 1}/{args.repeats}: {result['decode_tok_s']:.2f} tok/s, "
                  f"first token {result['first_token_s']:.3f} s, peak RSS {run.peak_rss_bytes / GB:.2f} GB",
                  file=sys.stderr)


def same_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def engine_summary(engine: Engine, reference: Engine | None) -> dict:
    runs = engine.runs
    out = {
        "kind": engine.kind,
        "decode_tok_s": summarize([r["decode_tok_s"] for r in runs]),
        "first_token_s": summarize([r["first_token_s"] for r in runs]),
        "load_s": summarize([r["load_s"] for r in runs])["median"],
        "peak_rss_bytes": max((r["peak_rss_bytes"] for r in runs), default=None),
        "model_bytes": engine.model_bytes,
        "providers": runs[0]["providers"] if runs else None,
        "runs_ok": len(runs),
        "failures": engine.failures,
        "deterministic": all(r["tokens"] == runs[0]["tokens"] for r in runs) if runs else None,
        "tokens": runs[0]["tokens"] if runs else None,
        **engine.extra,
    }
    if reference is not None and runs and reference.runs:
        ref = reference.runs[0]["tokens"]
        out["greedy_ids_vs_reference"] = {"reference": reference.name, "same": runs[0]["tokens"] == ref,
                                          "same_prefix": same_prefix(runs[0]["tokens"], ref), "of": len(ref)}
    return out


def ratio(a, b):
    return a / b if a is not None and b else None


def bundle_ratios(bundle: dict, torch: dict | None, genai: dict | None) -> dict:
    median = bundle["decode_tok_s"]["median"]
    projected = projected_bytes(bundle["size_breakdown"])
    return {
        "decode_ratio_vs_pytorch": ratio(median, torch and torch["decode_tok_s"]["median"]),
        "decode_ratio_vs_genai": ratio(median, genai and genai["decode_tok_s"]["median"]),
        "size_ratio_vs_genai": ratio(bundle["model_bytes"], genai and genai["model_bytes"]),
        "projected_28_layers_bytes": projected,
        "projected_28_layers_ratio_vs_fp16": projected / FP16_7B_THINKER_BYTES,
    }


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_report(args, summaries: dict, result: dict, notes: list[str]) -> None:
    first = next((s for s in summaries.values() if s["kind"] == "bundle"), None)
    cfg = first["thinker_config"] if first else {}
    print(f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy, {args.repeats} run(s) per engine; "
          f"thinker layers {cfg.get('num_hidden_layers', '?')}, hidden {cfg.get('hidden_size', '?')}")
    print(f"{'engine':28} {'decode tok/s (min-max)':>26} {'1st token s (min-max)':>25} {'load s':>7} "
          f"{'peak RSS GB':>11} {'model GB':>9}  greedy ids")
    for name, s in summaries.items():
        d, f = s["decode_tok_s"], s["first_token_s"]
        dec = f"{fmt(d['median'], '.2f')} ({fmt(d['min'], '.2f')}-{fmt(d['max'], '.2f')})"
        ft = f"{fmt(f['median'], '.3f')} ({fmt(f['min'], '.3f')}-{fmt(f['max'], '.3f')})"
        ids = s.get("greedy_ids_vs_reference")
        if name == result["reference_engine"]:
            ids_text = "reference"
        elif ids:
            ids_text = f"{ids['same_prefix']}/{ids['of']} same as reference" + ("" if ids["same"] else " (diverge)")
        else:
            ids_text = "-"
        if s["failures"]:
            ids_text += f"; {len(s['failures'])} failed: {s['failures'][0]}"
        print(f"{name:28} {dec:>26} {ft:>25} {fmt(s['load_s'], '7.2f')} "
              f"{fmt(s['peak_rss_bytes'] and s['peak_rss_bytes'] / GB, '11.2f')} "
              f"{fmt(s['model_bytes'] and s['model_bytes'] / GB, '9.3f')}  {ids_text}")
    for name, r in result["bundles"].items():
        b = summaries[name]["size_breakdown"]
        print(f"{name}: decode x{fmt(r['decode_ratio_vs_pytorch'], '.2f')} vs pytorch, "
              f"x{fmt(r['decode_ratio_vs_genai'], '.2f')} vs genai; size_ratio_vs_genai {fmt(r['size_ratio_vs_genai'], '.2f')}; "
              f"per layer {b['per_layer_bytes'] / GB:.3f} GB, embedding {b['embedding_bytes'] / GB:.3f} GB, "
              f"lm_head {b['lm_head_bytes'] / GB:.3f} GB -> projected 28 layers {r['projected_28_layers_bytes'] / GB:.2f} GB, "
              f"projected_28_layers_ratio_vs_fp16 {r['projected_28_layers_ratio_vs_fp16']:.2f} (fp16 7B thinker 15.2 GB)")
    for note in notes:
        print(f"note: {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, action="append", default=[],
                        help="bundle directory; repeat for several bundles (one engine each, named by recipe)")
    parser.add_argument("--model", type=Path, help="checkpoint dir for the PyTorch and onnxruntime-genai engines")
    parser.add_argument("--engines", nargs="+", choices=ENGINE_KINDS, default=list(ENGINE_KINDS),
                        help="engine kinds to run (default: all that the arguments allow)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per engine, each in a fresh process")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads, 0 = library default")
    parser.add_argument("--torch-dtype", default="float32")
    parser.add_argument("--genai-precision", default="int4", choices=["int4", "int8", "fp32"],
                        help="precision of the onnxruntime-genai model (fp32 checks the weight mapping exactly)")
    parser.add_argument("--work", type=Path, help="where the genai model is cached (default: next to the first bundle, else the model)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per engine run (and genai build)")
    parser.add_argument("--rss-limit-gb", type=float,
                        help="kill a run whose RSS passes this (default: available memory at start - 2 GB)")
    parser.add_argument("--json", "--out", dest="json", type=Path, default=Path("thinker_decode.json"))
    parser.add_argument("--engine", choices=ENGINE_KINDS, help=argparse.SUPPRESS)  # child process mode
    parser.add_argument("--genai-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.engine:
        child_main(args)
        return
    if "bundle" in args.engines and not args.bundle:
        parser.error("give at least one --bundle (or leave 'bundle' out of --engines)")
    if not args.bundle and args.model is None:
        parser.error("give --bundle and/or --model")
    for bundle in args.bundle:
        if not (bundle / "manifest.json").is_file():
            parser.error(f"{bundle} is not a bundle (no manifest.json): build one with `omni-export build`")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    args.rss_limit = int(args.rss_limit_gb * GB) if args.rss_limit_gb else default_rss_limit()

    engines, notes = make_engines(args)
    run_all(args, engines)
    by_kind = {e.kind: e for e in reversed(engines)}  # first engine of each kind
    reference = by_kind.get("torch") if by_kind.get("torch") and by_kind["torch"].runs else by_kind.get("bundle")
    summaries = {e.name: engine_summary(e, reference if e is not reference else None) for e in engines}
    torch_s = summaries[by_kind["torch"].name] if "torch" in by_kind else None
    genai_s = summaries[by_kind["genai"].name] if "genai" in by_kind else None
    bundles = {e.name: bundle_ratios(summaries[e.name], torch_s, genai_s) for e in engines if e.kind == "bundle"}
    primary = next(iter(bundles.values()), {})
    result = {
        "engines": summaries,
        "reference_engine": reference.name if reference else None,
        **primary,  # the first --bundle's ratios; all bundles under "bundles"
        "bundles": bundles,
        "fp16_7b_thinker_bytes": FP16_7B_THINKER_BYTES,
        "settings": {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
                     "threads": args.threads, "torch_dtype": args.torch_dtype, "genai_precision": args.genai_precision,
                     "bundles": [str(b) for b in args.bundle], "model": str(args.model) if args.model else None,
                     "machine": machine_info()},
        "notes": notes,
    }
    print_report(args, summaries, result, notes)
    write_json(args.json, result)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
