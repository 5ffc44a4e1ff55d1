"""The talker's registry entry: when a checkpoint has a talker, what config.talker records.

A checkpoint with ``enable_audio_output: false`` or without any ``talker.*`` tensor has no
talker to export (``skip_reason`` says why; ``build`` leaves the module out and the bundle is
text-only); one with only part of the talker's tensors is a CheckpointError naming them. The
``config`` block's codec ids and sampling defaults are transformers' (Qwen2_5OmniTalkerConfig,
Qwen2_5OmniForConditionalGeneration.generate).
"""

import inspect
import json
import shutil

import pytest

from omni_export.checkpoint.reader import Checkpoint, CheckpointError
from omni_export.modules.talker import TalkerModule
from omni_export.build.recipes import load_recipe


def module_for(model_dir) -> TalkerModule:
    return TalkerModule(Checkpoint.open(model_dir), load_recipe("fp32").module("talker"))


def copy_checkpoint(src, dst, config_change=None, drop=lambda name: False):
    shutil.copytree(src, dst)
    if config_change is not None:
        path = dst / "config.json"
        config = json.loads(path.read_text())
        config_change(config)
        path.write_text(json.dumps(config))
    from safetensors.numpy import load_file, save_file

    tensors = load_file(dst / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not drop(k)}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_talker_present_in_tiny_checkpoint(tiny_checkpoint):
    module = module_for(tiny_checkpoint)
    assert module.skip_reason() is None
    module.check()
    assert module.memory_estimate() > 0


def test_audio_output_disabled_skips_the_talker(tiny_checkpoint, tmp_path):
    model = copy_checkpoint(tiny_checkpoint, tmp_path / "m",
                            config_change=lambda c: c.update(enable_audio_output=False))
    module = module_for(model)
    assert "enable_audio_output" in module.skip_reason()
    module.check()  # no error: nothing to build


def test_no_talker_weights_skips_the_talker(tiny_checkpoint, tmp_path):
    model = copy_checkpoint(tiny_checkpoint, tmp_path / "m", drop=lambda name: name.startswith("talker."))
    assert "no talker weights" in module_for(model).skip_reason()


def test_partial_talker_weights_are_an_error(tiny_checkpoint, tmp_path):
    model = copy_checkpoint(tiny_checkpoint, tmp_path / "m", drop=lambda name: name == "talker.codec_head.weight")
    module = module_for(model)
    assert module.skip_reason() is None
    with pytest.raises(CheckpointError, match="talker.codec_head.weight") as info:
        module.check()
    assert "enable_audio_output" in info.value.fix


def test_config_block_follows_transformers(tiny_checkpoint):
    from transformers import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniTalkerConfig

    cfg = module_for(tiny_checkpoint).config()
    defaults = Qwen2_5OmniTalkerConfig()
    assert cfg["codec"] == {"bos": defaults.tts_codec_start_token_id, "eos": defaults.tts_codec_end_token_id,
                            "pad": defaults.tts_codec_pad_token_id, "mask": defaults.tts_codec_mask_token_id}
    assert cfg["text"] == {"bos": defaults.tts_text_start_token_id, "eos": defaults.tts_text_end_token_id,
                           "pad": defaults.tts_text_pad_token_id}
    params = inspect.signature(Qwen2_5OmniForConditionalGeneration.generate).parameters
    assert cfg["eos_token_ids"] == params["talker_eos_token_id"].default
    assert cfg["sampling"] == {key: params[f"talker_{key}"].default for key in
                               ("do_sample", "top_k", "top_p", "temperature", "repetition_penalty", "max_new_tokens")}
    assert cfg["suppress_tokens"] == [defaults.tts_codec_start_token_id]
    assert (cfg["embedding_size"], cfg["hidden_size"], cfg["head_dim"]) == (64, 32, 16)
