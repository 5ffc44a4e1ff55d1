"""An OpenAI chat-completions request body -> the runtime's ``ChatRequest`` (plus what only the server needs).

Content parts: ``text``; ``input_audio`` ``{"data": base64, "format": "wav"|"mp3"|"flac"|...}``;
``image_url`` and ``video_url`` ``{"url": "data:<mime>;base64,..."}``, or a local path
(``file://`` or plain) under the server's ``--media-dir``; remote URLs are never fetched.
Values are checked by ``ChatRequest`` itself (its InputErrors become 400 answers naming the
OpenAI field, ``PARAMS``).
"""

from __future__ import annotations

import base64
import binascii
import math
import os
from dataclasses import dataclass, replace
from numbers import Integral, Real
from pathlib import Path

from omni_runtime.errors import InputError
from omni_runtime.request import ChatRequest
from omni_runtime.server.errors import APIError, bad_request

AUDIO_FORMATS = ("wav", "pcm16")
#: runtime parameter -> the OpenAI request field (error messages and ``param``)
PARAMS = {"max_new_tokens": "max_tokens", "speaker": "audio.voice", "seed": "seed", "prompt": "messages",
          "system": "messages", "max_speech_seconds": "max_speech_seconds",
          "use_audio_in_video": "use_audio_in_video", "temperature": "temperature", "top_p": "top_p"}
KNOWN_FIELDS = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream",
    "stream_options", "modalities", "audio", "use_audio_in_video", "max_speech_seconds", "n", "user",
    "frequency_penalty", "presence_penalty", "logprobs", "top_logprobs", "response_format", "video_fps"})


@dataclass
class Call:
    """One checked request: the ChatRequest and the answer's shape."""

    request: ChatRequest
    model: str
    stream: bool
    include_usage: bool
    audio_format: str | None  # "wav" | "pcm16" when speech is asked for
    stop: list[str]
    greedy_talker: bool  # temperature 0: the talker decodes greedily too (as `run --greedy --wav`)
    max_tokens_field: str  # "max_tokens" or "max_completion_tokens" (named in errors)
    temperature: float | None = None
    top_p: float | None = None


def _number(body: dict, name: str, low: float | None = None, high: float | None = None):
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value):
        raise bad_request(f"{name} must be a number, got {value!r}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise bad_request(f"{name} must be between {low} and {high}, got {value!r}", name)
    return value


def _integer(body: dict, name: str, low: int):
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, Integral) or isinstance(value, bool) or value < low:
        raise bad_request(f"{name} must be an integer >= {low}, got {value!r}", name)
    return int(value)


def _b64(data, where: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise bad_request(f"{where} must be a non-empty base64 string", where)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where} is not valid base64", where) from None


def media_source(url, where: str, media_dir: Path | None):
    """The bytes of a data URL, or a checked local path under ``media_dir``."""
    if not isinstance(url, str) or not url:
        raise bad_request(f"{where} must be a non-empty string", where)
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise bad_request(f"{where} must be a base64 data URL (data:<mime>;base64,...)", where)
        return _b64(payload, where)
    if url.startswith(("http://", "https://", "ftp://")):
        raise bad_request(f"{where}: remote URLs are not fetched by this server", where, code="unsupported_value")
    path = url[len("file://"):] if url.startswith("file://") else url
    if media_dir is None:
        raise bad_request(f"{where}: local paths are not accepted (the server was started without --media-dir)",
                          where, code="unsupported_value")
    resolved = Path(os.path.realpath(media_dir / path))
    root = Path(os.path.realpath(media_dir))
    if resolved != root and root not in resolved.parents:
        raise APIError(403, f"{where}: the path is outside the server's media directory", param=where,
                       code="path_not_allowed")
    if not resolved.is_file():
        raise bad_request(f"{where}: no such file in the server's media directory", where)
    return str(resolved)


def _part(part, where: str, media_dir: Path | None) -> dict:
    if not isinstance(part, dict):
        raise bad_request(f"{where} must be an object", where)
    kind = part.get("type")
    if kind == "text":
        return {"type": "text", "text": part.get("text")}
    if kind == "input_audio":
        audio = part.get("input_audio")
        if not isinstance(audio, dict):
            raise bad_request(f"{where}.input_audio must be an object {{data, format}}", f"{where}.input_audio")
        return {"type": "audio", "audio": _b64(audio.get("data"), f"{where}.input_audio.data")}
    if kind in ("image_url", "video_url"):
        spec = part.get(kind)
        url = spec.get("url") if isinstance(spec, dict) else spec
        source = media_source(url, f"{where}.{kind}.url", media_dir)
        name = kind.split("_")[0]
        return {"type": name, name: source}
    raise bad_request(f"{where}: content part type {kind!r} is not supported (text, input_audio, image_url, "
                      f"video_url)", f"{where}.type", code="unsupported_value")


def convert_messages(messages, media_dir: Path | None) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty array", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object", f"messages[{i}]")
        role, content = message.get("role"), message.get("content")
        if role == "developer":
            role = "system"
        if isinstance(content, list):
            content = [_part(p, f"messages[{i}].content[{j}]", media_dir) for j, p in enumerate(content)]
            if all(p["type"] == "text" for p in content) and all(isinstance(p["text"], str) for p in content):
                content = "".join(p["text"] for p in content)
        out.append({"role": role, "content": content})
    return out


def parse_call(body, model_id: str, media_dir: Path | None = None, speech_cap: float | None = None,
               voices: list[str] | None = None) -> Call:
    """Check an OpenAI body and build its Call (APIError 400/404 for what is wrong)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", None, code="invalid_json")
    model = body.get("model", model_id)
    if model != model_id:
        raise APIError(404, f"the model {model!r} does not exist: this server serves {model_id!r}", param="model",
                       code="model_not_found")
    if body.get("n") not in (None, 1):
        raise bad_request("n must be 1 (one choice per request)", "n", code="unsupported_value")
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, field, 1)
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1)
    if top_p == 0:
        raise bad_request("top_p must be > 0", "top_p")
    seed = _integer(body, "seed", 0)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is None:
        stop = []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise bad_request("stop must be a string or an array of up to 4 non-empty strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    include_usage = bool(options.get("include_usage", False))
    modalities = body.get("modalities") or ["text"]
    if modalities not in (["text"], ["text", "audio"], ["audio", "text"]):
        raise bad_request(f"modalities must be [\"text\"] or [\"text\", \"audio\"], got {modalities!r}",
                          "modalities", code="unsupported_value")
    speech = "audio" in modalities
    audio_format, speech_fields = None, {}
    if speech:
        audio = body.get("audio") or {}
        if not isinstance(audio, dict):
            raise bad_request("audio must be an object {voice, format}", "audio")
        audio_format = audio.get("format", "wav")
        if audio_format not in AUDIO_FORMATS:
            raise bad_request(f"audio.format must be one of {', '.join(AUDIO_FORMATS)}, got {audio_format!r}",
                              "audio.format", code="unsupported_value")
        voice = audio.get("voice")
        if voice is not None and voices is not None and voice not in voices:
            raise bad_request(f"unknown voice {voice!r}: this model speaks with {', '.join(voices)}", "audio.voice")
        seconds = _number(body, "max_speech_seconds")
        if seconds is not None and seconds <= 0:
            raise bad_request("max_speech_seconds must be > 0", "max_speech_seconds")
        if speech_cap is not None:
            seconds = speech_cap if seconds is None else min(seconds, speech_cap)
        speech_fields = dict(speech=True, speaker=voice, stream=stream, max_speech_seconds=seconds,
                             noise_seed=0 if seed is None else seed)
        if stop:
            raise bad_request("stop is not supported together with audio output", "stop", code="unsupported_value")
    elif body.get("audio") is not None or body.get("max_speech_seconds") is not None:
        raise bad_request("audio and max_speech_seconds need modalities [\"text\", \"audio\"]", "modalities")
    use_audio_in_video = body.get("use_audio_in_video", False)
    messages = convert_messages(body.get("messages"), media_dir)
    try:
        request = ChatRequest(messages=messages, max_new_tokens=max_tokens, seed=seed,
                              use_audio_in_video=use_audio_in_video, video_fps=body.get("video_fps"),
                              **speech_fields)
    except InputError as exc:
        from omni_runtime.server.errors import from_omni_error

        raise from_omni_error(exc, {**PARAMS, "max_new_tokens": field}) from None
    return Call(request, model_id, stream, include_usage, audio_format, stop,
                greedy_talker=temperature == 0, max_tokens_field=field, temperature=temperature, top_p=top_p)


def sampling_for(call_body_temperature, call_body_top_p, defaults):
    """The SamplingConfig: temperature 0 -> greedy; temperature or top_p given -> sampling with them."""
    if call_body_temperature == 0:
        return replace(defaults, do_sample=False)
    changes = {}
    if call_body_temperature is not None:
        changes["temperature"] = float(call_body_temperature)
    if call_body_top_p is not None:
        changes["top_p"] = float(call_body_top_p)
    if changes:
        return replace(defaults, do_sample=True, **changes)
    return defaults
