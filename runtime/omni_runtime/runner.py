"""The runtime's small Python API: load a bundle, chat, stream text.

    from omni_runtime import OmniRunner
    runner = OmniRunner("bundle/")
    result = runner.chat("Hello", max_new_tokens=32, on_text=print)
    result.text, result.prompt_ids, result.token_ids, result.finish_reason

Generation is bounded by the model's context (``config.thinker.max_position_embeddings``):
prompt + new tokens never exceed it. A prompt that does not fit, or an explicit
``max_new_tokens`` that would overflow, is an InputError before any graph runs; the bundle's
default ``max_new_tokens`` is clamped to what fits instead (``finish_reason`` is then
``"context"`` when generation reaches that clamp).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from numbers import Integral
from pathlib import Path

from .chat import ChatTemplate, build_messages
from .errors import BundleError, InputError
from .manifest import load_manifest, verify_file
from .sampling import SamplingConfig
from .sessions import SessionPool, SessionSettings, select_providers
from .thinker import ThinkerGenerator


FINISH_REASONS = ("eos", "length", "context")


@dataclass
class ChatResult:
    """One answer. ``finish_reason``: ``"eos"`` (the model ended its turn), ``"length"``
    (``max_new_tokens`` reached) or ``"context"`` (the model's context length reached)."""

    text: str
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    prompt: str = field(repr=False, default="")

    def to_json(self) -> dict:
        return asdict(self)


class TextStreamer:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8."""

    def __init__(self, tokenizer, skip_ids: set[int]):
        self.tokenizer = tokenizer
        self.skip_ids = skip_ids
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        if token_id in self.skip_ids:
            return ""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


class OmniRunner:
    """A loaded bundle: manifest, tokenizer, chat template and lazily created sessions."""

    def __init__(self, bundle: str | Path, device: str = "auto", threads: int = 0):
        from tokenizers import Tokenizer

        self.manifest = load_manifest(bundle)
        providers = select_providers(device)
        self.pool = SessionPool(self.manifest, providers, SessionSettings(intra_op_threads=threads))
        tok = self.manifest.tokenizer
        for rel in (tok["file"], tok["chat_template_file"]):
            verify_file(self.manifest, rel)
        try:
            self.tokenizer = Tokenizer.from_file(str(self.manifest.path(tok["file"])))
        except Exception as exc:  # tokenizers raises plain Exceptions
            raise BundleError(f"cannot read the tokenizer ({exc})", path=self.manifest.path(tok["file"]),
                              fix="rebuild the bundle") from exc
        self.template = ChatTemplate.from_file(self.manifest.path(tok["chat_template_file"]))
        self.default_system_prompt = tok["default_system_prompt"]
        self.thinker = ThinkerGenerator(self.manifest, self.pool)

    @property
    def context_length(self) -> int:
        """Positions the model attends over: prompt + new tokens never exceed this."""
        return int(self.manifest.config["thinker"]["max_position_embeddings"])

    def default_sampling(self) -> SamplingConfig:
        gen = self.manifest.generation
        return SamplingConfig(do_sample=gen["do_sample"], temperature=gen["temperature"], top_k=gen["top_k"],
                              top_p=gen["top_p"], repetition_penalty=gen["repetition_penalty"])

    def render(self, prompt: str, system: str | None = None) -> str:
        """The chat-formatted prompt text (default system prompt when ``system`` is None)."""
        _check_text(prompt, "prompt")
        if system is not None:
            _check_text(system, "system")
        messages = build_messages(prompt, system=self.default_system_prompt if system is None else system)
        return self.template.render(messages, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def token_budget(self, prompt_tokens: int, max_new_tokens: int | None = None) -> tuple[int, str]:
        """``(limit, reason)``: how many tokens to generate after a ``prompt_tokens`` prompt and
        the finish reason to report if that limit is reached.

        ``max_new_tokens`` None means the bundle's default, clamped to the context (reason
        ``"context"`` when clamped); an explicit value that does not fit is an InputError naming
        the largest allowed value, as is a prompt that leaves no room for one new token.
        """
        context = self.context_length
        room = context - prompt_tokens
        if room < 1:
            raise InputError(
                f"the prompt is {prompt_tokens} tokens (chat template and system prompt included) but the "
                f"model's context holds {context} positions: no room is left for an answer",
                fix=f"shorten the prompt (or the system prompt) to fit in {context - 1} tokens",
                param="prompt",
            )
        if max_new_tokens is not None:
            _check_max_new_tokens(max_new_tokens)
            if max_new_tokens > room:
                raise InputError(
                    f"max_new_tokens={max_new_tokens} does not fit: the prompt takes {prompt_tokens} of the "
                    f"model's {context} context positions, so at most {room} new tokens are possible",
                    fix=f"ask for at most {room} new tokens (max_new_tokens <= {room}), or shorten the prompt",
                    param="max_new_tokens",
                )
            return int(max_new_tokens), "length"
        default = int(self.manifest.generation["max_new_tokens"])
        if default > room:
            return room, "context"
        return default, "length"

    def chat(
        self,
        prompt: str,
        system: str | None = None,
        max_new_tokens: int | None = None,
        sampling: SamplingConfig | None = None,
        seed: int | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> ChatResult:
        """Answer one user prompt; ``on_text`` receives the text as it is generated.

        ``max_new_tokens`` None uses the bundle's default (clamped to the context); ``sampling``
        None the bundle's generation defaults; ``seed`` seeds sampling (unused when greedy).
        Every argument is checked before any graph runs (InputError).
        """
        if max_new_tokens is not None:
            _check_max_new_tokens(max_new_tokens)
        sampling = self.default_sampling() if sampling is None else sampling
        if not isinstance(sampling, SamplingConfig):
            raise InputError(f"sampling must be a SamplingConfig or None, got {type(sampling).__name__}",
                             fix="pass omni_runtime.sampling.SamplingConfig(...)", param="sampling")
        sampling.validate()
        if seed is not None and (not isinstance(seed, Integral) or isinstance(seed, bool) or seed < 0):
            raise InputError(f"seed must be an integer >= 0, got {seed!r}", fix="pass a seed >= 0 (or None)",
                             param="seed")
        text = self.render(prompt, system)
        prompt_ids = self.encode(text)
        limit, limit_reason = self.token_budget(len(prompt_ids), max_new_tokens)
        streamer = TextStreamer(self.tokenizer, set(int(i) for i in self.thinker.eos_ids))

        def on_step(new):
            piece = streamer.push(int(new[0]))
            if piece and on_text is not None:
                on_text(piece)

        out = self.thinker.generate([prompt_ids], limit, sampling, seed, on_step, limit_reason=limit_reason)
        ids = out.token_ids[0]
        answer = self.tokenizer.decode(ids, skip_special_tokens=True)
        return ChatResult(answer, prompt_ids, ids, out.finish_reasons[0], prompt=text)


def _check_max_new_tokens(value) -> None:
    if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
        raise InputError(f"max_new_tokens must be an integer >= 1, got {value!r}",
                         fix="ask for at least 1 new token (max_new_tokens >= 1), or None for the bundle's default",
                         param="max_new_tokens")


def _check_text(value, name: str) -> None:
    """``value`` must be a str the tokenizer can take (no lone surrogates from undecodable bytes)."""
    if not isinstance(value, str):
        raise InputError(f"the {name} must be a string, got {type(value).__name__}", fix=f"pass the {name} as text",
                         param=name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            f"the {name} is not valid text: character {exc.start} is an unpaired surrogate "
            f"(bytes that are not UTF-8?)",
            fix=f"pass the {name} as UTF-8 text", param=name) from None
