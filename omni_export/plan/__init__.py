"""``omni-export plan``: peak memory per stage of one request, from the model's config.json alone.

- ``config``: the shapes of config.json, torch-free (a directory holding only config.json works);
- ``params``: the tensors of every graph of a bundle (per module) and their bytes per precision;
- ``media``: the request's token and patch counts, by the runtime's own rules;
- ``memory``: the stage model (weights under the session policy, KV cache, activations, arena,
  host arrays, the runtime's base);
- ``report``: the table;
- ``constants``: every constant of the model and where it comes from.

``make_plan(...)`` takes the command line's values (strings for sizes) and returns a
``memory.Plan`` (``plan.to_json()`` is ``--json``'s output); every bad value is a ``PlanError``.
"""

from __future__ import annotations

import math
import re

from omni_export.plan.config import PlanError, read_model
from omni_export.plan.constants import DEFAULT_VIDEO_SIZE
from omni_export.plan.memory import (BundleRecipe, Plan, Request, load_plan_recipe, parse_bytes, parse_policy,
                                     plan)

__all__ = ["Plan", "PlanError", "Request", "make_plan", "parse_bytes", "parse_size"]


def parse_size(text: str, flag: str) -> tuple[int, int]:
    """``1280x720`` -> (1280, 720); PlanError naming ``flag`` otherwise."""
    match = re.fullmatch(r"\s*([0-9]+)\s*[xX]\s*([0-9]+)\s*", str(text))
    if match is None or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise PlanError(f"{flag} {text!r} is not WIDTHxHEIGHT", param=flag, fix=f"write e.g. {flag} 1280x720")
    return int(match.group(1)), int(match.group(2))


def _seconds(value: float | None, flag: str, allow_zero: bool = True) -> float | None:
    if value is None:
        return None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise PlanError(f"{flag} {value:g} must be a {'non-negative' if allow_zero else 'positive'} number of "
                        "seconds", param=flag, fix=f"e.g. {flag} 15")
    return float(value)


def make_plan(model: str, recipe: str, target: str | None = None, video_seconds: float = 0.0,
              video_size: str | None = None, audio_seconds: float = 0.0, images: list[str] | None = None,
              device_memory: str | None = None, memory: str = "lazy", max_new_tokens: int | None = None,
              max_speech_seconds: float | None = None, speech: bool = True) -> Plan:
    """The plan of the command line's values (``omni-export plan``)."""
    if target is not None and target not in ("cpu", "cuda"):
        raise PlanError(f"--target {target!r} is not a target", param="--target", fix="use cpu or cuda")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise PlanError(f"--max-new-tokens {max_new_tokens} must be at least 1", param="--max-new-tokens",
                        fix="e.g. --max-new-tokens 512")
    request = Request(video_seconds=_seconds(video_seconds, "--video-seconds") or 0.0,
                      video_size=parse_size(video_size, "--video-size") if video_size else DEFAULT_VIDEO_SIZE,
                      audio_seconds=_seconds(audio_seconds, "--audio-seconds") or 0.0,
                      images=tuple(parse_size(i, "--image") for i in images or ()), speech=speech,
                      max_new_tokens=max_new_tokens,
                      max_speech_seconds=_seconds(max_speech_seconds, "--max-speech-seconds", allow_zero=False))
    policy = parse_policy(memory)
    capacity = parse_bytes(device_memory, "--device-memory") if device_memory is not None else None
    shape = read_model(model)
    resolved = load_plan_recipe(recipe, target or "cpu")
    notes = []
    if isinstance(resolved, BundleRecipe):
        if target is not None and target != resolved.target:
            notes.append(f"the bundle was built for {resolved.target}: planned for {resolved.target}, not {target}")
        target = resolved.target
    result = plan(shape, resolved, target or "cpu", request, policy, capacity)
    result.notes = notes + result.notes
    return result
