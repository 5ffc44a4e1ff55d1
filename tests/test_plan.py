"""``omni-export plan``: weight bytes against built bundles (exactly), parameter counts against
transformers, the published 7B/3B configs, fits / does not fit, errors, the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import yaml

from omni_runtime.bundle.names import MODULE_GRAPHS

from omni_export.modules import REGISTRY
from omni_export.plan import PlanError, make_plan, params
from omni_export.plan.config import DEFAULTS, read_model
from omni_export.plan.constants import GB, PRECISIONS
from omni_export.plan.memory import STAGES, Request, load_plan_recipe, plan
from conftest import run_cli

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
REAL_7B, REAL_3B = CONFIGS / "Qwen2.5-Omni-7B", CONFIGS / "Qwen2.5-Omni-3B"


def initializer_bytes(bundle: Path, graph: str) -> int:
    """Bytes of a graph's initializers as stored (external lengths, embedded raw data), without
    the builder's shape constants (``const_*``), which plan does not list."""
    model = onnx.load(str(bundle / f"{graph}.onnx"), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        if t.name.startswith("const_"):
            continue
        external = {e.key: e.value for e in t.external_data}
        total += int(external["length"]) if external else len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
    return total


def check_bundle_bytes(model: Path, bundle: Path) -> None:
    """Planned bytes of every graph == its initializers exactly; the manifest's file bytes exceed
    them only by the graph's protobuf and the 4 KB alignment padding of its external data."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    recipe = load_plan_recipe(str(bundle), "cpu")
    from omni_export.plan.memory import graph_weight_bytes

    planned = graph_weight_bytes(read_model(model), recipe, recipe.target)
    assert set(planned) == set(manifest["graphs"])
    for graph, spec in manifest["graphs"].items():
        assert planned[graph] == initializer_bytes(bundle, graph), graph
        files = sum(manifest["files"][f]["bytes"] for f in [spec["file"], *spec["external_data"]])
        external = len([t for t in onnx.load(str(bundle / spec["file"]), load_external_data=False).graph.initializer
                        if t.external_data])
        assert 0 <= files - planned[graph] <= manifest["files"][spec["file"]]["bytes"] + 4096 * external, graph


def test_fp32_bundle_bytes_exact(tiny):
    check_bundle_bytes(*tiny)


def test_quantized_bundle_bytes_exact(tiny_checkpoint, tmp_path):
    """int4 linears (MatMulNBits layout, group 64), an int8 lm_head, int4 embeddings, a keep_float linear."""
    from omni_export.build.pipeline import build_bundle

    recipe = tmp_path / "q.yaml"
    recipe.write_text(yaml.safe_dump({"schema_version": 2, "name": "q", "modules": {
        "thinker": {"weights": "int4", "method": "rtn", "group_size": 64, "emit": "matmulnbits", "lm_head": "int8",
                    "embeddings": "int4", "keep_float": ["layers.0.self_attn.q_proj"]},
        "audio": {}, "vision": {}, "talker": {}, "token2wav": {}}}))
    check_bundle_bytes(tiny_checkpoint, build_bundle(tiny_checkpoint, str(recipe), tmp_path / "bundle"))


def _offered(precision: str) -> dict:
    return {name: {"weights": precision} for name, module in REGISTRY.items() if precision in module.precisions}


@pytest.mark.parametrize("precision", ["float16", "int8", "int4"])
def test_new_precisions_bytes_exact(tiny_checkpoint, tmp_path, precision):
    """Every module that offers the precision (read from the module classes): built bytes == planned."""
    from omni_export.build.pipeline import build_bundle

    modules = _offered(precision)
    if not modules:
        pytest.skip(f"no module offers {precision} yet")
    if "talker" not in modules and "token2wav" in modules:
        modules["talker"] = {}
    recipe = tmp_path / "p.yaml"
    recipe.write_text(yaml.safe_dump({"schema_version": 2, "name": "p", "modules": {"thinker": {}, **modules}}))
    check_bundle_bytes(tiny_checkpoint, build_bundle(tiny_checkpoint, str(recipe), tmp_path / "bundle"))


def test_every_offered_precision_has_a_formula():
    for name, module in REGISTRY.items():
        for precision in module.precisions:
            assert precision in PRECISIONS, (name, precision)


def test_inventories_cover_the_registry():
    shape = read_model(REAL_7B)
    assert set(params.INVENTORIES) == set(REGISTRY)
    for module in REGISTRY:
        assert tuple(params.inventory(module, shape)) == MODULE_GRAPHS[module]


@pytest.mark.parametrize("config", [REAL_7B, REAL_3B])
def test_parameter_counts_match_transformers(config):
    """Per module, the checkpoint parameters plan counts == transformers' module built from the
    same config (on the meta device: no memory). Not in the graphs: the audio tower's unused
    bos/eos embedding and the DiT's speaker encoder (run at build time)."""
    import torch
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    cfg = Qwen2_5OmniConfig.from_pretrained(config)
    with torch.device("meta"):
        model = Qwen2_5OmniForConditionalGeneration(cfg)

    def count(module, skip=()):
        return sum(p.numel() for n, p in module.named_parameters() if not n.startswith(skip))

    inner = model.thinker.model
    expected = {"thinker": count(inner.language_model) + model.thinker.lm_head.weight.numel(),
                "audio": count(inner.audio_tower, ("audio_bos_eos_token",)), "vision": count(inner.visual),
                "talker": count(model.talker),
                "token2wav": count(model.token2wav, ("code2wav_dit_model.input_embed.spk_encoder",))}
    shape = read_model(config)
    assert {m: params.parameter_count(m, shape) for m in expected} == expected


@pytest.mark.parametrize("config", [REAL_7B, REAL_3B, "tiny"])
def test_config_reader_matches_transformers(config, tiny_checkpoint):
    """The torch-free reader gives the shapes the exporters take from transformers' config."""
    from transformers import Qwen2_5OmniConfig

    from omni_export.export.audio_encoder import AudioDims
    from omni_export.export.decoder_graph import TextDims
    from omni_export.export.token2wav_bigvgan import BigVGANDims
    from omni_export.export.token2wav_dit import DiTDims
    from omni_export.export.vision_encoder import VisionDims

    path = tiny_checkpoint if config == "tiny" else config
    cfg = Qwen2_5OmniConfig.from_pretrained(path)
    shape = read_model(path)
    for mine, theirs in ((shape.text, TextDims.from_config(cfg.thinker_config.text_config)),
                         (shape.talker, TextDims.from_config(cfg.talker_config))):
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                    "vocab_size", "max_position_embeddings"):
            assert getattr(mine, key) == getattr(theirs, key), key
    assert shape.text.intermediate_size == cfg.thinker_config.text_config.intermediate_size
    assert shape.talker.intermediate_size == cfg.talker_config.intermediate_size
    assert shape.talker.embedding_size == cfg.talker_config.embedding_size
    for mine, theirs in ((shape.audio, AudioDims.from_config(cfg.thinker_config.audio_config)),
                         (shape.vision, VisionDims.from_config(cfg.thinker_config.vision_config)),
                         (shape.dit, DiTDims.from_config(cfg.token2wav_config.dit_config)),
                         (shape.bigvgan, BigVGANDims.from_config(cfg.token2wav_config.bigvgan_config))):
        for key in mine.__dataclass_fields__:
            assert getattr(mine, key) == getattr(theirs, key), (type(mine).__name__, key)


def test_defaults_are_transformers_defaults():
    from transformers.models.qwen2_5_omni import configuration_qwen2_5_omni as c

    classes = {"text": c.Qwen2_5OmniTextConfig, "audio": c.Qwen2_5OmniAudioEncoderConfig,
               "vision": c.Qwen2_5OmniVisionEncoderConfig, "talker": c.Qwen2_5OmniTalkerConfig,
               "dit": c.Qwen2_5OmniDiTConfig, "bigvgan": c.Qwen2_5OmniBigVGANConfig}
    for section, defaults in DEFAULTS.items():
        config = classes[section]()
        for key, value in defaults.items():
            theirs = json.loads(json.dumps(getattr(config, key, None)))  # tuples as lists
            assert theirs == value, (section, key)


def test_config_only_directory(tmp_path):
    """A directory with config.json alone plans (no weights, no tokenizer)."""
    (tmp_path / "config.json").write_bytes((REAL_7B / "config.json").read_bytes())
    result = make_plan(str(tmp_path), "int4-rtn", video_seconds=15)
    assert result.peak_bytes > 0 and [s.name for s in result.stages] == list(STAGES)


def test_real_configs_plausible():
    """7B / 3B weights as published sizes imply: the int4 thinker 4.35 GB (the README's projection
    of the 7b-shape manifest), float32 everything about 4 bytes per parameter."""
    b7 = make_plan(str(REAL_7B), "int4-rtn").graph_bytes
    thinker = b7["thinker_embedding"] + b7["thinker_decoder"]
    assert 4.3 * GB < thinker < 4.4 * GB
    fp32 = make_plan(str(REAL_7B), "fp32").graph_bytes
    assert 42.8 * GB < sum(fp32.values()) < 43.3 * GB  # 10.73 B parameters (+ the graphs' tables)
    b3 = make_plan(str(REAL_3B), "fp32").graph_bytes
    assert 22.1 * GB < sum(b3.values()) < 22.3 * GB  # 5.54 B parameters
    kv7 = make_plan(str(REAL_7B), "int4-rtn", max_new_tokens=1000, speech=False)
    prefill = next(s for s in kv7.stages if s.name == "thinker_prefill")
    assert prefill.kv_bytes == 2 * 28 * 4 * 128 * 4 * (kv7.media.prompt_tokens + 1000)


def test_video_counts_follow_the_runtime(tmp_path):
    """--video-seconds counts what the runtime's load_video makes of such a video."""
    from omni_runtime.bundle.config import VisionConfig
    from omni_runtime.media.vision_prep import load_video

    from omni_export.plan.media import SOURCE_FPS, video_grid
    from omni_export.testkit.media import write_video

    video = write_video(tmp_path / "v.mp4", seconds=3, fps=SOURCE_FPS, size=(320, 240))
    loaded = load_video(video, VisionConfig())
    grid = video_grid(3, (320, 240), VisionConfig())
    assert (grid.t, grid.h, grid.w) == tuple(loaded.grid_thw)
    assert grid.seconds_per_grid == pytest.approx(loaded.second_per_grid)


def test_fits_and_does_not_fit():
    fits = make_plan(str(REAL_7B), "int4-rtn", video_seconds=15, device_memory="100GB")
    assert fits.fits and fits.to_json()["fits"] is True
    tight = make_plan(str(REAL_7B), "int4-rtn", video_seconds=15, device_memory="2GB")
    assert not tight.fits
    # 60 s of 720p video is 44.8K prompt tokens: over the thinker's 32768 positions
    long = make_plan(str(REAL_7B), "int4-rtn", video_seconds=60, device_memory="1TB")
    assert not long.fits and not long.context["fits"] and "context" in long.notes[0]


def test_policies():
    shape, recipe = read_model(REAL_7B), load_plan_recipe("int4-rtn", "cpu")
    request = Request(video_seconds=15)
    lazy = plan(shape, recipe, "cpu", request, "lazy")
    resident = plan(shape, recipe, "cpu", request, "resident")
    assert resident.peak_bytes > lazy.peak_bytes
    assert set(resident.stages[-1].graphs) == set(resident.graph_bytes)
    assert lazy.stages[-1].graphs == ["talker_embedding", "talker_decoder", "token2wav_dit", "token2wav_bigvgan"]
    everything = sum(resident.graph_bytes.values())
    assert plan(shape, recipe, "cpu", request, everything).peak_bytes == resident.peak_bytes
    # a budget of the speech stage + the thinker decoder: the least recently used (the thinker's
    # embedding, used before its decoder at every step) gives way, the decoder stays
    speech = sum(lazy.graph_bytes[g] for g in lazy.stages[-1].graphs)
    budget = plan(shape, recipe, "cpu", request, speech + lazy.graph_bytes["thinker_decoder"])
    assert budget.stages[-1].graphs == ["thinker_decoder", *lazy.stages[-1].graphs]
    # before the speech everything fitted: the encoders stayed (then gave way to the talker)
    assert budget.stages[2].graphs == ["audio_encoder", "vision_encoder", "thinker_embedding", "thinker_decoder"]
    with pytest.raises(PlanError, match="speech stage"):
        plan(shape, recipe, "cpu", request, speech - 1)


def test_json_fields():
    data = make_plan(str(REAL_7B), "int4-rtn", video_seconds=15, audio_seconds=5, images=["640x480"]).to_json()
    assert isinstance(data["peak_bytes"], int) and isinstance(data["fits"], bool)
    assert [s["name"] for s in data["stages"]] == list(STAGES)
    for stage in data["stages"]:
        for key in ("graphs", "weights_bytes", "kv_bytes", "activations_bytes", "arena_bytes", "base_bytes",
                    "peak_bytes"):
            assert key in stage
    assert data["peak_bytes"] == max(s["peak_bytes"] for s in data["stages"])
    assert data["media"]["image_tokens"] == 391 and data["media"]["audio_tokens"] == 125 + 375


@pytest.mark.parametrize("args,needle", [
    (["--model", "{missing}", "--recipe", "awq"], "model directory does not exist"),
    (["--model", "{empty}", "--recipe", "awq"], "no config.json"),
    (["--model", "{real}", "--recipe", "nope"], "unknown recipe 'nope'"),
    (["--model", "{real}", "--recipe", "fp32", "--device-memory", "8XB"], "--device-memory '8XB' is not a size"),
    (["--model", "{real}", "--recipe", "fp32", "--memory", "some"], "--memory 'some' is not a policy"),
    (["--model", "{real}", "--recipe", "fp32", "--image", "640"], "--image '640' is not WIDTHxHEIGHT"),
    (["--model", "{real}", "--recipe", "fp32", "--target", "tpu"], "--target 'tpu'"),
    (["--model", "{real}", "--recipe", "fp32", "--memory", "1GB"], "smaller than the thinker_prefill stage"),
])
def test_cli_errors(tmp_path, args, needle):
    (tmp_path / "empty").mkdir()
    values = {"missing": str(tmp_path / "missing"), "empty": str(tmp_path / "empty"), "real": str(REAL_7B)}
    out = run_cli("plan", *(a.format(**values) for a in args))
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr and "fix:" in out.stderr and "Traceback" not in out.stderr


def test_cli_table_and_json():
    out = run_cli("plan", "--model", REAL_7B, "--recipe", "int4-rtn", "--video-seconds", "15", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["stages"][0]["name"] == "audio_encoder"
    table = run_cli("plan", "--model", REAL_3B, "--recipe", "int4-rtn", "--audio-seconds", "30",
                    "--device-memory", "64GB")
    assert table.returncode == 0, table.stderr
    assert "thinker_prefill" in table.stdout and "fits" in table.stdout


def test_plan_is_torch_free():
    """plan reads config.json only: neither torch nor transformers is imported."""
    import subprocess
    import sys

    code = ("import sys; from omni_export.plan import make_plan; "
            f"make_plan({str(REAL_7B)!r}, 'awq', target='cuda', video_seconds=15, audio_seconds=5); "
            "print(sorted(m for m in ('torch', 'transformers', 'onnx', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
