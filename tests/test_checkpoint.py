"""Checkpoint loading: 4.5x and transformers-5 tensor names, sharded weights, tied heads, errors."""

import json
import shutil

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from omni_export.checkpoint.reader import Checkpoint, CheckpointError
from omni_export.modules.thinker import ThinkerModule, ThinkerWeights


def read_all(path):
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def copy_without_weights(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    return dst


def to_v5_name(name):
    if name.startswith("thinker.model.") and not name.startswith(("thinker.model.audio_tower", "thinker.model.visual")):
        return name.replace("thinker.model.", "thinker.model.language_model.", 1)
    return name.replace("thinker.audio_tower.", "thinker.model.audio_tower.").replace("thinker.visual.", "thinker.model.visual.")


def test_legacy_names_cover_the_text_model(tiny_checkpoint):
    ckpt = Checkpoint.open(tiny_checkpoint)
    targets = set(ckpt.tensor_names(ThinkerModule.prefixes))
    layers = ckpt.text_config().num_hidden_layers
    assert "embed_tokens.weight" in targets and "norm.weight" in targets
    assert {f"layers.{i}.self_attn.q_proj.weight" for i in range(layers)} <= targets
    assert not any(t.startswith(("audio_tower", "visual")) for t in targets)
    assert ThinkerWeights(ckpt).lm_head_name() == "thinker.lm_head.weight"


def test_v5_names_in_shards_give_the_same_decoder(tiny_checkpoint, tmp_path):
    tensors = read_all(tiny_checkpoint / "model.safetensors")
    renamed = {to_v5_name(k): v for k, v in tensors.items()}
    names = sorted(renamed)
    half = len(names) // 2
    model = copy_without_weights(tiny_checkpoint, tmp_path / "v5")
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: renamed[k].contiguous() for k in keys}, str(model / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))

    legacy, v5 = ThinkerWeights(Checkpoint.open(tiny_checkpoint)), ThinkerWeights(Checkpoint.open(model))
    assert legacy.names.keys() == v5.names.keys()
    names = sorted(legacy.names)
    a, b = legacy.read(names), v5.read(names)
    assert all(np.array_equal(a[k], b[k]) for k in names)
    assert np.array_equal(legacy.lm_head(), v5.lm_head())


def test_tied_lm_head_uses_the_embedding(tiny_checkpoint, tmp_path):
    tensors = read_all(tiny_checkpoint / "model.safetensors")
    del tensors["thinker.lm_head.weight"]
    model = copy_without_weights(tiny_checkpoint, tmp_path / "tied")
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lm_head"):
        ThinkerWeights(Checkpoint.open(model)).lm_head_name()  # untied config: a missing head is an error
    config = json.loads((model / "config.json").read_text())
    config["thinker_config"]["text_config"]["tie_word_embeddings"] = True
    (model / "config.json").write_text(json.dumps(config))
    weights = ThinkerWeights(Checkpoint.open(model))
    assert weights.lm_head_name() == weights.names["embed_tokens.weight"]
    head = weights.lm_head()
    assert np.array_equal(head, tensors[weights.names["embed_tokens.weight"]].float().numpy())


@pytest.mark.parametrize(
    "damage,message",
    [
        ("bin_only", ".bin"),
        ("truncated", "safetensors"),
        ("missing_shard", "shard"),
        ("no_tokenizer", "tokenizer.json"),
        ("bad_json", "config.json"),
    ],
)
def test_damaged_checkpoints(tiny_checkpoint, tmp_path, damage, message):
    model = tmp_path / "m"
    shutil.copytree(tiny_checkpoint, model)
    weights = model / "model.safetensors"
    if damage == "bin_only":
        weights.unlink()
        (model / "pytorch_model.bin").write_bytes(b"not read")
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "missing_shard":
        (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00009.safetensors"}}))
    elif damage == "no_tokenizer":
        (model / "tokenizer.json").unlink()
    elif damage == "bad_json":
        (model / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError) as info:
        Checkpoint.open(model)
    assert message in str(info.value) and "fix:" in str(info.value)
