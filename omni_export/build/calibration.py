"""Calibration data for AWQ: chat conversations rendered with the model's template, tokenized,
concatenated and cut into ``[samples, sequence_length]`` token blocks (as AutoAWQ does).

Conversations come from the built-in set (``calibration_data.jsonl``, 16 varied chats: several
topics and languages, code, numbers) or from a user's JSONL file (``--calib FILE``): one
conversation per line, either a messages list or ``{"messages": [...]}``; each message is
``{"role": "system" | "user" | "assistant", "content": str | [{"type": "text", "text": str}, ...]}``.
Blank lines are skipped.

``--calib`` (or ``calibration.source``) also takes an msModelSlim calibration index (multimodal
samples): :func:`index_file` tells the two apart and :func:`load_index` reads an index; the
media are embedded by ``omni_export.build.calibration_media``. recipes/README.md ("Calibration")
documents both formats.

No torch here: the recipe check reads calibration files before any model is loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from omni_runtime.errors import OmniError

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content")
BUILTIN_FILE = "calibration_data.jsonl"
#: msModelSlim's index names (``JsonlDatasetLoader.is_support``: the exact file name decides)
INDEX_NAMES = ("index.json", "index.jsonl")
MEDIA_KINDS = ("image", "audio", "video")
INDEX_KEYS = ("text", *MEDIA_KINDS)
#: the media suffixes msModelSlim's JsonlDatasetLoader accepts
MEDIA_SUFFIXES = {"image": (".jpg", ".jpeg", ".png"), "audio": (".wav", ".mp3"), "video": (".mp4",)}
#: ``default_text`` of msModelSlim's lab_practice/qwen2_5_omni_thinker/qwen2_5_omni_thinker_w8a8.yaml
DEFAULT_TEXT = "What are the elements can you see and hear in these medias."
EXAMPLE_SAMPLE = '{"text": "What is in the picture?", "image": "images/cat.png", "audio": "speech/q.wav"}'
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
    text = _read_text(path, "calibration file", "pass an existing JSONL file of conversations",
                      "pass a UTF-8 JSONL file, one conversation per line")
    return parse_calibration_text(text, path)


def _read_text(path: Path, what: str, missing_fix: str, unreadable_fix: str) -> str:
    """``path``'s UTF-8 text; a missing or unreadable file is a CalibrationError naming ``what``."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CalibrationError(f"{what} does not exist", path=path, fix=missing_fix) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"cannot read the {what}: {exc}", path=path, fix=unreadable_fix) from None


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


# ---------------------------------------------------------------------------------------------
# msModelSlim calibration index (multimodal samples)


@dataclass(frozen=True)
class IndexSample:
    """One sample of an index: its number (1-based, as msModelSlim counts entries), its text
    (``default_text`` when it has none) and the resolved paths of its media (None: absent)."""

    number: int
    text: str
    image: Path | None = None
    audio: Path | None = None
    video: Path | None = None

    def missing(self, kinds) -> list[str]:
        """The modalities of ``kinds`` this sample has no file for."""
        return [kind for kind in kinds if getattr(self, kind) is None]


def index_file(path: str | os.PathLike) -> Path | None:
    """The index file if ``path`` names an msModelSlim index, else None (a JSONL of conversations).

    As msModelSlim's loader chain decides: a file named exactly ``index.json`` or ``index.jsonl``
    is an index; a directory must hold exactly one of them (both, or neither, is an error
    naming the directory); any other file is a conversations JSONL."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in INDEX_NAMES if (path / name).is_file()]
        if len(found) != 1:
            problem = ("the directory holds both index.json and index.jsonl" if found
                       else "the directory holds no index.json or index.jsonl")
            raise CalibrationError(problem, path=path,
                                   fix="keep exactly one msModelSlim index (index.json or index.jsonl) in it, "
                                       "or pass the index file itself")
        return found[0]
    return path if path.name in INDEX_NAMES else None


def load_index(path: str | os.PathLike, default_text: str = DEFAULT_TEXT) -> list[IndexSample]:
    """The samples of an msModelSlim index file, every entry checked (a CalibrationError naming
    the file, the sample number and the fix otherwise).

    ``index.jsonl``: one JSON object per non-blank line. ``index.json``: one object, or a list of
    objects. An entry's keys are ``text`` and any of ``image``, ``audio``, ``video``; a missing,
    null or empty ``text`` takes ``default_text``; media paths are relative to the index's
    folder (absolute paths are allowed, as in msModelSlim), with msModelSlim's suffixes."""
    path = Path(path)
    raw = _read_text(path, "calibration index", "pass an existing index.json / index.jsonl (or a directory holding one)",
                     "pass a UTF-8 JSON file")
    entries: list[tuple[object, str]] = []  # (entry, where it is, for messages)
    if path.suffix == ".jsonl":
        for line_number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"sample {len(entries) + 1} (line {line_number})"
            try:
                entries.append((json.loads(line), where))
            except json.JSONDecodeError as exc:
                raise CalibrationError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})", path=path,
                                       fix=f"write one sample object per line, e.g. {EXAMPLE_SAMPLE}") from None
    else:
        try:
            content = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})", path=path,
                                   fix=f"write one sample object or a list of them, e.g. [{EXAMPLE_SAMPLE}]") from None
        if isinstance(content, dict):
            content = [content]
        if not isinstance(content, list):
            raise CalibrationError(f"index.json holds {_kind(content)}, not a sample object or a list of them",
                                   path=path, fix=f"write e.g. [{EXAMPLE_SAMPLE}]")
        entries = [(item, f"sample {i}") for i, item in enumerate(content, start=1)]
    if not entries:
        raise CalibrationError("the calibration index has no samples", path=path,
                               fix=f"add at least one sample, e.g. {EXAMPLE_SAMPLE}")
    return [_index_sample(item, number, where, path, default_text)
            for number, (item, where) in enumerate(entries, start=1)]


def _index_sample(item, number: int, where: str, path: Path, default_text: str) -> IndexSample:
    def bad(problem: str, fix: str) -> CalibrationError:
        return CalibrationError(f"{where}: {problem}", path=path, fix=fix)

    if not isinstance(item, dict):
        raise bad(f"is {_kind(item)}, not an object", f"write each sample as an object, e.g. {EXAMPLE_SAMPLE}")
    extra = sorted(set(item) - set(INDEX_KEYS))
    if extra:
        raise bad(f"unknown key(s) {', '.join(map(repr, extra))}",
                  f"keep only {', '.join(INDEX_KEYS)} (media paths relative to the index's folder)")
    text = item.get("text")
    if text is None or text == "":  # msModelSlim: no text -> default_text
        text = default_text
    elif not isinstance(text, str) or not text.strip():
        raise bad(f"text must be a non-empty string, got {json.dumps(text, ensure_ascii=False)[:60]}",
                  "give the sample some text, or leave text out to use calibration.default_text")
    else:
        text = text.strip()
    media = {kind: _media_path(item.get(kind), kind, path.parent, bad) for kind in MEDIA_KINDS}
    return IndexSample(number, text, **media)


def _media_path(raw, kind: str, base: Path, bad) -> Path | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw.strip():
        raise bad(f"{kind} must be a non-empty path string, got {json.dumps(raw, ensure_ascii=False)[:60]}",
                  f"write {kind} as a path relative to the index's folder, or leave it out")
    media = Path(raw.strip()).expanduser()
    if not media.is_absolute():
        media = (base / media).resolve()
    suffixes = MEDIA_SUFFIXES[kind]
    if media.suffix.lower() not in suffixes:
        raise bad(f"{kind} {raw!r} has suffix {media.suffix!r}, msModelSlim's {kind} suffixes are {', '.join(suffixes)}",
                  f"convert the file to one of {', '.join(suffixes)}")
    if not media.is_file():
        raise bad(f"{kind} file {media} does not exist",
                  f"fix the path ({kind} paths are relative to the index's folder {base})")
    return media


def index_samples(path: str | os.PathLike, default_text: str, require) -> tuple[list[IndexSample], list[IndexSample],
                                                                                 dict[str, int]]:
    """(every sample of the index ``path``, the ones used, skipped counts: ``select_samples``);
    an index none of whose samples has every modality of ``require`` is a CalibrationError."""
    samples = load_index(path, default_text)
    used, skipped = select_samples(samples, require)
    if not used:
        counts = ", ".join(f"{n} without {kind}" for kind, n in skipped.items())
        raise CalibrationError(f"no sample of the index has every modality calibration.require names "
                               f"({', '.join(require)}): {counts}", path=path,
                               fix="add samples with those media, or require fewer modalities")
    return samples, used, skipped


def select_samples(samples: list[IndexSample], require) -> tuple[list[IndexSample], dict[str, int]]:
    """(the samples that have every modality of ``require``, skipped sample counts by missing
    modality: a sample missing two is counted under both)."""
    used, skipped = [], {}
    for sample in samples:
        missing = sample.missing(require)
        for kind in missing:
            skipped[kind] = skipped.get(kind, 0) + 1
        if not missing:
            used.append(sample)
    return used, skipped
