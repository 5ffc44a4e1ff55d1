"""``omni-runtime serve``: an OpenAI-compatible chat-completions server over one bundle.

    omni-runtime serve BUNDLE [--host 127.0.0.1] [--port 8000] [--memory P] [--device D]
                       [--workers N] [--max-queue N] [--api-key KEY | env OMNI_API_KEY]
                       [--media-dir DIR] [--max-body-mb N] [--max-speech-seconds S]

Modules, one job each: ``errors`` (the OpenAI error body), ``openai_map`` (an OpenAI request
body -> ``ChatRequest``), ``engine`` (N worker threads over one ``OmniRunner`` and its session
pool, a bounded queue, cancellation), ``metrics`` (Prometheus text), ``app`` (the FastAPI
routes, SSE, auth, body limit, one log line per request) and ``main`` (the command line).
Needs the ``omni-runtime[serve]`` extra (fastapi, uvicorn); no torch. See docs/server.md.
"""
