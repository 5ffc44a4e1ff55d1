"""The vision module: the thinker's vision encoder (images and videos) as one graph.

Recipe section ``modules.vision``: ``weights: float32`` (the only choice for now, enforced by the
recipe schema, ``omni_export.build.recipes.MODULES``). The blocks are read from the checkpoint one at
a time and written to the graph's external data.

The manifest's ``config.vision`` block holds every constant the host needs to prepare inputs
(``omni_runtime.media.vision_prep``): the encoder's shapes, the image processor's values from
``preprocessor_config.json`` (pixel limits, mean/std, rescale factor, resampling) and the video
sampling defaults of qwen-omni-utils (fps, frame factor, frame and pixel limits).
"""

from __future__ import annotations

from omni_export.checkpoint.reader import CheckpointError
from omni_export.export import vision_encoder
from omni_export.export.onnx_graph import Linear
from omni_export.export.vision_encoder import ACTIVATIONS, VisionBlock, VisionDims, VisionWeights
from omni_export.modules.base import BuildContext, Module

PREFIXES = ("thinker.visual.", "thinker.model.visual.")  # 4.5x checkpoints, transformers 5 names

#: Qwen2VLImageProcessor defaults, used where preprocessor_config.json lacks a value.
IMAGE_DEFAULTS = {
    "min_pixels": 56 * 56,
    "max_pixels": 28 * 28 * 1280,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "rescale_factor": 1 / 255,
    "resample": 3,  # PIL bicubic
}

#: qwen-omni-utils (v2_5/vision_process.py) video sampling constants, in tokens of 28x28 pixels.
VIDEO_DEFAULTS = {
    "fps": 2.0,
    "frame_factor": 2,
    "min_frames": 4,
    "max_frames": 768,
    "min_tokens": 128,          # VIDEO_MIN_TOKEN_NUM: per-frame minimum
    "max_tokens": 768,          # VIDEO_MAX_TOKEN_NUM: per-frame maximum
    "model_seq_len": 128000,    # MODEL_SEQ_LEN: total_pixels = 0.9 * this many tokens
}


class VisionModule(Module):
    name = "vision"
    graphs = (vision_encoder.GRAPH_NAME,)

    def dims(self) -> VisionDims:
        return VisionDims.from_config(self.ckpt.config.thinker_config.vision_config)

    def _names(self) -> dict[str, str]:
        """Checkpoint tensor name -> name inside the vision encoder (``blocks.0.attn.q.weight``...)."""
        names = {}
        for name in self.ckpt.weight_map:
            for prefix in PREFIXES:
                if name.startswith(prefix):
                    names[name] = name[len(prefix):]
        return names

    def check(self) -> None:
        dims = self.dims()
        if dims.hidden_act not in ACTIVATIONS:
            raise CheckpointError(f"vision_config.hidden_act {dims.hidden_act!r} is not supported",
                                  path=self.ckpt.root / "config.json", fix=f"use one of: {', '.join(ACTIVATIONS)}")
        targets = set(self._names().values())
        needed = ["patch_embed.proj.weight", "merger.ln_q.weight", "merger.mlp.0.weight", "merger.mlp.2.weight",
                  *(f"blocks.{i}.{t}.weight" for i in range(dims.depth)
                    for t in ("norm1", "norm2", "attn.q", "attn.k", "attn.v", "attn.proj",
                              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))]
        self._check_preprocessor(dims)
        missing = [t for t in needed if t not in targets]
        if missing:
            raise CheckpointError(f"vision encoder weights are missing: thinker.visual.{', '.join(missing[:3])}",
                                  path=self.ckpt.root, fix="the checkpoint is incomplete or does not match config.json")

    def preprocessor(self) -> dict:
        """The image processor values of ``preprocessor_config.json`` (defaults where absent)."""
        raw = self.ckpt.json_file("preprocessor_config.json") or {}
        pre = {**IMAGE_DEFAULTS, **{k: v for k, v in raw.items() if k in IMAGE_DEFAULTS}}
        size = raw.get("size") if isinstance(raw.get("size"), dict) else {}
        if "min_pixels" not in raw and "shortest_edge" in size:  # newer processors keep the limits in size
            pre["min_pixels"] = size["shortest_edge"]
        if "max_pixels" not in raw and "longest_edge" in size:
            pre["max_pixels"] = size["longest_edge"]
        return pre

    def _check_preprocessor(self, dims: VisionDims) -> None:
        raw = self.ckpt.json_file("preprocessor_config.json") or {}
        path = self.ckpt.root / "preprocessor_config.json"
        if self.preprocessor()["resample"] != 3:
            raise CheckpointError(f"image resampling {raw.get('resample')!r} is not supported (only 3, bicubic)",
                                  path=path, fix="set \"resample\": 3 as in Qwen2.5-Omni's preprocessor_config.json")
        for key, value in (("patch_size", dims.patch_size), ("temporal_patch_size", dims.temporal_patch_size),
                           ("merge_size", dims.spatial_merge_size)):
            if key in raw and raw[key] != value:
                raise CheckpointError(f"{key} is {raw[key]!r} but the vision encoder's is {value}", path=path,
                                      fix="restore preprocessor_config.json from the original checkpoint")
        for key in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if raw.get(key) is False:
                raise CheckpointError(f"{key} false is not supported (the runtime always applies it)", path=path,
                                      fix=f"remove {key} or set it to true")

    def memory_estimate(self) -> int:
        """The vision weights in float32 a few times over (reading, graph), plus a margin."""
        return int(4 * 3 * self.ckpt.numel(list(self._names())) + 1.0e9)

    def config(self) -> dict:
        d = self.dims()
        pre = self.preprocessor()
        return {
            "depth": d.depth,
            "hidden_size": d.hidden_size,
            "num_heads": d.num_heads,
            "out_hidden_size": d.out_hidden_size,
            "in_channels": d.in_channels,
            "patch_size": d.patch_size,
            "temporal_patch_size": d.temporal_patch_size,
            "spatial_merge_size": d.spatial_merge_size,
            "window_size": d.window_size,
            "fullatt_block_indexes": list(d.fullatt_block_indexes),
            "image": {
                "min_pixels": int(pre["min_pixels"]),
                "max_pixels": int(pre["max_pixels"]),
                "image_mean": [float(v) for v in pre["image_mean"]],
                "image_std": [float(v) for v in pre["image_std"]],
                "rescale_factor": float(pre["rescale_factor"]),
                "resample": int(pre["resample"]),
            },
            "video": dict(VIDEO_DEFAULTS),
        }

    def _read(self, targets: list[str]) -> dict:
        import torch

        by_target = {t: n for n, t in self._names().items()}
        tensors = self.ckpt.read({by_target[t]: t for t in targets}, torch.float32)
        return {t: tensors[t].numpy() for t in targets}

    def _block(self, i: int) -> VisionBlock:
        p = f"blocks.{i}."
        linears = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "proj": "attn.proj", "gate_proj": "mlp.gate_proj",
                   "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj"}
        names = [f"{p}norm1.weight", f"{p}norm2.weight"]
        names += [f"{p}{path}.{kind}" for path in linears.values() for kind in ("weight", "bias")]
        t = self._read(names)
        return VisionBlock(t[f"{p}norm1.weight"], t[f"{p}norm2.weight"],
                           **{field: Linear(t[f"{p}{path}.weight"], t[f"{p}{path}.bias"])
                              for field, path in linears.items()})

    def build(self, ctx: BuildContext) -> dict:
        dims = self.dims()
        t = self._read(["patch_embed.proj.weight", "merger.ln_q.weight", "merger.mlp.0.weight", "merger.mlp.0.bias",
                        "merger.mlp.2.weight", "merger.mlp.2.bias"])
        weights = VisionWeights(t["patch_embed.proj.weight"], t["merger.ln_q.weight"],
                                Linear(t["merger.mlp.0.weight"], t["merger.mlp.0.bias"]),
                                Linear(t["merger.mlp.2.weight"], t["merger.mlp.2.bias"]))
        ctx.progress("vision encoder", 0, dims.depth)
        graph = vision_encoder.build_graph(
            dims, weights, (self._block(i) for i in range(dims.depth)), ctx.out_dir,
            on_block=lambda i: ctx.progress(f"vision block {i + 1}", i + 1, dims.depth))
        return {vision_encoder.GRAPH_NAME: (graph, None)}
