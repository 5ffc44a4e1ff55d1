"""``omni-runtime serve --ray``: the same app as a Ray Serve deployment, 2 replicas on a local Ray
instance; concurrent requests all succeed with the answers of the single process, and both
replicas serve."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from omni_runtime.request import ChatRequest  # noqa: E402
from omni_runtime.runner import OmniRunner  # noqa: E402

PROMPTS = ["Hello", "Tell me about the sea.", "Hi", "What is two plus two?"]
NEW = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_server(tiny_bundle):
    from omni_runtime.server.ray_app import serve_ray

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:
        serve_ray(tiny_bundle, host="127.0.0.1", port=port, replicas=2, num_cpus=0.5, blocking=False,
                  workers=1, memory="resident", model_id="tiny")
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "Ray Serve did not come up"
            time.sleep(0.5)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_as_the_single_process(ray_server, tiny_bundle):
    runner = OmniRunner(tiny_bundle)
    greedy = runner.default_sampling().__class__(do_sample=False)
    expected = {p: runner.chat(ChatRequest(messages=[{"role": "user", "content": p}], max_new_tokens=NEW,
                                           sampling=greedy)).text for p in PROMPTS}
    client = openai.OpenAI(base_url=ray_server + "/v1", api_key="none", max_retries=0, timeout=120)

    def ask(prompt):
        answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=NEW, temperature=0)
        return prompt, answer.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, PROMPTS * 3))
    assert len(answers) == 12
    for prompt, text in answers:
        assert text == expected[prompt]
    # streamed through Ray's proxy too
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=NEW, temperature=0, stream=True)
        if c.choices]
    assert "".join(pieces) == expected["Hello"]
    pids = {httpx.get(ray_server + "/health").json()["pid"] for _ in range(40)}
    assert len(pids) == 2  # both replicas serve
