"""W8A8's quality per exclusion: each bundle's thinker against transformers (float32), on one checkpoint.

For every ``--bundle`` (built from ``--model``; e.g. the w8a8 recipe with its default exclusions,
with lm_head int8 too, with every linear int8; and awq for scale) this reports:

- ``verify``'s thinker figures (``omni_export.verify``): the decoder graph's ``rel_rms`` /
  ``max_abs`` on a seeded random input (hidden states and last-position logits), and the
  teacher-forced next-token distributions over ``--prompts`` built-in conversations
  (``top1_agreement``, ``mean_kl``);
- greedy agreement: the bundle generates ``--tokens`` greedy tokens after each prompt, then
  transformers scores prompt + those tokens in one forward pass; ``greedy_agreement`` is the
  share of the bundle's tokens that are the float model's argmax after the same prefix, and
  ``greedy_prefix`` the mean count of leading tokens before the first disagreement (a random
  model's logits are nearly flat, so this is a strict measure);
- ``thinker_bytes``: the decoder and embedding graphs' files.

Prints a table and writes ``--json``::

    .venv/bin/python benchmarks/w8a8_quality.py --model /tmp/m7 --bundle /tmp/b7-w8a8 /tmp/b7-all \
        --json benchmarks/results/DATE/w8a8_exclusions_quality.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchutil import machine_info, write_json


def greedy_agreement(bundle: Path, model: Path, prompts: int, tokens: int) -> dict:
    """The bundle's greedy continuations scored by transformers (module docstring)."""
    from omni_runtime.bundle.manifest import load_manifest
    from omni_runtime.bundle.names import THINKER_DECODER, THINKER_EMBEDDING
    from omni_runtime.bundle.sessions import SessionPool
    from omni_runtime.prompt.rope import text_position_ids
    from omni_runtime.stages.thinker import ThinkerGenerator

    from omni_export.checkpoint.reader import Checkpoint
    from omni_export.verify.checks.thinker import _bundle_samples, _thinker, reference_forward

    manifest = load_manifest(bundle)
    samples = _bundle_samples(manifest, prompts, tokens)
    pool = SessionPool(manifest, ["CPUExecutionProvider"])
    try:
        generator = ThinkerGenerator(manifest, pool)
        generated = []
        for prompt, _ in samples:
            out = generator.generate([list(prompt)], tokens)  # greedy by default; may stop at eos
            generated.append(list(out.token_ids[0]))
        generator.done()
    finally:
        for name in (THINKER_EMBEDDING, THINKER_DECODER):
            pool.release(name)
    ckpt = Checkpoint.open(model)
    thinker = _thinker(ckpt)
    sequences = []
    table = thinker.weights().embedding()
    for (prompt, _), gen in zip(samples, generated):
        ids = np.asarray(prompt + gen, dtype=np.int64)
        sequences.append((table[ids][None], text_position_ids(np.ones((1, ids.size), dtype=np.int64))))
    del table
    ref = reference_forward(ckpt, sequences, module=thinker)
    agree, prefixes = [], []
    for k, ((prompt, _), gen) in enumerate(zip(samples, generated)):
        first = len(prompt) - 1
        expected = ref.logits(k, list(range(first, first + len(gen)))).argmax(-1)
        same = expected == np.asarray(gen)
        agree.append(same)
        prefixes.append(int(np.argmin(same)) if not same.all() else len(gen))
    agree = np.concatenate(agree)
    return {"greedy_agreement": float(agree.mean()), "greedy_prefix": float(np.mean(prefixes)),
            "greedy_tokens": int(agree.size), "generated": generated}


def measure(bundle: Path, model: Path, prompts: int, tokens: int) -> dict:
    from omni_runtime.bundle.manifest import load_manifest

    from omni_export.verify.driver import verify_bundle

    started = time.perf_counter()
    report = verify_bundle(bundle, model, prompts=prompts, tokens=tokens)
    manifest = load_manifest(bundle)
    thinker = manifest.recipe["modules"]["thinker"]
    decoder = report["graphs"]["thinker_decoder"]
    row = {"bundle": str(bundle), "recipe": manifest.recipe.get("name"),
           "keep_float": thinker.get("keep_float"), "lm_head": thinker.get("lm_head"),
           "weights": thinker.get("weights"), "activations": thinker.get("activations", "float"),
           "decoder_rel_rms": decoder["rel_rms"], "decoder_max_abs": decoder["max_abs"],
           "logits_rel_rms": decoder["logits_rel_rms"],
           "top1_agreement": report["thinker"]["top1_agreement"], "mean_kl": report["thinker"]["mean_kl"],
           "thinker_bytes": sum((bundle / f).stat().st_size for f in _thinker_files(manifest))}
    row.update(greedy_agreement(bundle, model, prompts, tokens))
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def _thinker_files(manifest) -> list[str]:
    from omni_runtime.bundle.names import THINKER_DECODER, THINKER_EMBEDDING

    files = []
    for name in (THINKER_DECODER, THINKER_EMBEDDING):
        graph = manifest.graph(name)
        files += [graph.file, *graph.external_data]
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="the checkpoint the bundles were built from")
    parser.add_argument("--bundle", type=Path, nargs="+", required=True)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for bundle in args.bundle:
        print(f"measuring {bundle} ...", flush=True)
        rows.append(measure(bundle, args.model, args.prompts, args.tokens))
    header = ("recipe", "keep_float", "lm_head", "decoder rel_rms", "logits rel_rms", "top-1", "mean KL",
              "greedy agree", "greedy prefix", "thinker GB")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['recipe']} | {r['keep_float']} | {r['lm_head']} | {r['decoder_rel_rms']:.4f} | "
              f"{r['logits_rel_rms']:.4f} | {r['top1_agreement']:.3f} | {r['mean_kl']:.2e} | "
              f"{r['greedy_agreement']:.3f} | {r['greedy_prefix']:.1f} | {r['thinker_bytes'] / 1e9:.2f} |")
    if args.json:
        write_json(args.json, {"model": str(args.model), "rows": rows,
                               "settings": {"prompts": args.prompts, "tokens": args.tokens},
                               "machine": machine_info()})


if __name__ == "__main__":
    main()
