"""Chat prompts: build Qwen2.5-Omni messages and render them with the bundle's Jinja template.

The Jinja environment is set up as transformers' ``apply_chat_template`` sets it up (sandbox,
``trim_blocks``/``lstrip_blocks``, ``raise_exception``, a non-escaping ``tojson``, ...), and
the template sees the same plain copy of the messages, so the runtime renders the same text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from omni_runtime.errors import BundleError, InputError

DEFAULT_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech."
)

CONTENT_TYPES = ("text", "audio", "image", "video")


class ChatTemplate:
    """A compiled chat template (the Jinja text shipped in the bundle)."""

    def __init__(self, text: str, *, path: str | os.PathLike | None = None):
        self.text = text
        self.path = path
        try:
            self._template = _environment().from_string(text)
        except jinja2.TemplateSyntaxError as e:
            raise BundleError(
                f"invalid chat template: {e.message} (line {e.lineno})",
                path=path,
                fix="rebuild the bundle from a checkpoint with a valid chat template",
            ) from e

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ChatTemplate:
        """Load a template from a UTF-8 Jinja file, e.g. the bundle's ``chat_template.jinja``."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise BundleError(f"cannot read the chat template: {e}", path=path, fix="rebuild the bundle") from e
        return cls(text, path=path)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render ``messages`` to the prompt text; extra keyword arguments are template variables
        (e.g. ``add_audio_id=True``). A template's ``raise_exception`` becomes an InputError."""
        try:
            return self._template.render(
                messages=_plain(messages),
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **_plain(kwargs),
            )
        except jinja2.TemplateError as e:
            raise InputError(f"the chat template rejected the messages: {e}", path=self.path) from e


def build_messages(
    prompt: str | None = None,
    system: str | None = DEFAULT_SYSTEM_PROMPT,
    content: list[dict] | None = None,
) -> list[dict]:
    """Build a one-turn conversation in the official Qwen2.5-Omni message format.

    ``system`` (None for no system message, then the template adds its own default) becomes
    ``{"role": "system", "content": [{"type": "text", "text": system}]}``. The user message's
    content is ``content`` (audio/image/video/text parts such as ``{"type": "audio", "audio": ...}``)
    followed by ``{"type": "text", "text": prompt}``. InputError if the user message would be empty.
    """
    parts = list(content or [])
    for part in parts:
        if not isinstance(part, dict) or part.get("type") not in CONTENT_TYPES:
            raise InputError(
                f"invalid content part {part!r}",
                fix=f"each part is a dict with 'type' one of {', '.join(CONTENT_TYPES)}",
            )
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("the prompt is empty", fix="pass a non-empty prompt text")
        parts.append({"type": "text", "text": prompt})
    if not parts:
        raise InputError("the prompt is empty", fix="pass a prompt text or audio/image/video content")
    messages = []
    if system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    messages.append({"role": "user", "content": parts})
    return messages


def _environment() -> ImmutableSandboxedEnvironment:
    """The Jinja environment of transformers' chat templates (utils/chat_template_utils.py)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Unlike Jinja's own tojson, this does not HTML-escape, as in transformers.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict`` for templates, without attribute access to the real type."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace`` for templates, refusing underscore-prefixed attributes."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}"
            )


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body (transformers uses it only to
    locate assistant tokens for training masks)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _plain(value):
    """A copy of ``value`` made of plain JSON types, as transformers gives templates.

    Other objects (audio arrays, images, ...) become an inert ``"<TypeName>"`` placeholder:
    templates only test whether media keys are present, and the sandbox cannot tell which of
    such objects' methods are dangerous.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    return f"<{type(value).__name__}>"
