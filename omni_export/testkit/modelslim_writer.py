"""Write a random-weight msModelSlim AscendV1 W8A8_DYNAMIC checkpoint (``omni-export tiny --w8a8-modelslim``).

Written from msModelSlim's own source, independently of the importer
(``omni_export.checkpoint.modelslim``), as what ``msmodelslim quant --model_type Qwen2.5-Omni-7B
--quant_type w8a8`` leaves on disk (Ascend/msmodelslim 3de0a3c4, 2026-07-02):

- the quantization: ``msmodelslim/ir/api/impl/int_quantization.py`` (``calculate_int_qparam``,
  symmetric int8 per channel: ``scale = max(max(-min, max) / 127, float32 eps)``, min/max
  clamped to include 0; ``int_quantize``: ``round(w / scale + 0)`` clamped to [-128, 127]), in
  float32 torch;
- the tensors: ``AscendV1Saver.on_w8a8_dynamic_per_channel`` (``weight`` int8,
  ``weight_scale`` float32 [N, 1], ``weight_offset`` zeros float32 [N, 1], all typed
  ``W8A8_DYNAMIC``; ``bias`` float32 typed ``FLOAT``) and ``on_float_module`` (every other
  parameter as it is, ``FLOAT``); ``post_run`` adds ``version`` 1.0.0, ``model_quant_type``,
  ``metadata``, ``group_size`` 0 and ``optional`` to the description;
- the files: ``BufferedSafetensorsWriter`` (``part_file_size`` > 0: shards
  ``quant_model_weights-0000i-of-0000N.safetensors`` and an index ``{"metadata": {"total_size"},
  "weight_map"}``, a new shard when the next tensor would reach the size) or ``SafetensorsWriter``
  (``part_file_size: 0``: one ``quant_model_weights.safetensors``); ``copy_files`` copies the
  model's ``.json`` / ``.py`` / ``.txt`` / ``.jinja`` files but ``*index.json``, and
  ``remove_quantization_config`` strips ``quantization_config`` from config.json;
- the Qwen2.5-Omni thinker adapter's ``ascendv1_save_postprocess``: ``thinker.`` before every key
  of the description (globals included) and of the index (rewritten as its bare weight map), and
  every tensor name of the shards.

Static W8A8 (``static``: module-name patterns, e.g. ``model.layers.*.self_attn.*``, as a recipe
with ``act: {scope: per_tensor, symmetric: False, method: minmax}`` gives them): the activation's
range over calibration tokens (the float thinker run in transformers on random prompt ids, its
linears' inputs hooked, as msModelSlim's minmax observer records them), its scale and offset
by ``calculate_int_qparam`` asymmetric int8 (min/max widened to 0, ``scale = max/255 - min/255``
at least eps, ``offset = round(-min / scale) - 128``), and ``AscendV1Saver.on_w8a8_static``'s
tensors: ``weight`` int8, ``quant_bias`` int32 (``round(bias / deq_scale - sum(weight) *
input_offset)``), ``input_scale`` and ``input_offset`` float32 [1], ``deq_scale`` (``input_scale *
weight_scale``, float32 when the model's dtype is bfloat16, else its bit pattern as int64:
``save/utils/deqscale.py``), all typed ``W8A8``, and ``bias`` float32 typed ``FLOAT``.

Which linears: the Qwen2.5 W8A8 practice (``lab_practice/qwen2_5/qwen2.5-7b-w8a8.yaml``,
``disable_names``: ``lm_head`` and every ``model.layers.<i>.mlp.down_proj``) by default; the
audio tower and the vision encoder are FLOAT (the Omni thinker recipe's ``exclude``). msModelSlim
writes only the thinker; the talker and token2wav (which a real user copies from the float
checkpoint) go to ``model.safetensors`` with ``spk_dict.pt`` so the directory builds a whole bundle.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

#: msModelSlim's Qwen2.5 W8A8 disable_names (module names inside the thinker, before the ``thinker.`` prefix)
DEFAULT_DISABLE = ("lm_head", "model.layers.*.mlp.down_proj")
LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)")
PREFIX = "thinker."


def quantize_per_channel(weight):
    """msModelSlim's symmetric int8 per-channel minmax: (int8 levels [N, K], float32 scale [N])."""
    import torch

    w = weight.to(torch.float32)
    eps = torch.tensor([torch.finfo(torch.float32).eps])
    min_val = torch.min(w.amin(dim=1), torch.zeros(w.shape[0]))
    max_val = torch.max(w.amax(dim=1), torch.zeros(w.shape[0]))
    scale = torch.max(torch.max(-min_val, max_val) / 127.0, eps)
    q = (w / scale[:, None] + 0.0).round_().clamp_(min=-128, max=127).to(torch.int8)
    return q, scale


def _save(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def _write_weights(entries: list, directory: Path, part_bytes: int) -> dict[str, str] | None:
    """msModelSlim's writers: shards + index for ``part_bytes`` > 0, else one file (returns None)."""
    if not part_bytes:
        _save(dict(entries), directory / "quant_model_weights.safetensors")
        return None
    shards, current, size, total = [], {}, 0, 0
    for name, tensor in entries:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes >= part_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
        total += nbytes
    if current:
        shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"quant_model_weights-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _save(shard, directory / file)
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "quant_model_weights.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return weight_map


def _omni_postprocess(directory: Path) -> None:
    """The Qwen2.5-Omni adapter's ``ascendv1_save_postprocess``: ``thinker.`` before every key."""
    from safetensors import safe_open

    for name in ("quant_model_description.json", "quant_model_weights.safetensors.index.json"):
        path = directory / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        target = data.get("weight_map") if data.get("weight_map") is not None else data
        path.write_text(json.dumps({f"{PREFIX}{k}": v for k, v in target.items()}, indent=2))
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {f"{PREFIX}{k}": f.get_tensor(k) for k in f.keys()}
        _save(tensors, path)


def asymmetric_params(min_val, max_val):
    """msModelSlim's ``calculate_int_qparam`` for int8 per tensor, asymmetric: (scale, offset) [1]."""
    import torch

    min_val, max_val = torch.as_tensor(min_val, dtype=torch.float32).reshape(1), \
        torch.as_tensor(max_val, dtype=torch.float32).reshape(1)
    eps = torch.tensor([torch.finfo(torch.float32).eps])
    min_val = torch.min(min_val, torch.zeros_like(min_val))
    max_val = torch.max(max_val, torch.zeros_like(max_val))
    scale = torch.max(max_val / 255 - min_val / 255, eps)
    offset = (-1 * min_val / scale).round() + (-128)
    return scale, offset


def input_ranges(float_dir: Path, modules: list[str], seed: int = 0) -> dict[str, tuple]:
    """{module: (min, max)} of each linear's input over calibration prompts: the float thinker
    (transformers, float32) on two random prompts of 48 ids, its linears' inputs hooked."""
    import torch
    from transformers import Qwen2_5OmniForConditionalGeneration

    thinker = Qwen2_5OmniForConditionalGeneration.from_pretrained(float_dir, dtype="float32").thinker.eval()
    ranges: dict[str, tuple] = {}

    def hook(name):
        def record(_module, args):
            lo, hi = args[0].detach().min(), args[0].detach().max()
            if name in ranges:
                lo, hi = torch.minimum(ranges[name][0], lo), torch.maximum(ranges[name][1], hi)
            ranges[name] = (lo, hi)
        return record

    named = dict(thinker.named_modules())
    # checkpoint names are model.layers.<i>...; transformers 5 nests the text model as model.language_model
    handles = [(named.get(m) or named[m.replace("model.", "model.language_model.", 1)]).register_forward_pre_hook(hook(m))
               for m in modules]
    vocab = thinker.config.text_config.vocab_size
    ids = torch.from_numpy(__import__("numpy").random.default_rng(seed).integers(0, min(vocab, 4000), (2, 48)))
    with torch.no_grad():
        thinker(input_ids=ids)
    for handle in handles:
        handle.remove()
    return ranges


def modelslim_entries(thinker: dict, disable: tuple[str, ...] = DEFAULT_DISABLE, static: tuple[str, ...] = (),
                      ranges: dict | None = None, deq_int64: bool = False) -> tuple[list, dict]:
    """(saved tensors [(name, tensor)], description {name: type}) of the thinker's parameters
    (names inside the thinker: ``model.layers.0...``, ``lm_head.weight``); the ``static`` modules
    as W8A8 (static) with their input ``ranges`` {module: (min, max)}."""
    import torch

    entries, description = [], {}

    def write(name, kind, tensor):
        entries.append((name, tensor))
        description[name] = kind

    modules = sorted({name.rsplit(".", 1)[0] for name in thinker})
    quantized = {m for m in modules if LINEAR.fullmatch(m) and not any(fnmatch.fnmatchcase(m, d) for d in disable)}
    for module in modules:
        params = sorted(n for n in thinker if n.rsplit(".", 1)[0] == module)
        if module in quantized and any(fnmatch.fnmatchcase(module, p) for p in static):
            q, weight_scale = quantize_per_channel(thinker[f"{module}.weight"])
            input_scale, input_offset = asymmetric_params(*ranges[module])
            deq_scale = input_scale * weight_scale
            bias = thinker.get(f"{module}.bias")
            fp_bias = bias.to(torch.float32) if bias is not None else torch.zeros(q.shape[0])
            correction = q.to(torch.float32).sum(dim=1) * input_offset.to(torch.float32)
            quant_bias = torch.round(fp_bias / deq_scale - correction).to(torch.int32)
            if deq_int64:  # deqscale2int64: the float32's bits as int32, widened
                deq_scale = torch.from_numpy(deq_scale.to(torch.float32).numpy().view("int32").astype("int64"))
            write(f"{module}.weight", "W8A8", q)
            write(f"{module}.quant_bias", "W8A8", quant_bias)
            write(f"{module}.input_scale", "W8A8", input_scale.to(torch.float32))
            write(f"{module}.input_offset", "W8A8", input_offset.to(torch.float32))
            write(f"{module}.deq_scale", "W8A8", deq_scale)
            if bias is not None:
                write(f"{module}.bias", "FLOAT", bias.to(torch.float32))
        elif module in quantized:
            q, scale = quantize_per_channel(thinker[f"{module}.weight"])
            weight_scale = scale.unsqueeze(-1)
            write(f"{module}.weight", "W8A8_DYNAMIC", q)
            write(f"{module}.weight_scale", "W8A8_DYNAMIC", weight_scale.to(torch.float32))
            write(f"{module}.weight_offset", "W8A8_DYNAMIC", torch.zeros_like(weight_scale).to(torch.float32))
            if f"{module}.bias" in thinker:
                write(f"{module}.bias", "FLOAT", thinker[f"{module}.bias"].to(torch.float32))
        else:
            for name in params:
                write(name, "FLOAT", thinker[name])
    return entries, description


def write_modelslim_checkpoint(out_dir: str | Path, preset: str = "tiny", seed: int = 0, layers: int | None = None,
                               part_bytes: int = 0, disable: tuple[str, ...] = DEFAULT_DISABLE,
                               static: tuple[str, ...] = (), deq_int64: bool | None = None,
                               progress: bool = False) -> Path:
    """Write the msModelSlim AscendV1 W8A8_DYNAMIC export of the random-weight ``preset``
    checkpoint (``seed``, ``layers`` as ``write_tiny_checkpoint``) into ``out_dir``, plus the float
    talker and token2wav (``model.safetensors``, ``spk_dict.pt``). ``part_bytes`` > 0 shards the
    quantized weights as ``part_file_size`` does (in bytes here); ``disable`` are msModelSlim's
    ``disable_names`` (fnmatch patterns of module names inside the thinker); ``static`` the
    quantized modules written as static W8A8 (fnmatch patterns), their ``deq_scale`` int64 when
    ``deq_int64`` (None: as msModelSlim decides, int64 unless the config's dtype is bfloat16). FileExistsError if
    ``out_dir`` is a non-empty directory. Returns ``out_dir``."""
    from safetensors import safe_open

    from omni_export.testkit.tiny_model import write_tiny_checkpoint

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not empty; choose a new directory or remove it first")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.modelslim-", dir=out_dir.parent))
    try:
        source = write_tiny_checkpoint(tmp / "float", preset=preset, seed=seed, layers=layers, progress=progress)
        target = tmp / "modelslim"
        target.mkdir()
        thinker, others = {}, {}
        with safe_open(str(source / "model.safetensors"), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.startswith(PREFIX):
                    thinker[name[len(PREFIX):]] = f.get_tensor(name)
                else:
                    others[name] = f.get_tensor(name)
        static_modules = sorted({n.rsplit(".", 1)[0] for n in thinker
                                 if LINEAR.fullmatch(n.rsplit(".", 1)[0])
                                 and any(fnmatch.fnmatchcase(n.rsplit(".", 1)[0], p) for p in static)})
        ranges = input_ranges(source, [f"{m}" for m in static_modules], seed) if static_modules else None
        if deq_int64 is None:
            dtype = json.loads((source / "config.json").read_text()).get("torch_dtype", "bfloat16")
            deq_int64 = str(dtype).removeprefix("torch.") != "bfloat16"
        entries, description = modelslim_entries(thinker, disable, tuple(static), ranges, deq_int64)
        _write_weights(entries, target, part_bytes)
        kinds = set(description.values())
        # update_quant_type: the highest of QUANT_TYPE_PRIORITY written (W8A8 above W8A8_DYNAMIC)
        model_type = "W8A8" if "W8A8" in kinds else "W8A8_DYNAMIC" if "W8A8_DYNAMIC" in kinds else "FLOAT"
        description.update({"version": "1.0.0", "model_quant_type": model_type, "metadata": {}, "group_size": 0,
                            "optional": {}})
        (target / "quant_model_description.json").write_text(json.dumps(description, indent=2))
        for file in source.iterdir():  # copy_files: .json / .py / .txt / .jinja, not *index.json
            if file.suffix in (".json", ".py", ".txt", ".jinja") and not file.name.endswith("index.json"):
                shutil.copy2(file, target / file.name)
        config = json.loads((target / "config.json").read_text())
        config.pop("quantization_config", None)
        (target / "config.json").write_text(json.dumps(config, indent=2))
        _omni_postprocess(target)
        # the float modules msModelSlim does not write, from the float checkpoint
        _save(others, target / "model.safetensors")
        shutil.copy2(source / "spk_dict.pt", target / "spk_dict.pt")
        if out_dir.exists():
            out_dir.rmdir()
        os.rename(target, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
