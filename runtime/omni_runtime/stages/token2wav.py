"""Token2wav on the host: speech codes -> mel (DiT + ODE) -> 24 kHz waveform (BigVGAN), torch-free.

Two graphs run here (docs/bundle-format.md): ``token2wav_dit`` (one velocity evaluation) and
``token2wav_bigvgan`` (mel -> waveform). Everything else is numpy, following transformers'
``Qwen2_5OmniToken2WavModel`` (modeling_qwen2_5_omni.py) step by step, in float32:

- **Time grid.** ``linspace(0, 1, steps)`` then sway sampling
  ``t + sway * (cos(pi / 2 * t) - 1 + t)`` (``Qwen2_5OmniToken2WavDiTModel.sample``; defaults
  10 steps, sway -1, guidance 0.5 from ``config.token2wav.ode``). The grid is the float32
  rounding of ``i / (steps - 1)``; torch's vectorised linspace kernel may differ from it by one
  ulp at some points (a relative 6e-8 on a time value).
- **Guidance.** Each velocity is one DiT run on a batch of two rows, as transformers batches
  ``apply_cfg=True``: the conditioned row (codes, the speaker's x-vector, the speaker encoder's
  output for the speaker's reference mel) and the unconditioned one (codes 0, x-vector 0, the
  encoder's output for a zero mel); ``v = cond + (cond - uncond) * guidance_scale``. With
  ``guidance_scale < 1e-5`` only the conditioned row runs (transformers' ``apply_cfg=False``).
- **Solvers.** ``rk4`` is transformers' ``RungeKutta4ODESolver`` (the 3/8 rule, same operation
  order); ``euler`` is the official low-VRAM code's ``y = y + v(t0, y) * (t1 - t0)``.
- **Noise.** transformers draws the initial state with ``torch.randn``; this runtime has no
  torch, so the noise is an explicit input: one sequence of standard normal rows ``[frames,
  mel_dim]`` drawn from ``numpy.random.default_rng(seed)`` in row order (a prefix of it does not
  depend on how many rows are drawn later), or an array passed as ``noise=``. The parity tests
  feed the same array to transformers by replacing its ``torch.randn`` call.

Streaming (``Token2Wav.stream``) follows the official low-VRAM streaming scheme, QwenLM/Qwen2.5-Omni
``low-VRAM-mode/modeling_qwen2_5_omni_low_VRAM_mode.py``, ``Qwen2_5OmniToken2WavModel.forward(...,
return_audio_in_chunk=True)``; its constants are in the manifest (``config.token2wav.stream``):

- DiT: codes are buffered until the buffer holds ``left + 48 + 12`` codes (``left`` is 0 for the
  first chunk, then 24); the buffer is solved from the slice of the shared noise sequence that
  starts at its first frame, the mel of the left and right context codes is cut off, and the last
  ``24 + 12`` codes stay in the buffer. When the codes end, the rest of the buffer is solved
  (only its left context cut off).
- Vocoder: mel chunks are appended to a buffer; when it holds more than ``left + 20`` frames
  (``left`` 0 at first, then 20) BigVGAN runs on it, ``left * 240`` samples are dropped at the
  start and ``20 * 240`` at the end, and the last 40 frames stay as the next context; at the end
  BigVGAN runs on what is left and only its left context is dropped.

Chunks therefore come out while codes are still arriving (``codes`` may be any iterator, e.g.
the talker's). Sessions are taken from the pool when needed; when the call (or the stream) ends the pool is
told this stage is done with them (``SessionPool.done``: the memory policy frees or keeps them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from omni_runtime.bundle.config import Token2WavConfig
from omni_runtime.errors import BundleError, InputError
from omni_runtime.bundle.manifest import Manifest, verify_file

from omni_runtime.bundle.names import TOKEN2WAV_BIGVGAN as BIGVGAN_GRAPH
from omni_runtime.bundle.names import TOKEN2WAV_DIT as DIT_GRAPH
SOLVERS = ("rk4", "euler")
SPEAKER_TENSORS = ("speaker_embedding", "reference_embedding", "null_reference_embedding")
CFG_THRESHOLD = 1e-5  # transformers: guidance_scale < 1e-5 runs the conditioned row only
REBUILD = "rebuild the bundle with this omni-export version"


@dataclass(frozen=True)
class Speaker:
    """One speaker of the bundle: the talker's text-stream start token and the DiT's conditioning."""

    name: str
    bos_token: int
    speaker_embedding: np.ndarray         # [enc_emb_dim] x-vector
    reference_embedding: np.ndarray       # [enc_dim] speaker encoder output for the reference mel
    null_reference_embedding: np.ndarray  # [enc_dim] speaker encoder output for a zero mel


def token2wav_config(manifest: Manifest) -> Token2WavConfig:
    """``config.token2wav`` of the manifest, typed; BundleError when the bundle has no speech output."""
    config = manifest.configs.token2wav
    if config is None or DIT_GRAPH not in manifest.graphs or BIGVGAN_GRAPH not in manifest.graphs:
        raise BundleError("this bundle has no speech output (no token2wav graphs): it was built from a model "
                          "without a talker, or with a recipe that leaves token2wav out",
                          path=manifest.manifest_path,
                          fix="ask for text only, or rebuild from a checkpoint with a talker and token2wav "
                              "with a recipe that exports them (e.g. --recipe fp32)")
    return config


def speaker_names(manifest: Manifest) -> list[str]:
    """The bundle's speaker names, in the order of spk_dict.pt."""
    return list(token2wav_config(manifest).speakers)


def check_speaker(manifest: Manifest, name: str | None) -> str:
    """``name`` (or the bundle's default speaker when None) if the bundle has it; InputError listing the
    choices otherwise."""
    config = token2wav_config(manifest)
    name = config.default_speaker if name is None else name
    if name not in config.speakers:
        raise InputError(f"unknown speaker {name!r}", fix=f"choose one of: {', '.join(config.speakers)}",
                         param="speaker")
    return name


def speaker_bos_token(manifest: Manifest, name: str | None = None) -> int:
    """The talker's text-stream start token of speaker ``name`` (default speaker when None)."""
    return token2wav_config(manifest).speakers[check_speaker(manifest, name)].bos_token


def load_speaker(manifest: Manifest, name: str | None = None) -> Speaker:
    """Speaker ``name`` of the bundle (sha256-checked ``.npy`` files, read without pickle)."""
    name = check_speaker(manifest, name)
    config = token2wav_config(manifest)
    entry = config.speakers[name]
    shapes = {"speaker_embedding": (config.enc_emb_dim,), "reference_embedding": (config.enc_dim,),
              "null_reference_embedding": (config.enc_dim,)}
    arrays = {}
    for tensor in SPEAKER_TENSORS:
        relpath = getattr(entry, tensor)
        verify_file(manifest, relpath)
        path = manifest.path(relpath)
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise BundleError(f"not a readable .npy file ({exc})", path=path, fix=REBUILD) from None
        if array.dtype != np.float32 or array.shape != shapes[tensor]:
            raise BundleError(f"expected float32 {list(shapes[tensor])}, found {array.dtype} {list(array.shape)}",
                              path=path, fix=REBUILD)
        arrays[tensor] = array
    return Speaker(name, entry.bos_token, **arrays)


class NoiseSequence:
    """Standard normal rows ``[mel_dim]`` numbered from 0: drawn lazily in order from
    ``numpy.random.default_rng(seed)``, or taken from a given array ``[rows, mel_dim]``."""

    def __init__(self, mel_dim: int, seed: int | None = None, noise: np.ndarray | None = None):
        self.mel_dim = mel_dim
        if noise is not None:
            noise = np.asarray(noise)
            if noise.ndim == 3 and noise.shape[0] == 1:
                noise = noise[0]
            if noise.ndim != 2 or noise.shape[1] != mel_dim or not np.issubdtype(noise.dtype, np.floating):
                raise InputError(f"noise must be a float array [frames, {mel_dim}], got {noise.dtype} "
                                 f"{list(noise.shape)}", fix=f"pass rows of {mel_dim} standard normal values, "
                                                              "or seed= instead", param="noise")
            self._rows = np.ascontiguousarray(noise, dtype=np.float32)
            self._rng = None
        else:
            if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
                raise InputError(f"seed must be an integer >= 0, got {seed!r}", fix="pass e.g. seed=0", param="seed")
            self._rows = np.zeros((0, mel_dim), np.float32)
            self._rng = np.random.default_rng(seed)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start .. stop - 1`` as ``[stop - start, mel_dim]`` float32."""
        if stop > self._rows.shape[0]:
            if self._rng is None:
                raise InputError(f"noise has {self._rows.shape[0]} rows, {stop} are needed",
                                 fix=f"pass at least {stop} rows of noise, or seed= instead", param="noise")
            more = self._rng.standard_normal((stop - self._rows.shape[0], self.mel_dim), dtype=np.float32)
            self._rows = np.concatenate([self._rows, more])
        return self._rows[start:stop]


def time_grid(steps: int, sway_coefficient: float | None) -> np.ndarray:
    """The ODE's time points [steps] (float32): linspace(0, 1, steps), then sway sampling."""
    t = (np.arange(steps, dtype=np.float64) / max(steps - 1, 1)).astype(np.float32)
    if sway_coefficient is not None:
        t = t + np.float32(sway_coefficient) * (np.cos(np.float32(math.pi / 2) * t) - np.float32(1) + t)
    return t.astype(np.float32)


class Token2Wav:
    """Speech codes -> float32 waveform at ``sample_rate`` Hz, whole or streamed in chunks."""

    def __init__(self, manifest: Manifest, pool):
        self.manifest = manifest
        self.pool = pool
        self.config = config = token2wav_config(manifest)
        self.sample_rate = config.sample_rate
        self.mel_dim = config.mel_dim
        self.mel_per_code = config.mel_per_code
        self.hop_length = config.hop_length
        self.num_embeds = config.num_embeds
        self.max_mel_frames = config.max_mel_frames
        self.ode = config.ode
        self.stream_config = config.stream
        self.speakers = speaker_names(manifest)
        self._speakers: dict[str, Speaker] = {}

    # -- arguments --------------------------------------------------------------------------
    def speaker(self, name: str | None = None) -> Speaker:
        """The named speaker (default: the bundle's default, Chelsie); InputError listing the choices."""
        name = check_speaker(self.manifest, name)
        if name not in self._speakers:
            self._speakers[name] = load_speaker(self.manifest, name)
        return self._speakers[name]

    def _options(self, solver, steps, guidance_scale, sway_coefficient, default_solver):
        solver = getattr(self.ode, default_solver) if solver is None else solver
        if solver not in SOLVERS:
            raise InputError(f"unknown solver {solver!r}", fix=f"use one of: {', '.join(SOLVERS)}", param="solver")
        steps = self.ode.steps if steps is None else steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
            raise InputError(f"steps must be an integer >= 2, got {steps!r}",
                             fix="pass e.g. steps=10 (the number of ODE time points)", param="steps")
        guidance = self.ode.guidance_scale if guidance_scale is None else guidance_scale
        if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not math.isfinite(guidance):
            raise InputError(f"guidance_scale must be a number, got {guidance!r}", fix="pass e.g. 0.5",
                             param="guidance_scale")
        sway = self.ode.sway_coefficient if sway_coefficient is None else sway_coefficient
        if sway is not None and (not isinstance(sway, (int, float)) or isinstance(sway, bool)
                                 or not math.isfinite(sway)):
            raise InputError(f"sway_coefficient must be a number, got {sway!r}", fix="pass e.g. -1.0",
                             param="sway_coefficient")
        return solver, steps, float(guidance), sway

    def _codes(self, codes) -> np.ndarray:
        array = np.asarray(list(codes) if not isinstance(codes, np.ndarray) else codes)
        if array.ndim == 2 and array.shape[0] == 1:
            array = array[0]
        if array.size == 0:
            return np.zeros(0, np.int64)
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise InputError(f"codes must be a list of integers, got {array.dtype} {list(array.shape)}",
                             fix="pass the talker's codec codes as a 1-D list of ints", param="codes")
        return self._check_range(array.astype(np.int64))

    def _check_range(self, array: np.ndarray) -> np.ndarray:
        bad = array[(array < 0) | (array > self.num_embeds)]
        if bad.size:
            raise InputError(f"code {int(bad[0])} is outside the DiT's codebook 0..{self.num_embeds}",
                             fix="pass the talker's codes without its eos/pad codes", param="codes")
        return array

    # -- the ODE ----------------------------------------------------------------------------
    def _velocity_fn(self, session, codes: np.ndarray, speaker: Speaker, guidance: float):
        """f(t, x [1, frames, mel]) -> velocity [1, frames, mel], guidance included."""
        if guidance < CFG_THRESHOLD:
            feeds = {"codes": codes[None], "speaker_embedding": speaker.speaker_embedding[None],
                     "reference_embedding": speaker.reference_embedding[None]}
            rows = 1
        else:
            feeds = {"codes": np.stack([codes, np.zeros_like(codes)]),
                     "speaker_embedding": np.stack([speaker.speaker_embedding,
                                                    np.zeros_like(speaker.speaker_embedding)]),
                     "reference_embedding": np.stack([speaker.reference_embedding,
                                                      speaker.null_reference_embedding])}
            rows = 2
        scale = np.float32(guidance)

        def f(t: np.float32, x: np.ndarray) -> np.ndarray:
            out = session.run(["velocity"], {**feeds, "x": np.repeat(x, rows, axis=0),
                                             "time": np.full(rows, t, np.float32)})[0]
            if rows == 1:
                return out
            cond, uncond = out[:1], out[1:]
            return cond + (cond - uncond) * scale

        return f

    @staticmethod
    def _solve(f, y: np.ndarray, t: np.ndarray, solver: str) -> np.ndarray:
        third, two_thirds = np.float32(1 / 3), np.float32(2 / 3)
        for t0, t1 in zip(t[:-1], t[1:]):
            dt = np.float32(t1 - t0)
            if solver == "euler":
                y = y + f(t0, y) * dt
                continue
            # transformers' RungeKutta4ODESolver._rk4_step (3/8 rule), same order of operations
            k1 = f(t0, y)
            k2 = f(np.float32(t0 + dt * third), y + dt * k1 * third)
            k3 = f(np.float32(t0 + dt * two_thirds), y + dt * (k2 - k1 * third))
            k4 = f(t1, y + dt * (k1 - k2 + k3))
            y = y + (k1 + np.float32(3) * (k2 + k3) + k4) * dt / np.float32(8)
        return y

    def _mel(self, session, codes: np.ndarray, y0: np.ndarray, speaker: Speaker, solver: str, steps: int,
             guidance: float, sway) -> np.ndarray:
        """Solve the ODE for ``codes`` from ``y0`` [frames, mel]; the mel [mel, frames]."""
        f = self._velocity_fn(session, codes, speaker, guidance)
        y = self._solve(f, y0[None].astype(np.float32), time_grid(steps, sway), solver)
        return np.ascontiguousarray(y[0].T)

    def _vocode(self, session, mel: np.ndarray) -> np.ndarray:
        return session.run(["waveform"], {"mel": mel[None].astype(np.float32)})[0][0]

    # -- public API -------------------------------------------------------------------------
    def mel(self, codes, speaker: str | None = None, *, solver: str | None = None, steps: int | None = None,
            seed: int | None = None, noise: np.ndarray | None = None, guidance_scale: float | None = None,
            sway_coefficient: float | None = None) -> np.ndarray:
        """The DiT's mel spectrogram [mel_dim, frames] for all ``codes`` at once (see ``waveform``)."""
        codes = self._codes(codes)
        solver, steps, guidance, sway = self._options(solver, steps, guidance_scale, sway_coefficient, "solver")
        spk = self.speaker(speaker)
        frames = codes.shape[0] * self.mel_per_code
        if frames > self.max_mel_frames:
            raise InputError(f"{codes.shape[0]} codes make {frames} mel frames, more than the DiT's "
                             f"{self.max_mel_frames}", fix="use stream(), which solves the codes in chunks",
                             param="codes")
        y0 = NoiseSequence(self.mel_dim, seed, noise).rows(0, frames)
        if frames == 0:
            return np.zeros((self.mel_dim, 0), np.float32)
        try:
            return self._mel(self.pool.get(DIT_GRAPH), codes, y0, spk, solver, steps, guidance, sway)
        finally:
            self.pool.done(DIT_GRAPH)

    def waveform(self, codes, speaker: str | None = None, *, solver: str | None = None, steps: int | None = None,
                 seed: int | None = None, noise: np.ndarray | None = None, guidance_scale: float | None = None,
                 sway_coefficient: float | None = None) -> np.ndarray:
        """The waveform of all ``codes`` at once: float32 [codes * mel_per_code * hop_length] in [-1, 1].

        Equal to transformers' ``Qwen2_5OmniToken2WavModel(codes, conditioning, reference_mel)`` for
        the same initial noise. ``solver`` ``rk4`` (default, as transformers) or ``euler``; ``steps``,
        ``guidance_scale`` and ``sway_coefficient`` default to the bundle's ``config.token2wav.ode``.
        The noise is drawn from ``seed`` (None: fresh entropy) unless ``noise`` [frames, mel_dim] is given.
        """
        mel = self.mel(codes, speaker, solver=solver, steps=steps, seed=seed, noise=noise,
                       guidance_scale=guidance_scale, sway_coefficient=sway_coefficient)
        if mel.shape[1] == 0:
            return np.zeros(0, np.float32)
        try:
            return self._vocode(self.pool.get(BIGVGAN_GRAPH), mel)
        finally:
            self.pool.done(BIGVGAN_GRAPH)

    def stream(self, codes: Iterable[int], speaker: str | None = None, *, solver: str | None = None,
               steps: int | None = None, seed: int | None = None, noise: np.ndarray | None = None,
               guidance_scale: float | None = None,
               sway_coefficient: float | None = None) -> Iterator[tuple[np.ndarray, bool]]:
        """Waveform chunks ``(pcm float32 [samples], last)`` while ``codes`` (any iterable, consumed
        lazily) arrive, by the official chunked scheme (module docstring). ``solver`` defaults to
        ``euler`` (``config.token2wav.ode.stream_solver``), as the official streaming code. The last
        chunk has ``last=True`` (it is empty when there were no codes). Arguments are checked
        before the first code is read; the sessions are released when the stream ends or is closed."""
        solver, steps, guidance, sway = self._options(solver, steps, guidance_scale, sway_coefficient,
                                                      "stream_solver")
        spk = self.speaker(speaker)
        noise_rows = NoiseSequence(self.mel_dim, seed, noise)
        return self._stream(iter(codes), spk, noise_rows, solver, steps, guidance, sway)

    def _stream(self, codes: Iterator, spk: Speaker, noise: NoiseSequence, solver: str, steps: int,
                guidance: float, sway) -> Iterator[tuple[np.ndarray, bool]]:
        s, r = self.stream_config, self.mel_per_code
        chunk, left_ctx, right_ctx = s.dit_chunk_codes, s.dit_left_context_codes, s.dit_right_context_codes
        voc_left_ctx, voc_right = s.vocoder_left_context_frames, s.vocoder_right_context_frames
        hop = self.hop_length
        try:
            dit = self.pool.get(DIT_GRAPH)
            vocoder = self.pool.get(BIGVGAN_GRAPH)

            def solve(buffer: list[int], start: int) -> np.ndarray:
                codes_arr = self._check_range(np.asarray(buffer, dtype=np.int64))
                frames = len(buffer) * r
                return self._mel(dit, codes_arr, noise.rows(start, start + frames), spk, solver, steps, guidance,
                                 sway)

            def mel_chunks() -> Iterator[np.ndarray]:
                buffer: list[int] = []
                left, start, produced = 0, 0, 0
                for code in codes:
                    if not isinstance(code, (int, np.integer)) or isinstance(code, bool):
                        raise InputError(f"codes must be integers, got {code!r}", fix="pass the talker's codec codes",
                                         param="codes")
                    buffer.append(int(code))
                    if len(buffer) == left + chunk + right_ctx:
                        mel = solve(buffer, start)[:, left * r: -right_ctx * r]
                        left = left_ctx
                        buffer = buffer[-(left + right_ctx):]
                        produced += mel.shape[1]
                        start = produced - left_ctx * r
                        yield mel
                if buffer:
                    yield solve(buffer, start)[:, left * r:]

            mel_buffer = np.zeros((self.mel_dim, 0), np.float32)
            voc_left = 0
            for mel in mel_chunks():
                mel_buffer = np.concatenate([mel_buffer, mel], axis=1)
                if mel_buffer.shape[1] > voc_left + voc_right:
                    wave = self._vocode(vocoder, mel_buffer)[voc_left * hop: -voc_right * hop]
                    voc_left = voc_left_ctx
                    mel_buffer = mel_buffer[:, -(voc_left + voc_right):]
                    yield wave, False
            if mel_buffer.shape[1] == 0:
                yield np.zeros(0, np.float32), True
            else:
                yield self._vocode(vocoder, mel_buffer)[voc_left * hop:], True
        finally:
            self.pool.done(DIT_GRAPH)
            self.pool.done(BIGVGAN_GRAPH)
