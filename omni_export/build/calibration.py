"""Calibration data for AWQ: chat conversations rendered with the model's template, tokenized,
concatenated and cut into ``[samples, sequence_length]`` token blocks (as AutoAWQ does).

Conversations come from the built-in set (``calibration_data.jsonl``, 16 varied chats: several
topics and languages, code, numbers) or from a user's JSONL file (``--calib FILE``): one
conversation per line, either a messages list or ``{"messages": [...]}``; each message is
``{"role": "system" | "user" | "assistant", "content": str | [{"type": "text", "text": str}, ...]}``.
Blank lines are skipped.

No torch here: the recipe check reads calibration files before any model is loaded.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import numpy as np

from omni_runtime.errors import OmniError

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content")
BUILTIN_FILE = "calibration_data.jsonl"
EXAMPLE_LINE = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'


class CalibrationError(OmniError):
    """A calibration file is missing, empty or not in the expected JSONL shape."""


def builtin_messages() -> list[list[dict]]:
    """The built-in calibration conversations (messages lists)."""
    ref = resources.files("omni_export.build") / BUILTIN_FILE
    return parse_calibration_text(ref.read_text(encoding="utf-8"), f"omni_export/{BUILTIN_FILE}")


def load_calibration_file(path: str | os.PathLike) -> list[list[dict]]:
    """Read a JSONL calibration file: one conversation (messages list) per non-blank line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CalibrationError("calibration file does not exist", path=path,
                               fix="pass an existing JSONL file of conversations") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"cannot read the calibration file: {exc}", path=path,
                               fix="pass a UTF-8 JSONL file, one conversation per line") from None
    return parse_calibration_text(text, path)


def parse_calibration_text(text: str, path: str | os.PathLike) -> list[list[dict]]:
    """Parse JSONL calibration text read from ``path`` (named in errors, with the line number)."""
    conversations = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue

        def bad(problem: str, fix: str = f"write one conversation per line, e.g. {EXAMPLE_LINE}"):
            return CalibrationError(f"line {number}: {problem}", path=path, fix=fix)

        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise bad(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        if isinstance(item, dict):
            extra = sorted(set(item) - {"messages"})
            if extra or "messages" not in item:
                raise bad(f"an object line needs exactly the key 'messages', got keys {sorted(item)}")
            messages = item["messages"]
        else:
            messages = item
        if not isinstance(messages, list):
            raise bad(f"expected a messages list or {{\"messages\": [...]}}, got {_kind(messages)}")
        if not messages:
            raise bad("the messages list is empty")
        conversations.append([_check_message(m, i, bad) for i, m in enumerate(messages)])
    if not conversations:
        raise CalibrationError("the calibration file has no conversations", path=path,
                               fix=f"write one conversation per line, e.g. {EXAMPLE_LINE}")
    return conversations


def _check_message(message, index: int, bad) -> dict:
    where = f"message {index}"
    if not isinstance(message, dict):
        raise bad(f"{where} is {_kind(message)}, expected an object with 'role' and 'content'")
    extra = sorted(set(message) - set(MESSAGE_KEYS))
    if extra:
        raise bad(f"{where} has unknown key(s) {', '.join(map(repr, extra))}",
                  "keep only 'role' and 'content' in each message")
    for key in MESSAGE_KEYS:
        if key not in message:
            raise bad(f"{where} has no {key!r}", f"each message needs 'role' and 'content', e.g. {EXAMPLE_LINE}")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise bad(f"{where} has role {role!r}", f"use one of: {', '.join(ROLES)}")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and set(part) == {"type", "text"}
                    and isinstance(part["text"], str)):
                raise bad(f"{where} content part {j} is {json.dumps(part, ensure_ascii=False)[:80]}; "
                          "calibration uses text only",
                          'write each part as {"type": "text", "text": "..."}, or the content as one string')
            texts.append(part["text"])
        text = "".join(texts)
    else:
        raise bad(f"{where} content is {_kind(content)}",
                  'write the content as a string or a non-empty list of {"type": "text", "text": "..."} parts')
    if not text.strip():
        raise bad(f"{where} has empty content", "remove the message or give it some text")
    return {"role": role, "content": content}


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), f"a {type(value).__name__}")


def calibration_messages(calibration) -> list[list[dict]]:
    """The conversations of a recipe's :class:`~omni_export.build.recipes.CalibrationRecipe`."""
    return builtin_messages() if calibration.file is None else load_calibration_file(calibration.file)


def calibration_ids(calibration, ckpt) -> np.ndarray:
    """[samples, sequence_length] int64 token ids of a recipe's calibration section, rendered with
    the chat template and tokenizer of the checkpoint ``ckpt``."""
    from omni_export.checkpoint.info import chat_template

    return calibration_batch(calibration_messages(calibration), ckpt.root / "tokenizer.json", chat_template(ckpt),
                             calibration.samples, calibration.sequence_length)


def tokenize_conversations(messages_list: list[list[dict]], tokenizer_json_path: str | os.PathLike,
                           chat_template_text: str) -> list[list[int]]:
    """Each conversation rendered with the chat template (no generation prompt) and tokenized
    with ``tokenizer.json`` as transformers' ``apply_chat_template(..., tokenize=True)`` does."""
    from tokenizers import Tokenizer

    from omni_runtime.prompt.chat import ChatTemplate

    template = ChatTemplate(chat_template_text)
    tokenizer = Tokenizer.from_file(os.fspath(tokenizer_json_path))
    texts = [template.render(messages, add_generation_prompt=False) for messages in messages_list]
    return [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]


def calibration_batch(messages_list: list[list[dict]], tokenizer_json_path: str | os.PathLike,
                      chat_template_text: str, samples: int, sequence_length: int) -> np.ndarray:
    """Token ids ``int64 [samples, sequence_length]`` for AWQ calibration.

    The conversations' token streams are concatenated in order (nothing between them beyond
    what the template renders) and cut into ``samples`` consecutive blocks of
    ``sequence_length`` tokens; the remainder is dropped. If there are too few tokens, the
    conversations are repeated from the first one. Deterministic.
    """
    if not messages_list:
        raise CalibrationError("no calibration conversations", fix="give at least one conversation")
    for name, value in (("samples", samples), ("sequence_length", sequence_length)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CalibrationError(f"calibration {name} must be a positive integer, got {value!r}",
                                   fix=f"set calibration.{name} in the recipe to a positive integer")
    streams = tokenize_conversations(messages_list, tokenizer_json_path, chat_template_text)
    stream = np.fromiter((t for ids in streams for t in ids), dtype=np.int64)
    if stream.size == 0:  # not reachable with a real template: every message renders tokens
        raise CalibrationError("the calibration conversations tokenize to nothing",
                               fix="use conversations with text")
    need = samples * sequence_length
    if stream.size < need:
        stream = np.tile(stream, -(-need // stream.size))
    return np.ascontiguousarray(stream[:need].reshape(samples, sequence_length))
