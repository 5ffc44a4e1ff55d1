"""Calibration data: JSONL parsing, and token batches checked against transformers' tokenizer."""

import json
import subprocess
import sys

import numpy as np
import pytest

from omni_export.build.pipeline import chat_template
from omni_export.build.calibration import (
    CalibrationError,
    builtin_messages,
    calibration_batch,
    calibration_messages,
    load_calibration_file,
)
from omni_export.checkpoint.reader import Checkpoint
from omni_export.build.recipes import load_recipe


def write(tmp_path, *lines):
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def rejected(path, *needles):
    with pytest.raises(CalibrationError) as info:
        load_calibration_file(path)
    message = str(info.value)
    assert info.value.path == str(path) and "fix:" in message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


# -- JSONL files -----------------------------------------------------------------------------


def test_valid_shapes(tmp_path):
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}]
    path = write(
        tmp_path,
        json.dumps([{"role": "user", "content": "Bonjour"}], ensure_ascii=False),
        "",
        json.dumps({"messages": [{"role": "system", "content": parts}, {"role": "user", "content": "2+2?"},
                                 {"role": "assistant", "content": "4"}]}),
    )
    assert load_calibration_file(path) == [
        [{"role": "user", "content": "Bonjour"}],
        [{"role": "system", "content": parts}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}],
    ]


GOOD = json.dumps([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "line,needles",
    [
        ('{"messages": [', ["line 2", "not valid JSON"]),
        ('"just text"', ["line 2", "a string", '{"messages": [{"role": "user"']),
        ('{"conversation": []}', ["line 2", "'messages'", "conversation"]),
        ('{"messages": [], "id": 3}', ["line 2", "'id'"]),
        ('{"messages": []}', ["line 2", "messages list is empty"]),
        ('[["user", "hi"]]', ["line 2", "message 0 is a list", "'role' and 'content'"]),
        ('[{"role": "user"}]', ["line 2", "message 0 has no 'content'"]),
        ('[{"content": "x"}]', ["line 2", "message 0 has no 'role'"]),
        ('[{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]',
         ["line 2", "message 1", "'robot'", "system, user, assistant"]),
        ('[{"role": "user", "content": "hi", "name": "bob"}]', ["line 2", "'name'"]),
        ('[{"role": "user", "content": 42}]', ["line 2", "content is a int", "string"]),
        ('[{"role": "user", "content": []}]', ["line 2", "content is a list"]),
        ('[{"role": "user", "content": [{"type": "image", "image": "cat.png"}]}]',
         ["line 2", "content part 0", "text only", '{"type": "text", "text": "..."}']),
        ('[{"role": "user", "content": "   "}]', ["line 2", "empty content"]),
    ],
)
def test_bad_lines(tmp_path, line, needles):
    rejected(write(tmp_path, GOOD, line, GOOD), *needles)


def test_empty_and_missing_files(tmp_path):
    rejected(write(tmp_path), "no conversations")
    rejected(write(tmp_path, "", "   "), "no conversations")
    rejected(tmp_path / "missing.jsonl", "does not exist")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'[{"role": "user", "content": "caf\xe9"}]\n')
    rejected(path, "UTF-8")


def test_builtin_messages():
    conversations = builtin_messages()
    assert len(conversations) >= 12
    roles = {m["role"] for c in conversations for m in c}
    assert roles == {"system", "user", "assistant"}
    text = json.dumps(conversations, ensure_ascii=False)
    assert "```" in text  # some code
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text)  # some Chinese
    assert calibration_messages(load_recipe("awq").calibration) == conversations


# -- token batches ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_files(tiny_checkpoint):
    """(tokenizer.json path, chat template text, transformers' tokenizer) of the tiny checkpoint."""
    from transformers import AutoTokenizer

    return (tiny_checkpoint / "tokenizer.json", chat_template(Checkpoint.open(tiny_checkpoint)),
            AutoTokenizer.from_pretrained(tiny_checkpoint))


def reference_ids(tokenizer, messages) -> list[int]:
    """transformers' apply_chat_template(..., tokenize=True) of one conversation."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_batch_matches_transformers(tokenizer_files):
    tokenizer_json, template, tokenizer = tokenizer_files
    conversations = builtin_messages()
    expected = [reference_ids(tokenizer, c) for c in conversations]
    # one conversation = one block: exactly transformers' ids
    for i in (0, 3, len(conversations) - 1):
        batch = calibration_batch([conversations[i]], tokenizer_json, template, 1, len(expected[i]))
        assert batch.dtype == np.int64 and batch.shape == (1, len(expected[i]))
        assert batch[0].tolist() == expected[i]
    # all conversations: their ids concatenated in order, cut into blocks
    stream = [t for ids in expected for t in ids]
    samples, length = 5, 64
    batch = calibration_batch(conversations, tokenizer_json, template, samples, length)
    assert batch.dtype == np.int64 and batch.shape == (samples, length) and batch.flags.c_contiguous
    assert batch.reshape(-1).tolist() == stream[: samples * length]
    # deterministic
    again = calibration_batch(conversations, tokenizer_json, template, samples, length)
    assert np.array_equal(batch, again)


def test_batch_cycles_when_short(tokenizer_files):
    tokenizer_json, template, tokenizer = tokenizer_files
    a = [{"role": "user", "content": "Hi"}]
    b = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}]
    ids = reference_ids(tokenizer, a) + reference_ids(tokenizer, b)
    samples, length = 3, len(ids) - 1  # needs ~3 passes over the two conversations
    batch = calibration_batch([a, b], tokenizer_json, template, samples, length)
    assert batch.shape == (samples, length)
    assert batch.reshape(-1).tolist() == (ids * 3)[: samples * length]


@pytest.mark.parametrize("samples,length", [(0, 8), (2, 0), (2, -1), (True, 8)])
def test_batch_bad_sizes(tokenizer_files, samples, length):
    tokenizer_json, template, _ = tokenizer_files
    with pytest.raises(CalibrationError, match="positive integer"):
        calibration_batch(builtin_messages(), tokenizer_json, template, samples, length)


def test_calibration_import_is_light():
    code = ("import sys, omni_export.build.calibration as c; c.builtin_messages(); "
            "heavy = [m for m in ('torch', 'transformers', 'onnx') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
