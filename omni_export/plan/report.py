"""``omni-export plan``'s output: the per-stage table (rich) and the JSON."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from omni_export.plan.constants import GB
from omni_export.plan.memory import Plan

TERMS = (("weights", "weights_bytes"), ("KV", "kv_bytes"), ("activations", "activations_bytes"),
         ("arena", "arena_bytes"), ("host", "host_bytes"), ("base", "base_bytes"), ("load", "load_bytes"))


def _gb(n: float) -> str:
    return f"{n / GB:.2f}"


def print_plan(plan: Plan, out: Console) -> None:
    data = plan.to_json()
    media = data["media"]
    request = data["request"]
    parts = []
    if request["audio_seconds"]:
        parts.append(f"{request['audio_seconds']:g} s audio")
    for w, h in request["images"]:
        parts.append(f"{w}x{h} image")
    if request["video_seconds"]:
        w, h = request["video_size"]
        parts.append(f"{request['video_seconds']:g} s video {w}x{h} with its audio")
    ctx = data["context"]
    out.print(f"plan: {data['model']}, recipe {data['recipe']}, target {data['target']}, memory "
              f"{data['memory_policy']}; {' + '.join(parts) or 'text'} in, "
              f"{'speech' if 'talker_codes' in ctx else 'text'} out")
    out.print(f"prompt {ctx['prompt_tokens']} tokens (audio {media['audio_tokens']}, images {media['image_tokens']}, "
              f"video {media['video_tokens']}; {media['vision_patches']} vision patches) + {ctx['max_new_tokens']} "
              f"answer tokens" + (f" + {ctx['talker_codes']} talker codes" if "talker_codes" in ctx else ""))
    where = "device" if plan.target == "cuda" else "RSS"
    table = Table(title=f"peak {where} per stage, GB")
    table.add_column("stage")
    table.add_column("sessions", overflow="fold")
    for label, _ in TERMS:
        table.add_column(label, justify="right")
    table.add_column("peak", justify="right")
    for s in data["stages"]:
        style = "bold" if s["name"] == data["peak_stage"] else None
        table.add_row(s["name"], ", ".join(s["graphs"]), *(_gb(s[key]) for _, key in TERMS), _gb(s["peak_bytes"]),
                      style=style)
    out.print(table)
    verdict = Text("fits", style="green") if data["fits"] else Text("does not fit", style="bold red")
    out.print(Text.assemble(f"peak {_gb(data['peak_bytes'])} GB ({data['peak_stage']}) in "
                            f"{_gb(data['device_memory_bytes'])} GB ({data['device_memory_source']}): ", verdict))
    if plan.target == "cuda":
        out.print(f"host RAM peak {_gb(data['host_peak_bytes'])} GB (runtime, numpy arrays)")
    for note in data["notes"]:
        out.print(Text.assemble(("note: ", "yellow"), note))
