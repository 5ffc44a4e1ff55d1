"""The bench request through transformers (PyTorch eager, float32, CPU), in its own process.

Run by ``omni-export bench --model DIR`` once per repeat (``python -m
omni_export.bench.pytorch_side SPEC``); prints one JSON line in the runtime side's format.

Same request as the runtime side: the inputs are the runtime's own host preparation of the
same files (``OmniRunner.prepare``: the chat template, expanded placeholders, log-mel features,
image/video patches; these reproduce ``Qwen2_5OmniProcessor``, see test_multimodal_generate.py),
so both sides feed the models identical ids and features; the host preparation itself is timed
as ``prepare`` on both sides. ``Qwen2_5OmniForConditionalGeneration.generate`` then runs with
the thinker greedy (its repetition penalty as the bundle's), exactly ``max_new_tokens`` new
tokens when the runtime side ignores eos (``thinker_min_new_tokens``), the talker greedy
(repetition penalty 1.05) with as many codes as the runtime's ``max_speech_seconds`` allows,
and token2wav as transformers runs it (the whole reply at once, RK4, the bundle's steps).
Attention is ``sdpa``, as in benchmarks/thinker_decode.py.

Stage boundaries come from forward hooks (audio tower, vision tower, token2wav), a thinker and a
talker logits processor (one stamp per new token) and a wrapper of ``talker.generate``. After
the request, the official chunked streaming token2wav (Euler, ``testkit.token2wav_refs.
official_stream``) re-makes the same codes with the runtime's documented noise: the figure
compared with the runtime's streamed token2wav at the same steps.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from omni_export.bench.trace import Tracer, open_fds


def _module(model, suffix: str):
    for name, module in model.named_modules():
        if name.endswith(suffix):
            return module
    return None


def torch_inputs(job, torch) -> dict:
    """``generate`` keyword arguments of a prepared runtime request (``OmniRunner.prepare``)."""
    ids = torch.tensor([job.inputs.ids], dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    media = job.media
    if media is None:
        return out
    if media.audio:
        longest = max(f.shape[1] for f in media.audio)
        features = np.zeros((len(media.audio), media.audio[0].shape[0], longest), np.float32)
        mask = np.zeros((len(media.audio), longest), np.int64)
        for i, f in enumerate(media.audio):
            features[i, :, : f.shape[1]] = f
            mask[i, : f.shape[1]] = 1
        out.update(input_features=torch.from_numpy(features), feature_attention_mask=torch.from_numpy(mask))
    # pixel_values* go to the thinker only (the thinker_ prefix): transformers 5.23's generate hands
    # unprefixed keys to the talker too, whose generate refuses pixel_values; the grids it takes
    if media.images:
        out.update(thinker_pixel_values=torch.from_numpy(np.concatenate([v.pixel_values for v in media.images])),
                   image_grid_thw=torch.tensor([list(v.grid_thw) for v in media.images], dtype=torch.long))
    if media.videos:
        out.update(thinker_pixel_values_videos=torch.from_numpy(np.concatenate([v.pixel_values for v in media.videos])),
                   video_grid_thw=torch.tensor([list(v.grid_thw) for v in media.videos], dtype=torch.long),
                   video_second_per_grid=torch.tensor([float(v.second_per_grid) for v in media.videos]))
    if media.use_audio_in_video:
        out["use_audio_in_video"] = True
    return out


def measure(spec: dict) -> dict:
    tracer = Tracer()
    tracer.enter("setup")
    fds_start = open_fds()
    import torch
    from transformers import Qwen2_5OmniForConditionalGeneration
    from transformers.utils import logging

    from omni_export.bench.runtime_side import build_request
    from omni_runtime.runner import OmniRunner

    logging.set_verbosity_error()
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(spec["model"], dtype=torch.float32,
                                                                attn_implementation="sdpa").eval()
    runner = OmniRunner(spec["bundle"], device="cpu")  # tokenizer, template and host prep only: no session
    request = build_request(spec, runner)
    timeline: dict = {"token_stamps": [], "code_stamps": []}
    hooks = []

    def enter_on(module, before: str, after: str):
        if module is None:
            return
        hooks.append(module.register_forward_pre_hook(lambda *_: tracer.enter(before)))
        hooks.append(module.register_forward_hook(lambda *_: tracer.enter(after)))

    enter_on(_module(model.thinker, "audio_tower"), "audio_encoder", "thinker_prefill")
    enter_on(_module(model.thinker, "visual"), "vision_encoder", "thinker_prefill")

    def thinker_stamp(input_ids, scores):
        if not timeline["token_stamps"]:
            tracer.enter("thinker_decode")
        timeline["token_stamps"].append(tracer.now())
        return scores

    def talker_stamp(input_ids, scores):
        timeline["code_stamps"].append(tracer.now())
        return scores

    talker_generate = model.talker.generate

    def talk(*args, **kwargs):
        tracer.enter("speech")
        timeline["talker_start"] = tracer.now()
        try:
            return talker_generate(*args, **kwargs)
        finally:
            timeline["talker_end"] = tracer.now()

    t2w_times = {}
    if spec["speech"]:
        model.talker.generate = talk

        def t2w_start(module, args):
            t2w_times["start"] = tracer.now()
            t2w_times["codes"] = [int(c) for c in args[0].reshape(-1).tolist()]  # what token2wav got

        hooks.append(model.token2wav.register_forward_pre_hook(t2w_start))
        hooks.append(model.token2wav.register_forward_hook(lambda *_: t2w_times.__setitem__("end", tracer.now())))

    tracer.enter("prepare")
    chat_start = tracer.now()
    job = runner.prepare(request)
    inputs = torch_inputs(job, torch)
    limit = job.limit
    kwargs = dict(thinker_max_new_tokens=limit, thinker_do_sample=False,
                  thinker_repetition_penalty=float(job.sampling.repetition_penalty),
                  thinker_logits_processor=[thinker_stamp])
    if spec["ignore_eos"]:
        kwargs["thinker_min_new_tokens"] = limit
    if spec["speech"]:
        voice = job.voice
        kwargs.update(speaker=voice.speaker, talker_max_new_tokens=int(voice.max_codes), talker_do_sample=False,
                      talker_repetition_penalty=float(voice.sampling.repetition_penalty),
                      talker_logits_processor=[talker_stamp])
        ode = runner.speech_pipeline().token2wav.ode
        kwargs["token2wav_num_steps"] = int(ode.steps)
    else:
        kwargs["generation_mode"] = "text"
    tracer.enter("thinker_prefill")
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
    chat_end = tracer.now()
    tracer.enter("host")
    tracer.finish()
    sequences = out[0] if spec["speech"] else (out.sequences if hasattr(out, "sequences") else out)
    new_ids = sequences[0, len(job.inputs.ids):].tolist()
    record = {
        "side": "pytorch",
        "providers": ["torch-cpu"],
        "torch_threads": torch.get_num_threads(),
        "chat_start": chat_start,
        "chat_end": chat_end,
        "prompt_tokens": len(job.inputs.ids),
        "new_tokens": len(new_ids),
        "media": job.inputs.media,
        "token_stamps": timeline["token_stamps"],
        "trace": tracer.to_json(),
        "peak_rss_bytes": tracer.peak_rss_bytes,
        "peak_device_bytes": None,
        "open_fds": {"start": fds_start, "end": open_fds()},
    }
    if spec["speech"]:
        waveform = out[1].reshape(-1).numpy()
        sample_rate = 24000
        codes = t2w_times.get("codes", [])
        record.update({
            "codes": len(codes),
            "audio_seconds": len(waveform) / sample_rate,
            "first_audio_seconds": t2w_times.get("end", chat_end) - chat_start,  # the whole waveform at once
            "first_audio_stamp": t2w_times.get("end"),
            "talker_start": timeline.get("talker_start"),
            "talker_end": timeline.get("talker_end"),
            "token2wav": {"seconds": t2w_times["end"] - t2w_times["start"], "solver": "rk4",
                          "steps": int(ode.steps)} if "end" in t2w_times else None,
        })
        if codes:
            record["token2wav_alone"] = official_stream_alone(model, runner, spec, codes, voice.speaker)
    for hook in hooks:
        hook.remove()
    return record


def official_stream_alone(model, runner, spec: dict, codes: list[int], speaker: str) -> dict:
    """The official chunked token2wav (Euler, the bundle's steps) on this request's codes, with the
    runtime's noise for ``noise_seed``: seconds, per-module time (DiT, BigVGAN)."""
    from omni_export.testkit.token2wav_refs import official_stream

    t2w = runner.speech_pipeline().token2wav
    spk = model.speaker_map[speaker]
    noise = np.random.default_rng(spec["noise_seed"]).standard_normal((max(len(codes), 1) * t2w.mel_per_code,
                                                                      t2w.mel_dim), dtype=np.float32)
    times = {"dit": 0.0, "bigvgan": 0.0, "dit_calls": 0, "bigvgan_calls": 0}
    started = {}
    hooks = []
    for key, module in (("dit", model.token2wav.code2wav_dit_model), ("bigvgan", model.token2wav.code2wav_bigvgan_model)):
        def pre(*_, key=key):
            started[key] = time.perf_counter()

        def post(*_, key=key):
            times[key] += time.perf_counter() - started[key]
            times[f"{key}_calls"] += 1

        hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    start = time.perf_counter()
    chunks = official_stream(model.token2wav, codes, spk["cond"].float(), spk["ref_mel"].float(), noise,
                             steps=int(t2w.ode.steps), solver="euler")
    seconds = time.perf_counter() - start
    for hook in hooks:
        hook.remove()
    audio = sum(int(np.asarray(c).size) for c in chunks) / t2w.sample_rate
    return {"seconds": seconds, "audio_seconds": audio, "rtf": seconds / audio if audio else None, "solver": "euler",
            "steps": int(t2w.ode.steps),
            "graph_runs": {"token2wav_dit": {"seconds": times["dit"], "calls": times["dit_calls"]},
                           "token2wav_bigvgan": {"seconds": times["bigvgan"], "calls": times["bigvgan_calls"]}}}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print(json.dumps(measure(json.loads(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
