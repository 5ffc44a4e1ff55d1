"""onnxruntime-genai's own model of the thinker's text weights, for the decode benchmark.

The thinker's text model is a Qwen2 decoder (same blocks, q/k/v biases, RMSNorm, SwiGLU) whose
only difference is mrope: three position axes over sections of the rotary dimensions. For a
text prompt the three axes carry the same position, and rotating every section by the same
position is plain 1D rope, so a ``Qwen2ForCausalLM`` with the same weights gives the same
logits. ``write_qwen2_view`` writes that Qwen2 checkpoint (config + renamed tensors, copied
byte for byte one tensor at a time, so memory stays low), and ``build_genai_model`` runs
``python -m onnxruntime_genai.models.builder`` on it and caches the result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
from pathlib import Path

from benchutil import GB, dir_bytes, run_measured

COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
SAFETENSORS_TORCH_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
MARKER = "omni_bench_source.json"  # written last into a finished genai model directory
COPY_CHUNK = 64 << 20


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data starts."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def qwen2_config(text_cfg, torch_dtype: str, generation: dict | None = None) -> dict:
    """A ``Qwen2ForCausalLM`` config.json with the thinker text model's sizes."""
    rope = getattr(text_cfg, "rope_parameters", None) or {}
    rope_theta = float(rope.get("rope_theta", getattr(text_cfg, "rope_theta", 1e6)))
    layers = int(text_cfg.num_hidden_layers)
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": int(text_cfg.hidden_size),
        "intermediate_size": int(text_cfg.intermediate_size),
        "num_hidden_layers": layers,
        "num_attention_heads": int(text_cfg.num_attention_heads),
        "num_key_value_heads": int(text_cfg.num_key_value_heads),
        "hidden_act": getattr(text_cfg, "hidden_act", "silu"),
        "rms_norm_eps": float(text_cfg.rms_norm_eps),
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "vocab_size": int(text_cfg.vocab_size),
        "max_position_embeddings": int(text_cfg.max_position_embeddings),
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": layers,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": torch_dtype,
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if generation and generation.get(key) is not None:
            config[key] = generation[key]
    return config


def qwen2_tensor_names(ckpt) -> dict[str, str]:
    """Checkpoint tensor name -> Qwen2ForCausalLM name, for the thinker text weights."""
    from omni_export.modules.thinker import ThinkerModule, ThinkerWeights

    names = {src: f"model.{local}" for local, src in ckpt.tensor_names(ThinkerModule.prefixes).items()}
    lm_head = ThinkerWeights(ckpt).lm_head_name()
    if lm_head in names:  # tied head: the embedding table is written twice (tie_word_embeddings false)
        return {**names, "__lm_head__": "lm_head.weight"}
    return {**names, lm_head: "lm_head.weight"}


def write_qwen2_view(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the thinker text model of ``model_dir`` as a Qwen2ForCausalLM checkpoint in ``out_dir``.

    Tensors are copied as raw bytes in their stored dtype, one at a time (64 MB chunks), into a
    single ``model.safetensors``; nothing is converted, so the view holds the same weights.
    """
    from transformers.utils import logging as transformers_logging

    from omni_export.checkpoint.reader import Checkpoint
    from omni_export.modules.thinker import ThinkerWeights

    transformers_logging.set_verbosity_error()  # config-validation chatter about the omni token ids
    ckpt = Checkpoint.open(model_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = qwen2_tensor_names(ckpt)
    lm_head = ThinkerWeights(ckpt).lm_head_name()  # the source of a tied head's "__lm_head__" copy
    headers: dict[str, tuple[dict, int]] = {}
    entries = []  # (qwen2 name, source file, dtype, shape, begin, end)
    for src, dst in sorted(names.items(), key=lambda kv: kv[1]):
        src = lm_head if src == "__lm_head__" else src
        file = ckpt.root / ckpt.weight_map[src]
        if file not in headers:
            headers[file] = _safetensors_header(file)
        info = headers[file][0][src]
        entries.append((dst, file, info["dtype"], info["shape"], *info["data_offsets"]))
    dtypes = {e[2] for e in entries if e[2] in SAFETENSORS_TORCH_DTYPES}
    torch_dtype = SAFETENSORS_TORCH_DTYPES[dtypes.pop()] if len(dtypes) == 1 else "float32"

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for dst, _, dtype, shape, begin, end in entries:
        header[dst] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + end - begin]}
        offset += end - begin
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(out / "model.safetensors", "wb") as dst_file:
        dst_file.write(struct.pack("<Q", len(blob)) + blob)
        for _, file, _, _, begin, end in entries:
            with open(file, "rb") as src_file:
                src_file.seek(headers[file][1] + begin)
                left = end - begin
                while left:
                    chunk = src_file.read(min(left, COPY_CHUNK))
                    if not chunk:
                        raise OSError(f"{file} is truncated")
                    dst_file.write(chunk)
                    left -= len(chunk)

    generation = ckpt.json_file("generation_config.json")
    config = qwen2_config(ckpt.text_config(), torch_dtype, generation)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in COPIED_FILES:
        if (ckpt.root / name).is_file():
            shutil.copyfile(ckpt.root / name, out / name)
    return out


def genai_version() -> str | None:
    try:
        import onnxruntime_genai
    except ImportError:
        return None
    return onnxruntime_genai.__version__


def cache_key(model_dir: Path, precision: str, extra_options: list[str]) -> str:
    """Changes when the checkpoint's config or weight files, the precision or the builder change."""
    root = Path(model_dir).resolve()
    files = sorted(p for p in root.iterdir() if p.name.endswith(".safetensors") or p.name == "config.json")
    stamp = {
        "model": str(root),
        "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        "precision": precision,
        "extra_options": extra_options,
        "onnxruntime_genai": genai_version(),
    }
    return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:12]


def genai_model_bytes(model_dir: Path) -> int:
    """Bytes of the genai model's graph files (``*.onnx`` and ``*.onnx.data``)."""
    return dir_bytes(model_dir, (".onnx", ".onnx.data"))


def build_genai_model(model_dir: str | Path, work: str | Path, precision: str = "int4",
                      extra_options: list[str] | None = None, timeout: float | None = None,
                      rss_limit: int | None = None, log=print) -> tuple[Path, dict]:
    """The genai model of ``model_dir``'s thinker text weights, built once and cached under ``work``.

    Returns the model directory and the build record (builder command, seconds, peak RSS),
    which is also stored in the directory as ``omni_bench_source.json``.
    """
    model_dir = Path(model_dir)
    extra_options = list(extra_options or [])
    key = cache_key(model_dir, precision, extra_options)
    final = Path(work) / f"genai-{model_dir.resolve().name}-{precision}-{key}"
    if (final / MARKER).is_file():
        return final, json.loads((final / MARKER).read_text())
    tmp = final.with_name(final.name + ".tmp")
    view = final.with_name(final.name + ".qwen2-view")
    cache = final.with_name(final.name + ".cache")
    for path in (tmp, view, cache):
        shutil.rmtree(path, ignore_errors=True)
    try:
        log(f"writing the Qwen2 view of {model_dir} to {view}")
        write_qwen2_view(model_dir, view)
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(view), "-o", str(tmp),
               "-p", precision, "-e", "cpu", "-c", str(cache)]
        if extra_options:
            cmd += ["--extra_options", *extra_options]
        log("building: " + " ".join(cmd))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        run = run_measured(cmd, timeout=timeout, rss_limit=rss_limit, env=env, poll_s=0.5)
        if not run.ok:
            raise RuntimeError(f"onnxruntime-genai builder failed ({run.failure()}):\n{run.stderr[-3000:]}")
        record = {"source_model": str(model_dir.resolve()), "precision": precision, "execution_provider": "cpu",
                  "extra_options": extra_options, "onnxruntime_genai": genai_version(), "builder_cmd": cmd,
                  "build_s": run.wall_s, "build_peak_rss_bytes": run.peak_rss_bytes,
                  "model_bytes": genai_model_bytes(tmp)}
        (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        tmp.rename(final)
        log(f"genai model: {final} ({record['model_bytes'] / GB:.2f} GB, built in {run.wall_s:.0f} s, "
            f"builder peak RSS {run.peak_rss_bytes / GB:.1f} GB)")
        return final, record
    finally:
        for path in (tmp, view, cache):
            shutil.rmtree(path, ignore_errors=True)
