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
into the upsampling filter (an exact power-of-two scaling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .onnx_graph import GraphBuilder
from .onnx_io import ExportedGraph

GRAPH_NAME = "token2wav_bigvgan"
FILE_NAME = "token2wav_bigvgan.onnx"
F = ir.DataType.FLOAT
MIN_DB = -115.0          # process_mel_spectrogram: amplitude floor and normalisation range (dB)
REF_DB = 20.0            # ... minus 20 dB
SNAKE_EPS = 1e-9         # SnakeBeta's no_div_by_zero
AA_RATIO = 2             # anti-aliased activation: up/down ratio and kernel size
AA_KERNEL = 12


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
        self.up_taps = (AA_RATIO * taps).astype(np.float32)
        self.down_taps = taps
        self._filters: dict[tuple[str, int], ir.Value] = {}

    def conv(self, x: ir.Value, conv: Conv, name: str, dilation: int = 1) -> ir.Value:
        g = self.g
        k = conv.weight.shape[-1]
        pad = _padding(k, dilation)
        inputs = [x, g.weight(f"{name}.weight", conv.weight.astype(np.float32))]
        if conv.bias is not None:
            inputs.append(g.weight(f"{name}.bias", conv.bias.astype(np.float32)))
        return g.op("Conv", *inputs, dilations=[dilation], pads=[pad, pad], strides=[1], kernel_shape=[k])

    def conv_transpose(self, x: ir.Value, conv: Conv, stride: int, name: str) -> ir.Value:
        g = self.g
        k = conv.weight.shape[-1]
        pad = (k - stride) // 2
        return g.op("ConvTranspose", x, g.weight(f"{name}.weight", conv.weight.astype(np.float32)),
                    g.weight(f"{name}.bias", conv.bias.astype(np.float32)), strides=[stride], pads=[pad, pad],
                    kernel_shape=[k])

    def _filter(self, kind: str, channels: int) -> ir.Value:
        key = (kind, channels)
        if key not in self._filters:
            taps = self.up_taps if kind == "up" else self.down_taps
            self._filters[key] = self.g.weight(f"aa_{kind}_filter_{channels}",
                                               np.ascontiguousarray(np.broadcast_to(taps, (channels, 1, AA_KERNEL))))
        return self._filters[key]

    def anti_aliased_snake(self, x: ir.Value, snake: Snake, name: str) -> ir.Value:
        """Upsample x2, SnakeBeta, downsample x2 (Qwen2_5OmniAntiAliasedActivation1d)."""
        g = self.g
        channels = snake.alpha.shape[0]
        # upsample: replicate-pad by kernel/ratio - 1, depthwise transposed conv, trim
        pad = AA_KERNEL // AA_RATIO - 1
        trim_left = pad * AA_RATIO + (AA_KERNEL - AA_RATIO) // 2
        trim_right = pad * AA_RATIO + (AA_KERNEL - AA_RATIO + 1) // 2
        up = g.op("Pad", x, g.const([0, 0, pad, 0, 0, pad]), mode="edge")
        up = g.op("ConvTranspose", up, self._filter("up", channels), strides=[AA_RATIO], group=channels,
                  kernel_shape=[AA_KERNEL])
        up = g.op("Slice", up, g.const([trim_left]), g.const([-trim_right]), g.const([2]))
        # SnakeBeta with per-channel constants
        alpha = np.exp(snake.alpha.astype(np.float32))[:, None]
        inv_beta = (np.float32(1.0) / (np.exp(snake.beta.astype(np.float32)) + np.float32(SNAKE_EPS)))[:, None]
        s = g.op("Sin", g.op("Mul", up, g.weight(f"{name}.exp_alpha", alpha.astype(np.float32))))
        act = g.op("Add", up, g.op("Mul", g.weight(f"{name}.inv_beta", inv_beta.astype(np.float32)),
                                   g.op("Mul", s, s)))
        # downsample: replicate-pad (kernel/2 - 1 left, kernel/2 right for an even kernel), strided depthwise conv
        left = AA_KERNEL // 2 - int(AA_KERNEL % 2 == 0)
        right = AA_KERNEL // 2
        down = g.op("Pad", act, g.const([0, 0, left, 0, 0, right]), mode="edge")
        return g.op("Conv", down, self._filter("down", channels), strides=[AA_RATIO], group=channels,
                    kernel_shape=[AA_KERNEL])

    def amp_block(self, x: ir.Value, block: AMPBlock, dilations: tuple[int, ...], name: str) -> ir.Value:
        for i, (c1, c2) in enumerate(zip(block.convs1, block.convs2)):
            residual = x
            x = self.anti_aliased_snake(x, block.activations[2 * i], f"{name}.activations.{2 * i}")
            x = self.conv(x, c1, f"{name}.convs1.{i}", dilation=dilations[i])
            x = self.anti_aliased_snake(x, block.activations[2 * i + 1], f"{name}.activations.{2 * i + 1}")
            x = self.conv(x, c2, f"{name}.convs2.{i}")
            x = self.g.op("Add", residual, x)
        return x


def build_graph(dims: BigVGANDims, weights: BigVGANWeights, out_dir: Path) -> ExportedGraph:
    """Write ``token2wav_bigvgan.onnx`` (+ ``.data``)."""
    g = GraphBuilder(out_dir, FILE_NAME)
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
    x = g.op("Clip", normalised, g.const(-1.0, np.float32), g.const(1.0, np.float32))

    x = b.conv(x, weights.conv_pre, "conv_pre")
    n_kernels = len(dims.resblock_kernel_sizes)
    for stage, stride in enumerate(dims.upsample_rates):
        x = b.conv_transpose(x, weights.ups[stage], stride, f"ups.{stage}.0")
        total = None
        for j in range(n_kernels):
            index = stage * n_kernels + j
            y = b.amp_block(x, weights.resblocks[index], dims.resblock_dilation_sizes[j], f"resblocks.{index}")
            total = y if total is None else g.op("Add", total, y)
        x = g.op("Div", total, g.const(float(n_kernels), np.float32))
    x = b.anti_aliased_snake(x, weights.activation_post, "activation_post")
    x = b.conv(x, weights.conv_post, "conv_post")
    wave = g.op("Clip", x, g.const(-1.0, np.float32), g.const(1.0, np.float32))
    wave = g.op("Squeeze", wave, g.const([1]))
    g.output(wave, "waveform", F, ("batch", "samples"))
    return g.save()
