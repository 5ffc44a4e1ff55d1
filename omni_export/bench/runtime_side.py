"""One measured request through the torch-free runtime (``OmniRunner``), in this process.

Run by ``omni-export bench`` as its own process per repeat (``python -m
omni_export.bench.runtime_side SPEC``): it imports numpy, onnxruntime and omni_runtime only (no
torch), answers one request and prints one JSON line. The runtime is measured from outside,
in this process only: ``SessionPool.get`` / ``release``, ``ThinkerGenerator.generate``,
``SpeechPipeline.run`` and ``Talker.generate`` are wrapped (class attributes, this process
only) to mark the stage boundaries, time session creation and return sessions whose ``run``
is timed (``trace.TimedSession``); nothing in the runtime changes.

Stages, in request order: ``audio_encoder`` and ``vision_encoder`` (from the first ``get`` of
their graph to its release), ``thinker_prefill`` (from the first thinker graph ``get``, which
the embedding merge of a media prompt does, to the first new token), ``thinker_decode`` (to the
last token), ``speech`` (talker and streamed token2wav, running together, to the last audio
chunk). Host work between them (media decoding before any stage, ``prepare``) is its own
segment. After the request, token2wav alone re-makes the same codes (same noise, sessions
loaded first): the figure compared with PyTorch's streamed token2wav, nothing else running.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import threading
import time

import numpy as np

from omni_export.bench.trace import TimedSession, Tracer, open_fds

#: graph name prefix -> the stage that loading it starts (talker and token2wav: ``speech``,
#: started by ``SpeechPipeline.run``)
_GRAPH_STAGES = (("audio_encoder", "audio_encoder"), ("vision_encoder", "vision_encoder"),
                 ("thinker_", "thinker_prefill"))
_LATE = {"thinker_prefill", "thinker_decode", "speech"}


def build_request(spec: dict, runner):
    """The ChatRequest of a bench spec: greedy thinker, greedy talker (its repetition penalty
    kept, as ``run --greedy``), streamed speech bounded by ``max_speech_seconds``."""
    from omni_runtime.request import ChatRequest

    sampling = dataclasses.replace(runner.default_sampling(), do_sample=False)
    speech = {}
    if spec["speech"]:
        speech = dict(speech=True, stream=True, speaker=spec.get("speaker"),
                      max_speech_seconds=spec["max_speech_seconds"], noise_seed=spec["noise_seed"],
                      talker_sampling=runner.default_talker_sampling(False))
    content = ([{"type": "audio", "audio": f} for f in spec["audio"]]
               + [{"type": "image", "image": f} for f in spec["image"]]
               + [{"type": "video", "video": f} for f in spec["video"]])
    if not content:
        return ChatRequest(prompt=spec["prompt"], max_new_tokens=spec["max_new_tokens"], sampling=sampling, **speech)
    content.append({"type": "text", "text": spec["prompt"]})
    return ChatRequest(messages=[{"role": "user", "content": content}], max_new_tokens=spec["max_new_tokens"],
                       sampling=sampling, **speech)


class _State:
    def __init__(self):
        self.tracer: Tracer | None = None
        self.lock = threading.Lock()
        self.log_seen: dict[int, int] = {}  # id(pool) -> load_log entries already recorded


def _bind(func):
    signature = inspect.signature(func)
    return lambda *args, **kwargs: signature.bind(*args, **kwargs)


def instrument(state: _State, timeline: dict) -> None:
    """Wrap the runtime's stage entry points (module docstring); ``timeline`` collects stamps."""
    from omni_runtime.bundle.sessions import SessionPool
    from omni_runtime.stages.speech import SpeechPipeline
    from omni_runtime.stages.talker import Talker
    from omni_runtime.stages.thinker import ThinkerGenerator

    get, release = SessionPool.get, SessionPool.release

    def timed_get(pool, name, *args, **kwargs):
        tracer = state.tracer
        current = tracer.current
        for prefix, stage in _GRAPH_STAGES:
            # a thinker graph after the text is done (the talker's text rows) starts no prefill
            late = current in _LATE or "token_stamps" in timeline
            if name.startswith(prefix) and not (stage == "thinker_prefill" and late):
                tracer.enter(stage)
        was_loaded = name in pool.loaded
        start = time.perf_counter()
        session = get(pool, name, *args, **kwargs)
        seconds = time.perf_counter() - start
        log = getattr(pool, "load_log", None)
        if isinstance(log, list):
            # the pool's own record of each creation; the talker's and token2wav's threads load
            # at once, so each entry is taken once, by whichever wrapper sees it first
            with state.lock:
                seen = state.log_seen.get(id(pool), 0)
                fresh, state.log_seen[id(pool)] = log[seen:], len(log)
            for entry in fresh:
                tracer.record_load({**entry, "source": "load_log"})
        elif not was_loaded:
            tracer.record_load({"graph": name, "seconds": seconds, "bytes": pool.loaded.get(name), "cached": None,
                                "source": "timed get"})
        tracer.record_loaded(pool.loaded)
        return TimedSession(session, name, tracer)

    def ended(release):
        def wrapped(pool, name, *args, **kwargs):
            out = release(pool, name, *args, **kwargs)
            tracer = state.tracer
            if tracer.current == name and name in ("audio_encoder", "vision_encoder"):
                tracer.enter("host")  # the encoder's stage ends when it hands its session back
            tracer.record_loaded(pool.loaded)
            return out
        return wrapped

    bind_generate = _bind(ThinkerGenerator.generate)
    thinker_generate = ThinkerGenerator.generate

    def generate(*args, **kwargs):
        bound = bind_generate(*args, **kwargs)
        on_step = bound.arguments.get("on_step")
        stamps = timeline.setdefault("token_stamps", [])
        tracer = state.tracer

        def stepped(new):
            if not stamps:
                tracer.enter("thinker_decode")
            stamps.append(tracer.now())
            if on_step is not None:
                on_step(new)

        bound.arguments["on_step"] = stepped
        if tracer.current != "thinker_prefill":
            tracer.enter("thinker_prefill")
        try:
            return thinker_generate(*bound.args, **bound.kwargs)
        finally:
            tracer.enter("host")

    speech_run = SpeechPipeline.run

    def run(self, *args, **kwargs):
        state.tracer.enter("speech")
        try:
            return (yield from speech_run(self, *args, **kwargs))
        finally:
            state.tracer.enter("host")

    bind_talk = _bind(Talker.generate)
    talker_generate = Talker.generate

    def talk(*args, **kwargs):
        bound = bind_talk(*args, **kwargs)
        on_codes = bound.arguments.get("on_codes")
        tracer = state.tracer
        stamps = timeline.setdefault("code_stamps", [])

        def coded(new):
            stamps.append(tracer.now())
            if on_codes is not None:
                on_codes(new)

        bound.arguments["on_codes"] = coded
        timeline["talker_start"] = tracer.now()
        try:
            return talker_generate(*bound.args, **bound.kwargs)
        finally:
            timeline["talker_end"] = tracer.now()

    SessionPool.get, SessionPool.release = timed_get, ended(release)
    if hasattr(SessionPool, "done"):  # the memory policies' "stage is done with it" (helper C)
        SessionPool.done = ended(SessionPool.done)
    ThinkerGenerator.generate = generate
    SpeechPipeline.run = run
    Talker.generate = talk


def device_peak_bytes() -> int | None:
    """Peak device memory from ``omni_runtime.bundle.device`` (NVML), None without a GPU or that module."""
    try:
        from omni_runtime.bundle import device
    except ImportError:
        return None
    for name in ("peak_device_memory", "peak_device_bytes", "device_peak_bytes"):
        fn = getattr(device, name, None)
        if callable(fn):
            try:
                value = fn()
            except Exception:  # NVML errors of any kind: no figure rather than no benchmark
                return None
            return int(value) if isinstance(value, (int, float)) else None
    return None


def make_runner(spec: dict):
    """``OmniRunner`` with the spec's memory policy when this runtime takes one (``memory=``)."""
    from omni_runtime.runner import OmniRunner

    kwargs = {"device": spec["device"], "threads": spec["threads"]}
    applied = "memory" in inspect.signature(OmniRunner).parameters
    if applied:
        kwargs["memory"] = spec["memory"]
    return OmniRunner(spec["bundle"], **kwargs), applied


def token2wav_alone(runner, state: _State, codes: list[int], speaker: str, noise_seed: int) -> dict:
    """token2wav streamed (the bundle's stream solver, default steps) on ``codes``, alone, sessions
    loaded first: its seconds, first chunk and per-graph run time."""
    from omni_runtime.bundle.names import TOKEN2WAV_BIGVGAN, TOKEN2WAV_DIT

    t2w = runner.speech_pipeline().token2wav
    tracer = state.tracer = Tracer()
    tracer.enter("token2wav_alone")
    runner.pool.get(TOKEN2WAV_DIT)
    runner.pool.get(TOKEN2WAV_BIGVGAN)
    first, samples = None, 0
    start = time.perf_counter()
    for pcm, _ in t2w.stream(codes, speaker, seed=noise_seed):
        first = first if first is not None else time.perf_counter() - start
        samples += len(pcm)
    seconds = time.perf_counter() - start
    tracer.finish()
    runs = tracer.segments[0].graph_runs
    audio = samples / t2w.sample_rate
    return {"seconds": seconds, "first_chunk_seconds": first, "audio_seconds": audio,
            "rtf": seconds / audio if audio else None, "solver": t2w.ode.stream_solver, "steps": t2w.ode.steps,
            "graph_runs": runs}


def measure(spec: dict) -> dict:
    """Answer the spec's request once, measured; the JSON-ready record of this process."""
    state = _State()
    timeline: dict = {}
    tracer = state.tracer = Tracer()
    tracer.enter("setup")
    fds_start = open_fds()
    instrument(state, timeline)
    runner, applied = make_runner(spec)
    if spec["ignore_eos"]:
        runner.thinker.eos_ids = np.array([], dtype=np.int64)  # exactly max_new_tokens, as PyTorch's min_new_tokens
    request = build_request(spec, runner)
    audio_stamps: list[float] = []
    tracer.enter("prepare")
    chat_start = tracer.now()
    result = runner.chat(request, on_audio=(lambda pcm, last: audio_stamps.append(tracer.now()))
                         if spec["speech"] else None)
    chat_end = tracer.now()
    tracer.finish()
    record = {
        "side": "runtime",
        "providers": list(runner.pool.providers),
        "memory_policy": spec["memory"],
        "memory_policy_applied": applied,
        "chat_start": chat_start,
        "chat_end": chat_end,
        "prompt_tokens": len(result.prompt_ids),
        "new_tokens": len(result.token_ids),
        "finish_reason": result.finish_reason,
        "media": result.media,
        "token_stamps": timeline.get("token_stamps", []),
        "trace": tracer.to_json(),
        "peak_rss_bytes": tracer.peak_rss_bytes,
        "peak_device_bytes": device_peak_bytes(),
        "open_fds": {"start": fds_start, "end": open_fds()},
        "loaded_after": list(runner.pool.loaded),
    }
    if spec["speech"]:
        codes = list(result.codes or [])
        record.update({
            "codes": len(codes),
            "audio_seconds": result.audio_seconds,
            "speech_finish_reason": result.speech_finish_reason,
            "first_audio_seconds": result.first_audio_seconds,  # the runtime's own, from prepare()
            "first_audio_stamp": audio_stamps[0] if audio_stamps else None,
            "audio_chunks": len(audio_stamps),
            "talker_start": timeline.get("talker_start"),
            "talker_end": timeline.get("talker_end"),
            "code_stamps_first_last": (timeline["code_stamps"][0], timeline["code_stamps"][-1])
            if timeline.get("code_stamps") else None,
        })
        if codes:
            record["token2wav_alone"] = token2wav_alone(runner, state, codes, result.speaker, spec["noise_seed"])
    return record


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    from omni_runtime.errors import InputError

    try:
        record = measure(spec)
    except InputError as exc:  # the request itself is bad: the parent says so once (driver._input_error)
        print(json.dumps({"input_error": {"problem": exc.problem, "path": exc.path, "fix": exc.fix}}))
        return 2
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
