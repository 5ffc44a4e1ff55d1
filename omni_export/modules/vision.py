"""The vision module: the thinker's vision encoder (images and videos) as one graph.

Recipe section ``modules.vision``: ``weights: float32 | float16 | int8`` (int8: every linear,
the patch embedding included, symmetric per output channel, activations ``dtype: float32 |
float16``), ``keep_fp32`` for a float16 graph (``norm``, ``softmax``, ``residual``). The blocks are
read from the checkpoint one at a time and written to the graph's external data. Checkpoint
names: ``STEM`` and ``blocks.<i>.`` + ``BLOCK_NORMS`` / ``BLOCK_LINEARS`` under ``PREFIXES``.

The manifest's ``config.vision`` block holds every constant the host needs to prepare inputs
(``omni_runtime.media.vision_prep``): the encoder's shapes, the image processor's values from
``preprocessor_config.json`` (pixel limits, mean/std, rescale factor, resampling) and the video
sampling defaults of qwen-omni-utils (fps, frame factor, frame and pixel limits).
"""

from __future__ import annotations

from omni_runtime.bundle.names import MODULE_GRAPHS

from omni_export.checkpoint.reader import CheckpointError
from omni_export.modules.base import (BuildContext, Module, ModuleBuild, channel_quantization, linear,
                                      quantize_linear, weight_and_bias)

PREFIXES = ("thinker.visual.", "thinker.model.visual.")  # 4.5x checkpoints, transformers 5 names
#: VisionWeights field -> checkpoint path: the patch embedding and merger norm (weight), the merger's linears
STEM = {"patch_embed": "patch_embed.proj", "merger_norm": "merger.ln_q"}
STEM_LINEARS = {"merger_fc1": "merger.mlp.0", "merger_fc2": "merger.mlp.2"}
#: VisionBlock field -> path inside ``blocks.<i>.``: the RMSNorms (weight) and the linears (weight, bias)
BLOCK_NORMS = {"norm1": "norm1", "norm2": "norm2"}
BLOCK_LINEARS = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "proj": "attn.proj", "gate_proj": "mlp.gate_proj",
                 "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj"}
STEM_TENSORS = [f"{path}.weight" for path in STEM.values()] + weight_and_bias(STEM_LINEARS.values())
BLOCK_TENSORS = [f"{path}.weight" for path in BLOCK_NORMS.values()] + weight_and_bias(BLOCK_LINEARS.values())

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
    description = "the thinker's vision encoder (image and video patches -> one embedding per 28x28 px)"
    graphs = MODULE_GRAPHS[name]
    prefixes = PREFIXES
    layer_prefix = "blocks"
    linears = tuple(BLOCK_LINEARS.values())
    recipe_keys = ("weights", "dtype", "keep_fp32")
    precisions = ("float32", "float16", "int8")
    fp32_parts = ("norm", "softmax", "residual")

    def dims(self):
        from omni_export.export.vision_encoder import VisionDims

        return VisionDims.from_config(self.ckpt.config.thinker_config.vision_config)

    def required_tensors(self) -> list[str]:
        return STEM_TENSORS + [f"blocks.{i}.{n}" for i in range(self.dims().depth) for n in BLOCK_TENSORS]

    def check(self) -> None:
        from omni_export.export.vision_encoder import ACTIVATIONS

        dims = self.dims()
        if dims.hidden_act not in ACTIVATIONS:
            raise CheckpointError(f"vision_config.hidden_act {dims.hidden_act!r} is not supported",
                                  path=self.ckpt.root / "config.json", fix=f"use one of: {', '.join(ACTIVATIONS)}")
        self._check_preprocessor(dims)
        super().check()

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

    def _check_preprocessor(self, dims) -> None:
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
        return int(4 * 3 * self.ckpt.numel(self.ckpt.tensor_names(self.prefixes).values()) + 1.0e9)

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

    def _block(self, i: int):
        from omni_export.export.vision_encoder import VisionBlock

        p = f"blocks.{i}."
        t = self.arrays([p + n for n in BLOCK_TENSORS])
        return VisionBlock(**{field: t[f"{p}{path}.weight"] for field, path in BLOCK_NORMS.items()},
                           **{field: quantize_linear(linear(t, p + path), self.settings)
                              for field, path in BLOCK_LINEARS.items()})

    def write(self, ctx: BuildContext) -> ModuleBuild:
        from omni_export.export import vision_encoder
        from omni_export.export.onnx_graph import Linear

        dims = self.dims()
        t = self.arrays(STEM_TENSORS)
        s = self.settings
        patch = Linear(t[f"{STEM['patch_embed']}.weight"].reshape(dims.hidden_size, -1))
        weights = vision_encoder.VisionWeights(
            patch_embed=quantize_linear(patch, s), merger_norm=t[f"{STEM['merger_norm']}.weight"],
            **{field: quantize_linear(linear(t, path), s) for field, path in STEM_LINEARS.items()})
        ctx.progress("vision encoder", 0, dims.depth)
        graph = vision_encoder.build_graph(
            dims, weights, (self._block(i) for i in range(dims.depth)), ctx.out_dir,
            on_block=lambda i: ctx.progress(f"vision block {i + 1}", i + 1, dims.depth), dtype=s.dtype,
            keep_fp32=s.keep_fp32)
        return ModuleBuild({vision_encoder.GRAPH_NAME: (graph, channel_quantization(s))})

    def verify(self, ctx):
        from omni_export.verify.checks import vision
        return vision.verify(self, ctx)
