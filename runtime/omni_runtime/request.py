"""One chat request, the same object from the Python API, the command lines, ``verify`` and the server.

``ChatRequest`` holds everything a request asks for: the prompt (text, or Qwen-style messages
with media), media options, generation settings and speech options. Building one checks every
value that needs no bundle (types and ranges), once; ``OmniRunner`` then checks what needs the
bundle (the context budget, the speaker, the solver, ...) and hands the request down to the
stages. Errors are ``InputError``\\ s naming the API argument (``param``); the command lines show
them as flags (``omni_runtime.cli.cli_message``).

    request = ChatRequest(prompt="Hello", max_new_tokens=32, speech=True, speaker="Ethan")
    result = runner.chat(request, on_text=print)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real

from omni_runtime.errors import InputError
from omni_runtime.stages.sampling import SamplingConfig

#: the speech options, which apply only when speech is asked for
SPEECH_OPTIONS = ("speaker", "stream", "solver", "talker_sampling", "talker_max_new_tokens", "max_speech_seconds",
                  "noise_seed")


def check_count(value, name: str, low: int, fix: str) -> None:
    """``value`` must be an integer >= ``low`` (not a bool); InputError naming ``name`` otherwise."""
    if not isinstance(value, Integral) or isinstance(value, bool) or value < low:
        raise InputError(f"{name} must be an integer >= {low}, got {value!r}", fix=fix, param=name)


def check_max_new_tokens(value) -> None:
    """``max_new_tokens`` must be an integer >= 1 (None, the bundle's default, is checked by the caller)."""
    check_count(value, "max_new_tokens", 1,
                "ask for at least 1 new token (max_new_tokens >= 1), or None for the bundle's default")


def check_text(value, name: str) -> None:
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


def _check_flag(value, name: str, fix: str) -> None:
    if not isinstance(value, bool):
        raise InputError(f"{name} must be True or False, got {value!r}", fix=fix, param=name)


def _check_sampling(value, name: str, fix: str) -> None:
    if value is None:
        return
    if not isinstance(value, SamplingConfig):
        raise InputError(f"{name} must be a SamplingConfig or None, got {type(value).__name__}", fix=fix, param=name)
    value.validate()


@dataclass(frozen=True, eq=False)
class ChatRequest:
    """What one request asks for, checked when it is made (module docstring).

    Exactly one of ``prompt`` (one user turn) and ``messages`` (Qwen-style messages with text,
    audio, image and video parts, see ``OmniRunner.chat``) is given. ``None`` means the bundle's
    default for every optional field: the system prompt, ``max_new_tokens`` (clamped to the
    context), ``sampling`` (the bundle's generation defaults), the speaker, the solver (``rk4``
    whole, ``euler`` streamed), the talker's sampling and code limit. ``max_speech_seconds``
    stops the talker after that many seconds of codes (a random talker never says its stop code,
    a real one can ramble); the result's ``speech_finish_reason`` then says ``"seconds"``. ``stream`` None: streamed
    when the caller takes audio chunks. ``seed`` seeds the thinker's and the talker's sampling;
    ``noise_seed`` (default: ``seed``) token2wav's initial noise.
    """

    prompt: str | None = None
    messages: list[dict] | None = field(default=None, repr=False)
    system: str | None = None
    use_audio_in_video: bool = False
    video_fps: float | None = None
    max_new_tokens: int | None = None
    sampling: SamplingConfig | None = None
    seed: int | None = None
    speech: bool = False
    speaker: str | None = None
    stream: bool | None = None
    solver: str | None = None
    talker_sampling: SamplingConfig | None = None
    talker_max_new_tokens: int | None = None
    max_speech_seconds: float | None = None
    noise_seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None:
            check_max_new_tokens(self.max_new_tokens)
        _check_sampling(self.sampling, "sampling", "pass omni_runtime.stages.sampling.SamplingConfig(...)")
        if self.seed is not None:
            check_count(self.seed, "seed", 0, "pass a seed >= 0 (or None)")
        _check_flag(self.speech, "speech", "pass speech=True to hear the answer")
        if not self.speech:
            # stream=False is the default spelled out; 0 or 0.0 is a value given (and checked below)
            given = [name for name in SPEECH_OPTIONS if getattr(self, name) is not None
                     and getattr(self, name) is not False]
            if given:
                raise InputError(f"{', '.join(given)} only apply to speech, which was not asked for",
                                 fix="pass speech=True (or on_audio) to hear the answer, or leave them out",
                                 param=given[0])
        if self.stream is not None:
            _check_flag(self.stream, "stream", "pass stream=True to get audio chunks while the talker runs")
        _check_sampling(self.talker_sampling, "talker_sampling",
                        "pass omni_runtime.stages.sampling.SamplingConfig(...), or None for the bundle's talker "
                        "defaults")
        if self.talker_max_new_tokens is not None:
            check_count(self.talker_max_new_tokens, "talker_max_new_tokens", 1,
                        "ask the talker for 1 or more codes, or None for the bundle's default")
        seconds = self.max_speech_seconds
        if seconds is not None and (not isinstance(seconds, Real) or isinstance(seconds, bool)
                                    or not math.isfinite(seconds) or seconds <= 0):
            raise InputError(f"max_speech_seconds must be a number > 0, got {seconds!r}",
                             fix="pass the most seconds of speech to make (e.g. 10), or None for no bound",
                             param="max_speech_seconds")
        if self.noise_seed is not None:
            check_count(self.noise_seed, "noise_seed", 0, "pass a noise_seed >= 0 (or None)")
        _check_flag(self.use_audio_in_video, "use_audio_in_video",
                    "pass use_audio_in_video=True to use the videos' audio tracks")
        fps = self.video_fps
        if fps is not None and (not isinstance(fps, Real) or isinstance(fps, bool) or not math.isfinite(fps)
                                or fps <= 0):
            raise InputError(f"video_fps must be a number > 0, got {fps!r}",
                             fix="pass the video frames to sample per second (e.g. 2.0), or None", param="video_fps")
        if self.messages is None:
            if self.prompt is None:
                raise InputError("nothing to answer: neither a prompt nor messages were given",
                                 fix="pass a prompt text or messages", param="prompt")
            check_text(self.prompt, "prompt")
        elif self.prompt is not None:
            raise InputError("prompt and messages were both given",
                             fix="pass the prompt as a text part of the last user message", param="prompt")
        if self.system is not None:
            check_text(self.system, "system")

    @property
    def noise(self) -> int | None:
        """The seed of token2wav's initial noise: ``noise_seed``, else ``seed``."""
        return self.seed if self.noise_seed is None else self.noise_seed
