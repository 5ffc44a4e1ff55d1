"""The runtime's small Python API: load a bundle, chat, stream text.

    from omni_runtime import OmniRunner
    runner = OmniRunner("bundle/")
    result = runner.chat("Hello", max_new_tokens=32, on_text=print)
    result.text, result.prompt_ids, result.token_ids
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .chat import ChatTemplate, build_messages
from .errors import BundleError
from .manifest import load_manifest, verify_file
from .sampling import SamplingConfig
from .sessions import SessionPool, SessionSettings, select_providers
from .thinker import ThinkerGenerator


@dataclass
class ChatResult:
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

    def default_sampling(self) -> SamplingConfig:
        gen = self.manifest.generation
        return SamplingConfig(do_sample=gen["do_sample"], temperature=gen["temperature"], top_k=gen["top_k"],
                              top_p=gen["top_p"], repetition_penalty=gen["repetition_penalty"])

    def render(self, prompt: str, system: str | None = None) -> str:
        """The chat-formatted prompt text (default system prompt when ``system`` is None)."""
        messages = build_messages(prompt, system=self.default_system_prompt if system is None else system)
        return self.template.render(messages, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def chat(
        self,
        prompt: str,
        system: str | None = None,
        max_new_tokens: int | None = None,
        sampling: SamplingConfig | None = None,
        seed: int | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> ChatResult:
        """Answer one user prompt; ``on_text`` receives the text as it is generated."""
        text = self.render(prompt, system)
        prompt_ids = self.encode(text)
        streamer = TextStreamer(self.tokenizer, set(int(i) for i in self.thinker.eos_ids))

        def on_step(new):
            piece = streamer.push(int(new[0]))
            if piece and on_text is not None:
                on_text(piece)

        limit = self.manifest.generation["max_new_tokens"] if max_new_tokens is None else max_new_tokens
        out = self.thinker.generate([prompt_ids], limit, sampling or self.default_sampling(), seed, on_step)
        ids = out.token_ids[0]
        answer = self.tokenizer.decode(ids, skip_special_tokens=True)
        return ChatResult(answer, prompt_ids, ids, out.finish_reasons[0], prompt=text)
