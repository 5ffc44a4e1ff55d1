"""Prometheus text exposition of the server's counters (no client library needed)."""

from __future__ import annotations

import threading

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self):
        self.counts = [0] * len(BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(BUCKETS, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.total}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.total}"]
        return out


class Metrics:
    """Requests by status, tokens, time to first token / first audio, queue depth, loaded sessions."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram()
        self.first_audio = Histogram()

    def request(self, status: int) -> None:
        with self._lock:
            self.requests[str(status)] = self.requests.get(str(status), 0) + 1

    def tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_first_audio(self, seconds: float) -> None:
        with self._lock:
            self.first_audio.observe(seconds)

    def render(self, queued: int, running: int, loaded: dict[str, int]) -> str:
        with self._lock:
            lines = ["# HELP omni_requests_total Chat completion requests answered, by HTTP status.",
                     "# TYPE omni_requests_total counter"]
            lines += [f'omni_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            lines += ["# HELP omni_prompt_tokens_total Prompt tokens processed.", "# TYPE omni_prompt_tokens_total counter",
                      f"omni_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP omni_completion_tokens_total Tokens generated.",
                      "# TYPE omni_completion_tokens_total counter",
                      f"omni_completion_tokens_total {self.completion_tokens}",
                      "# HELP omni_time_to_first_token_seconds Seconds from request to first text token.",
                      "# TYPE omni_time_to_first_token_seconds histogram"]
            lines += self.ttft.lines("omni_time_to_first_token_seconds")
            lines += ["# HELP omni_time_to_first_audio_seconds Seconds from request to first audio chunk.",
                      "# TYPE omni_time_to_first_audio_seconds histogram"]
            lines += self.first_audio.lines("omni_time_to_first_audio_seconds")
        lines += ["# HELP omni_queue_depth Requests waiting for a worker.", "# TYPE omni_queue_depth gauge",
                  f"omni_queue_depth {queued}",
                  "# HELP omni_running_requests Requests being generated.", "# TYPE omni_running_requests gauge",
                  f"omni_running_requests {running}",
                  "# HELP omni_loaded_sessions onnxruntime sessions loaded.", "# TYPE omni_loaded_sessions gauge",
                  f"omni_loaded_sessions {len(loaded)}",
                  "# HELP omni_loaded_session_bytes File bytes of the loaded sessions' graphs.",
                  "# TYPE omni_loaded_session_bytes gauge", f"omni_loaded_session_bytes {sum(loaded.values())}"]
        lines += [f'omni_loaded_session_bytes_by_graph{{graph="{g}"}} {b}' for g, b in loaded.items()]
        return "\n".join(lines) + "\n"
