"""Multimodal calibration from msModelSlim's index.json / index.jsonl.

- parsing: index.jsonl, index.json (a list or one object), a directory holding exactly one,
  detection against a conversations JSONL, every bad entry (file, sample number, fix);
- skipping: samples missing a ``require``d modality are skipped and counted;
- the oracle: a media sample's calibration input (merged embeddings, TMRoPE positions, the
  layers' rotary cos / sin) equals what transformers' Qwen2.5-Omni thinker feeds its language
  model for the same conversation (captured with a hook);
- end to end: ``omni-export build --recipe w8a8 --calib index.jsonl`` runs text, audio + image
  in and speech out through omni-runtime; an AWQ build takes the same index.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from omni_export.build.calibration import (
    DEFAULT_TEXT,
    CalibrationError,
    IndexSample,
    index_file,
    load_index,
    select_samples,
)
from omni_export.build.recipes import RecipeError, load_recipe, parse_recipe
from omni_export.testkit import media

RATE = 16000


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Media for the samples: a chirp (no espeak needed), a picture, a video with an audio track."""
    d = tmp_path_factory.mktemp("calib-media")
    media.write_audio(d / "sweep.wav", media.chirp(1.5, RATE), RATE)
    media.write_image(d / "picture.png", 160, 120)
    media.write_video(d / "talk.mp4", seconds=2.5, fps=10, audio=media.chirp(2.5, RATE, 300, 2000), audio_rate=RATE)
    return d


def write_jsonl(path: Path, entries) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in entries), encoding="utf-8")
    return path


# -- parsing ------------------------------------------------------------------------------------


def test_jsonl_and_json(folder, tmp_path):
    entries = [{"text": "  Describe it.  ", "image": "picture.png", "audio": "sweep.wav"},
               {"image": "picture.png"}, {"text": None, "video": "talk.mp4"}, {"text": ""}]
    jsonl = write_jsonl(folder / "index.jsonl", [entries[0], "", *entries[1:]])  # a blank line is skipped
    samples = load_index(jsonl)
    assert samples == [
        IndexSample(1, "Describe it.", image=folder / "picture.png", audio=folder / "sweep.wav"),
        IndexSample(2, DEFAULT_TEXT, image=folder / "picture.png"),
        IndexSample(3, DEFAULT_TEXT, video=folder / "talk.mp4"),
        IndexSample(4, DEFAULT_TEXT)]
    assert DEFAULT_TEXT == "What are the elements can you see and hear in these medias."
    assert load_index(jsonl, "Say it.")[1].text == "Say it."
    # index.json: a list of objects, or one object; paths relative to the index's folder
    sub = tmp_path / "set"
    sub.mkdir()
    absolute = {"text": "x", "image": str(folder / "picture.png")}
    (sub / "index.json").write_text(json.dumps([{"image": "../picture.png"}, absolute]))
    (tmp_path / "picture.png").write_bytes((folder / "picture.png").read_bytes())
    listed = load_index(sub / "index.json")  # "../picture.png" leaves the folder: allowed, as msModelSlim
    assert listed[0].image == tmp_path / "picture.png" and listed[1].image == folder / "picture.png"
    (sub / "index.json").write_text(json.dumps({"text": "One sample."}))
    assert load_index(sub / "index.json") == [IndexSample(1, "One sample.")]


def test_detection(folder, tmp_path):
    jsonl = write_jsonl(tmp_path / "a" / "index.jsonl", [{"text": "hi"}])
    assert index_file(jsonl) == jsonl
    assert index_file(jsonl.parent) == jsonl  # a directory holding exactly one
    chats = write_jsonl(tmp_path / "chats.jsonl", [[{"role": "user", "content": "hi"}]])
    assert index_file(chats) is None  # any other name: a JSONL of conversations, as before
    write_jsonl(tmp_path / "a" / "index.json", [{"text": "hi"}])
    for folder_, needle in ((jsonl.parent, "both index.json and index.jsonl"), (tmp_path / "a" / "x", "no index.json")):
        folder_.mkdir(exist_ok=True)
        with pytest.raises(CalibrationError) as info:
            index_file(folder_)
        assert info.value.path == str(folder_) and needle in str(info.value) and "fix:" in str(info.value)
    # the recipe takes the index file, or its directory, as --calib does
    recipe = load_recipe("w8a8").with_calibration_file(write_jsonl(tmp_path / "b" / "index.jsonl", [{"text": "hi"}]).parent)
    cal = recipe.calibration
    assert (cal.source, cal.file, cal.require, cal.use_audio_in_video) == ("index", tmp_path / "b" / "index.jsonl", (), True)
    assert recipe.to_json()["calibration"]["default_text"] == DEFAULT_TEXT
    assert load_recipe("w8a8").with_calibration_file(chats).calibration.source == "file"
    assert "default_text" not in load_recipe("awq").to_json()["calibration"]  # text recipes record what they did


@pytest.mark.parametrize("entry, needles", [
    ({"text": "x", "image": "nowhere.png"}, ["sample 2", "image file", "does not exist"]),
    ({"text": "x", "images": "picture.png"}, ["sample 2", "unknown key(s) 'images'"]),
    ({"text": "x", "audio": "picture.png"}, ["sample 2", "suffix '.png'", ".wav, .mp3"]),
    ({"text": "   "}, ["sample 2", "text must be a non-empty string"]),
    ({"text": 3}, ["sample 2", "text must be a non-empty string"]),
    ({"text": "x", "video": ""}, ["sample 2", "video must be a non-empty path string"]),
    ('["not", "an object"]', ["sample 2", "not an object"]),
    ("{broken", ["sample 2 (line 2)", "not valid JSON"]),
])
def test_bad_entries(folder, tmp_path, entry, needles):
    (tmp_path / "picture.png").write_bytes((folder / "picture.png").read_bytes())
    path = write_jsonl(tmp_path / "index.jsonl", [{"text": "fine"}, entry])
    with pytest.raises(CalibrationError) as info:
        load_index(path)
    message = str(info.value)
    assert info.value.path == str(path) and "fix:" in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_bad_files(tmp_path):
    for name, text, needle in (("index.json", "[]", "no samples"), ("index.json", '"text"', "holds a string"),
                               ("index.jsonl", "\n\n", "no samples"), ("index.json", "[{]", "not valid JSON")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(CalibrationError, match=needle) as info:
            load_index(path)
        assert info.value.path == str(path)


def test_recipe_keys(tmp_path):
    base = {"schema_version": 2, "name": "x", "modules": {"thinker": {"weights": "int4", "method": "awq"}}}
    cal = parse_recipe({**base, "calibration": {"require": ["image", "audio"], "default_text": "Hi.",
                                                "use_audio_in_video": False}}, "x.yaml").calibration
    assert (cal.require, cal.text, cal.use_audio_in_video) == (("image", "audio"), "Hi.", False)
    for bad in ({"require": ["picture"]}, {"require": "image"}, {"require": ["image", "image"]},
                {"default_text": ""}, {"default_text": 3}, {"use_audio_in_video": "yes"}):
        with pytest.raises(RecipeError, match=f"calibration.{next(iter(bad))}"):
            parse_recipe({**base, "calibration": bad}, "x.yaml")


# -- skipping -----------------------------------------------------------------------------------


def test_skipped_counts(folder, tmp_path):
    samples = load_index(write_jsonl(folder / "skips" / "index.jsonl", [
        {"image": "../picture.png", "audio": "../sweep.wav"}, {"image": "../picture.png"}, {"text": "only text"},
        {"video": "../talk.mp4"}]))
    used, skipped = select_samples(samples, ("image", "audio"))
    assert [s.number for s in used] == [1] and skipped == {"audio": 3, "image": 2}  # a sample counts under each
    assert select_samples(samples, ()) == (samples, {})
    # a recipe whose requirement no sample meets is refused before the build, naming the index
    recipe = tmp_path / "r.yaml"
    recipe.write_text("schema_version: 2\nname: r\nmodules: {thinker: {weights: int4, method: awq}}\n"
                      f"calibration: {{source: {folder / 'skips'}, require: [image, video]}}\n")
    with pytest.raises(CalibrationError, match="no sample of the index has every modality") as info:
        load_recipe(recipe)
    assert info.value.path == str(folder / "skips" / "index.jsonl")


def test_cli_refuses_an_ambiguous_directory(tiny_checkpoint, tmp_path):
    both = tmp_path / "both"
    write_jsonl(both / "index.json", [{"text": "a"}])
    write_jsonl(both / "index.jsonl", [{"text": "a"}])
    out = tmp_path / "bundle"
    proc = run_cli("build", "--model", tiny_checkpoint, "--recipe", "w8a8", "--calib", both, "--out", out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{both}: the directory holds both index.json and index.jsonl" in proc.stderr and "fix:" in proc.stderr
    assert not out.exists()


# -- the oracle: transformers' own merged inputs --------------------------------------------------


def decoded_video(path: str, cfg):
    """(sampled frames [T, H, W, 3] uint8 resized as qwen-omni-utils' fetch_video does, sampled fps)
    from the runtime's decoder (checked against fetch_video in test_vision_prep.py; fetch_video
    itself needs FFmpeg's shared libraries for torchcodec), as the audio comes from ``load_audio``."""
    from omni_runtime.media.vision_prep import _Sampling, _decode

    frames, indices, total, video_fps = _decode(path, _Sampling(cfg, None, None, None, path), None, None, None)
    return np.stack(frames), len(indices) / total * video_fps


def transformers_inputs(checkpoint, thinker, content, use_audio_in_video, vision_config):
    """(input_ids [L], inputs_embeds [L, H], position_ids [3, L]) that transformers' thinker gives
    its language model for one user turn (the processor on the same decoded media)."""
    from PIL import Image
    from transformers import Qwen2_5OmniProcessor

    from omni_runtime.media.audio_prep import load_audio
    from omni_runtime.prompt.chat import DEFAULT_SYSTEM_PROMPT

    processor = Qwen2_5OmniProcessor.from_pretrained(checkpoint)
    messages = [{"role": "system", "content": [{"type": "text", "text": DEFAULT_SYSTEM_PROMPT}]},
                {"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    audios, images, videos, fps, from_video = [], [], [], [], []
    for part in content:
        if part["type"] == "audio":
            audios.append(load_audio(part["audio"]))
            from_video.append(None)
        elif part["type"] == "image":
            images.append(Image.open(part["image"]))
        elif part["type"] == "video":
            frames, sample_fps = decoded_video(part["video"], vision_config)
            if use_audio_in_video:
                audios.append(load_audio(part["video"]))
                from_video.append(len(videos))
            videos.append(frames)
            fps.append(sample_fps)
    kwargs = {"fps": float(fps[0]), "do_sample_frames": False} if videos else {}
    if use_audio_in_video and videos:
        kwargs.update(load_audio_from_video=True, audio_from_video_indices=from_video)
    captured = {}

    def capture(_module, _args, kw):
        captured.update(embeds=kw["inputs_embeds"][0].numpy().copy(), positions=kw["position_ids"][-3:, 0].numpy().copy())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inputs = processor(text=[text], audio=audios or None, images=images or None, videos=videos or None,
                           return_tensors="pt", **kwargs)
        hook = thinker.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with torch.no_grad():
                thinker(**inputs, use_audio_in_video=use_audio_in_video and bool(videos))
        finally:
            hook.remove()
    return inputs["input_ids"][0].numpy(), captured["embeds"], captured["positions"]


@pytest.mark.parametrize("kinds", [("image", "audio"), ("video", "audio")])
def test_sample_inputs_equal_transformers(tiny_checkpoint, reference_thinker, folder, kinds):
    """The thinker's calibration input for a media sample = transformers' merged inputs_embeds
    (the same float32 towers on the same features: <= 1e-5, measured ~1e-7) and
    its TMRoPE position ids (exact); the layers' cos / sin from those ids = the text model's
    rotary embedding of them. The video sample feeds its audio track (use_audio_in_video)."""
    from omni_export.build.calibration_media import MediaCalibration, SamplePreparer, media_calibration
    from omni_export.checkpoint.reader import Checkpoint
    from omni_export.modules.thinker import ThinkerWeights
    from omni_export.quant.awq import layer_kwargs_for

    files = {"image": folder / "picture.png", "audio": folder / "sweep.wav", "video": folder / "talk.mp4"}
    index = write_jsonl(folder / "-".join(kinds) / "index.jsonl",
                        [{"text": "What is in these media?", **{k: f"../{files[k].name}" for k in kinds}}])
    sample = load_index(index)[0]
    ckpt = Checkpoint.open(tiny_checkpoint)
    table = ThinkerWeights(ckpt).embedding()
    ours = SamplePreparer(ckpt, table).inputs(sample)
    content = SamplePreparer.messages(sample)[0]["content"]
    assert [p["type"] for p in content] == ["text", *[k for k in ("image", "audio", "video") if k in kinds]]
    ids, embeds, positions = transformers_inputs(tiny_checkpoint, reference_thinker, content, "video" in kinds,
                                                 SamplePreparer(ckpt, table).vision_config())
    assert np.array_equal(ours.ids, ids)
    assert np.array_equal(ours.positions, positions)
    assert np.abs(ours.embeds - embeds).max() <= 1e-5
    media_rows = np.isin(ids, [ckpt.config.thinker_config.audio_token_index, ckpt.config.thinker_config.image_token_index,
                               ckpt.config.thinker_config.video_token_index])
    assert media_rows.sum() > 20 and not np.allclose(embeds[media_rows], table[ids[media_rows]])  # rows were merged

    # the whole sample as one block: the batch is the sample, its positions as they are (they start at 0)
    recipe = load_recipe("w8a8").with_calibration_file(index)
    import dataclasses
    cal = dataclasses.replace(recipe.calibration, samples=1, sequence_length=int(ids.size))
    batch = media_calibration(cal, ckpt, table)
    assert isinstance(batch, MediaCalibration) and batch.hidden.shape == (1, ids.size, table.shape[1])
    assert np.abs(batch.hidden[0] - embeds).max() <= 1e-5 and np.array_equal(batch.positions[:, 0], positions)
    text_config = ckpt.text_config()
    cos, sin = layer_kwargs_for(text_config, int(ids.size), position_ids=torch.from_numpy(batch.positions))[
        "position_embeddings"]
    ref_cos, ref_sin = reference_thinker.model.language_model.rotary_emb(
        torch.zeros(1), torch.from_numpy(positions)[:, None, :])
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)


def test_blocks_continue_positions(tiny_checkpoint, folder):
    """Samples concatenated with positions continuing, cut into blocks, each block shifted to 0;
    a text-only index gives the text path's positions 0..L-1."""
    import dataclasses

    from omni_export.build.calibration_media import SamplePreparer, media_calibration
    from omni_export.checkpoint.reader import Checkpoint
    from omni_export.modules.thinker import ThinkerWeights

    ckpt = Checkpoint.open(tiny_checkpoint)
    table = ThinkerWeights(ckpt).embedding()
    index = write_jsonl(folder / "mixed" / "index.jsonl",
                        [{"image": "../picture.png"}, {"text": "Just words."}, {"audio": "../sweep.wav"}])
    samples = load_index(index)
    streams = [SamplePreparer(ckpt, table).inputs(s) for s in samples]
    embeds = np.concatenate([s.embeds for s in streams])
    offsets = np.cumsum([0] + [int(s.positions.max()) + 1 for s in streams[:-1]])
    positions = np.concatenate([s.positions + o for s, o in zip(streams, offsets)], axis=1)
    cal = load_recipe("w8a8").with_calibration_file(index).calibration
    seq = 40
    n = embeds.shape[0] // seq
    batch = media_calibration(dataclasses.replace(cal, samples=n, sequence_length=seq), ckpt, table)
    assert np.array_equal(batch.hidden, embeds[: n * seq].reshape(n, seq, -1))
    blocks = positions[:, : n * seq].reshape(3, n, seq)
    assert np.array_equal(batch.positions, blocks - blocks.min(axis=(0, 2), keepdims=True))
    assert batch.counts["used"] == 3 and not batch.counts["repeated"]
    # more tokens than the samples have: repeated from the first; only what is needed is encoded
    more = media_calibration(dataclasses.replace(cal, samples=n + 2, sequence_length=seq), ckpt, table)
    assert more.counts["repeated"] and np.array_equal(more.hidden.reshape(-1, table.shape[1])[embeds.shape[0]:][:5],
                                                      embeds[:5])
    few = media_calibration(dataclasses.replace(cal, samples=1, sequence_length=8), ckpt, table)
    assert (few.counts["used"], few.counts["unused"]) == (1, 2)
    text_only = write_jsonl(folder / "words" / "index.jsonl", [{"text": "One."}, {"text": "Two more words."}])
    cal = load_recipe("w8a8").with_calibration_file(text_only).calibration
    batch = media_calibration(dataclasses.replace(cal, samples=2, sequence_length=16), ckpt, table)
    assert np.array_equal(batch.positions, np.broadcast_to(np.arange(16), (3, 2, 16)))


def test_media_the_runtime_refuses(tiny_checkpoint, folder):
    """A video without an audio track (use_audio_in_video, the default) or an undecodable image:
    an error naming the index, the sample and the fix, raised before any layer runs."""
    import dataclasses

    from omni_export.build.calibration_media import media_calibration
    from omni_export.checkpoint.reader import Checkpoint
    from omni_export.modules.thinker import ThinkerWeights

    ckpt = Checkpoint.open(tiny_checkpoint)
    table = ThinkerWeights(ckpt).embedding()
    bad = folder / "bad"
    bad.mkdir(exist_ok=True)
    media.write_video(bad / "silent.mp4", seconds=1.0, fps=10)
    (bad / "broken.png").write_bytes(b"not a picture")
    for entry, needles in (({"video": "silent.mp4"}, ["no audio track", "calibration.use_audio_in_video: false"]),
                           ({"image": "broken.png"}, ["broken.png"])):
        index = write_jsonl(bad / "index.jsonl", [{"text": "fine"}, entry])
        cal = load_recipe("w8a8").with_calibration_file(index).calibration
        with pytest.raises(CalibrationError) as info:
            media_calibration(dataclasses.replace(cal, samples=8, sequence_length=64), ckpt, table)
        message = str(info.value)
        assert info.value.path == str(index) and "sample 2" in message and "fix:" in message, message
        for needle in needles:
            assert needle in message, (needle, message)


# -- end to end ---------------------------------------------------------------------------------


def test_w8a8_and_awq_builds_with_an_index(tiny_checkpoint, folder, tmp_path):
    from omni_export.build.pipeline import build_bundle
    from omni_runtime.runner import OmniRunner
    from omni_runtime.stages.sampling import SamplingConfig

    index = write_jsonl(folder / "e2e" / "index.jsonl", [
        {"text": "Describe what you hear and see.", "image": "../picture.png", "audio": "../sweep.wav"},
        {"image": "../picture.png"}, {"text": "A text-only sample."}, {"video": "../talk.mp4", "audio": "../sweep.wav"}])
    out = tmp_path / "w8a8"
    proc = run_cli("build", "--model", tiny_checkpoint, "--recipe", "w8a8", "--calib", index, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "calibration index.jsonl: 4 of 4 samples used, 0 skipped" in proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["calibration"]["source"] == "index"
    counts = manifest["build"]["modules"]["thinker"]["calibration"]
    assert (counts["samples"], counts["used"], counts["skipped"]["total"]) == (4, 4, 0)
    assert counts["media"] == {"image": 2, "audio": 2, "video": 1}

    runner = OmniRunner(out, device="cpu")
    greedy = SamplingConfig(do_sample=False)
    text = runner.chat("Hello", max_new_tokens=3, sampling=greedy)
    assert len(text.token_ids) == 3 or text.finish_reason == "eos"
    spoken = runner.chat(messages=[{"role": "user", "content": [
        {"type": "audio", "audio": str(folder / "sweep.wav")}, {"type": "image", "image": str(folder / "picture.png")},
        {"type": "text", "text": "What is this?"}]}], max_new_tokens=3, sampling=greedy, speech=True,
        max_speech_seconds=0.3, noise_seed=0)
    assert spoken.media["image_tokens"] == [24] and spoken.media["audio_tokens"][0] > 30
    assert spoken.audio is not None and spoken.audio.size > 0 and np.isfinite(spoken.audio).all()

    # AWQ takes the same index; require: [image] skips the text-only and the video sample
    recipe = tmp_path / "awq-image.yaml"
    recipe.write_text("schema_version: 2\nname: awq-image\nmodules:\n"
                      "  thinker: {weights: int4, method: awq, lm_head: int8, embeddings: int8}\n"
                      f"calibration: {{source: {index}, samples: 2, sequence_length: 200, require: [image]}}\n")
    awq = build_bundle(tiny_checkpoint, load_recipe(recipe), tmp_path / "awq")
    info = json.loads((awq / "manifest.json").read_text())["build"]["modules"]["thinker"]
    counts = info["calibration"]  # 400 tokens: more than the two image samples have, so they repeat
    assert (counts["used"], counts["unused"], counts["repeated"]) == (2, 0, True)
    assert counts["skipped"] == {"total": 2, "without": {"image": 2}} and counts["media"]["video"] == 0
    assert len(info["awq"]) == 2  # both layers searched on the media batch
    answer = OmniRunner(awq, device="cpu").chat("Hello", max_new_tokens=3, sampling=greedy)
    assert len(answer.token_ids) == 3 or answer.finish_reason == "eos"
