"""The outlier testkit: planted outliers are seeded and where they say, and the default tiny
config is unchanged by the ``hidden`` override."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerTextModel

from omni_export.testkit.outliers import OutlierSpec, outlier_channels, plant_outliers
from omni_export.testkit.tiny_model import build_config


def text_model(hidden: int, seed: int = 0):
    cfg = build_config("tiny", hidden=hidden).thinker_config.text_config
    cfg.vocab_size = 64  # the planting does not depend on the vocabulary
    torch.manual_seed(seed)
    return Qwen2_5OmniThinkerTextModel(cfg).eval()


def test_default_tiny_config_unchanged():
    cfg = build_config("tiny").thinker_config.text_config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.rope_parameters["mrope_section"]) == (64, 128, [2, 3, 3])


@pytest.mark.parametrize("hidden", [96, 192])
def test_outliers_planted_and_seeded(hidden):
    spec = OutlierSpec()
    a, b = text_model(hidden), text_model(hidden)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    planted = plant_outliers(a, seed=3, spec=spec)
    assert plant_outliers(b, seed=3, spec=spec) == planted
    assert len(planted["channels"]) == spec.channels
    assert outlier_channels(hidden, seed=3, spec=spec) == planted["channels"]
    ch = planted["channels"]
    for i, layer in enumerate(a.layers):
        w = layer.input_layernorm.weight
        assert torch.allclose(w[ch], before[f"layers.{i}.input_layernorm.weight"][ch] * spec.norm_gain)
        rows = planted["layers"][i]["up_proj"]
        assert torch.allclose(layer.mlp.up_proj.weight[rows], before[f"layers.{i}.mlp.up_proj.weight"][rows] * spec.row_gain)
    others = [c for c in range(hidden) if c not in ch]
    assert torch.equal(a.embed_tokens.weight[:, others], before["embed_tokens.weight"][:, others])


def test_hidden_must_be_a_multiple_of_16():
    with pytest.raises(ValueError, match="multiple of 16"):
        build_config("tiny", hidden=100)
