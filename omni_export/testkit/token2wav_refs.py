"""Test-only references for token2wav: transformers' model, a checkpoint whose token2wav weights
give waveforms of audible size, the noise hand-over, and the official chunked streaming in torch.

- ``loud_checkpoint``: the tiny model's random token2wav weights (std 0.02) make a waveform of
  about 1e-7, so an absolute 1e-3 comparison would prove nothing. This writes a copy of a tiny
  checkpoint whose ``token2wav.*`` tensors are redrawn with fan-in scaling (every stage keeps
  unit-order activations; the waveform's standard deviation is about 0.3, mostly below
  the vocoder's clamp at 1), everything else unchanged.
  Graphs and transformers then both read these weights.
- ``given_noise``: transformers draws the DiT's initial state with ``torch.randn``; inside this
  context manager that call returns the array the test gives (the same array the runtime gets as
  ``noise=``), so both integrate from the same state.
- ``official_stream``: the official low-VRAM streaming algorithm (QwenLM/Qwen2.5-Omni,
  low-VRAM-mode/modeling_qwen2_5_omni_low_VRAM_mode.py, ``Qwen2_5OmniToken2WavModel.forward(...,
  return_audio_in_chunk=True)`` with ``Qwen2_5OmniToken2WavDiTModel.sample_chunk``), written
  here in torch on top of transformers' DiT and BigVGAN modules, independently of the runtime.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from pathlib import Path

import numpy as np

RECIPE = """schema_version: 2
name: token2wav-test
description: thinker + token2wav in float32 (the manifest needs a thinker)
modules:
  thinker: {weights: float32}
  token2wav: {weights: float32}
"""


def loud_checkpoint(src: Path, dst: Path, seed: int = 0) -> Path:
    """Copy checkpoint ``src`` to ``dst`` with its token2wav tensors redrawn (fan-in scaled)."""
    import torch
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.name != "model.safetensors":
            (shutil.copytree if path.is_dir() else shutil.copyfile)(path, dst / path.name)
    tensors = load_file(src / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if not name.startswith("token2wav."):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("alpha", "beta"):  # SnakeBeta log-parameters
            new = 0.3 * torch.randn(t.shape, generator=gen)
        elif leaf == "bias":
            new = 0.05 * torch.randn(t.shape, generator=gen)
        elif "codec_embed" in name:
            new = torch.randn(t.shape, generator=gen)
        elif t.ndim >= 2:
            fan_in = math.prod(t.shape[1:])
            if ".ups." in name:  # ConvTranspose1d [in, out, k]: each output sums in * k / stride terms
                fan_in = t.shape[0] * t.shape[2] / 2
            new = torch.randn(t.shape, generator=gen) / math.sqrt(fan_in)
            if "conv_post" in name:  # the vocoder's residual stages grow the signal: bring it back below the clamp
                new = new * 0.05
        else:
            new = torch.randn(t.shape, generator=gen) * 0.1
        tensors[name] = new.to(t.dtype).contiguous()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def reference_model(checkpoint: Path):
    """transformers' Qwen2.5-Omni (float32, eval) from ``checkpoint``; ``.token2wav``, ``.speaker_map``."""
    from transformers import Qwen2_5OmniForConditionalGeneration
    from transformers.utils import logging

    logging.set_verbosity_error()
    return Qwen2_5OmniForConditionalGeneration.from_pretrained(checkpoint, dtype="float32").eval()


@contextlib.contextmanager
def given_noise(noise: np.ndarray):
    """Make ``torch.randn(shape, ...)`` return ``noise`` (its first rows, shaped [1, frames, mel])."""
    import torch

    real = torch.randn
    rows = np.asarray(noise, np.float32)

    def fake(*size, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (list, tuple, torch.Size)) else size
        assert len(shape) == 3 and shape[0] == 1 and shape[2] == rows.shape[1], shape
        assert shape[1] <= rows.shape[0], (shape, rows.shape)
        return torch.from_numpy(rows[: shape[1]].copy())[None].to(kwargs.get("dtype") or torch.float32)

    torch.randn = fake
    try:
        yield
    finally:
        torch.randn = real


def _sample_chunk(dit, y0, cond, ref_mel, codes, steps, guidance_scale, sway, solver):
    """The official ``sample_chunk`` (Euler) on transformers' DiT; ``solver="rk4"`` uses transformers'
    RungeKutta4ODESolver instead. Returns the mel [1, mel_dim, frames]."""
    import torch
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import RungeKutta4ODESolver

    frames = y0.shape[1]
    cond = cond.unsqueeze(1).repeat(1, frames, 1)

    def f(t, x):
        if guidance_scale < 1e-5:
            return dit(hidden_states=x, speaker_embedding=cond, condition_vector=ref_mel, quantized_code=codes,
                       time_step=t, drop_audio_conditioning=False, drop_code=False, apply_cfg=False)
        out = dit(hidden_states=x, quantized_code=codes, speaker_embedding=cond, condition_vector=ref_mel,
                  time_step=t, apply_cfg=True)
        guided, null = torch.chunk(out, 2, dim=0)
        return guided + (guided - null) * guidance_scale

    t = torch.linspace(0, 1, steps, dtype=torch.float32)
    if sway is not None:
        t += sway * (torch.cos(torch.pi / 2 * t) - 1 + t)
    if solver == "rk4":
        y = RungeKutta4ODESolver(function=f, initial_value=y0).integrate(t)[-1]
    else:
        y = y0
        for t0, t1 in zip(t[:-1], t[1:]):
            y = y + f(t0, y) * (t1 - t0)
    return y.permute(0, 2, 1)


def official_stream(token2wav, codes, cond, ref_mel, noise: np.ndarray, steps=10, guidance_scale=0.5, sway=-1.0,
                    solver="euler"):
    """The official chunked token2wav in torch; returns the list of waveform chunks (numpy), in order."""
    import torch

    dit, vocoder = token2wav.code2wav_dit_model, token2wav.code2wav_bigvgan_model
    repeats = dit.repeats
    noise_t = torch.from_numpy(np.asarray(noise, np.float32))[None]
    outputs = []
    with torch.no_grad():
        def dit_streaming():
            code_buffer = torch.zeros((1, 0), dtype=torch.long)
            chunk, left_context, right_context = 48, 24, 12
            left, start, mel_len = 0, 0, 0
            for next_code in codes:
                code_buffer = torch.cat([code_buffer, torch.tensor([[int(next_code)]])], dim=1)
                if code_buffer.size(1) == left + chunk + right_context:
                    duration = code_buffer.size(1) * repeats
                    mel = _sample_chunk(dit, noise_t[:, start:start + duration], cond, ref_mel, code_buffer, steps,
                                        guidance_scale, sway, solver)
                    mel = mel[:, :, left * repeats: -right_context * repeats]
                    left = left_context
                    code_buffer = code_buffer[:, -(left + right_context):]
                    mel_len += mel.size(-1)
                    start = mel_len - left_context * repeats
                    yield mel
            if code_buffer.size(1) > 0:
                duration = code_buffer.size(1) * repeats
                mel = _sample_chunk(dit, noise_t[:, start:start + duration], cond, ref_mel, code_buffer, steps,
                                    guidance_scale, sway, solver)
                yield mel[:, :, left * repeats:]

        mel_buffer = torch.zeros((1, dit.mel_dim, 0))
        left_context, right_context, hop = 20, 20, 240
        left = 0
        for mel in dit_streaming():
            mel_buffer = torch.cat([mel_buffer, mel], dim=-1)
            if mel_buffer.size(-1) > left + right_context:
                wave = vocoder(mel_buffer)[left * hop: -right_context * hop]
                left = left_context
                mel_buffer = mel_buffer[:, :, -(left + right_context):]
                outputs.append(wave.numpy())
        outputs.append(vocoder(mel_buffer)[left * hop:].numpy())
    return outputs


def build_bundle_for(checkpoint: Path, out: Path) -> Path:
    """An fp32 bundle of ``checkpoint`` with the thinker and token2wav only (fast)."""
    from omni_export.build.pipeline import build_bundle
    from omni_export.build.recipes import parse_recipe
    import yaml

    recipe = parse_recipe(yaml.safe_load(RECIPE), "token2wav-test.yaml")
    return build_bundle(checkpoint, recipe, out, memory_check=False)


def open_token2wav(bundle: Path):
    from omni_runtime.bundle.manifest import load_manifest
    from omni_runtime.bundle.sessions import SessionPool, SessionSettings
    from omni_runtime.stages.token2wav import Token2Wav

    manifest = load_manifest(bundle)
    pool = SessionPool(manifest, ["CPUExecutionProvider"], SessionSettings(intra_op_threads=1))
    return Token2Wav(manifest, pool), pool



_PREPARED: dict = {}


def prepared(tmp_path_factory):
    """(loud checkpoint, bundle with thinker + token2wav, transformers model): built once per session."""
    if "case" not in _PREPARED:
        from omni_export.testkit.tiny_model import write_tiny_checkpoint

        base = tmp_path_factory.mktemp("token2wav")
        tiny = write_tiny_checkpoint(base / "tiny", preset="tiny", seed=5)
        loud = loud_checkpoint(Path(tiny), base / "loud", seed=5)
        bundle = build_bundle_for(loud, base / "bundle")
        _PREPARED["case"] = (loud, bundle, reference_model(loud))
    return _PREPARED["case"]


def graph_session(bundle: Path, graph: str):
    """A one-thread onnxruntime CPU session of the bundle's graph ``graph`` (e.g. ``token2wav_dit``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(bundle / f"{graph}.onnx"), options, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Run torch with ``n`` intra-op threads (the reference is far slower on a busy 2-core machine otherwise)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
