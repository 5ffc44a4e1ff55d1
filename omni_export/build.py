"""``omni-export build``: checkpoint + recipe -> bundle (graphs, tokenizer, manifest)."""

from __future__ import annotations

import gc
from contextlib import nullcontext
from pathlib import Path

import torch
from rich.console import Console
from transformers.utils import logging as transformers_logging
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from omni_runtime.chat import DEFAULT_SYSTEM_PROMPT

from .bundle import BundleWriter
from .checkpoint import Checkpoint, CheckpointError
from .export import thinker_decoder, thinker_embedding
from .recipes import Recipe, load_recipe

TORCH_DTYPES = {"float32": torch.float32}

# manifest name -> token text, with the thinker config key that must agree (if any)
SPECIAL_TOKENS = {
    "endoftext": ("<|endoftext|>", None),
    "im_start": ("<|im_start|>", None),
    "im_end": ("<|im_end|>", None),
    "audio": ("<|AUDIO|>", "audio_token_index"),
    "audio_bos": ("<|audio_bos|>", "audio_start_token_id"),
    "audio_eos": ("<|audio_eos|>", "audio_end_token_id"),
    "vision_bos": ("<|vision_bos|>", "vision_start_token_id"),
    "vision_eos": ("<|vision_eos|>", "vision_end_token_id"),
    "image": ("<|IMAGE|>", "image_token_index"),
    "video": ("<|VIDEO|>", "video_token_index"),
}


def special_tokens(ckpt: Checkpoint) -> dict[str, int]:
    """Special token ids from tokenizer.json, checked against the thinker config."""
    tok = ckpt.json_file("tokenizer.json") or {}
    added = {t.get("content"): t.get("id") for t in tok.get("added_tokens", [])}
    thinker = ckpt.raw_config["thinker_config"]
    ids: dict[str, int] = {}
    for name, (text, config_key) in SPECIAL_TOKENS.items():
        if text not in added:
            raise CheckpointError(f"tokenizer.json has no special token {text}", path=ckpt.root / "tokenizer.json",
                                  fix="use the tokenizer files of the Qwen2.5-Omni checkpoint")
        ids[name] = int(added[text])
        if config_key and config_key in thinker and int(thinker[config_key]) != ids[name]:
            raise CheckpointError(
                f"{text} is id {ids[name]} in tokenizer.json but {config_key} is {thinker[config_key]} in config.json",
                path=ckpt.root, fix="the tokenizer does not belong to this model: copy the matching tokenizer files")
    return ids


def chat_template(ckpt: Checkpoint) -> str:
    """The chat template text: chat_template.jinja, chat_template.json or tokenizer_config.json."""
    jinja = ckpt.root / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        data = ckpt.json_file(name) or {}
        if isinstance(data.get("chat_template"), str):
            return data["chat_template"]
    raise CheckpointError("no chat template found (chat_template.jinja, chat_template.json or tokenizer_config.json)",
                          path=ckpt.root, fix="copy chat_template.json of the original checkpoint into the model directory")


def generation_defaults(ckpt: Checkpoint, tokens: dict[str, int]) -> dict:
    """Generation defaults from generation_config.json, with transformers' own fallbacks."""
    gen = ckpt.json_file("generation_config.json") or {}
    eos = gen.get("eos_token_id", [tokens["im_end"], tokens["endoftext"]])
    eos = [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    pad = gen.get("pad_token_id")
    return {
        "eos_token_ids": eos,
        "pad_token_id": int(pad if pad is not None else tokens["endoftext"]),
        "do_sample": bool(gen.get("do_sample", False)),
        "temperature": float(gen.get("temperature", 1.0)),
        "top_k": int(gen.get("top_k", 50)),
        "top_p": float(gen.get("top_p", 1.0)),
        "repetition_penalty": float(gen.get("repetition_penalty", 1.0)),
        "max_new_tokens": int(gen.get("max_new_tokens", 512)),
    }


def thinker_constants(ckpt: Checkpoint, kv_dtype: str) -> dict:
    cfg = ckpt.text_config()
    rope = cfg.rope_parameters
    return {
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": thinker_decoder.head_dim(cfg),
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": float(rope["rope_theta"]),
        "mrope_section": list(rope.get("mrope_section", [16, 24, 24])),
        "max_position_embeddings": cfg.max_position_embeddings,
        "kv_dtype": kv_dtype,
    }


# Peak RSS of a whole-graph export is about this multiple of the graph's weight bytes
# (measured: 7b-shape, 2 thinker layers, 4.04 GB decoder weights -> 10.9 GB peak RSS).
EXPORT_MEMORY_FACTOR = 2.7


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes, or None where that is not readable."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(ckpt: Checkpoint, dtype: torch.dtype) -> None:
    """Refuse, before any work, an export that would not fit in this machine's memory."""
    embedding = ckpt.embed_tokens_name()
    names = [n for n in ckpt.thinker_text_names() if n != embedding] + [ckpt.lm_head_name()]
    need = int(ckpt.numel(names) * dtype.itemsize * EXPORT_MEMORY_FACTOR)
    have = available_memory()
    if have is not None and need > have:
        raise CheckpointError(
            f"exporting the thinker decoder needs about {need / 1e9:.1f} GB of RAM, "
            f"only {have / 1e9:.1f} GB is available",
            path=ckpt.root,
            fix="use a machine with more memory, or a checkpoint with fewer layers "
                "(layer-at-a-time compilation is on the roadmap); --no-memory-check skips this check")


def build_bundle(model_dir: str | Path, recipe: str | Recipe, out: str | Path, force: bool = False,
                 console: Console | None = None, memory_check: bool = True) -> Path:
    """Compile ``model_dir`` with ``recipe`` into the bundle directory ``out`` (atomically)."""
    transformers_logging.set_verbosity_error()  # config-validation chatter is not for users
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    ckpt = Checkpoint.open(model_dir)
    dtype = TORCH_DTYPES[recipe.dtype]
    if memory_check:
        check_memory(ckpt, dtype)
    tokens = special_tokens(ckpt)
    template = chat_template(ckpt)
    show = console is not None
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                        console=console, disable=not show, transient=False)
    steps = [("thinker embedding", thinker_embedding), ("thinker decoder", thinker_decoder)]
    with BundleWriter(Path(out), force=force) as writer, (progress if show else nullcontext()):
        task = progress.add_task("exporting", total=len(steps) + 1)
        for label, exporter in steps:
            progress.update(task, description=f"exporting {label}")
            module = exporter.build(ckpt, dtype)
            graph = exporter.export(module, writer.dir, onnx_dtype=recipe.dtype)
            writer.add_graph(exporter.GRAPH_NAME, graph, recipe.dtype, recipe.quantization)
            del module
            gc.collect()
            progress.advance(task)
        progress.update(task, description="writing tokenizer and manifest")
        writer.copy_file(ckpt.root / "tokenizer.json", "tokenizer.json")
        writer.write_text("chat_template.jinja", template)
        generation = generation_defaults(ckpt, tokens)
        manifest = {
            "model": {"family": "qwen2_5_omni", "source": ckpt.root.resolve().name,
                      "architectures": ckpt.raw_config.get("architectures") or []},
            "recipe": recipe.to_json(),
            "tokenizer": {"file": "tokenizer.json", "chat_template_file": "chat_template.jinja",
                          "default_system_prompt": DEFAULT_SYSTEM_PROMPT},
            "special_tokens": {**tokens, "pad": generation["pad_token_id"]},
            "generation": generation,
            "config": {"thinker": thinker_constants(ckpt, recipe.dtype)},
        }
        path = writer.commit(manifest)
        progress.advance(task)
    return path

