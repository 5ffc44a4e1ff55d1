"""From the repeats' records to the figures: per stage and per request, medians with their range.

``figures(record)`` turns one process's record (``runtime_side`` / ``pytorch_side``) into its
per-stage and per-request figures; ``summarize_side`` gives each figure over the repeats as
``{"median", "min", "max", "runs"}``; ``result`` assembles the JSON ``omni-export bench``
writes (its fields: docs/bench.md); ``print_tables`` prints it with rich.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from omni_export.bench import STAGES

T2W_GRAPHS = ("token2wav_dit", "token2wav_bigvgan")
LAZY_MARGIN = 0.15  # the target: lazy peak <= (largest stage + KV) * 1.15


def summarize(values: Sequence[float | None]) -> dict | None:
    """``{median, min, max, runs}`` of the values that are not None; None when there are none."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {"median": statistics.median(present), "min": min(present), "max": max(present), "runs": list(present)}


def _median(summary: dict | None):
    return None if summary is None else summary["median"]


def _ratio(a, b):
    return a / b if a is not None and b else None


def _stage_segments(record: dict) -> dict[str, dict]:
    """Segments merged by name: seconds summed, peak RSS max, loads and graph runs joined."""
    merged: dict[str, dict] = {}
    for seg in record["trace"]["segments"]:
        m = merged.setdefault(seg["name"], {"seconds": 0.0, "peak_rss_bytes": None, "loads": [], "graph_runs": {},
                                            "loaded_bytes_max": 0, "loaded_graphs": [], "start": seg["start"]})
        m["seconds"] += seg["seconds"]
        if seg["peak_rss_bytes"] is not None:
            m["peak_rss_bytes"] = max(m["peak_rss_bytes"] or 0, seg["peak_rss_bytes"])
        m["loads"] += seg["loads"]
        for graph, run in seg["graph_runs"].items():
            r = m["graph_runs"].setdefault(graph, {"seconds": 0.0, "calls": 0})
            r["seconds"] += run["seconds"]
            r["calls"] += run["calls"]
        if seg["loaded_bytes_max"] >= m["loaded_bytes_max"]:
            m["loaded_bytes_max"], m["loaded_graphs"] = seg["loaded_bytes_max"], seg["loaded_graphs"]
    return merged


def figures(record: dict) -> dict:
    """One process's figures: ``{"request": {...}, "stages": {name: {...}}}`` (seconds, bytes)."""
    segs = _stage_segments(record)
    start = record["chat_start"]
    stamps = record.get("token_stamps") or []
    media = record.get("media") or {}
    stages: dict[str, dict] = {}
    for name in STAGES:
        seg = segs.get(name)
        if seg is None:
            continue
        load = sum(entry.get("seconds") or 0.0 for entry in seg["loads"])
        out = {"seconds": seg["seconds"], "session_load_seconds": load, "peak_rss_bytes": seg["peak_rss_bytes"],
               # sorted: the talker's and token2wav's threads load in either order (the raw trace keeps it)
               "sessions_loaded": sorted({entry["graph"] for entry in seg["loads"]}),
               "loaded_bytes": seg["loaded_bytes_max"] or None, "loaded_graphs": sorted(seg["loaded_graphs"]),
               "graph_seconds": {g: r["seconds"] for g, r in seg["graph_runs"].items()}}
        compute = seg["seconds"] - load
        if name == "audio_encoder":
            out["tokens"] = sum(media.get("audio_tokens") or []) + sum(t or 0 for t in media.get("video_audio_tokens") or [])
        elif name == "vision_encoder":
            out["tokens"] = sum(media.get("image_tokens") or []) + sum(media.get("video_tokens") or [])
        elif name == "thinker_prefill":
            out["tokens"] = record["prompt_tokens"]
            out["time_to_first_token_seconds"] = stamps[0] - start if stamps else None
        elif name == "thinker_decode":
            out["tokens"] = max(len(stamps) - 1, 0)
        if name == "thinker_decode":
            span = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
            out["tokens_per_second"] = out["tokens"] / span if span > 0 else None
        elif "tokens" in out:
            out["tokens_per_second"] = out["tokens"] / compute if compute > 0 and out["tokens"] else None
        if name == "speech":
            out.update(_speech(record, seg))
        stages[name] = out
    request = {
        "request_seconds": record["chat_end"] - start,
        "time_to_first_token_seconds": stamps[0] - start if stamps else None,
        "peak_rss_bytes": record.get("peak_rss_bytes"),
        "peak_device_bytes": record.get("peak_device_bytes"),
        "prompt_tokens": record["prompt_tokens"],
        "new_tokens": record["new_tokens"],
        "setup_seconds": segs["setup"]["seconds"] if "setup" in segs else None,
        # the process before any request work: interpreter, libraries, the loaded manifest/tokenizer
        "base_rss_bytes": _first_rss(record, "prepare"),
        "prepare_seconds": segs["prepare"]["seconds"] if "prepare" in segs else None,
        "session_load_seconds": sum(s["session_load_seconds"] for s in stages.values()),
        "setup_session_load_seconds": sum(e.get("seconds") or 0.0 for e in segs.get("setup", {}).get("loads", [])),
    }
    request["session_load_fraction"] = _ratio(request["session_load_seconds"], request["request_seconds"])
    if "speech" in stages:
        sp = stages["speech"]
        request.update(first_audio_seconds=sp["first_audio_seconds"], token2wav_rtf=sp["token2wav_rtf"],
                       audio_seconds=sp["audio_seconds"], codes=sp["codes"],
                       first_audio_before_talker_end=sp["first_audio_before_talker_end"])
    alone = record.get("token2wav_alone")
    if alone:
        request["token2wav_alone"] = {"seconds": alone["seconds"], "rtf": alone["rtf"],
                                      "first_chunk_seconds": alone.get("first_chunk_seconds"),
                                      "solver": alone["solver"], "steps": alone["steps"],
                                      "graph_seconds": {g: r["seconds"] for g, r in alone["graph_runs"].items()}}
    return {"request": request, "stages": stages}


def _first_rss(record: dict, name: str) -> int | None:
    for seg in record["trace"]["segments"]:
        if seg["name"] == name:
            return seg["rss_start_bytes"]
    return None


def _speech(record: dict, seg: dict) -> dict:
    start = record["chat_start"]
    audio = record.get("audio_seconds") or 0.0
    first = record.get("first_audio_stamp")
    talker = (record.get("talker_end") or 0.0) - (record.get("talker_start") or 0.0)
    if record["side"] == "runtime":
        # token2wav's own time inside the request: its two graphs' runs (it shares the cores with the talker)
        t2w = sum(seg["graph_runs"].get(g, {}).get("seconds", 0.0) for g in T2W_GRAPHS)
    else:
        t2w = (record.get("token2wav") or {}).get("seconds")
    return {
        "codes": record.get("codes"),
        "audio_seconds": audio,
        "first_audio_seconds": first - start if first is not None else None,
        "talker_seconds": talker or None,
        "talker_codes_per_second": record["codes"] / talker if talker and record.get("codes") else None,
        "token2wav_seconds": t2w,
        "token2wav_rtf": t2w / audio if t2w is not None and audio else None,
        "first_audio_before_talker_end": (first < record["talker_end"]) if first is not None and
        record.get("talker_end") is not None else None,
        "speech_finish_reason": record.get("speech_finish_reason"),
    }


def _summaries(items: list[dict]) -> dict:
    """Per key: a summary of numbers over the repeats, the common value of other fields (a list
    when they differ), nested dicts summarized the same way."""
    keys: list[str] = []
    for item in items:
        keys += [k for k in item if k not in keys]
    out = {}
    for key in keys:
        values = [item.get(key) for item in items]
        present = [v for v in values if v is not None]
        if present and all(isinstance(v, dict) for v in present):
            out[key] = _summaries(present)
        elif present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
            out[key] = summarize(present)
        elif present and all(isinstance(v, bool) for v in present):
            out[key] = present[0] if len(set(present)) == 1 else present  # one value, or each repeat's
        else:
            out[key] = present[0] if present and all(v == present[0] for v in present) else (present or None)
    return out


def summarize_side(all_figures: list[dict]) -> dict:
    """The figures of every repeat of one side, summarized: request-level keys at the top and a
    ``stages`` list in request order."""
    if not all_figures:
        return {"stages": [], "repeats_ok": 0}
    top = _summaries([f["request"] for f in all_figures])
    stages = []
    for name in STAGES:
        per = [f["stages"][name] for f in all_figures if name in f["stages"]]
        if per:
            stages.append({"name": name, **_summaries(per)})
    return {**top, "stages": stages, "repeats_ok": len(all_figures)}


def kv_cache_bytes(manifest, prompt_tokens: int, max_new_tokens: int, codes: int | None) -> dict:
    """Bytes of the thinker's KV cache for this request (prompt + new tokens), and of the talker's
    (its prefill is the prompt + 2 rows, then one row per code)."""
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}
    out = {}
    for module, length in (("thinker", prompt_tokens + max_new_tokens),
                           ("talker", prompt_tokens + 2 + (codes or 0) if codes is not None else None)):
        cfg = manifest.config.get(module)
        if not cfg or length is None:
            continue
        out[module] = (int(cfg["num_hidden_layers"]) * 2 * int(cfg["num_key_value_heads"]) * int(cfg["head_dim"])
                       * length * itemsize.get(cfg.get("kv_dtype", "float32"), 4))
    return out


def memory_check(side: dict, kv: dict) -> dict | None:
    """The lazy target: the measured peak against (largest stage's loaded sessions + KV caches) * 1.15."""
    sized = [(s["name"], _median(s.get("loaded_bytes"))) for s in side["stages"]]
    sized = [(n, b) for n, b in sized if b]
    peak = _median(side.get("peak_rss_bytes"))
    if not sized or peak is None:
        return None
    name, largest = max(sized, key=lambda item: item[1])
    kv_total = sum(kv.values())
    bound = (largest + kv_total) * (1 + LAZY_MARGIN)
    return {"largest_stage": name, "largest_stage_loaded_bytes": largest, "kv_cache_bytes": kv,
            "bound_bytes": int(bound), "peak_rss_bytes": peak, "peak_over_bound": peak / bound, "within": peak <= bound,
            "base_rss_bytes": _median(side.get("base_rss_bytes"))}


def ratios(runtime: dict, pytorch: dict | None) -> dict:
    """Runtime against PyTorch, from the medians of the same bench run (> 1: the runtime is better)."""
    if not pytorch or not pytorch.get("stages"):
        return {}
    rt = {s["name"]: s for s in runtime["stages"]}
    pt = {s["name"]: s for s in pytorch["stages"]}

    def rate(stage):
        return _ratio(_median((rt.get(stage) or {}).get("tokens_per_second")),
                      _median((pt.get(stage) or {}).get("tokens_per_second")))

    def faster(key, a=runtime, b=pytorch):
        return _ratio(_median(_get(b, key)), _median(_get(a, key)))

    return {
        "decode_ratio_vs_pytorch": rate("thinker_decode"),
        "prefill_ratio_vs_pytorch": rate("thinker_prefill"),
        "audio_encoder_ratio_vs_pytorch": rate("audio_encoder"),
        "vision_encoder_ratio_vs_pytorch": rate("vision_encoder"),
        "time_to_first_token_ratio_vs_pytorch": faster("time_to_first_token_seconds"),
        "first_audio_ratio_vs_pytorch": faster("first_audio_seconds"),
        "request_ratio_vs_pytorch": faster("request_seconds"),
        "token2wav_ratio_vs_pytorch": faster("token2wav_alone.seconds"),
        "peak_rss_ratio_vs_pytorch": _ratio(_median(runtime.get("peak_rss_bytes")),
                                            _median(pytorch.get("peak_rss_bytes"))),
    }


def _get(side: dict, dotted: str):
    value = side
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


# ------------------------------------------------------------------------------------ printing
def _num(value: float, spec: str | None) -> str:
    if spec is not None:
        return format(value, spec)
    size = abs(value)  # about three significant digits
    return format(value, ".0f" if size >= 100 else ".1f" if size >= 10 else ".2f" if size >= 1 else ".3f")


def _range(summary, scale: float = 1.0, spec: str | None = None) -> str:
    if not isinstance(summary, dict):
        return "-"
    m, lo, hi = (summary[k] / scale for k in ("median", "min", "max"))
    if len(summary["runs"]) == 1 or lo == hi:
        return _num(m, spec)
    return f"{_num(m, spec)} ({_num(lo, spec)}-{_num(hi, spec)})"


def stage_table(side: dict, title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("stage", "session load s", "seconds", "tokens", "tok/s", "latency s", "token2wav RTF",
                "peak RSS GB", "loaded GB"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for s in side["stages"]:
        latency = s.get("time_to_first_token_seconds") or s.get("first_audio_seconds")
        tokens = s.get("tokens") or s.get("codes")
        label = s["name"] + (" (TTFT)" if "time_to_first_token_seconds" in s else
                             " (first audio)" if "first_audio_seconds" in s else "")
        table.add_row(label, _range(s.get("session_load_seconds")), _range(s.get("seconds")),
                      _range(tokens, spec=".0f"), _range(s.get("tokens_per_second")),
                      _range(latency), _range(s.get("token2wav_rtf")), _range(s.get("peak_rss_bytes"), 1e9, ".2f"),
                      _range(s.get("loaded_bytes"), 1e9, ".2f"))
    return table


def print_tables(result: dict, console) -> None:
    from rich.table import Table

    runs = result["repeats"]
    note = f"median (min-max) of {runs} repeat(s), each in a fresh process"
    console.print(stage_table(result, f"runtime {result['recipe']}, memory {result['memory_policy']}: {note}"))
    if result.get("pytorch"):
        console.print(stage_table(result["pytorch"], f"PyTorch eager float32 (transformers): {note}"))
    summary = Table(title="request", title_justify="left")
    for col in ("figure", "runtime", "PyTorch", "ratio"):
        summary.add_column(col, justify="left" if col == "figure" else "right")
    pt = result.get("pytorch") or {}
    rows = [("request s", "request_seconds", 1, ".2f", "request_ratio_vs_pytorch"),
            ("time to first token s", "time_to_first_token_seconds", 1, ".3f", "time_to_first_token_ratio_vs_pytorch"),
            ("first audio s", "first_audio_seconds", 1, ".2f", "first_audio_ratio_vs_pytorch"),
            ("token2wav RTF (in the request)", "token2wav_rtf", 1, ".3f", None),
            ("token2wav streamed alone s", "token2wav_alone.seconds", 1, ".2f", "token2wav_ratio_vs_pytorch"),
            ("session load s", "session_load_seconds", 1, ".2f", None),
            ("session load / request", "session_load_fraction", 1, ".3f", None),
            ("peak RSS GB", "peak_rss_bytes", 1e9, ".2f", "peak_rss_ratio_vs_pytorch"),
            ("peak device GB", "peak_device_bytes", 1e9, ".2f", None)]
    for label, key, scale, spec, ratio_key in rows:
        ours, theirs = _get(result, key), _get(pt, key) if pt else None
        if ours is None and theirs is None:
            continue
        r = result.get(ratio_key) if ratio_key else None
        summary.add_row(label, _range(ours, scale, spec), _range(theirs, scale, spec), "-" if r is None else f"{r:.2f}x")
    for label, key in (("thinker decode tok/s", "decode_ratio_vs_pytorch"), ("thinker prefill tok/s", "prefill_ratio_vs_pytorch")):
        if result.get(key) is not None:
            summary.add_row(label, "", "", f"{result[key]:.2f}x")
    console.print(summary)
    check = result.get("memory_check")
    if check:
        console.print(f"memory: peak RSS {check['peak_rss_bytes'] / 1e9:.2f} GB vs (largest stage {check['largest_stage']} "
                      f"{check['largest_stage_loaded_bytes'] / 1e9:.2f} GB + KV {sum(check['kv_cache_bytes'].values()) / 1e9:.3f} GB)"
                      f" x 1.15 = {check['bound_bytes'] / 1e9:.2f} GB: {'within' if check['within'] else 'over'} "
                      f"({check['peak_over_bound']:.2f} of the bound); the process before any request "
                      f"{(check['base_rss_bytes'] or 0) / 1e9:.2f} GB")
    before = result.get("first_audio_before_talker_end")
    if before is not None:
        said = {True: "yes, every repeat", False: "no, in no repeat"}.get(before) if isinstance(before, bool) else \
            f"in {sum(before)} of {len(before)} repeats"
        console.print(f"first audio before the talker finished: {said}")
    for failure in result.get("failures", []):
        console.print(f"failed: {failure}")
    for note in result.get("notes", []):
        console.print(f"note: {note}")
