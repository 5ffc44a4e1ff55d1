"""``omni-runtime serve``: the OpenAI-compatible server, tested with the real ``openai`` client.

* Text (non-streamed and streamed) equals ``omni-runtime run --greedy --json`` token for token.
* Streamed speech: the PCM16 chunks joined equal the runtime's streamed waveform within 1 LSB
  (greedy, same noise seed); non-streamed ``message.audio.data`` is the whole WAV of the
  runtime's unstreamed waveform.
* Images and audio in (data URLs, base64 input_audio, a path under --media-dir) answer as the
  runtime does with the same bytes.
* Every bad request gets the OpenAI error body and status, and the server keeps serving.
* The engine: a full queue is 429 with Retry-After; a disconnected client cancels its generation.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import wave
from dataclasses import replace

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from omni_runtime.request import ChatRequest  # noqa: E402
from omni_runtime.runner import OmniRunner  # noqa: E402

KEY = "test-key-123"
NEW = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread on a free port."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("media")
    (path / "photo.png").write_bytes(png(64, 64))
    return path


@pytest.fixture(scope="module")
def server(tiny_bundle, media_dir):
    from omni_runtime.server.main import build_app

    app = build_app(tiny_bundle, workers=2, api_key=KEY, media_dir=media_dir, max_body_mb=1.0,
                    max_speech_seconds=2.0, model_id="tiny")
    srv = Server(app)
    srv.app = app
    yield srv
    srv.stop()
    app.state.engine.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def runner(tiny_bundle):
    return OmniRunner(tiny_bundle)


def png(width: int, height: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def wav_of(seconds: float = 1.0, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return out.getvalue()


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def pcm16(audio: np.ndarray) -> np.ndarray:
    return (np.clip(audio, -1, 1) * 32767.0).round().astype(np.int16)


def greedy(runner, request: ChatRequest, speech: bool = False) -> ChatRequest:
    changes = {"sampling": replace(runner.default_sampling(), do_sample=False)}
    if speech:
        changes["talker_sampling"] = runner.default_talker_sampling(False)
    return replace(request, **changes)


# -- text ---------------------------------------------------------------------------------------

def test_text_equals_run_token_for_token(server, client, tiny_bundle, runner):
    run = subprocess.run([sys.executable, "-m", "omni_runtime.cli", "run", str(tiny_bundle), "--prompt", "Hello",
                          "--greedy", "--json", "--max-new-tokens", str(NEW)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    expected = json.loads(run.stdout)

    answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                            max_tokens=NEW, temperature=0)
    assert answer.choices[0].message.content == expected["text"]
    assert answer.usage.completion_tokens == len(expected["token_ids"])
    assert answer.usage.prompt_tokens == len(expected["prompt_ids"])
    assert answer.choices[0].finish_reason == "length"

    # streamed: the same pieces the runtime's on_text gives, one per token
    pieces = []
    runner.chat(greedy(runner, ChatRequest(prompt="Hello", max_new_tokens=NEW)), on_text=pieces.append)
    deltas, usage = [], None
    for chunk in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                                max_completion_tokens=NEW, temperature=0, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            deltas.append(chunk.choices[0].delta.content)
    assert deltas == pieces
    assert "".join(deltas) == expected["text"]
    assert usage.completion_tokens == len(expected["token_ids"])


def test_stop_sequence(client, runner):
    full = runner.chat(greedy(runner, ChatRequest(prompt="Hello", max_new_tokens=NEW))).text
    stop = full.split()[2]
    answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                            max_tokens=NEW, temperature=0, stop=[stop])
    assert answer.choices[0].message.content == full[:full.index(stop)]
    assert answer.choices[0].finish_reason == "stop"


# -- speech -------------------------------------------------------------------------------------

SPEECH = dict(max_new_tokens=4, speech=True, max_speech_seconds=0.5, noise_seed=0)


def test_streamed_speech_equals_runtime_within_one_lsb(client, runner):
    expected = runner.chat(greedy(runner, ChatRequest(messages=[{"role": "user", "content": "Hi"}], stream=True,
                                                      **SPEECH), speech=True))
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0,
        modalities=["text", "audio"], audio={"voice": "Chelsie", "format": "pcm16"}, stream=True,
        extra_body={"max_speech_seconds": 0.5})
    text, chunks, transcript = [], [], []
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if delta.content:
            text.append(delta.content)
        audio = getattr(delta, "audio", None)
        if audio is not None and audio.data:
            chunks.append(np.frombuffer(base64.b64decode(audio.data), dtype="<i2"))
            transcript.append(audio.transcript or "")
    assert "".join(text) == expected.text
    assert "".join(transcript) == expected.text
    assert len(chunks) > 1  # sent chunk by chunk
    got = np.concatenate(chunks).astype(np.int32)
    want = pcm16(expected.audio).astype(np.int32)
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= 1


def test_whole_wav_equals_runtime(client, runner):
    expected = runner.chat(greedy(runner, ChatRequest(messages=[{"role": "user", "content": "Hi"}], stream=False,
                                                      speaker="Ethan", **SPEECH), speech=True))
    answer = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0,
        modalities=["text", "audio"], audio={"voice": "Ethan", "format": "wav"}, extra_body={"max_speech_seconds": 0.5})
    message = answer.choices[0].message
    assert message.content == expected.text
    assert message.audio.transcript == expected.text
    with wave.open(io.BytesIO(base64.b64decode(message.audio.data))) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (expected.sample_rate, 1, 2)
        got = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int32)
    assert np.max(np.abs(got - pcm16(expected.audio).astype(np.int32))) <= 1


def test_speech_seconds_capped_by_server(client):
    answer = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0,
        modalities=["text", "audio"], audio={"voice": "Chelsie", "format": "pcm16"},
        extra_body={"max_speech_seconds": 1000})
    samples = len(base64.b64decode(answer.choices[0].message.audio.data)) // 2
    assert 0 < samples <= 2.0 * 24000 + 24000 * 0.5  # --max-speech-seconds 2 (+ token2wav's last chunk)


# -- media in -----------------------------------------------------------------------------------

def test_image_and_audio_in(client, runner, media_dir):
    image, audio = png(64, 64), wav_of(1.0)
    expected = runner.chat(greedy(runner, ChatRequest(messages=[{"role": "user", "content": [
        {"type": "audio", "audio": audio}, {"type": "image", "image": image},
        {"type": "text", "text": "What is this?"}]}], max_new_tokens=NEW)))
    assert expected.media["image_tokens"] and expected.media["audio_tokens"]
    answer = client.chat.completions.create(model="tiny", max_tokens=NEW, temperature=0, messages=[
        {"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(audio).decode(), "format": "wav"}},
            {"type": "image_url", "image_url": {"url": data_url("image/png", image)}},
            {"type": "text", "text": "What is this?"}]}])
    assert answer.choices[0].message.content == expected.text
    assert answer.usage.prompt_tokens == len(expected.prompt_ids)
    # the same image from --media-dir
    answer = client.chat.completions.create(model="tiny", max_tokens=NEW, temperature=0, messages=[
        {"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(audio).decode(), "format": "wav"}},
            {"type": "image_url", "image_url": {"url": "file://photo.png"}},
            {"type": "text", "text": "What is this?"}]}])
    assert answer.choices[0].message.content == expected.text


# -- bad requests -------------------------------------------------------------------------------

def user(content):
    return [{"role": "user", "content": content}]


BAD = [
    ("unknown model", dict(model="gpt-4o", messages=user("Hi")), openai.NotFoundError, "model", "model_not_found"),
    ("unknown voice", dict(model="tiny", messages=user("Hi"), modalities=["text", "audio"],
                           audio={"voice": "Nobody", "format": "wav"}), openai.BadRequestError, "audio.voice",
     "invalid_value"),
    ("base64 not audio", dict(model="tiny", messages=user([{"type": "input_audio", "input_audio": {
        "data": base64.b64encode(b"this is not audio at all" * 50).decode(), "format": "wav"}}])),
     openai.BadRequestError, None, "invalid_value"),
    ("not base64", dict(model="tiny", messages=user([{"type": "input_audio", "input_audio": {
        "data": "!!!not-base64!!!", "format": "wav"}}])), openai.BadRequestError,
     "messages[0].content[0].input_audio.data", "invalid_value"),
    ("image too small", dict(model="tiny", messages=user([{"type": "image_url", "image_url": {
        "url": data_url("image/png", png(8, 8))}}, {"type": "text", "text": "?"}])), openai.BadRequestError, None,
     "invalid_value"),
    ("max_tokens beyond context", dict(model="tiny", messages=user("Hi"), max_tokens=10**6),
     openai.BadRequestError, "max_tokens", "context_length_exceeded"),
    ("remote url", dict(model="tiny", messages=user([{"type": "image_url", "image_url": {
        "url": "http://example.com/a.png"}}])), openai.BadRequestError, "messages[0].content[0].image_url.url",
     "unsupported_value"),
    ("path outside media dir", dict(model="tiny", messages=user([{"type": "image_url", "image_url": {
        "url": "file://../../../../etc/passwd"}}])), openai.PermissionDeniedError,
     "messages[0].content[0].image_url.url", "path_not_allowed"),
    ("bad temperature", dict(model="tiny", messages=user("Hi"), temperature=5), openai.BadRequestError,
     "temperature", "invalid_value"),
]


@pytest.mark.parametrize("name,kwargs,error,param,code", BAD, ids=[b[0] for b in BAD])
def test_bad_request(client, name, kwargs, error, param, code):
    with pytest.raises(error) as caught:
        client.chat.completions.create(**kwargs)
    body = caught.value.body
    assert set(body) == {"message", "type", "param", "code"}
    assert body["param"] == param and body["code"] == code
    assert "Traceback" not in body["message"] and body["message"]
    # and the server keeps serving
    assert client.chat.completions.create(model="tiny", messages=user("Hi"), max_tokens=1).choices


def test_bad_http(server, client):
    auth = {"Authorization": f"Bearer {KEY}"}
    url = server.url + "/v1/chat/completions"
    r = httpx.post(url, content=b"{not json", headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url, content=b'{"messages": "' + b"x" * (2 * 2**20) + b'"}', headers=auth)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(url, json={"model": "tiny", "messages": user("Hi")}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server.url + "/nope").json()["error"]["type"] == "not_found"
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    metrics = httpx.get(server.url + "/metrics").text
    for name in ("omni_requests_total{status=\"200\"}", "omni_completion_tokens_total", "omni_queue_depth",
                 "omni_time_to_first_token_seconds_count", "omni_time_to_first_audio_seconds_count",
                 "omni_loaded_sessions", "omni_loaded_session_bytes"):
        assert name in metrics


def test_disconnect_cancels_generation(server):
    engine = server.app.state.engine
    before = engine.metrics.completion_tokens
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "messages": user("Hi"), "max_tokens": 30000, "temperature": 0,
                            "stream": True}, timeout=30) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    deadline = time.time() + 20
    while engine.running and time.time() < deadline:
        time.sleep(0.05)
    assert engine.running == 0 and engine.queued == 0
    assert engine.metrics.completion_tokens == before  # never finished


# -- the engine's queue ---------------------------------------------------------------------------

class BlockingRunner:
    """A runner whose chat streams text until released or cancelled."""

    has_speech = False

    def __init__(self):
        self.release = threading.Event()
        self.cancelled = 0

    def default_sampling(self):
        from omni_runtime.stages.sampling import SamplingConfig

        return SamplingConfig()

    def chat(self, request, on_text=None, on_audio=None):
        from omni_runtime.server.engine import Cancelled

        try:
            while not self.release.wait(0.01):
                on_text("x")
        except Cancelled:
            self.cancelled += 1
            raise
        raise RuntimeError("released")


def test_full_queue_is_429_and_cancel_stops(tiny_bundle):
    import asyncio

    from omni_runtime.server.engine import Engine
    from omni_runtime.server.errors import APIError
    from omni_runtime.server.openai_map import parse_call

    fake = BlockingRunner()
    engine = Engine(fake, workers=1, max_queue=1)
    loop = asyncio.new_event_loop()
    try:
        call = parse_call({"messages": user("Hi")}, "tiny")
        first, second = engine.submit(call, loop), engine.submit(call, loop)
        with pytest.raises(APIError) as caught:
            engine.submit(call, loop)
        assert caught.value.status == 429 and caught.value.headers["Retry-After"] == "1"
        assert caught.value.body()["error"]["code"] == "queue_full"
        second.cancel.set()  # cancelled while queued: never runs
        first.cancel.set()
        deadline = time.time() + 10
        while (engine.running or engine.queued) and time.time() < deadline:
            time.sleep(0.01)
        assert fake.cancelled == 1 and engine.running == 0 and engine.queued == 0
        engine.submit(call, loop).cancel.set()  # room again
    finally:
        fake.release.set()
        engine.shutdown()
        loop.close()


def test_serve_cli_errors(tiny_bundle):
    env = {**os.environ}
    r = subprocess.run([sys.executable, "-m", "omni_runtime.cli", "serve", str(tiny_bundle), "--workers", "0"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "--workers must be >= 1" in r.stderr and "Traceback" not in r.stderr


def test_concurrent_requests_share_one_pool(client, runner):
    """4 clients at once on 2 workers over one session pool (lazy policy): each gets its greedy answer."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = ["Hello", "Hi", "Tell me about the sea.", "What is two plus two?"]
    expected = {p: runner.chat(greedy(runner, ChatRequest(prompt=p, max_new_tokens=NEW))).text for p in prompts}

    def ask(prompt):
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="tiny", messages=user(prompt), max_tokens=NEW, temperature=0, stream=True) if c.choices]
        return prompt, "".join(pieces)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, prompts * 2))
    assert [text for _, text in answers] == [expected[p] for p, _ in answers]


def test_serve_command_end_to_end(tiny_bundle, tmp_path):
    """The real entry point: `omni-runtime serve` in a subprocess, one request, one log line per request."""
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "omni_runtime.cli", "serve", str(tiny_bundle), "--port",
                                 str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMNI_API_KEY": KEY})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        answer = c.chat.completions.create(model=tiny_bundle.name, messages=user("Hello"), max_tokens=2,
                                           temperature=0)
        assert answer.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):  # the key came from OMNI_API_KEY
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(20)
    lines = [line for line in log.read_text().splitlines() if "omni_runtime.server" in line]
    assert [line.split()[4:7] for line in lines if "/v1/" in line] == [
        ["POST", "/v1/chat/completions", "200"], ["GET", "/v1/models", "401"]]
    assert "Traceback" not in log.read_text()


def test_video_in_with_its_audio(client, runner, tmp_path):
    from omni_export.testkit.media import write_video

    t = np.arange(32000) / 16000
    video = write_video(tmp_path / "clip.mp4", seconds=2.0, fps=4, size=(64, 64),
                        audio=(0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)).read_bytes()
    expected = runner.chat(greedy(runner, ChatRequest(messages=[{"role": "user", "content": [
        {"type": "video", "video": video}, {"type": "text", "text": "What happens?"}]}], use_audio_in_video=True,
        max_new_tokens=NEW)))
    assert expected.media["video_tokens"] and expected.media["video_audio_tokens"]
    answer = client.chat.completions.create(model="tiny", max_tokens=NEW, temperature=0, messages=[
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": data_url("video/mp4", video)}},
                                     {"type": "text", "text": "What happens?"}]}],
        extra_body={"use_audio_in_video": True})
    assert answer.choices[0].message.content == expected.text
    assert answer.usage.prompt_tokens == len(expected.prompt_ids)
