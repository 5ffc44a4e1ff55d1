"""``omni-export verify``: the layer-at-a-time PyTorch reference and the bundle report.

The reference (``omni_export.verify.checks.thinker.reference_forward``: transformers decoder layers built and
run one at a time) is first checked against transformers' whole thinker loaded with
``from_pretrained``, so the verify numbers rest on an independent oracle. Then: an fp32 bundle
matches it to float rounding (top-1 agreement 1, KL ~0), an int4-rtn bundle shows a small,
nonzero, finite error, and the CLI prints the documented JSON shape. The other graphs' reference
modules (``reference_module``, built from a sub-config and only its tensors) are checked equal to
the modules transformers' ``from_pretrained`` builds, and every graph of the fp32 bundle matches.
"""

import json
import math

import numpy as np
import pytest
import torch

from conftest import run_cli
from omni_export.checkpoint.reader import Checkpoint
from omni_export.verify.checks.thinker import reference_forward, reference_layers
from omni_export.verify.context import VerifyError
from omni_export.verify.driver import verify_bundle, verify_modules
from omni_export.verify.reference import reference_module
from omni_runtime.bundle.manifest import load_manifest

LOGIT_KEYS = {"max_abs", "rel_rms", "logits_max_abs", "logits_rel_rms"}
GRAPH_KEYS = {"thinker_embedding": {"max_abs", "rel_rms"}, "thinker_decoder": LOGIT_KEYS,
              "audio_encoder": {"max_abs", "rel_rms"}, "vision_encoder": {"max_abs", "rel_rms"},
              "talker_embedding": {"max_abs", "rel_rms"}, "talker_decoder": LOGIT_KEYS,
              "token2wav_dit": {"max_abs", "rel_rms"}, "token2wav_bigvgan": {"max_abs", "rel_rms"}}


def check_shape(report):
    """Every graph of the bundle's manifest is reported, with finite metrics."""
    assert set(report["graphs"]) == set(load_manifest(report["bundle"]).graphs)
    for name, metrics in report["graphs"].items():
        assert GRAPH_KEYS[name] <= set(metrics)
        assert all(math.isfinite(metrics[k]) for k in GRAPH_KEYS[name])
    assert {"top1_agreement", "mean_kl", "positions"} <= set(report["thinker"])
    assert {"bundle", "model", "recipe", "seconds"} <= set(report)


@pytest.mark.parametrize("multimodal", [False, True])
def test_reference_equals_transformers_thinker(tiny_checkpoint, reference_thinker, multimodal):
    config = reference_thinker.config.text_config
    g = torch.Generator().manual_seed(3)
    embeds = torch.randn(1, 11, config.hidden_size, generator=g)
    positions = np.broadcast_to(np.arange(11), (3, 1, 11)).copy()
    if multimodal:  # distinct t/h/w positions, as TMRoPE gives image and audio tokens
        positions += torch.randint(0, 30, (3, 1, 11), generator=g).numpy()
    ref = reference_forward(Checkpoint.open(tiny_checkpoint), [(embeds.numpy(), positions)])
    with torch.no_grad():
        out = reference_thinker.model.language_model(inputs_embeds=embeds, position_ids=torch.from_numpy(positions))
        logits = reference_thinker.lm_head(out.last_hidden_state)[0].numpy()
    hidden = out.last_hidden_state.numpy()
    assert ref.hidden[0].shape == hidden.shape
    assert np.abs(ref.hidden[0] - hidden).max() <= 1e-5
    assert np.abs(ref.logits(0, list(range(11))) - logits).max() <= 1e-5


def test_reference_layers_are_transformers_modules(tiny_checkpoint):
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniDecoderLayer

    ckpt = Checkpoint.open(tiny_checkpoint)
    layers = list(reference_layers(ckpt))
    assert len(layers) == ckpt.text_config().num_hidden_layers
    assert all(type(layer) is Qwen2_5OmniDecoderLayer and not layer.training for layer in layers)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for layer in layers for p in layer.parameters())


def test_reference_modules_are_transformers_modules(tiny_checkpoint):
    """Each reference module built from its sub-config and its own tensors equals, parameters and
    buffers, the module transformers' from_pretrained builds from the whole checkpoint."""
    from transformers import Qwen2_5OmniForConditionalGeneration
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as m

    ckpt = Checkpoint.open(tiny_checkpoint)
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype="float32")
    cfg = ckpt.config
    cases = [(m.Qwen2_5OmniAudioEncoder, cfg.thinker_config.audio_config, ("thinker.audio_tower.",),
              model.thinker.model.audio_tower),
             (m.Qwen2_5OmniVisionEncoder, cfg.thinker_config.vision_config, ("thinker.visual.",),
              model.thinker.model.visual),
             (m.Qwen2_5OmniTalkerForConditionalGeneration, cfg.talker_config, ("talker.",), model.talker),
             (m.Qwen2_5OmniToken2WavDiTModel, cfg.token2wav_config.dit_config, ("token2wav.code2wav_dit_model.",),
              model.token2wav.code2wav_dit_model),
             (m.Qwen2_5OmniToken2WavBigVGANModel, cfg.token2wav_config.bigvgan_config,
              ("token2wav.code2wav_bigvgan_model.",), model.token2wav.code2wav_bigvgan_model)]
    for cls, config, prefixes, expected in cases:
        module = reference_module(ckpt, cls, config, prefixes)
        assert type(module) is cls and not module.training
        ours = dict(module.named_parameters()) | dict(module.named_buffers())
        theirs = dict(expected.named_parameters()) | dict(expected.named_buffers())
        assert ours.keys() == theirs.keys(), cls.__name__
        for name, value in theirs.items():
            assert ours[name].dtype == torch.float32
            assert torch.equal(ours[name], value.float()), f"{cls.__name__}.{name}"


def errors(metrics: dict) -> list[float]:
    """A graph's numeric figures (its errors); ``dtype`` / ``runs_on`` say how it ran."""
    values = [v for k, v in metrics.items() if k not in ("dtype", "runs_on", "cpu_float32_ops")]
    assert values and all(isinstance(v, (int, float)) for v in values), metrics
    return values


def test_missing_graphs_are_skipped(tiny_bundle, tiny_checkpoint):
    manifest = load_manifest(tiny_bundle)
    for name in ("audio_encoder", "talker_embedding", "token2wav_dit", "token2wav_bigvgan"):
        del manifest.graphs[name]
    report = verify_modules(manifest, Checkpoint.open(tiny_checkpoint), scale=0.02)
    assert set(report) == {"vision_encoder", "talker_decoder"}
    assert all(value <= 1e-4 for metrics in report.values() for value in errors(metrics))


def test_fp32_bundle_matches(tiny_bundle, tiny_checkpoint):
    report = verify_bundle(tiny_bundle, tiny_checkpoint, prompts=2, tokens=16)
    print(json.dumps(report, indent=1))
    check_shape(report)
    assert set(report["graphs"]) == set(GRAPH_KEYS)  # the tiny fp32 bundle has every graph
    for metrics in report["graphs"].values():
        assert all(value <= 1e-4 for value in errors(metrics))
        assert metrics["dtype"] == "float32" and metrics["runs_on"] == "onnxruntime-cpu", metrics
    assert report["recipe"] == "fp32"
    assert report["thinker"]["positions"] == 2 * 16
    assert report["thinker"]["top1_agreement"] == 1.0
    assert report["thinker"]["mean_kl"] < 1e-6


@pytest.fixture(scope="module")
def int4_bundle(tiny_checkpoint, tmp_path_factory):
    from omni_export.build.pipeline import build_bundle

    return build_bundle(tiny_checkpoint, "int4-rtn", tmp_path_factory.mktemp("verify-int4") / "b")


def test_int4_rtn_bundle_has_small_nonzero_error(int4_bundle, tiny_checkpoint):
    report = verify_bundle(int4_bundle, tiny_checkpoint, prompts=2, tokens=16)
    print(json.dumps(report, indent=1))
    check_shape(report)
    assert report["recipe"] == "int4-rtn"
    graphs, thinker = report["graphs"], report["thinker"]
    assert 1e-4 < graphs["thinker_embedding"]["rel_rms"] < 0.02   # int8 table: ~1/255 of a row's range
    assert 1e-3 < graphs["thinker_decoder"]["rel_rms"] < 0.3      # int4 group-128 weights
    assert 1e-3 < graphs["thinker_decoder"]["logits_rel_rms"] < 0.3
    assert 0.0 < thinker["mean_kl"] < 0.05 and math.isfinite(thinker["mean_kl"])
    assert 0.5 <= thinker["top1_agreement"] <= 1.0


def test_other_model_is_refused(tiny_bundle, tmp_path):
    from omni_export.testkit.tiny_model import write_tiny_checkpoint

    other = write_tiny_checkpoint(tmp_path / "other", preset="tiny", seed=1, layers=3)
    with pytest.raises(VerifyError, match="num_hidden_layers 2 vs 3"):
        verify_bundle(tiny_bundle, other, prompts=1, tokens=2)


def test_cli_json(tiny_bundle, tiny_checkpoint):
    proc = run_cli("verify", tiny_bundle, "--model", tiny_checkpoint, "--json", "--prompts", "1", "--tokens", "4")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    check_shape(report)
    assert report["thinker"]["positions"] == 4
    assert report["thinker"]["top1_agreement"] == 1.0


def test_cli_missing_model_is_a_clean_error(tiny_bundle, tmp_path):
    proc = run_cli("verify", tiny_bundle, "--model", tmp_path / "nope")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "fix:" in proc.stderr and str(tmp_path / "nope") in proc.stderr


def test_build_verify(tiny_checkpoint, tmp_path):
    proc = run_cli("build", "--model", tiny_checkpoint, "--recipe", "fp32", "--out", tmp_path / "b", "--verify")
    assert proc.returncode == 0, proc.stderr
    assert "thinker_decoder" in proc.stdout and "top1 agreement" in proc.stdout
