"""``omni-runtime serve BUNDLE ...``: parse the options, load the bundle, run uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from omni_runtime.errors import InputError

SERVE_DESCRIPTION = "Serve a bundle over an OpenAI-compatible HTTP API (chat completions with streamed text and speech)."


def serve_parser(prog: str = "omni-runtime serve") -> argparse.ArgumentParser:
    from omni_runtime.bundle.sessions import DEVICES
    from omni_runtime.cli import _Parser

    p = _Parser(prog=prog, description=SERVE_DESCRIPTION, allow_abbrev=False)
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory (with manifest.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--memory", metavar="POLICY", default="lazy",
                   help="session memory policy: lazy, resident or a byte budget such as 6GB (default: lazy)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--workers", type=int, default=1, help="requests generated at once (default: 1)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests waiting beyond the workers before 429 Too Many Requests (default: 16)")
    p.add_argument("--api-key", metavar="KEY", default=None,
                   help="require Authorization: Bearer KEY (default: env OMNI_API_KEY; none: no auth)")
    p.add_argument("--media-dir", metavar="DIR", default=None,
                   help="allow local media paths (file:// or plain) under DIR; otherwise only data URLs")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body in MB (default: 64)")
    p.add_argument("--max-speech-seconds", type=float, default=None, metavar="S",
                   help="server-wide cap on seconds of speech per answer (default: none)")
    p.add_argument("--model-id", default=None, help="model name to answer to (default: the bundle dir's name)")
    p.add_argument("--log-level", default="info", help="log level (default: info)")
    ray = p.add_argument_group("Ray Serve (needs omni-runtime[ray])")
    ray.add_argument("--ray", action="store_true", help="serve as a Ray Serve deployment (replicas on a Ray cluster)")
    ray.add_argument("--replicas", type=int, default=1, help="replicas of the deployment (default: 1)")
    ray.add_argument("--num-gpus", type=float, default=0, help="GPUs per replica (1: one replica per GPU)")
    ray.add_argument("--num-cpus", type=float, default=1, help="CPUs per replica (default: 1)")
    ray.add_argument("--ray-address", default=None, help="Ray cluster to join (default: env RAY_ADDRESS, or a local one)")
    return p


def build_app(bundle, *, memory="lazy", device="auto", threads=0, workers=1, max_queue=16, api_key=None,
              media_dir=None, max_body_mb=64.0, max_speech_seconds=None, model_id=None):
    """The FastAPI app serving ``bundle`` (the runner is loaded here)."""
    from omni_runtime.runner import OmniRunner
    from omni_runtime.server.app import ServerConfig, create_app
    from omni_runtime.server.engine import Engine

    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}", fix="pass --workers 1 or more", param="workers")
    if max_queue < 0:
        raise InputError(f"--max-queue must be >= 0, got {max_queue}", fix="pass --max-queue 0 or more")
    if media_dir is not None and not Path(media_dir).is_dir():
        raise InputError("the media directory does not exist", path=media_dir, fix="pass an existing --media-dir")
    if max_speech_seconds is not None and not max_speech_seconds > 0:
        raise InputError("--max-speech-seconds must be > 0", fix="pass e.g. --max-speech-seconds 30")
    runner = OmniRunner(bundle, device=device, threads=threads, memory=memory)
    config = ServerConfig(model_id=model_id or Path(bundle).resolve().name, api_key=api_key or None,
                          media_dir=None if media_dir is None else Path(media_dir),
                          max_body_bytes=int(max_body_mb * 2**20), max_speech_seconds=max_speech_seconds)
    return create_app(Engine(runner, workers, max_queue), config)


def serve_main(argv: list[str], prog: str = "omni-runtime serve") -> int:
    from omni_runtime.cli import _guarded, _UsageError, print_error

    try:
        args = serve_parser(prog).parse_args(argv)
    except _UsageError as exc:
        print_error(f"{exc}\n  fix: see `{prog} --help`")
        return 2

    def run():
        try:
            import uvicorn
        except ImportError:
            raise InputError("the server needs fastapi and uvicorn", fix="pip install 'omni-runtime[serve]'") from None
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s",
                            stream=sys.stderr)
        if args.ray:
            try:
                from omni_runtime.server.ray_app import serve_ray
                import ray  # noqa: F401
            except ImportError:
                raise InputError("--ray needs Ray Serve", fix="pip install 'omni-runtime[ray]'") from None
            if args.replicas < 1:
                raise InputError(f"--replicas must be >= 1, got {args.replicas}", fix="pass --replicas 1 or more")
            serve_ray(args.bundle, host=args.host, port=args.port, address=args.ray_address, replicas=args.replicas,
                      num_gpus=args.num_gpus, num_cpus=args.num_cpus, memory=args.memory, device=args.device,
                      threads=args.threads, workers=args.workers, max_queue=args.max_queue,
                      api_key=args.api_key or os.environ.get("OMNI_API_KEY"), media_dir=args.media_dir,
                      max_body_mb=args.max_body_mb, max_speech_seconds=args.max_speech_seconds,
                      model_id=args.model_id)
            return
        app = build_app(args.bundle, memory=args.memory, device=args.device, threads=args.threads,
                        workers=args.workers, max_queue=args.max_queue,
                        api_key=args.api_key or os.environ.get("OMNI_API_KEY"), media_dir=args.media_dir,
                        max_body_mb=args.max_body_mb, max_speech_seconds=args.max_speech_seconds,
                        model_id=args.model_id)
        uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level=args.log_level)

    return _guarded(run)
