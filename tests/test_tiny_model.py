"""The test-model kit: random-weight Qwen2.5-Omni checkpoints in the real on-disk layout.

Only the ``tiny`` preset is written here (a ``7b-shape`` checkpoint is 4.6 GB); its config is
checked without building weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from omni_export.testkit import tiny_model, tokenizer_kit
from omni_export.testkit.tiny_model import CHECKPOINT_FILES, SPEAKERS, build_config, write_tiny_checkpoint
from omni_export.testkit.tokenizer_kit import CHAT_TEMPLATE, SPECIAL_TOKENS

LEGACY_PREFIXES = (
    "thinker.model.layers.0.",
    "thinker.model.embed_tokens.weight",
    "thinker.model.norm.weight",
    "thinker.lm_head.weight",
    "thinker.audio_tower.",
    "thinker.visual.",
    "talker.model.layers.0.",
    "talker.model.embed_tokens.weight",
    "talker.codec_head.weight",
    "talker.thinker_to_talker_proj.",
    "token2wav.code2wav_dit_model.",
    "token2wav.code2wav_bigvgan_model.",
)

THINKER_IDS = {
    "audio_token_index": 151646,
    "image_token_index": 151655,
    "video_token_index": 151656,
    "audio_start_token_id": 151647,
    "audio_end_token_id": 151648,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "user_token_id": 872,
    "bos_token_id": 151644,
    "eos_token_id": 151645,
    "pad_token_id": 151643,
    "position_id_per_seconds": 25,
    "seconds_per_chunk": 2,
}


def _partials(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-kit") / "model"
    assert write_tiny_checkpoint(out, preset="tiny", seed=0) == out
    return out


@pytest.fixture(scope="module")
def weights(ckpt) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "model.safetensors")


@pytest.fixture(scope="module")
def loaded(ckpt):
    """(model, loading info) from transformers' ``from_pretrained``.

    ``Qwen2_5OmniForConditionalGeneration.from_pretrained(..., output_loading_info=True)`` breaks
    in transformers 5.23 (it calls ``load_speakers`` on the returned tuple), so the loading info
    comes from the generic ``PreTrainedModel.from_pretrained``; the speakers are loaded as the
    subclass would.
    """
    from transformers import Qwen2_5OmniForConditionalGeneration as C

    model, info = super(C, C).from_pretrained(ckpt, output_loading_info=True)
    model.load_speakers(ckpt / "spk_dict.pt")
    return model.eval(), info


@pytest.fixture(scope="module")
def processor(ckpt):
    from transformers import Qwen2_5OmniProcessor

    return Qwen2_5OmniProcessor.from_pretrained(ckpt)


# ------------------------------------------------------------------------------------------ layout


def test_layout(ckpt):
    names = {p.name for p in ckpt.iterdir()}
    assert set(CHECKPOINT_FILES) <= names
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "spk_dict.pt",
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.json",
    ):
        assert (ckpt / name).is_file(), name
    assert _partials(ckpt.parent) == []
    gen = json.loads((ckpt / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643]
    assert gen["pad_token_id"] == 151643
    assert gen["do_sample"] is False
    assert "transformers_version" in gen


def test_safetensors_legacy_names(ckpt, weights):
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    keys = list(weights)
    for prefix in LEGACY_PREFIXES:
        assert any(k.startswith(prefix) for k in keys), prefix
    for new in ("thinker.model.language_model.", "thinker.model.audio_tower.", "thinker.model.visual."):
        assert not any(k.startswith(new) for k in keys), new
    assert all(k.split(".")[0] in ("thinker", "talker", "token2wav") for k in keys)
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert weights["thinker.model.embed_tokens.weight"].shape == (152064, 64)
    assert weights["thinker.lm_head.weight"].shape == (152064, 64)
    # untied: lm_head is its own tensor
    assert not torch.equal(weights["thinker.model.embed_tokens.weight"], weights["thinker.lm_head.weight"])
    assert weights["talker.codec_head.weight"].shape == (8448, 32)
    assert weights["talker.thinker_to_talker_proj.weight"].shape == (32, 64)


def test_names_match_transformers_save_pretrained(loaded, weights, tmp_path):
    model, _ = loaded
    model.save_pretrained(tmp_path / "sp")
    with safe_open(tmp_path / "sp" / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(weights)


# ------------------------------------------------------------------------------------------ config


def test_config_json_is_legacy_style(ckpt):
    raw = json.loads((ckpt / "config.json").read_text())
    assert raw["architectures"] == ["Qwen2_5OmniModel"]
    assert raw["model_type"] == "qwen2_5_omni"
    assert raw["torch_dtype"] == "float32"
    assert raw["enable_audio_output"] is True
    for sub in (raw["thinker_config"]["text_config"], raw["talker_config"]):
        assert "rope_parameters" not in sub
        assert sub["rope_theta"] == 1000000.0
        assert sub["rope_scaling"] == {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"}
    assert "rope_parameters" not in json.dumps(raw)
    thinker = raw["thinker_config"]
    for key, value in THINKER_IDS.items():
        assert thinker[key] == value, key
    assert thinker["text_config"]["tie_word_embeddings"] is False
    assert raw["token2wav_config"]["dit_config"]["model_type"] == "qwen2_5_omni_dit"
    assert raw["token2wav_config"]["bigvgan_config"]["model_type"] == "qwen2_5_omni_bigvgan"


def test_config_round_trip(ckpt):
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(ckpt)
    assert isinstance(cfg, transformers.Qwen2_5OmniConfig)
    assert cfg.enable_audio_output is True
    text = cfg.thinker_config.text_config
    talker = cfg.talker_config
    for sub in (text, talker):
        assert sub.rope_parameters["mrope_section"] == [2, 3, 3]
        assert sub.rope_parameters["rope_theta"] == 1000000.0
        assert sub.rope_parameters["rope_type"] == "default"
    assert cfg.thinker_config.vision_config.rope_parameters["rope_type"] == "axial"
    for key, value in THINKER_IDS.items():
        assert getattr(cfg.thinker_config, key) == value, key
    assert cfg.thinker_config.audio_token_id == 151646
    assert cfg.thinker_config.image_token_id == 151655
    assert cfg.thinker_config.video_token_id == 151656
    assert (talker.tts_text_pad_token_id, talker.tts_text_start_token_id, talker.tts_text_end_token_id) == (
        151859,
        151860,
        151861,
    )
    assert (
        talker.tts_codec_pad_token_id,
        talker.tts_codec_start_token_id,
        talker.tts_codec_end_token_id,
        talker.tts_codec_mask_token_id,
    ) == (8292, 8293, 8294, 8296)
    assert text.vocab_size == 152064 and text.hidden_size == 64 and text.num_hidden_layers == 2

    # Everything else reads back exactly as built (rope_scaling keeps its legacy "type" key).
    def norm(d):
        d = {k: v for k, v in d.items() if k not in ("_name_or_path", "architectures", "dtype")}
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                v = norm(v)
                if k == "rope_parameters":
                    v.pop("type", None)
            out[k] = v
        return out

    assert norm(cfg.to_dict()) == norm(build_config("tiny").to_dict())


# ------------------------------------------------------------------------------------------ weights


def test_from_pretrained_loads_everything(loaded, weights):
    model, info = loaded
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert not info.get("error_msgs")
    state = model.state_dict()
    assert len(state) == len(weights)
    for name, tensor in state.items():
        legacy = tiny_model._legacy_name(name)
        assert legacy in weights, name
        assert torch.equal(tensor, weights[legacy]), name


def test_from_pretrained_loads_speakers(ckpt):
    from transformers import Qwen2_5OmniForConditionalGeneration

    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(ckpt)
    assert sorted(model.speaker_map) == ["Chelsie", "Ethan"]


def test_same_seed_same_weights(ckpt, tmp_path):
    again = tmp_path / "again"
    again.mkdir()  # an existing empty directory is fine
    write_tiny_checkpoint(again, preset="tiny", seed=0)
    assert (again / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    assert (again / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    assert (again / "config.json").read_bytes() == (ckpt / "config.json").read_bytes()


def test_other_seed_other_weights(weights, tmp_path):
    other = load_file(write_tiny_checkpoint(tmp_path / "seed1", preset="tiny", seed=1) / "model.safetensors")
    assert set(other) == set(weights)
    for name in ("thinker.model.layers.0.self_attn.q_proj.weight", "thinker.lm_head.weight", "talker.codec_head.weight"):
        assert not torch.equal(other[name], weights[name]), name


def test_special_rows_are_random_at_the_states_scale(weights, tmp_path):
    """The talker's special prefill rows (codec pad / bos / eos / mask, the speakers' bos) are drawn at
    the thinker states' scale (RMS 1), each its own draw, another for another seed; its text pad /
    bos / eos rows are random at the initializer's 0.02, like the codec codes they are summed with."""
    config = build_config("tiny")
    rows = tiny_model.special_rows(config)
    assert rows == {"talker.model.embed_tokens.weight": [8292, 8293, 8294, 8296],
                    "thinker.model.embed_tokens.weight": [151870, 151872]}
    other = load_file(write_tiny_checkpoint(tmp_path / "seed1", preset="tiny", seed=1) / "model.safetensors")
    for name, ids in rows.items():
        drawn = weights[name][ids]
        rms = drawn.pow(2).mean(dim=1).sqrt()
        assert torch.all((rms > 0.6) & (rms < 1.4)), (name, rms)  # std 1 over 64 values
        assert abs(float(drawn.mean())) < 0.2
        assert len({tuple(r.tolist()) for r in drawn}) == len(ids)
        assert not torch.equal(other[name][ids], drawn), name
    text = weights["thinker.model.embed_tokens.weight"][tiny_model.talker_text_rows(config)]
    rms = text.pow(2).mean(dim=1).sqrt()
    assert torch.all((rms > 0.01) & (rms < 0.03)), rms  # the initializer's std 0.02


def test_other_weights_are_the_seeds_initialization(weights):
    """Drawing the special rows (a generator of their own) leaves every other weight as transformers'
    initialization draws it for the seed, but for the codec head rows ``_speak_the_codebook`` zeroes."""
    from transformers import Qwen2_5OmniForConditionalGeneration

    config = build_config("tiny")
    torch.manual_seed(0)
    with tiny_model._quiet_transformers():
        model = Qwen2_5OmniForConditionalGeneration._from_config(config, dtype=torch.float32)
    special = tiny_model.special_rows(config)
    for name, tensor in model.state_dict().items():
        legacy = tiny_model._legacy_name(name)
        written = weights[legacy]
        if legacy in special:
            keep = torch.ones(tensor.shape[0], dtype=torch.bool)
            keep[special[legacy]] = False
            assert torch.equal(written[keep], tensor[keep]), legacy
        elif legacy == "talker.codec_head.weight":
            live = written.abs().sum(dim=1) > 0
            assert torch.equal(written[live], tensor[live])
        else:
            assert torch.equal(written, tensor), legacy


def test_only_off_codebook_codec_head_rows_are_zero(weights):
    """No row of any weight matrix is zero (no ``padding_idx`` row, nothing fixed), except the codec
    head rows past token2wav's codebook 0..8193 other than the talker's stop codes 8292 and 8294."""
    zero = {}
    for name, tensor in weights.items():
        if tensor.dim() == 2:
            rows = (tensor == 0).all(dim=1).nonzero().flatten().tolist()
            if rows:
                zero[name] = rows
    assert zero == {"talker.codec_head.weight": [r for r in range(8194, 8448) if r not in (8292, 8294)]}


# ------------------------------------------------------------------------------------------ tokenizer


CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {
        "role": "user",
        "content": [
            {"type": "audio", "audio": "a.wav"},
            {"type": "image", "image": "b.png"},
            {"type": "video", "video": "c.mp4"},
            {"type": "text", "text": "What do you hear and see? Ünïcödé 日本語 🙂"},
        ],
    },
]


def test_tokenizer_special_ids_and_agreement(ckpt):
    import tokenizers
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(ckpt)
    raw = tokenizers.Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    assert len(hf) == 151665 == tokenizer_kit.VOCAB_SIZE_WITH_SPECIALS
    assert raw.get_vocab_size(with_added_tokens=True) == 151665
    for content, idx in SPECIAL_TOKENS.items():
        assert hf.convert_tokens_to_ids(content) == idx, content
        assert raw.token_to_id(content) == idx, content
        assert hf.encode(content, add_special_tokens=False) == [idx], content
    assert hf.eos_token == "<|im_end|>" and hf.eos_token_id == 151645
    assert hf.pad_token == "<|endoftext|>" and hf.pad_token_id == 151643
    assert hf.bos_token is None
    # the attributes Qwen2_5OmniProcessor reads
    assert (hf.audio_token, hf.audio_token_id) == ("<|AUDIO|>", 151646)
    assert (hf.image_token, hf.image_token_id) == ("<|IMAGE|>", 151655)
    assert (hf.video_token, hf.video_token_id) == ("<|VIDEO|>", 151656)
    assert (hf.audio_bos_token, hf.audio_eos_token) == ("<|audio_bos|>", "<|audio_eos|>")
    assert (hf.vision_bos_token, hf.vision_eos_token) == ("<|vision_bos|>", "<|vision_eos|>")
    assert hf.chat_template == CHAT_TEMPLATE

    prompt = hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert "<|audio_bos|><|AUDIO|><|audio_eos|><|vision_bos|><|IMAGE|><|vision_eos|>" in prompt
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = hf(prompt)["input_ids"]
    assert ids == raw.encode(prompt).ids
    for special in ("<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|IMAGE|>", "<|VIDEO|>", "<|vision_bos|>"):
        assert SPECIAL_TOKENS[special] in ids
    assert hf.decode(ids) == prompt

    for text in (
        "The quick brown fox jumps over the lazy dog.",
        "Hello!  How are you?\n\nI'm fine; they've left.\t123 456",
        "Ünïcödé naïve café, 日本語のテキスト, emoji 🙂🚀, Ελληνικά",
        "",
    ):
        a = hf(text)["input_ids"]
        assert a == raw.encode(text).ids, text
        assert hf.decode(a) == text
        assert raw.decode(a) == text
    # the non-special added tokens are never split either
    assert hf.encode("<tool_call>x</tool_call>", add_special_tokens=False)[0] == 151657


def test_tokenizer_layout(ckpt):
    vocab = json.loads((ckpt / "vocab.json").read_text())
    assert sorted(vocab.values()) == list(range(151643))
    assert json.loads((ckpt / "added_tokens.json").read_text()) == SPECIAL_TOKENS
    assert (ckpt / "merges.txt").read_text().startswith("#version: 0.2\n")
    assert json.loads((ckpt / "chat_template.json").read_text()) == {"chat_template": CHAT_TEMPLATE}
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["chat_template"] == CHAT_TEMPLATE
    assert config["model_max_length"] == 32768
    decoder = config["added_tokens_decoder"]
    assert decoder["151657"]["special"] is False and decoder["151645"]["special"] is True
    # filler tokens decode to readable ASCII words
    import tokenizers

    raw = tokenizers.Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    text = raw.decode(list(range(100000, 100050)))
    assert text.replace(" ", "").isascii() and text.replace(" ", "").isalpha()


# ------------------------------------------------------------------------------------------ processor


def _inputs(processor):
    from PIL import Image

    text = processor.apply_chat_template(
        [{"role": "user", "content": CHAT[1]["content"][:2] + CHAT[1]["content"][3:]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    audio = np.random.RandomState(0).randn(16000).astype(np.float32) * 0.1  # 1 s at 16 kHz
    image = Image.fromarray((np.random.RandomState(1).rand(56, 84, 3) * 255).astype(np.uint8))
    return processor(text=text, audio=[audio], images=[image], return_tensors="pt")


def test_processor_loads_and_processes(processor):
    assert type(processor.feature_extractor).__name__ == "WhisperFeatureExtractor"
    assert processor.feature_extractor.feature_size == 128
    assert processor.feature_extractor.sampling_rate == 16000
    assert type(processor.image_processor).__name__.startswith("Qwen2VLImageProcessor")
    assert processor.image_processor.merge_size == 2
    assert processor.video_processor is not None
    assert type(processor.tokenizer).__name__ == "Qwen2Tokenizer"
    assert processor.chat_template == CHAT_TEMPLATE

    inputs = _inputs(processor)
    ids = inputs["input_ids"][0]
    assert inputs["input_features"].shape == (1, 128, 30000)
    assert int(inputs["feature_attention_mask"].sum()) == 100  # 1 s = 100 mel frames
    assert int((ids == 151646).sum()) == 25  # 100 frames -> 50 -> 25 audio tokens
    grid = inputs["image_grid_thw"][0]
    assert int((ids == 151655).sum()) == int(grid.prod()) // 4
    assert inputs["pixel_values"].shape == (int(grid.prod()), 3 * 2 * 14 * 14)


def test_every_stack_runs(loaded, processor):
    """Thinker (with audio + image), talker and token2wav run on the random weights."""
    model, _ = loaded
    inputs = _inputs(processor)
    with torch.no_grad():
        out = model.thinker(**inputs, output_hidden_states=True)
        assert out.logits.shape == (1, inputs["input_ids"].shape[1], 152064)
        assert torch.isfinite(out.logits).all()

        # talker on thinker hidden states + token embeddings, as generate() feeds it
        talker_in = model.talker.thinker_to_talker_proj(out.hidden_states[-1] + out.hidden_states[0])
        talker_out = model.talker.model(inputs_embeds=talker_in, use_cache=False)
        codes = model.talker.codec_head(talker_out.last_hidden_state)
        assert codes.shape == (1, inputs["input_ids"].shape[1], 8448)
        assert torch.isfinite(codes).all()

        spk = model.speaker_map["Chelsie"]
        wav = model.token2wav(
            torch.randint(0, 8193, (1, 6)),
            conditioning=spk["cond"].float(),
            reference_mel=spk["ref_mel"].float(),
            num_steps=2,
        )
    assert wav.numel() == 6 * 2 * 240  # codes x repeats x BigVGAN upsampling
    assert torch.isfinite(wav).all()


# ------------------------------------------------------------------------------------------ speakers


def test_spk_dict(ckpt, loaded):
    model, _ = loaded
    spk = torch.load(ckpt / "spk_dict.pt", weights_only=True)
    assert sorted(spk) == ["Chelsie", "Ethan"]
    dit = model.config.token2wav_config.dit_config
    for name, entry in spk.items():
        assert set(entry) == {"cond", "ref_mel", "bos_token"}
        assert entry["cond"].shape == (1, dit.enc_emb_dim) and entry["cond"].dtype == torch.float32
        assert entry["ref_mel"].shape == (1, 400, dit.mel_dim) and entry["ref_mel"].dtype == torch.float32
        assert isinstance(entry["bos_token"], int) and entry["bos_token"] == SPEAKERS[name]
        assert entry["bos_token"] < model.config.thinker_config.text_config.vocab_size
    assert sorted(model.speaker_map) == ["Chelsie", "Ethan"]


# ------------------------------------------------------------------------------------------ atomicity


def test_existing_nonempty_dir_raises(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_tiny_checkpoint(out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert _partials(tmp_path) == []


def test_failure_leaves_nothing(tmp_path, monkeypatch):
    def boom(_out_dir):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(tiny_model.tokenizer_kit, "write_tokenizer", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_tiny_checkpoint(tmp_path / "model")
    assert not (tmp_path / "model").exists()
    assert _partials(tmp_path) == []


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        write_tiny_checkpoint(tmp_path / "a", preset="huge")
    with pytest.raises(ValueError, match="layers"):
        write_tiny_checkpoint(tmp_path / "b", layers=0)
    with pytest.raises(ValueError, match="dtype"):
        write_tiny_checkpoint(tmp_path / "c", dtype="int8")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ presets


def _mrope_ok(sub) -> bool:
    head_dim = getattr(sub, "head_dim", None) or sub.hidden_size // sub.num_attention_heads
    return sum(sub.rope_parameters["mrope_section"]) * 2 == head_dim


def test_tiny_config():
    cfg = build_config("tiny")
    text, audio, vision = (cfg.thinker_config.text_config, cfg.thinker_config.audio_config,
                           cfg.thinker_config.vision_config)
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (64, 4, 2)
    assert (text.num_hidden_layers, text.intermediate_size, text.vocab_size) == (2, 128, 152064)
    assert text.rope_parameters["mrope_section"] == [2, 3, 3] and _mrope_ok(text)
    assert text.tie_word_embeddings is False and cfg.thinker_config.tie_word_embeddings is False
    assert (audio.num_mel_bins, audio.d_model, audio.encoder_layers, audio.output_dim) == (128, 32, 2, 64)
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size, vision.fullatt_block_indexes) == (2, 32, 64, [1])
    assert (cfg.talker_config.embedding_size, cfg.talker_config.hidden_size, cfg.talker_config.vocab_size) == (64, 32, 8448)
    assert _mrope_ok(cfg.talker_config)
    assert build_config("tiny", layers=5).thinker_config.text_config.num_hidden_layers == 5


def test_7b_shape_config_has_real_widths_and_few_layers():
    cfg = build_config("7b-shape")
    th = cfg.thinker_config
    text, audio, vision = th.text_config, th.audio_config, th.vision_config
    talker = cfg.talker_config
    dit, bigvgan = cfg.token2wav_config.dit_config, cfg.token2wav_config.bigvgan_config

    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (3584, 28, 4)
    assert (text.intermediate_size, text.vocab_size) == (18944, 152064)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24] and _mrope_ok(text)
    assert text.rope_parameters["rope_theta"] == 1000000.0
    assert (audio.d_model, audio.encoder_attention_heads, audio.encoder_ffn_dim, audio.output_dim) == (1280, 20, 5120, 3584)
    assert (vision.hidden_size, vision.num_heads, vision.intermediate_size, vision.out_hidden_size) == (1280, 16, 3420, 3584)
    assert (talker.hidden_size, talker.num_attention_heads, talker.num_key_value_heads, talker.head_dim) == (896, 12, 4, 128)
    assert (talker.intermediate_size, talker.embedding_size, talker.vocab_size) == (18944, 3584, 8448)
    assert talker.rope_parameters["mrope_section"] == [16, 24, 24] and _mrope_ok(talker)
    assert (dit.hidden_size, dit.num_attention_heads, dit.head_dim) == (1024, 16, 64)
    assert bigvgan.upsample_initial_channel == 1536

    # few layers in every stack, with valid layer indexes
    assert text.num_hidden_layers == 4
    assert audio.encoder_layers == 2 and vision.depth == 2 and talker.num_hidden_layers == 2
    assert dit.num_hidden_layers == 2
    assert all(i < vision.depth for i in vision.fullatt_block_indexes)
    assert all(i < dit.num_hidden_layers for i in (*dit.look_ahead_layers, *dit.look_backward_layers))
    assert build_config("7b-shape", layers=1).thinker_config.text_config.num_hidden_layers == 1
    # special ids as in the real checkpoint
    for key, value in THINKER_IDS.items():
        assert getattr(th, key) == value, key


def test_unknown_preset():
    with pytest.raises(ValueError):
        build_config("13b")
