"""AWQ on one Qwen2.5-Omni decoder layer: layer kwargs, exact scale folding, and the scale and
clip searches against AutoAWQ.

The AutoAWQ reference is transcribed from casper-hansen/AutoAWQ: awq/quantize/quantizer.py
(``_get_input_feat`` hooks, ``_search_best_scale`` / ``_compute_best_scale`` in their
single-device loop form, ``_compute_best_clip``, ``pseudo_quantize_tensor``) and
awq/quantize/scale.py (``scale_ln_fcs``, ``scale_fc_fc``, the input-feature division of
``apply_scale``), with the layer groups of awq/models/qwen2_5_omni.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
    Qwen2_5OmniDecoderLayer,
    Qwen2_5OmniThinkerTextModel,
)

from omni_export.quant import rtn
from omni_export.quant.awq import LINEAR_NAMES, AwqConfig, AwqStats, awq_layer, fake_quantize, layer_kwargs_for
from omni_export.testkit.tiny_model import build_config


def text_config(hidden=128, intermediate=256, heads=4, kv_heads=4, attn="sdpa"):
    cfg = build_config("tiny").thinker_config.text_config
    cfg.hidden_size, cfg.intermediate_size = hidden, intermediate
    cfg.num_attention_heads, cfg.num_key_value_heads = heads, kv_heads
    cfg.head_dim = hidden // heads
    half = cfg.head_dim // 2
    cfg.rope_parameters["mrope_section"] = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    cfg._attn_implementation = attn
    return cfg


def random_layer(cfg, seed=0) -> Qwen2_5OmniDecoderLayer:
    torch.manual_seed(seed)
    layer = Qwen2_5OmniDecoderLayer(cfg, 0).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.dim() == 2 or name.endswith("bias"):
                p.normal_(0, 0.02)
            else:  # RMSNorm weights
                p.uniform_(0.5, 1.5)
    return layer


def outlier_hidden(cfg, n=4, seq=32, seed=0, mult=30.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, seq, cfg.hidden_size, generator=g)
    h[..., torch.randperm(cfg.hidden_size, generator=g)[:4]] *= mult
    return h


def module(layer, path):
    for part in path.split("."):
        layer = getattr(layer, part)
    return layer


# ------------------------------------------------------------------------------------ layer kwargs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_layer_kwargs_match_the_text_model(attn):
    """layer(x, **layer_kwargs_for(cfg, seq)) reproduces how Qwen2_5OmniThinkerTextModel calls
    its layers (causal mask, 3-axis text positions)."""
    cfg = build_config("tiny", layers=2).thinker_config.text_config
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = Qwen2_5OmniThinkerTextModel(cfg).eval()
    seen = {}
    model.layers[1].register_forward_hook(
        lambda m, args, kwargs, out: seen.update(x=args[0] if args else kwargs["hidden_states"], y=out),
        with_kwargs=True,
    )
    with torch.no_grad():
        model(inputs_embeds=torch.randn(3, 11, cfg.hidden_size))
        y = model.layers[1](seen["x"], **layer_kwargs_for(cfg, 11))
    torch.testing.assert_close(y, seen["y"], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ folding


@pytest.mark.parametrize("hidden,intermediate,heads,kv_heads", [(256, 512, 8, 2), (256, 512, 4, 4), (160, 352, 5, 1)])
def test_scale_folding_keeps_the_float_layer(hidden, intermediate, heads, kv_heads):
    """(160, 352): partial last blocks of 64 (K = 160 and 352)."""
    cfg = text_config(hidden=hidden, intermediate=intermediate, heads=heads, kv_heads=kv_heads)
    layer = random_layer(cfg)
    calib = outlier_hidden(cfg)
    kwargs = layer_kwargs_for(cfg, calib.shape[1])
    other = outlier_hidden(cfg, seed=5)  # not the calibration data
    with torch.no_grad():
        ref, ref_other = layer(calib, **kwargs), layer(other, **kwargs)
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    stats = AwqStats()
    clips = awq_layer(layer, calib, kwargs, AwqConfig(group_size=64, grid=10), stats)
    with torch.no_grad():
        out, out_other = layer(calib, **kwargs), layer(other, **kwargs)
    for a, b in ((out, ref), (out_other, ref_other)):
        assert float((a - b).norm() / b.norm()) < 1e-5
    # the scales were applied (the outliers make every group pick non-trivial scales)
    assert set(stats.ratios) == {"qkv", "vo", "mlp", "down"}
    changed = [n for n, p in layer.named_parameters() if not torch.equal(p, before[n])]
    for name in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight", "mlp.gate_proj.weight"):
        assert name in changed
    assert "self_attn.q_proj.bias" not in changed
    # one clip per block for every linear but q and k, on AutoAWQ's shrink grid
    for name in LINEAR_NAMES:
        if name in ("self_attn.q_proj", "self_attn.k_proj"):
            assert clips[name] is None
            continue
        w = module(layer, name).weight.detach().numpy()
        n, k = w.shape
        c = clips[name]
        g = -(-k // 64)
        assert c.shape == (n, g) and c.dtype == np.float32
        org_max = np.abs(np.pad(w, ((0, 0), (0, g * 64 - k)))).reshape(n, g, 64).max(-1)
        ratio = 1 - c / org_max
        assert np.allclose(ratio * 20, np.round(ratio * 20), atol=1e-4) and (ratio >= 0).all() and (ratio < 0.5).all()
    # what the lead does with the result
    q = rtn.quantize(module(layer, "mlp.down_proj").weight.detach().numpy(), 64, clip=clips["mlp.down_proj"])
    assert q.q.shape == (hidden, intermediate)


def test_gqa_v_to_o_scales_are_shared_per_kv_head():
    cfg = text_config(hidden=256, intermediate=512, heads=8, kv_heads=2)
    layer = random_layer(cfg, seed=1)
    o_before = layer.self_attn.o_proj.weight.detach().clone()
    v_before = layer.self_attn.v_proj.bias.detach().clone()
    hidden = outlier_hidden(cfg, seed=1)
    awq_layer(layer, hidden, layer_kwargs_for(cfg, hidden.shape[1]), AwqConfig(group_size=64, grid=10, clip=False))
    s_v = v_before / layer.self_attn.v_proj.bias.detach()  # [kv_heads * head_dim]
    s_o = layer.self_attn.o_proj.weight.detach()[0] / o_before[0]  # [heads * head_dim]
    expected = s_v.view(2, 1, 32).expand(2, 4, 32).reshape(-1)  # query head j uses kv head j // 4
    torch.testing.assert_close(s_o, expected, rtol=1e-5, atol=0)
    assert not torch.allclose(s_v, torch.ones_like(s_v))


def test_fake_quantize_equals_rtn():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (40, 200)).astype(np.float32)
    clip = (np.abs(w).max() * rng.uniform(0.2, 1, (40, 4))).astype(np.float32)
    s = rng.uniform(0.5, 2, 200).astype(np.float32)
    for sym in (False, True):
        ref = rtn.quantize(w * s, 64, symmetric=sym, clip=clip).dequantize()
        got = fake_quantize(torch.from_numpy(w), 64, 4, sym, clip=torch.from_numpy(clip), col_scale=torch.from_numpy(s))
        assert np.array_equal(got.numpy(), ref)


def test_config_validation():
    with pytest.raises(ValueError, match="group_size"):
        AwqConfig(group_size=100).validate()
    with pytest.raises(ValueError, match="grid"):
        AwqConfig(grid=0).validate()
    with pytest.raises(ValueError, match="max_shrink"):
        AwqConfig(max_shrink=1.0).validate()
    cfg = text_config()
    layer = random_layer(cfg).to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        awq_layer(layer, torch.randn(1, 4, 128), layer_kwargs_for(cfg, 4))


# ------------------------------------------------------------------------------------ vs AutoAWQ


def autoawq_pseudo_quantize(w, group_size, w_bit=4):
    org_w_shape = w.shape
    w = w.reshape(-1, group_size)
    max_val = w.amax(dim=1, keepdim=True)
    min_val = w.amin(dim=1, keepdim=True)
    max_int = 2**w_bit - 1
    scales = (max_val - min_val).clamp(min=1e-5) / max_int
    zeros = (-torch.round(min_val / scales)).clamp_(0, max_int)
    w = (torch.clamp(torch.round(w / scales) + zeros, 0, max_int) - zeros) * scales
    return w.reshape(org_w_shape)


def autoawq_input_feat(layer, hidden, kwargs):
    feats = {}
    hooks = [
        module(layer, name).register_forward_hook(lambda m, x, y, name=name: feats.__setitem__(name, x[0].detach().clone()))
        for name in LINEAR_NAMES
    ]
    with torch.no_grad():
        layer(hidden, **kwargs)
    for h in hooks:
        h.remove()
    return {k: v.reshape(-1, v.shape[-1]) for k, v in feats.items()}, {k: v for k, v in feats.items()}


@torch.no_grad()
def autoawq_best_scale(module2inspect, linears, inp, kwargs, group_size, n_grid):
    weight = torch.cat([m.weight for m in linears], dim=0)
    org_shape = weight.shape
    weight = weight.view(-1, group_size)
    w_scale = weight.abs() / (weight.abs().amax(dim=1, keepdim=True) + 1e-6)
    w_mean = w_scale.view(org_shape).mean(0)
    x_mean = inp.abs().view(-1, inp.shape[-1]).to(torch.float32).sum(dim=0) / inp.view(-1, inp.shape[-1]).shape[0]

    def forward(x):
        out = module2inspect(x, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    fp16_output = forward(inp)
    org_sd = {k: v.clone() for k, v in module2inspect.state_dict().items()}
    best_error, best_ratio, best_scales = float("inf"), -1, None
    for ratio in range(n_grid):
        ratio = ratio / n_grid
        scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()
        scales_view = scales.view(1, -1)
        scales[torch.isinf(scales)] = 1
        scales[torch.isnan(scales)] = 1
        for fc in linears:
            fc.weight.mul_(scales_view)
            fc.weight.data = autoawq_pseudo_quantize(fc.weight.data, group_size) / scales_view
        loss = (fp16_output - forward(inp)).float().pow(2).sum().item() / fp16_output.numel()
        if loss < best_error:
            best_error, best_ratio, best_scales = loss, ratio, scales.clone()
        module2inspect.load_state_dict(org_sd)
    return best_ratio, best_scales


@torch.no_grad()
def autoawq_best_clip(w, input_feat, group_size, n_grid=20, max_shrink=0.5, n_sample_token=512):
    """``_compute_best_clip`` -> best max |w| per [output row, group]."""
    org_w_shape = w.shape
    input_feat = input_feat.view(-1, input_feat.shape[-1])
    input_feat = input_feat.reshape(1, input_feat.shape[0], -1, group_size)
    step_size = max(1, input_feat.shape[1] // n_sample_token)
    input_feat = input_feat[:, ::step_size]
    w = w.reshape(org_w_shape[0], 1, -1, group_size)
    oc_batch_size = 256 if org_w_shape[0] % 256 == 0 else 64
    assert org_w_shape[0] % oc_batch_size == 0
    w_all = w
    best_max_val_all = []
    for i_b in range(org_w_shape[0] // oc_batch_size):
        w = w_all[i_b * oc_batch_size : (i_b + 1) * oc_batch_size]
        org_max_val = w.abs().amax(dim=-1, keepdim=True)
        best_max_val = org_max_val.clone()
        min_errs = torch.ones_like(org_max_val) * 1e9
        org_out = (input_feat * w).sum(dim=-1)
        for i_s in range(int(max_shrink * n_grid)):
            max_val = org_max_val * (1 - i_s / n_grid)
            min_val = -max_val
            cur_w = torch.clamp(w, min_val, max_val)
            q_w = autoawq_pseudo_quantize(cur_w, group_size)
            cur_out = (input_feat * q_w).sum(dim=-1)
            err = (cur_out - org_out).pow(2).mean(dim=1).view(min_errs.shape)
            cur_best_idx = err < min_errs
            min_errs[cur_best_idx] = err[cur_best_idx]
            best_max_val[cur_best_idx] = max_val[cur_best_idx]
        best_max_val_all.append(best_max_val)
    return torch.cat(best_max_val_all, dim=0).squeeze(1).squeeze(-1)


def test_scale_and_clip_search_match_autoawq():
    """Without GQA (AutoAWQ then scales v_proj -> o_proj too) and without the extra s = 1
    candidate, every group picks AutoAWQ's ratio and scales, and the clip search picks
    AutoAWQ's clip for every output row and block."""
    group_size, grid = 64, 20
    cfg = text_config(hidden=128, intermediate=256, heads=4, kv_heads=4)
    layer = random_layer(cfg, seed=2)
    ref_layer = copy.deepcopy(layer)
    hidden = outlier_hidden(cfg, seq=32, seed=2)
    kwargs = layer_kwargs_for(cfg, hidden.shape[1])

    stats = AwqStats()
    clips = awq_layer(layer, hidden, kwargs, AwqConfig(group_size=group_size, grid=grid, identity_candidate=False), stats)

    # --- AutoAWQ on the copy
    feat, feat3d = autoawq_input_feat(ref_layer, hidden, kwargs)
    attn, mlp = ref_layer.self_attn, ref_layer.mlp
    groups = {
        "qkv": (ref_layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], feat3d["self_attn.q_proj"], attn, kwargs),
        "vo": (attn.v_proj, [attn.o_proj], feat3d["self_attn.o_proj"], attn.o_proj, {}),
        "mlp": (ref_layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], feat3d["mlp.gate_proj"], mlp, {}),
        "down": (mlp.up_proj, [mlp.down_proj], feat3d["mlp.down_proj"], mlp.down_proj, {}),
    }
    ref_scales = {}
    for name, (prev, linears, inp, inspect, kw) in groups.items():
        ratio, scales = autoawq_best_scale(inspect, linears, inp, kw, group_size, grid)
        assert stats.ratios[name] == ratio, name
        ref_scales[name] = scales
    with torch.no_grad():  # apply_scale: scale_ln_fcs / scale_fc_fc
        for name, (prev, linears, inp, inspect, kw) in groups.items():
            s = ref_scales[name]
            if isinstance(prev, torch.nn.Linear):
                prev.weight[-s.size(0):].div_(s.view(-1, 1))
                if prev.bias is not None:
                    prev.bias.div_(s.view(-1))
            else:
                prev.weight.div_(s)
            for fc in linears:
                fc.weight.mul_(s.view(1, -1))
    for (name, p), (_, p_ref) in zip(layer.named_parameters(), ref_layer.named_parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-7, msg=name)

    # AutoAWQ's clip search on the scaled layer (its inputs as the scaled layer computes them)
    feat, _ = autoawq_input_feat(layer, hidden, kwargs)
    for name in LINEAR_NAMES:
        if name in ("self_attn.q_proj", "self_attn.k_proj"):
            assert clips[name] is None
            continue
        best = autoawq_best_clip(module(layer, name).weight.detach(), feat[name], group_size)
        assert torch.equal(torch.from_numpy(clips[name]), best), name
