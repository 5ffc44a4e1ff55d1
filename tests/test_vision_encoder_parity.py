"""The vision encoder graph against transformers' ``Qwen2_5OmniVisionEncoder`` (``thinker.model.visual``).

The oracle runs on the same patches with the grids and computes its own rotary positions,
window permutation and segment lengths; the graph gets ours (``vision_prep.encoder_inputs``),
which are also compared with transformers' ``vision_utils`` functions exactly.

The tiny checkpoint's vision weights are re-drawn at unit scale (std 1/sqrt(fan_in)) for the
graph parity: with the checkpoint's 0.02-std weights attention is almost uniform and confining
it to the wrong segments would change the output by less than the 1e-4 tolerance.
``test_masking_is_visible`` proves the redrawn weights make such an error 1000x the tolerance.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from omni_runtime.errors import InputError
from omni_runtime.media.vision_prep import VisionConfig, encoder_inputs, token_count

TOL = 1e-4
PATCH_DIM = 3 * 2 * 14 * 14

GRIDS = {
    "one-window-112px": [(1, 8, 8)],
    "140x196px": [(1, 10, 14)],                  # not a multiple of the 112-px window
    "308x504px": [(1, 22, 36)],                  # several windows, partial ones at the edges
    "tall-840x28px": [(1, 60, 2)],
    "video-t3": [(3, 12, 20)],                   # video grid, t > 1
    "two-images": [(1, 10, 14), (1, 18, 12)],    # two images in one call
    "video+image": [(2, 8, 10), (1, 6, 6)],
    "1008x1120px": [(1, 72, 80)],                # 90 windows (2 loop groups), 5760 patches (12 query chunks)
}


def _patches(grids, seed=0) -> np.ndarray:
    n = sum(t * h * w for t, h, w in grids)
    return np.random.default_rng(seed).standard_normal((n, PATCH_DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def unit_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint with its vision weights redrawn at unit scale."""
    from safetensors.numpy import load_file, save_file

    out = tmp_path_factory.mktemp("vision-unit") / "model"
    shutil.copytree(tiny_checkpoint, out)
    files = sorted(out.glob("*.safetensors"))
    rng = np.random.default_rng(7)
    for file in files:
        tensors = load_file(file)
        for name, value in tensors.items():
            if "visual." in name and value.ndim >= 2:  # linears and the patch embedding
                fan_in = int(np.prod(value.shape[1:]))
                tensors[name] = (rng.standard_normal(value.shape) / np.sqrt(fan_in)).astype(value.dtype)
            elif "visual." in name and name.endswith(".bias"):
                tensors[name] = (0.1 * rng.standard_normal(value.shape)).astype(value.dtype)
        save_file(tensors, file, metadata={"format": "pt"})
    return out


def _visual(checkpoint: Path):
    from transformers import Qwen2_5OmniForConditionalGeneration

    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="sdpa",
                                                                  dtype="float32")
    return model.thinker.model.visual.eval()


def _reference(visual, pixels: np.ndarray, grids) -> np.ndarray:
    with torch.no_grad():
        return visual(torch.from_numpy(pixels), grid_thw=torch.tensor(grids)).pooler_output.numpy()


@pytest.fixture(scope="module")
def unit_graph(unit_checkpoint, tmp_path_factory):
    """(onnxruntime session of the vision graph built from unit_checkpoint, transformers' visual)."""
    import onnxruntime as ort

    from omni_export.checkpoint.reader import Checkpoint
    from omni_export.modules import REGISTRY, BuildContext
    from omni_export.build.recipes import load_recipe

    recipe = load_recipe("fp32")
    ckpt = Checkpoint.open(unit_checkpoint)
    module = REGISTRY["vision"](ckpt, recipe.module("vision"))
    module.check()
    out = tmp_path_factory.mktemp("vision-graph")
    graphs = module.build(BuildContext(ckpt=ckpt, recipe=recipe, out_dir=out)).graphs
    graph, quantization = graphs["vision_encoder"]
    assert quantization is None
    assert [t.name for t in graph.inputs] == ["pixel_values", "position_ids", "window_index", "cu_seqlens",
                                              "cu_window_seqlens"]
    session = ort.InferenceSession(str(out / graph.file), providers=["CPUExecutionProvider"])
    return session, _visual(unit_checkpoint)


@pytest.mark.parametrize("name", list(GRIDS))
def test_graph_matches_transformers(unit_graph, name):
    session, visual = unit_graph
    grids = GRIDS[name]
    pixels = _patches(grids)
    ref = _reference(visual, pixels, grids)
    (got,) = session.run(None, {"pixel_values": pixels, **encoder_inputs(grids)})
    assert got.shape == ref.shape == (sum(token_count(g) for g in grids), visual.config.out_hidden_size)
    assert np.abs(ref).max() > 0.5  # unit-scale outputs: the tolerance is meaningful
    assert np.abs(got - ref).max() <= TOL


def test_masking_is_visible(unit_graph):
    """Attention over whole frames instead of windows, or over the whole call instead of one
    frame, moves the output far beyond the tolerance: the parity above checks the masks."""
    session, _ = unit_graph
    grids = GRIDS["video+image"]
    pixels = _patches(grids)
    inputs = encoder_inputs(grids)
    (good,) = session.run(None, {"pixel_values": pixels, **inputs})
    total = np.array([0, pixels.shape[0]], dtype=np.int64)
    for wrong in ({"cu_window_seqlens": inputs["cu_seqlens"]}, {"cu_seqlens": total}):
        (bad,) = session.run(None, {"pixel_values": pixels, **{**inputs, **wrong}})
        assert np.abs(bad - good).max() > 1000 * TOL


@pytest.mark.parametrize("grids", [[(1, 2, 2)], [(1, 8, 8)], [(1, 16, 16)], [(1, 10, 14)], [(4, 30, 2)],
                                   [(3, 12, 20), (1, 36, 22)], [(1, 2, 2), (2, 4, 4), (1, 18, 18)]])
def test_encoder_inputs_equal_transformers(grids):
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    g = torch.tensor(grids)
    window_index, cu_window = get_vision_window_index(g, spatial_merge_size=2, window_size=112, patch_size=14)
    ours = encoder_inputs(grids, VisionConfig())
    assert all(v.dtype == np.int64 for v in ours.values())
    np.testing.assert_array_equal(ours["position_ids"], get_vision_position_ids(g, 2).numpy())
    np.testing.assert_array_equal(ours["window_index"], window_index.numpy())
    np.testing.assert_array_equal(ours["cu_seqlens"], get_vision_cu_seqlens(g).numpy())
    np.testing.assert_array_equal(ours["cu_window_seqlens"], cu_window.numpy())


def test_runtime_stage_on_the_bundle(tiny_checkpoint, tiny_bundle):
    """The fp32 bundle's vision graph through the runtime stage (session loaded on demand and
    released after), against the tiny checkpoint's own visual."""
    from omni_runtime.bundle.manifest import load_manifest
    from omni_runtime.bundle.sessions import SessionPool
    from omni_runtime.stages.vision_encoder import VisionEncoder
    from omni_runtime.media.vision_prep import VisionInput

    manifest = load_manifest(tiny_bundle)
    assert manifest.recipe["modules"]["vision"]["weights"] == "float32"
    config = manifest.config["vision"]
    checkpoint_config = json.loads((tiny_checkpoint / "config.json").read_text())["thinker_config"]["vision_config"]
    keys = ("depth", "hidden_size", "patch_size", "window_size", "fullatt_block_indexes")
    assert {k: config[k] for k in keys} == {k: checkpoint_config[k] for k in keys}
    pre = json.loads((tiny_checkpoint / "preprocessor_config.json").read_text())
    assert {k: config["image"][k] for k in ("min_pixels", "max_pixels", "image_mean", "image_std")} == \
        {k: pre[k] for k in ("min_pixels", "max_pixels", "image_mean", "image_std")}

    pool = SessionPool(manifest, ["CPUExecutionProvider"])
    encoder = VisionEncoder(manifest, pool)
    grids = GRIDS["video+image"]
    pixels = _patches(grids, seed=3)
    ref = _reference(_visual(tiny_checkpoint), pixels, grids)
    got = encoder.encode(pixels, grids)
    assert np.abs(got - ref).max() <= TOL
    assert pool.loaded == {}  # released after the call

    first = sum(t * h * w for t, h, w in grids[:1])
    items = [VisionInput(pixels[:first], grids[0], "video"), VisionInput(pixels[first:], grids[1])]
    parts = encoder.encode_inputs(items)
    assert [p.shape[0] for p in parts] == [token_count(g) for g in grids]
    np.testing.assert_array_equal(np.concatenate(parts), got)

    with pytest.raises(InputError, match=r"pixel_values has shape \[10, 1176\]"):
        encoder.encode(pixels[:10], grids)
    with pytest.raises(InputError, match="not a multiple of the merge size"):
        encoder.encode(pixels[:15], [(1, 3, 5)])


@pytest.mark.parametrize("change,needles", [
    ({"resample": 2}, ["resampling 2", "bicubic"]),
    ({"patch_size": 16}, ["patch_size is 16", "vision encoder's is 14"]),
    ({"do_normalize": False}, ["do_normalize false"]),
])
def test_module_refuses_other_preprocessing(tiny_checkpoint, tmp_path, change, needles):
    """A preprocessor_config.json the runtime would not follow is refused before the build."""
    from omni_export.checkpoint.reader import Checkpoint, CheckpointError
    from omni_export.modules import REGISTRY
    from omni_export.build.recipes import load_recipe

    for file in tiny_checkpoint.iterdir():
        (tmp_path / file.name).symlink_to(file)
    pre = json.loads((tiny_checkpoint / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").unlink()
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**pre, **change}))
    module = REGISTRY["vision"](Checkpoint.open(tmp_path), load_recipe("fp32").module("vision"))
    with pytest.raises(CheckpointError) as info:
        module.check()
    message = str(info.value)
    assert "preprocessor_config.json" in message and all(n in message for n in needles), message
