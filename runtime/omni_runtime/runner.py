"""The runtime's small Python API: load a bundle, chat, stream text.

    from omni_runtime import OmniRunner
    runner = OmniRunner("bundle/")
    result = runner.chat("Hello", max_new_tokens=32, on_text=print)
    result.text, result.prompt_ids, result.token_ids, result.finish_reason

    # Qwen-style messages with audio, images and video (paths, bytes or numpy arrays)
    result = runner.chat(messages=[{"role": "user", "content": [
        {"type": "audio", "audio": "question.wav"}, {"type": "image", "image": "photo.png"},
        {"type": "video", "video": "clip.mp4"}, {"type": "text", "text": "What do you hear and see?"}]}],
        use_audio_in_video=True)
    result.media  # {"audio_tokens": [...], "image_tokens": [...], "video_tokens": [...], ...}

Generation is bounded by the model's context (``config.thinker.max_position_embeddings``):
prompt + new tokens never exceed it. A prompt that does not fit, or an explicit
``max_new_tokens`` that would overflow, is an InputError before any graph runs; the bundle's
default ``max_new_tokens`` is clamped to what fits instead (``finish_reason`` is then
``"context"`` when generation reaches that clamp). For multimodal prompts the budget counts the
expanded prompt (one position per audio, image and video token).

Media are decoded and their token counts known before any graph runs; the audio and vision
encoder sessions are created only when a request has that modality (``omni_runtime.prompt.media_prompt``).

Sessions follow a memory policy (``OmniRunner(bundle, memory=...)``, ``omni_runtime.bundle.memory``):
``"lazy"`` (default) frees each stage's sessions after it (the encoders after the prefill, the
thinker after its text, the talker and token2wav after the speech); ``"resident"`` keeps them;
a byte budget (``"6GB"``) keeps what fits and evicts the least recently used idle session.
``runner.pool.load_log`` records each session creation (graph, seconds, bytes, cached).

Speech out (bundles with a talker and token2wav, ``omni_runtime.stages.speech``)::

    # the whole answer, as transformers' generate(return_audio): RK4, one token2wav run
    result = runner.chat("Hello", speech=True, speaker="Ethan", noise_seed=0)
    result.audio, result.sample_rate, result.codes, result.first_audio_seconds, result.audio_seconds

    # streamed: on_audio gets float32 PCM chunks while the talker is still producing codes
    result = runner.chat("Hello", on_audio=lambda pcm, last: player.write(pcm))

    # or as an iterator of (pcm, last); .result is the ChatResult once it is exhausted
    with runner.speak("Hello") as chunks:
        for pcm, last in chunks:
            player.write(pcm)
    chunks.result.text
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omni_runtime.prompt.chat import ChatTemplate, build_messages
from omni_runtime.errors import BundleError, InputError
from omni_runtime.bundle.manifest import load_manifest, verify_file
from omni_runtime.stages.sampling import SamplingConfig
from omni_runtime.bundle.memory import THINKER as THINKER_STAGE
from omni_runtime.bundle.memory import MemoryPolicy, request_stages
from omni_runtime.bundle.sessions import SessionPool, SessionSettings, select_providers
from omni_runtime.request import ChatRequest, check_max_new_tokens, check_text
from omni_runtime.stages.thinker import ThinkerGenerator

#: the fields a ChatRequest takes (``chat``/``speak``/``prompt_inputs`` keyword arguments)
REQUEST_FIELDS = frozenset(f.name for f in dataclasses.fields(ChatRequest))


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
    # Media token counts of a multimodal prompt: {"audio_tokens": [...], "image_tokens": [...],
    # "video_tokens": [...]} (+ "video_audio_tokens" with use_audio_in_video); None for text.
    media: dict | None = None
    # Speech (speech=True or on_audio): the talker's codes (without its stop code), the whole
    # waveform (float32 mono at sample_rate Hz), the speaker, the seconds from the start of the
    # request to the first audio (the first chunk when streamed, the waveform otherwise) and the
    # duration of the audio. All None for a text answer.
    codes: list[int] | None = None
    audio: np.ndarray | None = field(default=None, repr=False, compare=False)
    sample_rate: int | None = None
    speaker: str | None = None
    first_audio_seconds: float | None = None
    audio_seconds: float | None = None
    #: why the speech ended: "eos" (the talker's stop code), "length" (talker_max_new_tokens) or
    #: "seconds" (max_speech_seconds)
    speech_finish_reason: str | None = None

    def to_json(self) -> dict:
        """JSON-ready fields: everything but ``audio`` (the waveform); ``media`` only for media
        prompts and the speech fields only for speech."""
        body = {"text": self.text, "prompt_ids": list(self.prompt_ids), "token_ids": list(self.token_ids),
                "finish_reason": self.finish_reason, "prompt": self.prompt}
        if self.media is not None:
            body["media"] = self.media
        if self.codes is not None:
            body.update(codes=list(self.codes), speaker=self.speaker, sample_rate=self.sample_rate,
                        first_audio_seconds=self.first_audio_seconds, audio_seconds=self.audio_seconds,
                        speech_finish_reason=self.speech_finish_reason)
        return body


@dataclass
class PromptInputs:
    """What the thinker is fed for one prompt (``OmniRunner.prompt_inputs``).

    ``ids`` are the prompt ids with every media placeholder expanded to its token count (what
    ``Qwen2_5OmniProcessor`` returns as ``input_ids``). For a prompt with media, ``embeds`` are
    the token embeddings with the encoder rows merged in at the placeholders ``[seq, hidden]``,
    ``positions`` the TMRoPE position ids ``[3, seq]`` and ``rope_delta`` the offset of decode
    positions; for text all three are left to the thinker (None, None, 0).
    """

    text: str
    ids: list[int]
    media: dict | None = None
    embeds: np.ndarray | None = field(default=None, repr=False)
    positions: np.ndarray | None = field(default=None, repr=False)
    rope_delta: int = 0

    def generate_kwargs(self) -> dict:
        """Keyword arguments of ``ThinkerGenerator.generate`` for this (one-row) prompt."""
        if self.embeds is None:
            return {}
        return {"prompt_embeds": [self.embeds], "prompt_positions": [self.positions],
                "rope_deltas": [self.rope_delta]}


@dataclass
class PreparedRequest:
    """A request checked against the bundle and tokenized (``OmniRunner.prepare``), ready to run."""

    request: ChatRequest
    started: float  # time.perf_counter() when the request came in (first-audio latency)
    inputs: PromptInputs
    media: object | None  # media_prompt.PreparedMedia: decoded media whose encoders have not run yet
    limit: int  # new tokens at most
    limit_reason: str  # the finish reason when the limit is reached ("length" or "context")
    sampling: SamplingConfig
    voice: object | None  # speech.SpeechOptions, None for a text answer


class SpeechChunks:
    """``OmniRunner.speak``'s iterator of ``(pcm float32, last)`` chunks; ``result`` is the
    ChatResult once the last chunk is out (None before). ``close()`` (or leaving a ``with``
    block) stops the request early and releases its sessions."""

    def __init__(self, chunks: Iterator[tuple[np.ndarray, bool]]):
        self._chunks = chunks
        self.result: ChatResult | None = None

    def __iter__(self) -> "SpeechChunks":
        return self

    def __next__(self) -> tuple[np.ndarray, bool]:
        try:
            return next(self._chunks)
        except StopIteration as done:
            if done.value is not None:
                self.result = done.value
            raise StopIteration from None

    def close(self) -> None:
        self._chunks.close()

    def __enter__(self) -> "SpeechChunks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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

    def __init__(self, bundle: str | Path, device: str = "auto", threads: int = 0,
                 memory: MemoryPolicy | str | int = "lazy"):
        """``memory``: the session policy (``omni_runtime.bundle.memory``): ``"lazy"`` (default: each
        stage's sessions are freed after it), ``"resident"`` (kept once loaded) or a byte budget
        (``"6GB"``, ``"6.5GiB"``, an int: least recently used sessions evicted to fit). A budget
        smaller than the thinker stage is an InputError here, before any graph runs; one smaller
        than another stage a request needs, when that request is prepared."""
        from tokenizers import Tokenizer

        policy = MemoryPolicy.parse(memory)  # InputError before the bundle is read
        self.manifest = load_manifest(bundle)
        providers = select_providers(device)
        self.pool = SessionPool(self.manifest, providers, SessionSettings(intra_op_threads=threads), memory=policy)
        self.pool.check_stages([THINKER_STAGE])
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
        self._speech = None  # SpeechPipeline, made when speech is first asked for

    @property
    def context_length(self) -> int:
        """Positions the model attends over: prompt + new tokens never exceed this."""
        return self.manifest.configs.thinker.max_position_embeddings

    def default_sampling(self) -> SamplingConfig:
        """The bundle's generation defaults (``generation``)."""
        return self.manifest.configs.generation.sampling

    def render(self, prompt: str, system: str | None = None) -> str:
        """The chat-formatted prompt text (default system prompt when ``system`` is None)."""
        check_text(prompt, "prompt")
        if system is not None:
            check_text(system, "system")
        messages = build_messages(prompt, system=self.default_system_prompt if system is None else system)
        return self.template.render(messages, add_generation_prompt=True)

    def render_messages(self, messages: list[dict]) -> str:
        """The chat-formatted text of checked messages (``media_prompt.normalize_messages``)."""
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
                f"the prompt is {prompt_tokens} tokens (chat template, system prompt and media tokens included) "
                f"but the model's context holds {context} positions: no room is left for an answer",
                fix=f"shorten the prompt (or the system prompt, or the audio/video) to fit in {context - 1} tokens",
                param="prompt",
            )
        if max_new_tokens is not None:
            check_max_new_tokens(max_new_tokens)
            if max_new_tokens > room:
                raise InputError(
                    f"max_new_tokens={max_new_tokens} does not fit: the prompt takes {prompt_tokens} of the "
                    f"model's {context} context positions, so at most {room} new tokens are possible",
                    fix=f"ask for at most {room} new tokens (max_new_tokens <= {room}), or shorten the prompt",
                    param="max_new_tokens",
                )
            return int(max_new_tokens), "length"
        default = self.manifest.configs.generation.max_new_tokens
        if default > room:
            return room, "context"
        return default, "length"

    def chat(self, prompt: str | ChatRequest | None = None, *, on_text: Callable[[str], None] | None = None,
             on_audio: Callable[[np.ndarray, bool], None] | None = None, **fields) -> ChatResult:
        """Answer one request: a :class:`ChatRequest`, or its fields as keyword arguments (a user
        ``prompt``, or Qwen-style ``messages``); ``on_text`` receives the text as it is generated.

        ``messages`` is a list of ``{"role": "system"|"user"|"assistant", "content": str | [parts]}``
        with parts ``{"type": "text", "text": ...}``, ``{"type": "audio", "audio": path | bytes |
        float array at 16 kHz}``, ``{"type": "image", "image": path | bytes | uint8 array | PIL
        image}``, ``{"type": "video", "video": path | bytes | uint8 frames [T, H, W, 3]}``
        (optional keys: ``audio_start``/``audio_end`` seconds; ``min_pixels``/``max_pixels`` for
        images; ``fps``, ``min_frames``, ``max_frames``, ``min_pixels``, ``max_pixels``,
        ``total_pixels`` for videos). Without a system message, ``system`` (default: the bundle's
        system prompt) is added first. ``use_audio_in_video`` also feeds each video's audio track,
        interleaved with its frames in 2-second chunks; ``video_fps`` is the frame sampling rate
        (default: the bundle's, 2 frames per second).

        ``max_new_tokens`` None uses the bundle's default (clamped to the context); ``sampling``
        None the bundle's generation defaults; ``seed`` seeds sampling (unused when greedy).
        Every argument and every media input is checked before any graph runs (InputError).

        Speech (``speech=True``, or ``on_audio`` given; the bundle needs a talker and token2wav,
        BundleError otherwise): the reply is also spoken by ``speaker`` (default: the bundle's,
        Chelsie; InputError listing the choices for an unknown one) and the result carries
        ``codes``, ``audio``, ``sample_rate``, ``first_audio_seconds`` and ``audio_seconds``.
        ``stream`` (default: True when ``on_audio`` is given) makes token2wav run on the codes
        while the talker produces them, in the official chunked scheme: ``on_audio(pcm, last)``
        receives float32 PCM chunks as they come. Unstreamed, the audio is made at once as
        transformers' ``generate`` makes it (``on_audio`` then gets it as one chunk). ``solver``:
        ``"rk4"`` or ``"euler"`` (default: ``rk4`` unstreamed, ``euler`` streamed, from the
        bundle). ``talker_sampling`` None uses the bundle's talker defaults (sampling: top-k 40,
        top-p 0.8, temperature 0.9, repetition penalty 1.05; ``Talker.default_sampling(False)``
        is greedy); ``talker_max_new_tokens`` bounds the codes (default: the bundle's, 4096).
        ``max_speech_seconds`` stops the talker after that many seconds of codes
        (``speech_finish_reason`` ``"seconds"``; otherwise ``"eos"`` or ``"length"``).
        ``seed`` also seeds the talker's sampling; ``noise_seed`` (default: ``seed``) draws
        token2wav's initial noise (``numpy.random.default_rng(noise_seed)``; None: fresh).
        """
        if on_audio is not None and not callable(on_audio):
            raise InputError(f"on_audio must be a callable (pcm, last) or None, got {type(on_audio).__name__}",
                             fix="pass a function taking a float32 array and a bool", param="on_audio")
        request = as_request(prompt, fields, speech=on_audio is not None)
        chunks = self._answer(self.prepare(request, stream_default=on_audio is not None), on_text)
        try:
            while True:
                pcm, last = next(chunks)
                if on_audio is not None:
                    on_audio(pcm, last)
        except StopIteration as done:
            return done.value
        finally:
            chunks.close()

    def speak(self, prompt: str | ChatRequest | None = None, *, on_text: Callable[[str], None] | None = None,
              **fields) -> "SpeechChunks":
        """The spoken answer as an iterator of ``(pcm float32, last)`` chunks, streamed unless the
        request says ``stream=False`` (arguments as ``chat``); its ``result`` is the ChatResult once
        the last chunk is out.

        Every argument is checked here, before any graph runs; the thinker runs at the first
        ``next()``. Closing the iterator early (``close()``, or leaving a ``with`` block) stops
        the talker and releases the speech sessions.
        """
        request = as_request(prompt, fields, speech=True)
        return SpeechChunks(self._answer(self.prepare(request, stream_default=True), on_text))

    @property
    def has_speech(self) -> bool:
        """True if this bundle can speak (talker and token2wav graphs)."""
        from omni_runtime.stages.speech import has_speech

        return has_speech(self.manifest)

    def speech_pipeline(self):
        """The bundle's ``omni_runtime.stages.speech.SpeechPipeline`` (BundleError for a text-only bundle); no
        session is created until speech runs."""
        if self._speech is None:
            from omni_runtime.stages.speech import SpeechPipeline

            self._speech = SpeechPipeline(self.manifest, self.pool)
        return self._speech

    def default_talker_sampling(self, do_sample: bool | None = None) -> SamplingConfig:
        """The bundle's talker sampling defaults (``do_sample=False``: greedy, repetition penalty kept)."""
        return self.speech_pipeline().talker.default_sampling(do_sample)

    def prepare(self, request: ChatRequest, stream_default: bool = False) -> "PreparedRequest":
        """Check ``request`` against this bundle (speech options, media, the context budget) and
        tokenize it; no graph runs. ``stream_default`` is the streaming of a request that leaves
        ``stream`` None."""
        started = time.perf_counter()
        voice = None
        if request.speech:
            stream = stream_default if request.stream is None else request.stream
            voice = self.speech_pipeline().options(request, stream)
        inputs, prepared = self._tokenize(request)
        limit, limit_reason = self.token_budget(len(inputs.ids), request.max_new_tokens)
        sampling = self.default_sampling() if request.sampling is None else request.sampling
        self.pool.check_stages(request_stages(
            audio=prepared is not None and prepared.has_audio, vision=prepared is not None and prepared.has_vision,
            speech=voice is not None, stream=voice is not None and voice.stream))
        return PreparedRequest(request, started, inputs, prepared, limit, limit_reason, sampling, voice)

    def _answer(self, job: "PreparedRequest", on_text) -> Iterator[tuple[np.ndarray, bool]]:
        """Run a prepared request: the thinker (text streamed to ``on_text``), then, with speech,
        the speech chunks; returns the ChatResult (StopIteration value)."""
        inputs, voice = job.inputs, job.voice
        streamer = TextStreamer(self.tokenizer, set(int(i) for i in self.thinker.eos_ids))

        def on_step(new):
            piece = streamer.push(int(new[0]))
            if piece and on_text is not None:
                on_text(piece)

        try:
            if job.media is not None:
                self._encode_media(inputs, job.media)
            out = self.thinker.generate([inputs.ids], job.limit, job.sampling, job.request.seed, on_step,
                                        limit_reason=job.limit_reason, keep_states=voice is not None,
                                        **inputs.generate_kwargs())
            if voice is not None:  # the talker's thinker rows, while the thinker is loaded
                self.speech_pipeline().talker.text_embeddings(voice.bos_token)
        finally:
            self.thinker.done()  # the thinker stage ends with its text
        ids = out.token_ids[0]
        answer = self.tokenizer.decode(ids, skip_special_tokens=True)
        result = ChatResult(answer, inputs.ids, ids, out.finish_reasons[0], prompt=inputs.text, media=inputs.media)
        if voice is None:
            return result
        from omni_runtime.stages.speech import SpeechOutput

        pipeline = self.speech_pipeline()
        spoken = SpeechOutput(codes=[], audio=np.zeros(0, np.float32), sample_rate=pipeline.sample_rate)
        yield from pipeline.run(out.states[0], voice, job.started, spoken)
        result.codes = list(spoken.codes)
        result.audio = spoken.audio
        result.sample_rate = spoken.sample_rate
        result.speaker = voice.speaker
        result.first_audio_seconds = spoken.first_audio_seconds
        result.audio_seconds = len(spoken.audio) / spoken.sample_rate
        result.speech_finish_reason = spoken.finish_reason
        return result

    def prompt_inputs(self, prompt: str | ChatRequest | None = None, **fields) -> PromptInputs:
        """What ``chat`` feeds the thinker for this request (same arguments; only the prompt, system
        and media fields matter): the expanded prompt ids and, for media, the merged embeddings and
        TMRoPE positions (the encoders run here)."""
        inputs, prepared = self._tokenize(as_request(prompt, fields))
        if prepared is not None:
            self._encode_media(inputs, prepared)
        return inputs

    def _tokenize(self, request: ChatRequest):
        """(PromptInputs without embeddings, PreparedMedia or None): text rendered, media decoded,
        placeholders expanded; no graph has run."""
        if request.messages is None:
            text = self.render(request.prompt, request.system)
            return PromptInputs(text, self.encode(text)), None
        from omni_runtime.stages.audio_encoder import AudioEncoder
        from omni_runtime.prompt.media_prompt import media_items, normalize_messages, prepare_media, rope_config
        from omni_runtime.prompt.multimodal import MediaTokens, expand_placeholders
        from omni_runtime.stages.vision_encoder import vision_config

        checked = normalize_messages(request.messages, request.system, self.default_system_prompt)
        items = media_items(checked)
        text = self.render_messages(checked)
        ids = self.encode(text)
        if not items:
            return PromptInputs(text, ids), None
        kinds = {item.kind for item in items}
        use_audio_in_video = request.use_audio_in_video
        needs_audio = "audio" in kinds or (use_audio_in_video and "video" in kinds)
        audio_config = AudioEncoder(self.manifest, self.pool).config if needs_audio else None
        visual = vision_config(self.manifest) if kinds & {"image", "video"} else None
        prepared = prepare_media(items, audio_config, visual, use_audio_in_video, request.video_fps)
        rope = rope_config(self.manifest)
        ids = expand_placeholders(ids, prepared.placeholders(), MediaTokens.from_manifest(self.manifest.special_tokens),
                                  merge_size=prepared.merge_size, position_id_per_seconds=rope.position_id_per_seconds,
                                  seconds_per_chunk=rope.seconds_per_chunk)
        return PromptInputs(text, ids, media=prepared.summary()), prepared

    def _encode_media(self, inputs: PromptInputs, prepared) -> None:
        """Run the encoders (each released right after), embed the ids, merge, compute positions."""
        from omni_runtime.prompt.media_prompt import encode_media, rope_config, rope_inputs
        from omni_runtime.prompt.multimodal import MediaTokens, merge_embeddings
        from omni_runtime.prompt.rope import rope_index
        from omni_runtime.bundle.names import THINKER_EMBEDDING as EMBEDDING

        features = encode_media(prepared, self.manifest, self.pool)
        ids = np.asarray([inputs.ids], dtype=np.int64)
        embeds = self.pool.get(EMBEDDING).run(None, {"input_ids": ids})[0][0]
        inputs.embeds = merge_embeddings(ids[0], embeds, MediaTokens.from_manifest(self.manifest.special_tokens),
                                         **features)
        positions, deltas = rope_index(ids, rope_config(self.manifest), **rope_inputs(prepared))
        inputs.positions = positions[:, 0, :]
        inputs.rope_delta = int(deltas[0, 0])


def as_request(prompt, fields: dict, speech: bool = False) -> ChatRequest:
    """``prompt`` if it is a ChatRequest (then no other field may be given), else a ChatRequest of
    ``prompt`` and the keyword ``fields`` (TypeError for an unknown one, as for a function);
    ``speech`` True asks for speech whatever the fields say (``on_audio``, ``speak``)."""
    if isinstance(prompt, ChatRequest):
        if fields:
            raise InputError(f"a ChatRequest was given, so {', '.join(fields)} cannot be given beside it",
                             fix="set them in the ChatRequest (dataclasses.replace(request, ...))",
                             param=next(iter(fields)))
        return dataclasses.replace(prompt, speech=True) if speech and not prompt.speech else prompt
    unknown = sorted(set(fields) - REQUEST_FIELDS)
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    return ChatRequest(prompt=prompt, **{**fields, **({"speech": True} if speech else {})})
