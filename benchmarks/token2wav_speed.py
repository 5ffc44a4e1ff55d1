"""Token2wav speed: the bundle's graphs + omni_runtime.stages.token2wav against transformers' PyTorch module.

Both run in this process with the same number of threads (``--threads``), the same codes, speaker,
solver, steps and initial noise; the waveforms are compared (max abs difference) so a fast wrong
result cannot pass. Measured: the whole waveform (``Token2Wav.waveform`` vs
``Qwen2_5OmniToken2WavModel.forward``), and streaming (``Token2Wav.stream`` vs the official
chunked algorithm in torch, omni_export/testkit/token2wav_refs.py): first-chunk latency and total time.

The graphs are built from ``--model`` into ``--work`` (token2wav only, reused when present); the
PyTorch reference is ``Qwen2_5OmniToken2WavModel`` with the checkpoint's ``token2wav.*`` weights
in float32, so the 7b-shape preset (real DiT and BigVGAN widths) needs about 3 GB::

    .venv/bin/python benchmarks/token2wav_speed.py --model /tmp/bench/s7 --work /tmp/bench/t2w-s7 \\
        --codes 100 --threads 2 --json token2wav.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def build_graphs(model_dir: Path, work: Path) -> dict:
    """token2wav graphs + speakers of ``model_dir`` in ``work``; returns a manifest dict (no thinker)."""

    from omni_export.checkpoint.reader import Checkpoint
    from omni_export.modules.base import BuildContext
    from omni_export.modules.token2wav import Token2WavModule

    done = work / "token2wav_manifest.json"
    if done.exists():
        return json.loads(done.read_text())
    work.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoint.open(model_dir)
    module = Token2WavModule.reference(ckpt)
    module.check()
    started = time.perf_counter()
    graphs = module.build(BuildContext(ckpt=ckpt, recipe=None, out_dir=work)).graphs
    build_s = time.perf_counter() - started
    files = {}
    for path in sorted(p for p in work.rglob("*") if p.is_file() and p != done):
        rel = path.relative_to(work).as_posix()
        files[rel] = {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    data = {"config": {"token2wav": module.config()}, "files": files, "build_seconds": round(build_s, 2),
            "graphs": {name: {"file": g.file, "external_data": list(g.external_data), "opset": g.opset,
                              "dtype": "float32", "quantization": None,
                              "inputs": [t.to_json() for t in g.inputs], "outputs": [t.to_json() for t in g.outputs]}
                       for name, (g, _) in graphs.items()}}
    done.write_text(json.dumps(data, indent=1))
    return data


def open_runtime(work: Path, data: dict, threads: int):
    from omni_runtime.bundle.manifest import GraphSpec, Manifest, TensorSpec
    from omni_runtime.bundle.sessions import SessionPool, SessionSettings
    from omni_runtime.stages.token2wav import Token2Wav

    graphs = {name: GraphSpec(name=name, file=g["file"], external_data=tuple(g["external_data"]), opset=g["opset"],
                              dtype=g["dtype"], quantization=None,
                              inputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in g["inputs"]),
                              outputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in g["outputs"]))
              for name, g in data["graphs"].items()}
    manifest = Manifest(root=work.resolve(), data=data, graphs=graphs)
    pool = SessionPool(manifest, ["CPUExecutionProvider"], SessionSettings(intra_op_threads=threads))
    return Token2Wav(manifest, pool)


def reference(model_dir: Path):
    """transformers' Qwen2_5OmniToken2WavModel with the checkpoint's token2wav weights (float32), speakers."""
    import torch
    from safetensors import safe_open
    from transformers import Qwen2_5OmniConfig
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniToken2WavModel

    config = Qwen2_5OmniConfig.from_pretrained(model_dir).token2wav_config
    config._attn_implementation = "sdpa"
    model = Qwen2_5OmniToken2WavModel(config).float().eval()
    state = {}
    index = model_dir / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    for file in files:
        with safe_open(model_dir / file, framework="pt") as f:
            for name in f.keys():
                if name.startswith("token2wav."):
                    state[name[len("token2wav."):]] = f.get_tensor(name).float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("filter" in m or "inv_freq" in m for m in missing), (missing, unexpected)
    speakers = torch.load(model_dir / "spk_dict.pt", weights_only=True)
    return model, speakers


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return out, times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="checkpoint directory (e.g. omni-export tiny DIR)")
    parser.add_argument("--work", type=Path, required=True, help="where the token2wav graphs are built / reused")
    parser.add_argument("--codes", type=int, default=100, help="number of speech codes (2 mel frames each)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--solvers", nargs="+", default=["rk4", "euler"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--speaker", default="Chelsie")
    parser.add_argument("--no-stream", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import torch
    from transformers.utils import logging

    from omni_export.testkit.token2wav_refs import _sample_chunk, given_noise, official_stream

    logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    data = build_graphs(args.model, args.work)
    t2w = open_runtime(args.work, data, args.threads)
    model, speakers = reference(args.model)
    cond, ref_mel = speakers[args.speaker]["cond"].float(), speakers[args.speaker]["ref_mel"].float()
    codes = np.random.default_rng(0).integers(0, 8193, args.codes).tolist()
    noise = np.random.default_rng(1).standard_normal((args.codes * 2, 80), dtype=np.float32)
    audio_s = args.codes * 2 * 240 / 24000
    rows = []

    for solver in args.solvers:
        def torch_wave():
            with torch.no_grad():
                if solver == "rk4":
                    with given_noise(noise):
                        return model(torch.tensor([codes]), cond, ref_mel, num_steps=args.steps).numpy()
                mel = _sample_chunk(model.code2wav_dit_model, torch.from_numpy(noise)[None], cond, ref_mel,
                                    torch.tensor([codes]), args.steps, 0.5, -1.0, "euler")
                return model.code2wav_bigvgan_model(mel).numpy()

        ort_out, ort_t = timed(lambda: t2w.waveform(codes, args.speaker, solver=solver, steps=args.steps,
                                                    noise=noise), args.repeats)
        ref_out, ref_t = timed(torch_wave, args.repeats)
        rows.append({"mode": "waveform", "solver": solver, "steps": args.steps, "onnx_s": statistics.median(ort_t),
                     "torch_s": statistics.median(ref_t), "max_abs_diff": float(np.abs(ort_out - ref_out).max())})

        if args.no_stream:
            continue

        def ort_stream():
            first, chunks, started = None, [], time.perf_counter()
            for pcm, _ in t2w.stream(codes, args.speaker, solver=solver, steps=args.steps, noise=noise):
                first = first or time.perf_counter() - started
                chunks.append(pcm)
            return first, chunks

        def torch_stream():
            started = time.perf_counter()
            chunks = official_stream(model, codes, cond, ref_mel, noise, steps=args.steps, solver=solver)
            return None, chunks, time.perf_counter() - started

        (o_first, o_chunks), o_t = timed(ort_stream, args.repeats)
        (_, r_chunks, _), r_t = timed(torch_stream, args.repeats)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(o_chunks, r_chunks))
        rows.append({"mode": "stream", "solver": solver, "steps": args.steps, "onnx_s": statistics.median(o_t),
                     "torch_s": statistics.median(r_t), "onnx_first_chunk_s": o_first, "max_abs_diff": diff,
                     "chunks": len(o_chunks)})

    print(f"token2wav, {args.codes} codes = {audio_s:.2f} s of audio, {args.threads} thread(s), "
          f"median of {args.repeats}; graphs built in {data.get('build_seconds')} s")
    print(f"{'mode':9} {'solver':6} {'steps':>5} {'onnx s':>8} {'torch s':>8} {'speed-up':>8} {'RTF onnx':>8} "
          f"{'max|diff|':>10}")
    for r in rows:
        r["speedup"] = r["torch_s"] / r["onnx_s"]
        r["rtf_onnx"] = r["onnx_s"] / audio_s
        print(f"{r['mode']:9} {r['solver']:6} {r['steps']:>5} {r['onnx_s']:8.3f} {r['torch_s']:8.3f} "
              f"{r['speedup']:7.2f}x {r['rtf_onnx']:8.3f} {r['max_abs_diff']:10.2e}"
              + (f"  first chunk {r['onnx_first_chunk_s']:.3f} s" if r["mode"] == "stream" else ""))
    if args.json:
        args.json.write_text(json.dumps({"codes": args.codes, "threads": args.threads, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
