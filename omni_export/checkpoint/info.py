"""Build-time interpretation of a checkpoint: special token ids, chat template, generation defaults.

These read the checkpoint's own files (tokenizer.json, chat_template.*, generation_config.json)
and check them against config.json; the bundle records the results in its manifest.
"""

from __future__ import annotations

from omni_export.checkpoint.reader import Checkpoint, CheckpointError

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
