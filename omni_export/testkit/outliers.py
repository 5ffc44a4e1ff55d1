"""Outlier channels planted in a random thinker, the way real LLM activations have them.

Real LLMs have a few hidden channels far larger than the rest (LLM.int8, SmoothQuant, AWQ
papers), in the residual stream and in the RMSNorm weights that scale it, and "massive
activations": a few MLP intermediate channels (down_proj's input) and value channels (o_proj's
input) orders of magnitude above the others. A random-weight model has none, so AWQ and
SmoothQuant have nothing to find there. :func:`plant_outliers` puts them into a transformers
``Qwen2_5OmniThinkerTextModel`` (in place, seeded):

- ``channels`` hidden channels: their embedding columns times ``embed_gain`` (outliers in the
  residual stream from the first layer on) and, in every layer, their ``input_layernorm`` and
  ``post_attention_layernorm`` weights times ``norm_gain`` (outliers in what q/k/v and gate/up
  read, whatever the input);
- per layer, ``massive_rows`` rows of ``up_proj`` and of ``v_proj`` times ``row_gain`` (massive
  down_proj and o_proj inputs).

The channels and rows are drawn from ``seed`` with a generator of their own, so every other
weight stays as the seed draws it. ``omni-export tiny --outliers`` writes such a checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["OutlierSpec", "outlier_channels", "plant_outliers"]

#: offset of the planting generator's seed from the model's (+1: speakers, +2: special rows)
SEED_OFFSET = 3


@dataclass(frozen=True)
class OutlierSpec:
    """How many outliers and how large (module docstring)."""

    channels: int = 4
    embed_gain: float = 4.0
    norm_gain: float = 16.0
    massive_rows: int = 4
    row_gain: float = 16.0

    def to_json(self) -> dict:
        return asdict(self)


def outlier_channels(hidden: int, seed: int, spec: OutlierSpec = OutlierSpec()) -> list[int]:
    """The hidden channels :func:`plant_outliers` picks for a model of width ``hidden`` and ``seed``."""
    import torch

    gen = torch.Generator().manual_seed(seed + SEED_OFFSET)
    return sorted(torch.randperm(hidden, generator=gen)[: spec.channels].tolist())


def plant_outliers(text_model, seed: int, spec: OutlierSpec = OutlierSpec()) -> dict:
    """Scale ``text_model``'s weights in place as ``spec`` says; returns what was planted:
    ``{"channels": [...], "layers": [{"up_proj": [...], "v_proj": [...]}, ...]}``."""
    import torch

    hidden = text_model.embed_tokens.weight.shape[1]
    if not 0 < spec.channels <= hidden:
        raise ValueError(f"channels must be in 1..{hidden}, got {spec.channels}")
    gen = torch.Generator().manual_seed(seed + SEED_OFFSET)
    channels = torch.randperm(hidden, generator=gen)[: spec.channels]
    planted = {"channels": sorted(channels.tolist()), "layers": []}
    with torch.no_grad():
        text_model.embed_tokens.weight[:, channels] *= spec.embed_gain
        for layer in text_model.layers:
            layer.input_layernorm.weight[channels] *= spec.norm_gain
            layer.post_attention_layernorm.weight[channels] *= spec.norm_gain
            rows = {}
            for name, linear in (("up_proj", layer.mlp.up_proj), ("v_proj", layer.self_attn.v_proj)):
                picked = torch.randperm(linear.weight.shape[0], generator=gen)[: spec.massive_rows]
                linear.weight[picked] *= spec.row_gain
                rows[name] = sorted(picked.tolist())
            planted["layers"].append(rows)
    return planted
