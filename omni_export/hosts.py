"""Tokenization for the C++ and C# hosts: ``omni-export tokenize`` and ``omni-export detokenize``.

The hosts (runtime/cpp, runtime/csharp; docs/hosts.md) run a bundle from its manifest alone and
take token ids, not text. ``tokenize`` prepares a request exactly as ``omni-export run`` does
(``OmniRunner.prepare``: chat template, default system prompt, media decoded, placeholders
expanded) and writes what the hosts read into a directory:

- ``inputs.json``: ``prompt_ids`` (the expanded prompt), ``media`` (token counts), ``encoders``
  (graph name -> {graph input name -> ``.npy`` file}: the audio and vision encoders' inputs as the
  runtime computes them, ``audio_prep.encoder_inputs`` / ``vision_prep.encoder_inputs``),
  ``rope`` (what TMRoPE needs: image and video grids, audio mel-frame counts, seconds per video
  grid step, ``use_audio_in_video``) and, with ``--noise-seed``, ``noise``: token2wav's initial
  noise rows for that seed (``numpy.random.default_rng(seed)``, the Python runtime's). The hosts
  draw the same rows themselves from their ``--seed``; the file fixes them explicitly;
- the ``.npy`` files (little-endian float32 / int64, C order).

Every file is written to a temporary name and renamed; ``inputs.json`` last. ``detokenize``
turns ids back into text with the bundle's tokenizer (special tokens skipped, as ``run`` prints).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omni_runtime.atomic import write_atomic
from omni_runtime.errors import InputError

INPUTS_FILE = "inputs.json"


@dataclass
class Tokenized:
    """What ``tokenize`` produced: the expanded prompt ids and, with an output directory, its files."""

    prompt_ids: list[int]
    text: str
    media: dict | None = None
    files: list[str] = field(default_factory=list)
    inputs: Path | None = None

    def to_json(self) -> dict:
        body = {"prompt_ids": self.prompt_ids, "prompt": self.text}
        if self.media is not None:
            body["media"] = self.media
        if self.inputs is not None:
            body["inputs"] = str(self.inputs)
        return body


def _save_npy(folder: Path, name: str, array: np.ndarray) -> str:
    array = np.ascontiguousarray(array)
    if array.dtype.kind == "f":
        array = array.astype("<f4", copy=False)
    elif array.dtype.kind in "iu":
        array = array.astype("<i8", copy=False)
    else:  # pragma: no cover - the runtime's inputs are float or integer
        raise TypeError(f"cannot write {array.dtype} for the hosts")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    write_atomic(folder / name, write)
    return name


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError("is a file, so --out cannot be a directory there", path=out,
                         fix="pass a directory for --out (it is created if missing)")
    if not out.parent.exists():
        raise InputError("directory does not exist", path=out.parent,
                         fix="create it first (mkdir -p), or choose another --out")


def tokenize(bundle: str | os.PathLike, prompt: str | None, audio: list[str] | None = None,
             image: list[str] | None = None, video: list[str] | None = None, system: str | None = None,
             use_audio_in_video: bool = False, video_fps: float | None = None, out: str | os.PathLike | None = None,
             noise_seed: int | None = None, noise_frames: int | None = None) -> Tokenized:
    """Prepare the request ``omni-export run BUNDLE --prompt ... --audio ... --image ...`` would run and,
    with ``out``, write the hosts' inputs there (module docstring). No graph runs."""
    from omni_runtime.cli import RunOptions, chat_request, check_run_options
    from omni_runtime.runner import OmniRunner

    opts = RunOptions(bundle=os.fspath(bundle), prompt=prompt, system=system, audio=audio or None,
                      image=image or None, video=video or None, use_audio_in_video=use_audio_in_video,
                      video_fps=video_fps)
    check_run_options(opts)
    if out is None and (opts.has_media or noise_seed is not None):
        raise InputError("media inputs and noise are written as files, so --out is needed",
                         fix="pass --out DIR (the hosts then take --inputs DIR/inputs.json)")
    if noise_seed is not None and noise_seed < 0:
        raise InputError(f"--noise-seed must be >= 0, got {noise_seed}", fix="pass e.g. --noise-seed 0")
    if noise_frames is not None and noise_frames < 1:
        raise InputError(f"--noise-frames must be >= 1, got {noise_frames}", fix="pass e.g. --noise-frames 1024")
    folder = None if out is None else Path(out)
    if folder is not None:
        _check_out(folder)
    runner = OmniRunner(bundle, device="cpu")
    job = runner.prepare(chat_request(opts))  # the context budget is checked here too
    inputs, prepared = job.inputs, job.media
    result = Tokenized(list(inputs.ids), inputs.text, media=inputs.media)
    if folder is None:
        return result
    folder.mkdir(exist_ok=True)
    body: dict = {"prompt_ids": result.prompt_ids, "encoders": {}}
    if prepared is not None:
        from omni_runtime.media import audio_prep, vision_prep
        from omni_runtime.prompt.media_prompt import rope_inputs
        from omni_runtime.stages.vision_encoder import vision_config

        body["media"] = inputs.media
        if prepared.has_audio:
            config = runner.manifest.configs.audio
            feeds = audio_prep.encoder_inputs(prepared.audio, n_window=config.n_window, n_mels=config.num_mel_bins)
            body["encoders"]["audio_encoder"] = {name: _save_npy(folder, f"audio_encoder.{name}.npy", value)
                                                 for name, value in feeds.items()}
        if prepared.has_vision:
            pixel_values, grids = vision_prep.concat_inputs([*prepared.images, *prepared.videos])
            feeds = {"pixel_values": np.asarray(pixel_values, np.float32),
                     **vision_prep.encoder_inputs(grids, vision_config(runner.manifest))}
            body["encoders"]["vision_encoder"] = {name: _save_npy(folder, f"vision_encoder.{name}.npy", value)
                                                  for name, value in feeds.items()}
        rope = rope_inputs(prepared)
        body["rope"] = {
            "image_grid_thw": [] if rope["image_grid_thw"] is None else rope["image_grid_thw"].tolist(),
            "video_grid_thw": [] if rope["video_grid_thw"] is None else rope["video_grid_thw"].tolist(),
            "audio_seqlens": [] if rope["audio_seqlens"] is None else rope["audio_seqlens"].tolist(),
            "second_per_grids": [] if rope["second_per_grids"] is None else
            [float(s) for s in rope["second_per_grids"]],
            "use_audio_in_video": bool(rope["use_audio_in_video"]),
        }
    if noise_seed is not None:
        from omni_runtime.stages.token2wav import NoiseSequence, token2wav_config

        t2w = token2wav_config(runner.manifest)
        frames = noise_frames
        if frames is None:
            talker = runner.manifest.configs.talker
            frames = (talker.max_new_tokens if talker is not None else 4096) * t2w.mel_per_code
        rows = NoiseSequence(t2w.mel_dim, seed=int(noise_seed)).rows(0, int(frames))
        body["noise"] = _save_npy(folder, "noise.npy", rows)
        body["noise_seed"] = int(noise_seed)
    target = folder / INPUTS_FILE

    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(body) + "\n", encoding="utf-8")

    write_atomic(target, write)
    result.files = sorted({*(v for enc in body["encoders"].values() for v in enc.values()),
                           *([body["noise"]] if "noise" in body else []), INPUTS_FILE})
    result.inputs = target
    return result


def parse_ids(text: str) -> list[int]:
    """``1,2,3`` -> [1, 2, 3]; InputError naming the bad piece."""
    ids = []
    for piece in text.split(","):
        piece = piece.strip()
        try:
            ids.append(int(piece))
        except ValueError:
            raise InputError(f"not a token id: {piece!r}", fix="pass ids as comma-separated integers, e.g. 1,2,3") \
                from None
    return ids


def detokenize(bundle: str | os.PathLike, ids: list[int]) -> str:
    """The text of ``ids`` with the bundle's tokenizer (special tokens skipped)."""
    from tokenizers import Tokenizer

    from omni_runtime.bundle.manifest import load_manifest, verify_file

    manifest = load_manifest(bundle)
    vocab = manifest.configs.thinker.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise InputError(f"token id {bad[0]} is outside the vocabulary 0..{vocab - 1}",
                         fix="pass ids the bundle's thinker produced")
    rel = manifest.tokenizer["file"]
    verify_file(manifest, rel)
    tokenizer = Tokenizer.from_file(str(manifest.path(rel)))
    return tokenizer.decode(ids, skip_special_tokens=True)
