"""The token2wav BigVGAN vocoder graph (mel spectrogram -> waveform), built op by op.

Graph IO (docs/bundle-format.md, ``token2wav_bigvgan``)::

    mel [batch, mel_dim, frames] float32       the DiT's mel spectrogram (log amplitude)
    -> waveform [batch, samples] float32       samples = frames * hop_length (240), in [-1, 1]

This is ``Qwen2_5OmniToken2WavBigVGANModel.forward``: the mel is turned into a normalised
decibel spectrogram, ``conv_pre``, then per upsampling stage a transposed convolution and the
mean of the stage's AMP blocks (dilated convolutions with anti-aliased SnakeBeta activations),
then the final anti-aliased activation, ``conv_post`` and a clamp to [-1, 1].

The anti-aliased activation upsamples by 2 (replicate padding, a depthwise transposed
convolution with a Kaiser-windowed sinc filter, trimming), applies SnakeBeta
``x + 1 / (exp(beta) + 1e-9) * sin(x * exp(alpha))^2`` and downsamples by 2 (replicate padding,
depthwise strided convolution with the same kind of filter). The filters are the taps of
transformers' ``kaiser_sinc_filter1d`` computed here in numpy; the upsampling gain of 2 is folded
into the upsampling filter (an exact power-of-two scaling). The upsampling runs in polyphase form
(two depthwise convolutions, interleaved) and both filters as 2D depthwise convolutions over
[batch, channels, 1, length], which onnxruntime runs with its fast depthwise kernels (2-8x faster
than the 1D grouped convolution / transposed convolution on CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from omni_runtime.bundle.names import TOKEN2WAV_BIGVGAN as GRAPH_NAME

from omni_export.export.onnx_graph import GraphBuilder
from omni_export.export.onnx_io import ExportedGraph

FILE_NAME = "token2wav_bigvgan.onnx"
F = ir.DataType.FLOAT
MIN_DB = -115.0          # process_mel_spectrogram: amplitude floor and normalisation range (dB)
REF_DB = 20.0            # ... minus 20 dB
SNAKE_EPS = 1e-9         # SnakeBeta's no_div_by_zero
AA_RATIO = 2             # anti-aliased activation: up/down ratio and kernel size
AA_KERNEL = 12
UP_PAD = 3               # polyphase upsampling: replicate padding and taps per phase (see anti_aliased_snake)
UP_TAPS = 7


@dataclass(frozen=True)
class BigVGANDims:
    mel_dim: int
    upsample_initial_channel: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]

    @classmethod
    def from_config(cls, cfg) -> "BigVGANDims":
        return cls(cfg.mel_dim, cfg.upsample_initial_channel, tuple(cfg.resblock_kernel_sizes),
                   tuple(tuple(d) for d in cfg.resblock_dilation_sizes), tuple(cfg.upsample_rates),
                   tuple(cfg.upsample_kernel_sizes))

    @property
    def hop_length(self) -> int:
        """Waveform samples per mel frame (the product of the upsampling rates)."""
        return math.prod(self.upsample_rates)

    def channels(self, stage: int) -> int:
        """Channels after upsampling stage ``stage`` (0-based)."""
        return self.upsample_initial_channel // (2 ** (stage + 1))


@dataclass
class Conv:
    weight: np.ndarray        # Conv1d [out, in, k]; ConvTranspose1d [in, out, k]
    bias: np.ndarray | None


@dataclass
class Snake:
    alpha: np.ndarray  # [channels] (log scale, as stored)
    beta: np.ndarray


@dataclass
class AMPBlock:
    convs1: list[Conv]       # dilated
    convs2: list[Conv]
    activations: list[Snake]  # 6: before each conv (convs1[i] after activations[2i], convs2[i] after [2i+1])


@dataclass
class BigVGANWeights:
    conv_pre: Conv
    ups: list[Conv]
    resblocks: list[AMPBlock]  # stage-major: stage * len(kernel sizes) + j
    activation_post: Snake
    conv_post: Conv


def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> np.ndarray:
    """transformers' ``kaiser_sinc_filter1d`` taps [kernel_size] (float32)."""
    even = kernel_size % 2 == 0
    half = kernel_size // 2
    delta_f = 4 * half_width
    attenuation = 2.285 * (half - 1) * math.pi * delta_f + 7.95
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    window = np.kaiser(kernel_size, beta).astype(np.float32)
    t = (np.arange(-half, half) + 0.5) if even else (np.arange(kernel_size) - half)
    sinc = np.sinc(2 * cutoff * t.astype(np.float32)).astype(np.float32)
    taps = np.float32(2 * cutoff) * window * sinc
    return (taps / taps.sum()).astype(np.float32)


def _padding(kernel: int, dilation: int = 1) -> int:
    return (kernel * dilation - dilation) // 2


class _Builder:
    def __init__(self, g: GraphBuilder):
        self.g = g
        taps = kaiser_sinc_filter(0.5 / AA_RATIO, 0.6 / AA_RATIO, AA_KERNEL)
        up = (AA_RATIO * taps).astype(np.float32)  # the upsampler's gain of 2, folded in
        zero = np.zeros(1, np.float32)
        self.up_even = np.concatenate([up[AA_KERNEL - 1::-2], zero])  # up[11 - 2i], then a zero tap
        self.up_odd = np.concatenate([zero, up[AA_KERNEL - 2::-2]])   # a zero tap, then up[10 - 2i]
        self.down_taps = taps
        self._filters: dict[tuple[str, int], ir.Value] = {}

    def conv(self, x: ir.Value, conv: Conv, name: str, dilation: int = 1) -> ir.Value:
        g = self.g
        k = conv.weight.shape[-1]
        pad = _padding(k, dilation)
        inputs = [x, g.conv_weight(f"{name}.weight", conv.weight)]
        if conv.bias is not None:
            inputs.append(g.fweight(f"{name}.bias", conv.bias))
        return g.op("Conv", *inputs, dilations=[dilation], pads=[pad, pad], strides=[1], kernel_shape=[k])

    def conv_transpose(self, x: ir.Value, conv: Conv, stride: int, name: str) -> ir.Value:
        g = self.g
        k = conv.weight.shape[-1]
        pad = (k - stride) // 2
        return g.op("ConvTranspose", x, g.conv_weight(f"{name}.weight", conv.weight, transposed=True),
                    g.fweight(f"{name}.bias", conv.bias), strides=[stride], pads=[pad, pad],
                    kernel_shape=[k])

    def _filter(self, kind: str, channels: int) -> ir.Value:
        """Per-channel taps as a 2D depthwise Conv weight [channels, 1, 1, k]."""
        key = (kind, channels)
        if key not in self._filters:
            taps = {"up_even": self.up_even, "up_odd": self.up_odd, "down": self.down_taps}[kind]
            self._filters[key] = self.g.fweight(f"aa_{kind}_filter_{channels}", np.ascontiguousarray(
                np.broadcast_to(taps, (channels, 1, 1, taps.shape[0]))))
        return self._filters[key]

    def anti_aliased_snake(self, x: ir.Value, snake: Snake, name: str) -> ir.Value:
        """Upsample x2, SnakeBeta, downsample x2 (Qwen2_5OmniAntiAliasedActivation1d), on x [B, C, L].

        The filters run as 2D depthwise convolutions over [B, C, 1, L] (onnxruntime's fast depthwise
        kernels). The upsampling (replicate pad by 5, transposed conv with stride 2, trim 15 at each
        end) is computed in polyphase form: output sample 2q is sum_i up[11 - 2i] * xq[q + i] and
        sample 2q + 1 is sum_i up[10 - 2i] * xq[q + 1 + i] (i = 0..5) with xq = x replicate-padded
        by 3, i.e. two 7-tap depthwise convolutions whose outputs are interleaved.
        """
        g = self.g
        channels = snake.alpha.shape[0]
        xq = g.op("Unsqueeze", g.op("Pad", x, g.const([0, 0, UP_PAD, 0, 0, UP_PAD]), mode="edge"), g.const([2]))
        phases = [g.op("Unsqueeze", g.op("Conv", xq, self._filter(kind, channels), group=channels,
                                         kernel_shape=[1, UP_TAPS]), g.const([-1]))
                  for kind in ("up_even", "up_odd")]
        up = g.op("Reshape", g.op("Concat", *phases, axis=-1), g.const([0, 0, 1, -1]))   # [B, C, 1, 2L]
        # SnakeBeta with per-channel constants
        alpha = np.exp(snake.alpha.astype(np.float32))[:, None, None]
        inv_beta = (np.float32(1.0) / (np.exp(snake.beta.astype(np.float32)) + np.float32(SNAKE_EPS)))[:, None, None]
        s = g.op("Sin", g.op("Mul", up, g.fweight(f"{name}.exp_alpha", alpha)))
        act = g.op("Add", up, g.op("Mul", g.fweight(f"{name}.inv_beta", inv_beta), g.op("Mul", s, s)))
        # downsample: replicate-pad (kernel/2 - 1 left, kernel/2 right for an even kernel), strided depthwise conv
        left = AA_KERNEL // 2 - int(AA_KERNEL % 2 == 0)
        right = AA_KERNEL // 2
        down = g.op("Pad", act, g.const([0, 0, 0, left, 0, 0, 0, right]), mode="edge")
        down = g.op("Conv", down, self._filter("down", channels), strides=[1, AA_RATIO], group=channels,
                    kernel_shape=[1, AA_KERNEL])
        return g.op("Squeeze", down, g.const([2]))

    def amp_block(self, x: ir.Value, block: AMPBlock, dilations: tuple[int, ...], name: str) -> ir.Value:
        for i, (c1, c2) in enumerate(zip(block.convs1, block.convs2)):
            residual = x
            x = self.anti_aliased_snake(self.g.stream(x), block.activations[2 * i], f"{name}.activations.{2 * i}")
            x = self.conv(x, c1, f"{name}.convs1.{i}", dilation=dilations[i])
            x = self.anti_aliased_snake(x, block.activations[2 * i + 1], f"{name}.activations.{2 * i + 1}")
            x = self.conv(x, c2, f"{name}.convs2.{i}")
            x = self.g.residual(residual, x)
        return self.g.stream(x)


def build_graph(dims: BigVGANDims, weights: BigVGANWeights, out_dir: Path, dtype: str = "float32",
                keep_fp32: tuple[str, ...] = ()) -> ExportedGraph:
    """Write ``token2wav_bigvgan.onnx`` (+ ``.data``). ``dtype``: the float type it computes in (IO
    stays float32; the mel's decibel normalisation is float32 in any case); ``keep_fp32``:
    ``residual`` (each AMP block's residual stream) of a float16 graph kept in float32."""
    g = GraphBuilder(out_dir, FILE_NAME, dtype=dtype, keep_fp32=keep_fp32)
    b = _Builder(g)
    mel = g.input("mel", F, ("batch", dims.mel_dim, "frames"))

    # process_mel_spectrogram: 20 * log10(max(exp(mel), 10^(-115/20))) - 20, then scaled to [-1, 1]
    min_level = np.float32(math.exp(MIN_DB / 20.0 * math.log(10)))
    amplitude = g.op("Max", g.op("Exp", mel), g.const(min_level, np.float32))
    db = g.op("Sub", g.op("Mul", g.const(20.0, np.float32),
                          g.op("Div", g.op("Log", amplitude), g.const(math.log(10.0), np.float32))),
              g.const(REF_DB, np.float32))
    normalised = g.op("Sub", g.op("Mul", g.const(2.0, np.float32),
                                  g.op("Div", g.op("Sub", db, g.const(MIN_DB, np.float32)),
                                       g.const(-MIN_DB, np.float32))), g.const(1.0, np.float32))
    x = g.to_compute(g.op("Clip", normalised, g.const(-1.0, np.float32), g.const(1.0, np.float32)))

    x = b.conv(x, weights.conv_pre, "conv_pre")
    n_kernels = len(dims.resblock_kernel_sizes)
    for stage, stride in enumerate(dims.upsample_rates):
        x = b.conv_transpose(x, weights.ups[stage], stride, f"ups.{stage}.0")
        total = None
        for j in range(n_kernels):
            index = stage * n_kernels + j
            y = b.amp_block(x, weights.resblocks[index], dims.resblock_dilation_sizes[j], f"resblocks.{index}")
            total = y if total is None else g.op("Add", total, y)
        x = g.op("Div", total, g.fconst(float(n_kernels)))
    x = b.anti_aliased_snake(x, weights.activation_post, "activation_post")
    x = b.conv(x, weights.conv_post, "conv_post")
    wave = g.op("Clip", x, g.fconst(-1.0), g.fconst(1.0))
    wave = g.op("Squeeze", wave, g.const([1]))
    g.float_output(wave, "waveform", ("batch", "samples"))
    return g.save()
