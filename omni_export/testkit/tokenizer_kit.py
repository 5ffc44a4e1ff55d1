"""A locally built Qwen2-style byte-level BPE tokenizer for test checkpoints.

Nothing can be downloaded from a model hub here, so the test-model kit builds its own
tokenizer with the ``tokenizers`` library, in the on-disk layout of the real Qwen2.5-Omni
tokenizer (``vocab.json``, ``merges.txt``, ``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``, ``added_tokens.json`` and ``chat_template.json``).

The vocabulary is laid out so that every special token sits at its real id:

* ids ``0..255``: the 256 byte-level symbols, in GPT-2 ``bytes_to_unicode`` order (as in Qwen2);
* then the tokens of BPE merges learned (deterministically) from a small embedded English corpus;
* then filler tokens (a space followed by ASCII letters, e.g. ``" tobami"``) up to id 151642,
  so that the output of a random-weight model decodes to readable gibberish. Fillers have no
  merges: the encoder never produces them, the decoder turns them back into text;
* ids ``151643..151664``: the 22 added (special) tokens of Qwen2.5-Omni.

The regular vocabulary is contiguous up to the first special id. That matters: when
transformers rebuilds a ``Qwen2Tokenizer`` from vocab + merges and then re-adds the added
tokens, it keeps their ids only if there is no hole below them.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

__all__ = [
    "CHAT_TEMPLATE",
    "FIRST_SPECIAL_ID",
    "MODEL_SPECIFIC_TOKENS",
    "PRETOKENIZE_REGEX",
    "SPECIAL_TOKENS",
    "TOKENIZER_FILES",
    "VOCAB_SIZE_WITH_SPECIALS",
    "build_tokenizer",
    "write_tokenizer",
]

PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

#: Added tokens of Qwen2.5-Omni: content -> real id.
SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|AUDIO|>": 151646,
    "<|audio_bos|>": 151647,
    "<|audio_eos|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_bos|>": 151652,
    "<|vision_eos|>": 151653,
    "<|vision_pad|>": 151654,
    "<|IMAGE|>": 151655,
    "<|VIDEO|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
}

#: Added tokens that are *not* special (as in Qwen2): they are still never split.
_NON_SPECIAL = frozenset(
    {
        "<tool_call>",
        "</tool_call>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
    }
)

#: Special tokens listed as ``additional_special_tokens`` (as in the real Qwen2.5-Omni repo).
_ADDITIONAL_SPECIAL_TOKENS = [
    t for t in SPECIAL_TOKENS if t not in _NON_SPECIAL and t != "<|endoftext|>"
]

#: Named multimodal tokens the transformers ``Qwen2_5OmniProcessor`` reads from the tokenizer
#: (``tokenizer.audio_token``, ``tokenizer.audio_token_id``, ...). Written into
#: ``tokenizer_config.json`` as the ``extra_special_tokens`` dict.
MODEL_SPECIFIC_TOKENS: dict[str, str] = {
    "audio_token": "<|AUDIO|>",
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
}

FIRST_SPECIAL_ID = 151643
VOCAB_SIZE_WITH_SPECIALS = FIRST_SPECIAL_ID + len(SPECIAL_TOKENS)  # 151665

TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
)

#: The real Qwen2.5-Omni chat template.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}"
    "<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A few paragraphs of plain English to learn merges from (written for this kit).
_CORPUS = """\
The assistant listens to the question, looks at the picture and answers in a clear voice.
It can hear speech and music, read the text in an image, and follow what happens in a video.
When the answer is ready, it speaks the words out loud, one short sentence after another.

A small model is useful for testing. It has the same shape of pipeline as the large one:
an audio encoder, a vision encoder, a text decoder, a talker that turns text into speech codes,
and a vocoder that turns those codes into a waveform. The weights are random, so the words it
says make no sense, but every tensor has the right name, type and place.

Exporting a model means tracing each part of the network and writing it to a file that another
program can load and run. The export must keep the numbers the same: for the same input, the
exported graph and the original model should give the same output, up to a small tolerance.

Good tests are short and repeatable. They build the inputs from a fixed seed, run the code, and
compare the results with what is expected. If something changes, the test tells you where and why.
The quick brown fox jumps over the lazy dog, and then the dog sleeps in the warm afternoon sun.

Numbers and dates appear in text too: 2024, 3.14, 42 apples, 7 days a week, 16000 samples per second.
Questions often start with what, where, when, who, why or how; answers often start with yes or no.
Hello! How are you today? I'm fine, thanks. We'll see you tomorrow; they've already left, haven't they?
"""

#: Number of merges learned from the corpus at most (it stops earlier if no pair occurs twice).
_MAX_MERGES = 2000


def _bytes_to_unicode() -> list[tuple[int, str]]:
    """GPT-2's reversible byte -> printable unicode map, in its canonical order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [(b, chr(c)) for b, c in zip(bs, cs)]


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _learn_merges(corpus: str, max_merges: int) -> list[tuple[str, str]]:
    """Plain deterministic BPE training on the byte-level pre-tokenized corpus.

    Ties between pairs of equal count are broken by the pair itself (lexicographic), so the
    result never depends on hash order or library version.
    """
    normalizer = normalizers.NFC()
    words = Counter(w for w, _ in _pre_tokenizer().pre_tokenize_str(normalizer.normalize_str(corpus)))
    segs: dict[tuple[str, ...], int] = {tuple(w): c for w, c in sorted(words.items())}
    merges: list[tuple[str, str]] = []
    for _ in range(max_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for seg, count in segs.items():
            for a, b in zip(seg, seg[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        best_count = max(pairs.values())
        if best_count < 2:
            break
        best = min(p for p, c in pairs.items() if c == best_count)
        merges.append(best)
        merged = best[0] + best[1]
        new_segs: dict[tuple[str, ...], int] = {}
        for seg, count in segs.items():
            out: list[str] = []
            i = 0
            while i < len(seg):
                if i + 1 < len(seg) and seg[i] == best[0] and seg[i + 1] == best[1]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(seg[i])
                    i += 1
            key = tuple(out)
            new_segs[key] = new_segs.get(key, 0) + count
        segs = new_segs
    return merges


def _filler_words(count: int, taken: set[str], seed: int = 0) -> list[str]:
    """``count`` distinct pronounceable ASCII-letter words, deterministic for a seed."""
    consonants = "bcdfghjklmnprstvwz"
    vowels = "aeiou"
    syllables = [c + v for c in consonants for v in vowels]  # 90
    rng = random.Random(seed)
    out: list[str] = []
    seen = set(taken)
    # 2-syllable words first (8,100 of them), then 3-syllable (729,000), in shuffled order.
    for n_syl in (2, 3):
        total = len(syllables) ** n_syl
        for idx in rng.sample(range(total), total if n_syl == 2 else min(total, count * 2)):
            parts = []
            for _ in range(n_syl):
                idx, r = divmod(idx, len(syllables))
                parts.append(syllables[r])
            word = "Ġ" + "".join(parts)  # "Ġ" is the byte-level symbol of a leading space
            if word in seen:
                continue
            seen.add(word)
            out.append(word)
            if len(out) == count:
                return out
    raise RuntimeError("not enough filler words")  # pragma: no cover - 737k candidates


def _build_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab: dict[str, int] = {}
    for _, ch in _bytes_to_unicode():
        vocab[ch] = len(vocab)
    merges: list[tuple[str, str]] = []
    for a, b in _learn_merges(_CORPUS, _MAX_MERGES):
        tok = a + b
        if tok in vocab:  # cannot happen with plain BPE, but keep the vocab consistent
            continue
        vocab[tok] = len(vocab)
        merges.append((a, b))
    for word in _filler_words(FIRST_SPECIAL_ID - len(vocab), set(vocab)):
        vocab[word] = len(vocab)
    assert len(vocab) == FIRST_SPECIAL_ID and sorted(vocab.values()) == list(range(FIRST_SPECIAL_ID))
    return vocab, merges


def _added_token(content: str) -> AddedToken:
    special = content not in _NON_SPECIAL
    return AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)


def build_tokenizer() -> Tokenizer:
    """Build the ``tokenizers.Tokenizer`` (vocab, merges, pipeline and the 22 added tokens)."""
    vocab, merges = _build_vocab_and_merges()
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # Added tokens take the next free ids, in order: the vocabulary is contiguous, so they land
    # exactly on their real ids.
    for content, want in SPECIAL_TOKENS.items():
        added = _added_token(content)
        if added.special:
            tok.add_special_tokens([added])
        else:
            tok.add_tokens([added])
        got = tok.token_to_id(content)
        if got != want:  # pragma: no cover - guarded by the layout above
            raise AssertionError(f"{content} got id {got}, expected {want}")
    return tok


def _token_dict(content: str) -> dict:
    t = _added_token(content)
    return {
        "content": content,
        "lstrip": t.lstrip,
        "normalized": t.normalized,
        "rstrip": t.rstrip,
        "single_word": t.single_word,
        "special": t.special,
    }


def _tokenizer_config() -> dict:
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): _token_dict(c) for c, i in SPECIAL_TOKENS.items()},
        "additional_special_tokens": list(_ADDITIONAL_SPECIAL_TOKENS),
        # transformers >= 4.50 reads named multimodal tokens from this dict; transformers 5 turns
        # it into `model_specific_special_tokens`, which gives `tokenizer.audio_token`,
        # `tokenizer.audio_token_id`, ... as the Qwen2.5-Omni processor needs.
        "extra_special_tokens": dict(MODEL_SPECIFIC_TOKENS),
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "processor_class": "Qwen2_5OmniProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _special_tokens_map() -> dict:
    return {
        "additional_special_tokens": list(_ADDITIONAL_SPECIAL_TOKENS),
        "eos_token": _token_dict("<|im_end|>") | {"special": True},
        "pad_token": _token_dict("<|endoftext|>") | {"special": True},
    }


def _dump_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer(out_dir: Path) -> None:
    """Write the tokenizer files into ``out_dir`` (created if missing)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.save(str(out_dir / "tokenizer.json"), pretty=False)

    vocab = {t: i for t, i in sorted(tok.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1])}
    _dump_json(out_dir / "vocab.json", vocab)
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    _dump_json(out_dir / "added_tokens.json", dict(sorted(SPECIAL_TOKENS.items(), key=lambda kv: kv[1])))
    _dump_json(out_dir / "special_tokens_map.json", _special_tokens_map())
    _dump_json(out_dir / "tokenizer_config.json", _tokenizer_config())
    _dump_json(out_dir / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
