"""AWQ beats round-to-nearest on a decoder layer whose activations have outlier channels.

Real LLM activations have a few channels far larger than the rest (LLM.int8, AWQ papers): in
the hidden states (so the input-norm output feeding q/k/v and the post-attention-norm output
feeding gate/up have outlier channels) and, as "massive activations", in the MLP's
intermediate activations (down_proj's input) and in value channels (o_proj's input). The
layer below plants them: 4 of 256 hidden channels scaled 50x, and 4 up_proj / v_proj output
rows scaled 16x. Weights are int4, group size 64, asymmetric, as RTN; the error is measured on
held-out tokens drawn like the calibration ones.
"""

from __future__ import annotations

import copy

import torch
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniDecoderLayer

from omni_export.quant import rtn
from omni_export.quant.awq import LINEAR_NAMES, AwqConfig, AwqStats, awq_layer, layer_kwargs_for
from omni_export.testkit.tiny_model import build_config

GROUP = 64


def module(layer, path):
    for part in path.split("."):
        layer = getattr(layer, part)
    return layer


def outlier_layer(seed: int):
    cfg = build_config("tiny").thinker_config.text_config
    cfg.hidden_size, cfg.intermediate_size = 256, 512
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 8, 2, 32  # GQA as the 7B (7:1 there)
    cfg.rope_parameters["mrope_section"] = [4, 6, 6]
    cfg._attn_implementation = "sdpa"
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = Qwen2_5OmniDecoderLayer(cfg, 0).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.dim() == 2 or name.endswith("bias"):
                p.normal_(0, 0.02, generator=g)
        layer.mlp.up_proj.weight[torch.randperm(512, generator=g)[:4]] *= 16
        layer.self_attn.v_proj.weight[torch.randperm(64, generator=g)[:4]] *= 16
    channels = torch.randperm(256, generator=g)[:4]

    def hidden(n: int, seq: int) -> torch.Tensor:
        h = torch.randn(n, seq, 256, generator=g)
        h[..., channels] *= 50
        return h

    return cfg, layer, hidden


def quantized(layer, clips=None):
    q = copy.deepcopy(layer)
    for name in LINEAR_NAMES:
        lin = module(q, name)
        w = rtn.quantize(lin.weight.detach().numpy(), GROUP, clip=None if clips is None else clips[name])
        lin.weight.data = torch.from_numpy(w.dequantize())
    return q


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def test_awq_error_at_most_0_6_of_rtn():
    cfg, layer, hidden = outlier_layer(seed=0)
    calib, test = hidden(8, 64), hidden(8, 64)
    kwargs = layer_kwargs_for(cfg, 64)
    float_layer = copy.deepcopy(layer)
    ref, ref_calib = float_layer(test, **kwargs), float_layer(calib, **kwargs)

    rtn_err = rel_rms(quantized(float_layer)(test, **kwargs), ref)
    stats = AwqStats()
    clips = awq_layer(layer, calib, kwargs, AwqConfig(group_size=GROUP), stats)
    awq_err = rel_rms(quantized(layer, clips)(test, **kwargs), ref)
    awq_err_calib = rel_rms(quantized(layer, clips)(calib, **kwargs), ref_calib)
    rtn_err_calib = rel_rms(quantized(float_layer)(calib, **kwargs), ref_calib)
    print(f"\nlayer output relative RMS error, held-out tokens: RTN {rtn_err:.5f}  AWQ {awq_err:.5f}  "
          f"(x{awq_err / rtn_err:.3f}); calibration tokens: RTN {rtn_err_calib:.5f}  AWQ {awq_err_calib:.5f}  "
          f"(x{awq_err_calib / rtn_err_calib:.3f}); ratios {stats.ratios}")
    assert awq_err <= 0.6 * rtn_err
    assert awq_err_calib <= 0.6 * rtn_err_calib
    # every group's search beat RTN on its own loss
    for group, loss in stats.losses.items():
        assert loss < stats.rtn_losses[group], group
