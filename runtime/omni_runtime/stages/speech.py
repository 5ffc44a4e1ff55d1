"""Speech out: the thinker's reply -> talker codes -> token2wav waveform, whole or streamed.

``OmniRunner.chat(..., speech=True)`` and ``OmniRunner.speak`` drive this module; it joins the
pieces tested on their own (``omni_runtime.stages.talker``, ``omni_runtime.stages.token2wav``):

- **whole** (``stream=False``): the talker generates every code, then token2wav solves them in
  one ODE run (default solver ``rk4``, ``config.token2wav.ode.solver``) and vocodes the mel in
  one BigVGAN run. This is transformers' ``Qwen2_5OmniForConditionalGeneration.generate``:
  the same codes and, from the same initial noise, the same waveform.
- **streamed** (``stream=True``): the talker runs in a worker thread and hands each code over a
  bounded queue to ``Token2Wav.stream`` (the official low-VRAM chunked scheme, default solver
  ``euler``, ``config.token2wav.ode.stream_solver``), which the caller's thread consumes: the
  first chunk comes out after 60 codes (48 + 12 right context) while the talker goes on.
  onnxruntime releases the GIL while a graph runs, so both make progress on separate cores.
  The queue holds at most ``dit_chunk_codes`` (48) codes: the talker may run one DiT chunk
  ahead of token2wav and then waits, so a slow consumer bounds the memory and a closed stream
  stops the talker at its next code.

The sessions of the talker (``talker_embedding``, ``talker_decoder``) and of token2wav
(``token2wav_dit``, ``token2wav_bigvgan``) are created when speech is asked for and released
when it ends, on success, on error and when a stream is closed early. A stream creates
token2wav's sessions before the talker's thread starts creating its own: a session's creation
holds extra memory for a moment, and created side by side those moments add up (measured on the
7b-shape awq bundle: docs/bundle-format.md).

Noise: token2wav's initial state is drawn from ``numpy.random.default_rng(noise_seed)``
(``omni_runtime.stages.token2wav.NoiseSequence``): the same seed gives the same audio.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from omni_runtime.errors import BundleError, InputError
from omni_runtime.bundle.manifest import Manifest
from omni_runtime.bundle.names import TOKEN2WAV_BIGVGAN, TOKEN2WAV_DIT
from omni_runtime.stages.sampling import SamplingConfig
from omni_runtime.bundle.sessions import SessionPool
from omni_runtime.stages.talker import Talker
from omni_runtime.stages.thinker import ThinkerStates
from omni_runtime.stages.token2wav import SOLVERS, Token2Wav

NO_SPEECH_FIX = ("ask for text only, or rebuild the bundle from a checkpoint with a talker (enable_audio_output "
                 "true and its talker and token2wav weights) with a recipe that exports modules.talker and "
                 "modules.token2wav (e.g. --recipe fp32)")
_POLL = 0.05  # seconds between checks of the other side while waiting on the code queue


def has_speech(manifest: Manifest) -> bool:
    """True if the bundle can speak: talker graphs and config, token2wav graphs and config."""
    from omni_runtime.stages.talker import has_talker
    from omni_runtime.stages.token2wav import token2wav_config

    if not has_talker(manifest):
        return False
    try:
        token2wav_config(manifest)
    except BundleError:
        return False
    return True


def check_speech(manifest: Manifest) -> None:
    """BundleError (naming manifest.json) if the bundle cannot produce speech."""
    if not has_speech(manifest):
        raise BundleError("this bundle has no speech output (no talker or token2wav graphs): it was built from a "
                          "model without a talker, or with a recipe that leaves them out",
                          path=manifest.manifest_path, fix=NO_SPEECH_FIX)


@dataclass(frozen=True)
class SpeechOptions:
    """Checked speech settings of one request (``SpeechPipeline.options``)."""

    speaker: str
    bos_token: int
    stream: bool
    solver: str
    sampling: SamplingConfig
    max_codes: int
    #: ``speech_finish_reason`` when the talker reaches ``max_codes``: "length" (talker_max_new_tokens)
    #: or "seconds" (max_speech_seconds)
    limit_reason: str
    seed: int | None  # the talker's sampling seed
    noise_seed: int | None  # token2wav's initial noise


@dataclass
class SpeechOutput:
    """What one request's speech produced (filled in while its chunks are generated)."""

    codes: list[int]
    audio: np.ndarray
    sample_rate: int
    first_audio_seconds: float | None = None
    #: why the talker stopped: "eos" (its stop code), "length" (talker_max_new_tokens) or
    #: "seconds" (max_speech_seconds)
    finish_reason: str | None = None


class _Cancelled(Exception):
    """The consumer went away: the talker thread stops at its next code."""


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


class CodePipe:
    """Codes from the talker thread to token2wav: a bounded queue, cancellable from either side."""

    def __init__(self, size: int):
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self.cancelled = threading.Event()
        self.producer: threading.Thread | None = None

    def put(self, item) -> None:
        """Producer side: blocks while the queue is full; raises _Cancelled once the consumer left."""
        while not self.cancelled.is_set():
            try:
                self._queue.put(item, timeout=_POLL)
                return
            except queue.Full:
                continue
        raise _Cancelled

    def __iter__(self) -> Iterator[int]:
        """Consumer side: the codes until the talker ends; its error is raised here."""
        while True:
            try:
                item = self._queue.get(timeout=_POLL)
            except queue.Empty:
                if self.producer is not None and not self.producer.is_alive() and self._queue.empty():
                    raise RuntimeError("the talker thread ended without a result")  # pragma: no cover - defensive
                continue
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item


class SpeechPipeline:
    """Talker + token2wav of one bundle (no sessions until speech runs)."""

    def __init__(self, manifest: Manifest, pool: SessionPool):
        check_speech(manifest)
        self.manifest = manifest
        self.pool = pool
        self.talker = Talker(manifest, pool)
        self.token2wav = Token2Wav(manifest, pool)

    @property
    def sample_rate(self) -> int:
        return self.token2wav.sample_rate

    def options(self, request, stream: bool) -> SpeechOptions:
        """The speech settings of ``request`` (an ``omni_runtime.request.ChatRequest``, whose values are
        already type-checked) resolved against this bundle: InputError naming the argument for an
        unknown speaker or solver, or more codes than one token2wav run takes; no graph runs."""
        spk = self.token2wav.speaker(request.speaker)  # unknown -> InputError listing the choices
        solver = request.solver
        ode = self.token2wav.ode
        solver = (ode.stream_solver if stream else ode.solver) if solver is None else solver
        if solver not in SOLVERS:
            raise InputError(f"unknown solver {solver!r}", fix=f"use one of: {', '.join(SOLVERS)}", param="solver")
        sampling = self.talker.default_sampling() if request.talker_sampling is None else request.talker_sampling
        max_codes = request.talker_max_new_tokens
        max_codes = self.talker.config.max_new_tokens if max_codes is None else max_codes
        t2w = self.token2wav
        limit_reason = "length"
        if request.max_speech_seconds is not None:
            codes_per_second = t2w.sample_rate / (t2w.mel_per_code * t2w.hop_length)  # 50 for Qwen2.5-Omni
            seconds_codes = max(1, int(request.max_speech_seconds * codes_per_second))
            if seconds_codes < max_codes:
                max_codes, limit_reason = seconds_codes, "seconds"
        if not stream and max_codes * t2w.mel_per_code > t2w.max_mel_frames:
            raise InputError(f"talker_max_new_tokens={max_codes} codes can make {max_codes * t2w.mel_per_code} mel "
                             f"frames, more than the {t2w.max_mel_frames} token2wav solves at once",
                             fix=f"stream the audio (stream=True), or ask for at most "
                                 f"{t2w.max_mel_frames // t2w.mel_per_code} codes", param="talker_max_new_tokens")
        return SpeechOptions(spk.name, spk.bos_token, stream, solver, sampling, int(max_codes), limit_reason,
                             request.seed, request.noise)

    def run(self, states: ThinkerStates, opts: SpeechOptions, start: float,
            out: SpeechOutput) -> Iterator[tuple[np.ndarray, bool]]:
        """Chunks ``(pcm float32, last)`` of the reply in ``states``; ``out`` is filled in as they come
        (codes, the whole audio when the last chunk is out, ``first_audio_seconds`` since ``start``,
        a ``time.perf_counter()`` value)."""
        pieces: list[np.ndarray] = []
        chunks = self._stream(states, opts, out) if opts.stream else self._whole(states, opts, out)
        try:
            for pcm, last in chunks:
                if out.first_audio_seconds is None:
                    out.first_audio_seconds = time.perf_counter() - start
                pieces.append(pcm)
                if last:
                    out.audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
                    # the talker's codes exclude its stop code: all max_codes of them means no stop
                    out.finish_reason = opts.limit_reason if len(out.codes) >= opts.max_codes else "eos"
                yield pcm, last
        finally:
            chunks.close()

    def _check_code(self, code: int) -> None:
        limit = self.token2wav.num_embeds
        if not 0 <= code <= limit:
            raise BundleError(f"the talker produced code {code}, outside token2wav's codebook 0..{limit}: this "
                              f"bundle's talker and token2wav weights do not belong together (a random test model?)",
                              path=self.manifest.manifest_path,
                              fix="build the bundle from a checkpoint whose talker speaks token2wav's codes (e.g. "
                                  "the real Qwen2.5-Omni weights), or ask for text only")

    def _talk(self, states: ThinkerStates, opts: SpeechOptions, on_codes: Callable[[list[int]], None]) -> list[int]:
        return self.talker.generate(states, opts.bos_token, opts.sampling, seed=opts.seed,
                                    max_new_tokens=opts.max_codes, on_codes=on_codes)

    def _whole(self, states, opts, out) -> Iterator[tuple[np.ndarray, bool]]:
        def on_codes(new):
            for code in new:
                self._check_code(code)
                out.codes.append(code)

        codes = self._talk(states, opts, on_codes)
        out.codes[:] = codes
        yield self.token2wav.waveform(codes, opts.speaker, solver=opts.solver, seed=opts.noise_seed), True

    def _stream(self, states, opts, out) -> Iterator[tuple[np.ndarray, bool]]:
        pipe = CodePipe(self.token2wav.stream_config.dit_chunk_codes)

        def on_codes(new):
            for code in new:
                self._check_code(code)
                out.codes.append(code)
                pipe.put(code)

        def talk():
            try:
                self._talk(states, opts, on_codes)
                pipe.put(_END)
            except _Cancelled:
                pass
            except BaseException as error:  # handed to the consumer, raised in its thread
                try:
                    pipe.put(_Failed(error))
                except _Cancelled:
                    pass

        pool = self.token2wav.pool
        try:
            for name in (TOKEN2WAV_DIT, TOKEN2WAV_BIGVGAN):  # one creation at a time (module docstring)
                pool.get(name)
            chunks = self.token2wav.stream(pipe, opts.speaker, solver=opts.solver, seed=opts.noise_seed)
            pipe.producer = threading.Thread(target=talk, name="omni-runtime-talker", daemon=True)
            pipe.producer.start()
            try:
                yield from chunks
            finally:
                pipe.cancelled.set()
                chunks.close()
                pipe.producer.join()
        finally:  # token2wav's stream says done itself, unless it never started
            for name in (TOKEN2WAV_DIT, TOKEN2WAV_BIGVGAN):
                pool.done(name)
