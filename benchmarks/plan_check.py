"""`omni-export plan` against measured peaks: one whole request per memory policy, per stage.

For each policy (default: lazy and resident) the script plans the request with
``omni_export.plan`` (model shapes from ``--model``'s config.json, the bundle's own recipe) and
runs it ``--repeats`` times, each in a fresh process through the runtime's API
(``OmniRunner(bundle, memory=POLICY).chat(messages=[audio, image, text], speech=True)``). The
child marks the stage boundaries (the encoders' ``encode``, the thinker's decode loop, the speech
pipeline; the names ``omni-export bench`` uses) and reads its own peak RSS per stage exactly: at
each boundary it reads ``VmHWM`` and resets it (``/proc/self/clear_refs`` = 5). It also reports
the RSS before any session (the runtime's base) and after each stage.

``--bench-json FILE`` instead compares the plan with an ``omni-export bench --json`` result (its
request, policy and per-stage peaks; media durations and sizes read from its files).

A first, unmeasured run per bundle fills the runtime's optimized-graph cache (later loads read
the optimized copies, as users' second and later runs do). Prints the table plan vs measured
(median and range) and writes JSON; ``--calibrate`` also loads each graph alone and reports its
resident and transient bytes per byte of weights (``LOAD_FACTOR`` / ``LOAD_TRANSIENT`` of
``omni_export/plan/constants.py``). Example (the shared 7b-shape bundle):

    .venv/bin/python benchmarks/plan_check.py --bundle /tmp/b7/awq --model /tmp/b7/model --repeats 3 \\
        --json plan_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import GB, default_rss_limit, machine_info, run_measured, summarize, write_json  # noqa: E402

STAGES = ("prepare", "audio_encoder", "vision_encoder", "thinker_prefill", "thinker_decode", "speech")
TOLERANCE = 0.15  # issue 13: plan within 15% of the measured peaks


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


class StageMeter:
    """Peak RSS per stage: VmHWM read and reset at each boundary."""

    def __init__(self):
        self.current = "start"
        self.peaks: dict[str, int] = {}
        self.after: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self._since = time.perf_counter()
        self._reset()

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS

    def mark(self, stage: str) -> None:
        if stage == self.current:
            return
        now = time.perf_counter()
        self.peaks[self.current] = max(self.peaks.get(self.current, 0), _status("VmHWM"))
        self.after[self.current] = _status("VmRSS")
        self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self._since
        self._since = now
        self.current = stage
        self._reset()


def _instrument(meter: StageMeter) -> None:
    """Wrap the runtime's stage entry points so they mark the meter."""
    from omni_runtime.stages import audio_encoder, kv_decoder, speech, vision_encoder

    def around(cls, name, stage, after):
        original = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            meter.mark(stage)
            try:
                return original(self, *args, **kwargs)
            finally:
                meter.mark(after)
        setattr(cls, name, wrapper)

    around(audio_encoder.AudioEncoder, "encode", "audio_encoder", "thinker_prefill")
    around(vision_encoder.VisionEncoder, "encode", "vision_encoder", "thinker_prefill")
    decode = kv_decoder.KVDecoder.decode

    def decode_wrapper(self, *args, **kwargs):
        if meter.current != "speech":  # the talker's loop runs inside the speech stage
            meter.mark("thinker_decode")
        return decode(self, *args, **kwargs)
    kv_decoder.KVDecoder.decode = decode_wrapper
    run = speech.SpeechPipeline.run

    def run_wrapper(self, *args, **kwargs):
        meter.mark("speech")
        yield from run(self, *args, **kwargs)
    speech.SpeechPipeline.run = run_wrapper


def write_media(work: Path, audio_seconds: float, image: tuple[int, int], video_seconds: float,
                video_size: tuple[int, int]) -> None:
    """The request's media: a noisy tone, a drawn image, a moving-gradient video with a tone track."""
    from omni_export.plan.media import SOURCE_FPS
    from omni_export.testkit.media import tone, write_audio, write_image, write_video

    if audio_seconds:
        write_audio(work / "audio.wav", tone(audio_seconds, freqs=(440.0,), noise=0.05), 16000)
    if image[0]:
        write_image(work / "image.png", width=image[0], height=image[1])
    if video_seconds:
        write_video(work / "video.mp4", seconds=video_seconds, fps=SOURCE_FPS, size=video_size,
                    audio=tone(video_seconds, freqs=(330.0,), noise=0.05))


def child(args) -> dict:
    meter = StageMeter()
    base_before = _status("VmRSS")
    from omni_runtime.runner import OmniRunner

    runner = OmniRunner(args.bundle, device="cpu", memory=args.policy)
    base = _status("VmRSS")
    _instrument(meter)
    meter.mark("prepare")
    work = Path(args.work)
    content = []
    for kind, file in (("audio", "audio.wav"), ("image", "image.png"), ("video", "video.mp4")):
        if (work / file).is_file():
            content.append({"type": kind, kind: str(work / file)})
    messages = [{"role": "user", "content": content + [{"type": "text", "text": "What do you hear and see?"}]}]
    started = time.perf_counter()
    result = runner.chat(messages=messages, max_new_tokens=args.max_new_tokens, speech=True,
                         max_speech_seconds=args.max_speech_seconds, seed=0, stream=True,
                         use_audio_in_video=(work / "video.mp4").is_file())
    meter.mark("end")
    text_ids = runner.prompt_inputs(prompt="What do you hear and see?").ids  # text-only prompt length
    return {"policy": args.policy, "base_before_runner_bytes": base_before, "base_bytes": base,
            "stage_peak_bytes": meter.peaks, "stage_after_bytes": meter.after, "stage_seconds": meter.seconds,
            # clear_refs also resets the kernel's peak behind ru_maxrss: the peak is the stages' maximum
            "request_seconds": time.perf_counter() - started, "peak_bytes": max(meter.peaks.values()),
            "prompt_tokens": len(result.prompt_ids), "answer_tokens": len(result.token_ids),
            "codes": len(result.codes or []), "media": result.media, "text_prompt_tokens": len(text_ids),
            "load_log": getattr(runner.pool, "load_log", None)}


def calibrate_child(args) -> dict:
    """Each graph loaded alone: RSS before, peak during and after the load."""
    from omni_runtime.runner import OmniRunner

    runner = OmniRunner(args.bundle, device="cpu", memory="lazy")
    out = {}
    for name in runner.manifest.graphs:
        before = _status("VmRSS")
        StageMeter._reset()
        runner.pool.get(name)
        out[name] = {"before": before, "peak": _status("VmHWM"), "after": _status("VmRSS"),
                     "file_bytes": runner.pool.graph_bytes(name) if hasattr(runner.pool, "graph_bytes") else None}
        runner.pool.release(name)
        out[name]["released"] = _status("VmRSS")
    return out


def planned(args, policy: str, text_tokens: int) -> dict:
    from omni_export.plan.config import read_model
    from omni_export.plan.memory import Request, load_plan_recipe, parse_policy, plan

    shape = read_model(args.model)
    recipe = load_plan_recipe(str(args.bundle), "cpu")
    req = Request(audio_seconds=args.audio_seconds, images=(tuple(args.image),) if args.image[0] else (),
                  video_seconds=args.video_seconds, video_size=tuple(args.video_size), speech=True,
                  max_new_tokens=args.max_new_tokens, max_speech_seconds=args.max_speech_seconds,
                  text_tokens=text_tokens)
    return plan(shape, recipe, recipe.target, req, parse_policy(policy)).to_json()


def _median(value):
    return value.get("median") if isinstance(value, dict) else value


def bench_request(bench: dict):
    """The plan Request of an ``omni-export bench`` request (durations and sizes from its files)."""
    import soundfile
    from PIL import Image

    from omni_export.plan.memory import Request
    import av

    req = bench["request"]
    audio = sum(soundfile.info(str(f)).duration for f in req.get("audio") or [])
    images = tuple(Image.open(f).size for f in req.get("image") or [])
    video_seconds, video_size = 0.0, (1280, 720)
    for f in req.get("video") or []:  # plan takes one video (the last)
        with av.open(str(f)) as container:
            stream = container.streams.video[0]
            video_size = (stream.codec_context.width, stream.codec_context.height)
            video_seconds = float(stream.duration * stream.time_base) if stream.duration else \
                container.duration / 1e6
    return Request(video_seconds=video_seconds, video_size=video_size, audio_seconds=audio, images=images,
                   speech=bool(req.get("speech")), max_new_tokens=req.get("max_new_tokens"),
                   max_speech_seconds=req.get("max_speech_seconds"))


def compare_bench(args) -> None:
    """Plan vs an ``omni-export bench --json`` result, stage by stage."""
    import dataclasses

    from omni_export.plan.config import read_model
    from omni_export.plan.memory import load_plan_recipe, parse_policy, plan

    bench = json.loads(Path(args.bench_json).read_text())
    shape = read_model(args.model)
    recipe = load_plan_recipe(bench["bundle"], "cpu")
    request = bench_request(bench)
    policy = parse_policy(str(bench.get("memory_policy") or "lazy"))
    first = plan(shape, recipe, recipe.target, dataclasses.replace(request, text_tokens=0), policy)
    prompt = _median((bench.get("stages") and next((s.get("tokens") for s in bench["stages"]
                                                     if s["name"] == "thinker_prefill"), None)))
    text = max(0, int(prompt) - first.media.prompt_tokens) if prompt else request.text_tokens
    planned_ = plan(shape, recipe, recipe.target, dataclasses.replace(request, text_tokens=text), policy)
    measured = {s["name"]: _median(s.get("peak_rss_bytes")) for s in bench.get("stages") or []}
    rows = []
    print(f"plan vs omni-export bench {args.bench_json} (policy {bench.get('memory_policy')}, "
          f"{bench.get('repeats')} repeats, medians)")
    print(f"{'stage':16} {'planned GB':>10} {'measured GB':>11} {'plan/meas':>9}")
    for s in planned_.stages:
        m = measured.get(s.name)
        rows.append({"stage": s.name, "planned_bytes": s.peak_bytes, "measured_bytes": m,
                     "ratio": s.peak_bytes / m if m else None})
        print(f"{s.name:16} {s.peak_bytes / GB:10.2f} {(m or 0) / GB:11.2f} "
              f"{(s.peak_bytes / m if m else float('nan')):9.2f}")
    peak = _median(bench.get("peak_rss_bytes"))
    ratio = planned_.peak_bytes / peak if peak else None
    print(f"{'PEAK':16} {planned_.peak_bytes / GB:10.2f} {(peak or 0) / GB:11.2f} {ratio or float('nan'):9.2f}  "
          f"{'ok' if ratio and abs(ratio - 1) <= TOLERANCE else 'OUTSIDE 15%'}")
    write_json(args.json, {"bench_json": str(args.bench_json), "plan": planned_.to_json(), "stages": rows,
                           "planned_peak_bytes": planned_.peak_bytes, "measured_peak_bytes": peak,
                           "peak_ratio": ratio, "within_tolerance": bool(ratio and abs(ratio - 1) <= TOLERANCE)})
    print(f"wrote {args.json}")
    if not (ratio and abs(ratio - 1) <= TOLERANCE):
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("/tmp/b7/awq"))
    parser.add_argument("--model", type=Path, default=Path("/tmp/b7/model"), help="the checkpoint's config.json dir")
    parser.add_argument("--policies", nargs="+", default=["lazy", "resident"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--audio-seconds", type=float, default=10.0)
    parser.add_argument("--image", type=lambda s: tuple(int(v) for v in s.lower().split("x")), default=(640, 480),
                        help="WIDTHxHEIGHT of the test image (0x0: none)")
    parser.add_argument("--video-seconds", type=float, default=0.0, help="also a video with its sound track")
    parser.add_argument("--video-size", type=lambda s: tuple(int(v) for v in s.lower().split("x")),
                        default=(1280, 720), help="WIDTHxHEIGHT of the test video")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--max-speech-seconds", type=float, default=3.0)
    parser.add_argument("--calibrate", action="store_true", help="also measure each graph's load alone")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--json", type=Path, default=Path("plan_check.json"))
    parser.add_argument("--bench-json", type=Path, help="compare with this `omni-export bench --json` result instead "
                                                       "of measuring here")
    parser.add_argument("--child", choices=("request", "calibrate"), help=argparse.SUPPRESS)
    parser.add_argument("--policy", default="lazy", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "request":
        print(json.dumps(child(args)))
        return
    if args.child == "calibrate":
        print(json.dumps(calibrate_child(args)))
        return
    if args.bench_json is not None:
        compare_bench(args)
        return
    if not (args.bundle / "manifest.json").is_file():
        parser.error(f"{args.bundle} is not a bundle (no manifest.json)")
    if not (args.model / "config.json").is_file():
        parser.error(f"{args.model} has no config.json")
    rss_limit = default_rss_limit()
    work = Path(tempfile.mkdtemp(prefix="plan-check-"))
    write_media(work, args.audio_seconds, args.image, args.video_seconds, args.video_size)
    env = {**os.environ, "OMNI_RUNTIME_CACHE_DIR": str(work / "cache")}
    base_cmd = [sys.executable, str(Path(__file__).resolve()), "--bundle", str(args.bundle), "--work", str(work),
                "--audio-seconds", str(args.audio_seconds), "--max-new-tokens", str(args.max_new_tokens),
                "--max-speech-seconds", str(args.max_speech_seconds)]
    result = {"bundle": str(args.bundle), "model": str(args.model), "settings": vars(args) | {"json": str(args.json)},
              "machine": machine_info(), "policies": {}}
    print("warm-up run (fills the optimized-graph cache) ...", file=sys.stderr)
    warm = run_measured(base_cmd + ["--child", "request", "--policy", "lazy"], timeout=args.timeout,
                        rss_limit=rss_limit, env=env)
    if not warm.ok:
        raise SystemExit(f"the warm-up request failed: {warm.failure()}")
    result["warm_up"] = warm.last_json()
    if args.calibrate:  # after the warm-up: loads read the optimized copies, as in the measured runs
        run = run_measured(base_cmd + ["--child", "calibrate"], timeout=args.timeout, rss_limit=rss_limit, env=env)
        result["calibration"] = run.last_json() if run.ok else {"error": run.failure()}
    failed = False
    for policy in args.policies:
        runs = []
        for i in range(args.repeats):
            run = run_measured(base_cmd + ["--child", "request", "--policy", policy], timeout=args.timeout,
                               rss_limit=rss_limit, env=env)
            if not run.ok:
                raise SystemExit(f"policy {policy} run {i + 1} failed: {run.failure()}")
            runs.append(run.last_json())
            print(f"  {policy} run {i + 1}: peak {runs[-1]['peak_bytes'] / GB:.2f} GB", file=sys.stderr)
        # the text around the media as this bundle's tokenizer counts it (the test tokenizer is not Qwen's)
        plan = planned(args, policy, result["warm_up"]["text_prompt_tokens"])
        stages = {}
        for stage in STAGES:
            values = [r["stage_peak_bytes"][stage] for r in runs if stage in r["stage_peak_bytes"]]
            stages[stage] = summarize(values)
        measured_peak = summarize([r["peak_bytes"] for r in runs])
        rows = []
        for s in plan["stages"]:
            m = stages.get(s["name"], {}).get("median")
            rows.append({"stage": s["name"], "planned_bytes": s["peak_bytes"], "measured": stages.get(s["name"]),
                         "ratio": None if not m else s["peak_bytes"] / m,
                         "terms": {k: s[k] for k in ("weights_bytes", "kv_bytes", "activations_bytes", "arena_bytes",
                                                     "host_bytes", "base_bytes", "load_bytes")}})
        ratio = plan["peak_bytes"] / measured_peak["median"]
        ok = abs(ratio - 1) <= TOLERANCE
        failed |= not ok
        result["policies"][policy] = {"plan": plan, "runs": runs, "stages": rows, "measured_peak": measured_peak,
                                      "planned_peak_bytes": plan["peak_bytes"], "peak_ratio": ratio,
                                      "within_tolerance": ok}
    # the table
    media = " + ".join(part for part in (f"{args.audio_seconds:g} s audio" if args.audio_seconds else "",
                                         f"{args.image[0]}x{args.image[1]} image" if args.image[0] else "",
                                         f"{args.video_seconds:g} s {args.video_size[0]}x{args.video_size[1]} video "
                                         "with its audio" if args.video_seconds else "") if part)
    print(f"plan vs measured: {args.bundle}, {media} in, speech out "
          f"({args.max_speech_seconds:g} s), {args.max_new_tokens} new tokens; {args.repeats} runs per policy, "
          f"median (min-max) of peak RSS")
    print(f"{'policy':9} {'stage':16} {'planned GB':>10} {'measured GB':>22} {'plan/meas':>9}")
    for policy, data in result["policies"].items():
        for row in data["stages"]:
            m = row["measured"] or {}
            meas = (f"{m['median'] / GB:6.2f} ({m['min'] / GB:.2f}-{m['max'] / GB:.2f})" if m.get("median")
                    else "-")
            ratio = f"{row['ratio']:.2f}" if row["ratio"] else "-"
            print(f"{policy:9} {row['stage']:16} {row['planned_bytes'] / GB:10.2f} {meas:>22} {ratio:>9}")
        mp = data["measured_peak"]
        print(f"{policy:9} {'PEAK':16} {data['planned_peak_bytes'] / GB:10.2f} "
              f"{mp['median'] / GB:6.2f} ({mp['min'] / GB:.2f}-{mp['max'] / GB:.2f}) {data['peak_ratio']:9.2f}"
              f"  {'ok' if data['within_tolerance'] else 'OUTSIDE 15%'}")
    if "calibration" in result and "error" not in result["calibration"]:
        print("graph loads alone (per byte of files): resident after load, peak during load")
        for name, c in result["calibration"].items():
            if c.get("file_bytes"):
                print(f"  {name:20} {(c['after'] - c['before']) / c['file_bytes']:5.2f} "
                      f"{(c['peak'] - c['before']) / c['file_bytes']:5.2f}  ({c['file_bytes'] / GB:.3f} GB)")
    write_json(args.json, result)
    print(f"wrote {args.json}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
