"""The same app as a Ray Serve deployment (the ``omni-runtime[ray]`` extra).

    omni-runtime serve BUNDLE --ray --replicas 2 [--num-gpus 1] [--ray-address auto]
    # or, with a config file (docs/server.md):  serve run serve_config.yaml
    #   applications:
    #   - name: omni
    #     import_path: omni_runtime.server.ray_app:app_builder
    #     args: {bundle: /models/bundle, replicas: 2, num_gpus: 1, workers: 1, memory: resident}

Each replica loads the bundle once and runs ``main.build_app`` (its own engine, workers and
queue); Ray's proxy spreads requests over the replicas and places them on the cluster's
machines (``num_gpus`` per replica: one replica per GPU). ``autoscaling`` takes Ray Serve's
``autoscaling_config`` (``min_replicas``, ``max_replicas``, ``target_ongoing_requests``, ...)
instead of a fixed ``replicas``.
"""

from __future__ import annotations

import os
from pathlib import Path

#: build_app options a replica takes
APP_OPTIONS = ("memory", "device", "threads", "workers", "max_queue", "api_key", "media_dir", "max_body_mb",
               "max_speech_seconds", "model_id")


class OmniReplica:
    """One replica: its app is built on the replica (``__serve_build_asgi_app__``), not pickled."""

    def __init__(self, bundle: str, options: dict):
        self.bundle = bundle
        self.options = options

    def __serve_build_asgi_app__(self):
        from omni_runtime.server.main import build_app

        return build_app(self.bundle, **self.options)


def deployment(bundle, *, replicas: int = 1, num_gpus: float = 0, num_cpus: float = 1,
               autoscaling: dict | None = None, max_ongoing_requests: int | None = None, **options):
    """The bound Ray Serve application serving ``bundle`` (``serve.run(deployment(...))``)."""
    from ray import serve

    unknown = sorted(set(options) - set(APP_OPTIONS))
    if unknown:
        raise TypeError(f"unknown option {unknown[0]!r}")
    bundle = str(Path(bundle).resolve())
    model_id = options.pop("model_id", None) or Path(bundle).name
    actor = {"num_cpus": num_cpus}
    if num_gpus:
        actor["num_gpus"] = num_gpus
    workers = int(options.get("workers", 1))
    settings = dict(name="omni", ray_actor_options=actor,
                    max_ongoing_requests=max_ongoing_requests or workers + int(options.get("max_queue", 16)))
    if autoscaling:
        settings["autoscaling_config"] = dict(autoscaling)
    else:
        settings["num_replicas"] = int(replicas)
    cls = serve.deployment(**settings)(serve.ingress()(OmniReplica))
    return cls.bind(bundle, {**options, "model_id": model_id})


def app_builder(args: dict):
    """``serve run`` / config-file entry: ``args`` are ``deployment``'s keyword arguments (``bundle`` required)."""
    args = dict(args)
    return deployment(args.pop("bundle"), **args)


def serve_ray(bundle, *, host: str, port: int, address: str | None = None, blocking: bool = True, **kwargs):
    """Start (or join, ``address``) a Ray cluster and run the deployment on ``host:port``."""
    import ray
    from ray import serve

    ray.init(address=address or os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(bundle, **kwargs), name="omni", route_prefix="/", blocking=blocking)
