"""Every constant of ``omni-export plan``'s memory model, with where it comes from.

Bytes of stored weights follow the graph builders exactly (``PRECISIONS``, checked against
built bundles' initializers in ``tests/test_plan.py``). The runtime terms (base, arena, load
overhead, activation factors) are measured on this machine with ``benchmarks/plan_check.py``
(onnxruntime CPU, 7b-shape awq bundle): rerun it after a runtime change and update the numbers
here, each with the date and figure it came from. The CUDA figures cannot be measured here
(no GPU): they are stated assumptions, marked as such.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
MB = 1e6


@dataclass(frozen=True)
class Precision:
    """How a linear weight ``[out, in]`` is stored at one ``weights`` precision."""

    name: str
    bits: int
    #: "float": ``bits / 8`` bytes per value; "group": block-wise along ``in`` (group_size) with a
    #: scale and a ``bits``-wide zero point per block and output; "channel": symmetric, one scale
    #: per output channel, no zero point
    scheme: str

    @property
    def bytes_per_param(self) -> float:
        return self.bits / 8

    def matrix_bytes(self, out: int, inp: int, group_size: int = 128, emit: str = "qdq", scale_bytes: int = 4) -> int:
        if self.scheme == "float":
            return out * inp * self.bits // 8
        if self.scheme == "channel":
            return out * inp * self.bits // 8 + out * scale_bytes
        blocks = -(-inp // group_size)
        if emit == "matmulnbits":  # MatMulNBits: K padded to whole blocks, zero points padded per row
            return out * blocks * group_size * self.bits // 8 + out * blocks * scale_bytes \
                + out * -(-blocks * self.bits // 8)
        # DequantizeLinear + MatMul (omni_export.quant.packing.to_blocked_dq): levels [in, out],
        # scales and zero points [blocks, out]; 4-bit values are packed two per byte
        return -(-inp * out * self.bits // 8) + blocks * out * scale_bytes + -(-blocks * out * self.bits // 8)


#: ``weights`` precisions of the recipe schema (``omni_export.build.recipes.WEIGHTS``) and how their
#: linears are stored (omni_export/export/onnx_graph.py): float32 / float16 at 4 / 2 bytes, int8
#: weight-only (1 byte + one scale per output channel, symmetric, no zero point), int4 block-wise.
#: ``tests/test_plan.py`` builds every precision the module classes offer and compares the bytes,
#: and fails when a module class offers a precision missing here.
PRECISIONS = {
    "float32": Precision("float32", 32, "float"),
    "float16": Precision("float16", 16, "float"),
    "int8": Precision("int8", 8, "channel"),
    "int4": Precision("int4", 4, "group"),
}
#: the thinker's ``lm_head`` / ``embeddings`` values: int8 and int4 are block-wise with zero
#: points there (RTN of ``modules/thinker.py``: ``_table``), float32 is the module's float type
TABLE_PRECISIONS = {
    "int8": Precision("int8", 8, "group"),
    "int4": Precision("int4", 4, "group"),
}

#: The float type of each target: ``--target cuda`` stores the float parts (and the int4 scales)
#: in float16 and keeps activations and the KV cache in float16 (issue 13, item 2).
TARGET_FLOAT = {"cpu": "float32", "cuda": "float16"}
TARGETS = tuple(TARGET_FLOAT)

# ---------------------------------------------------------------------------------------------
# request defaults

#: tokens of the chat template, the default system prompt of Qwen2.5-Omni (the one speech needs:
#: "You are Qwen, a virtual human developed by the Qwen Team, ...") and a one-line question
#: around the media placeholders: an estimate for Qwen's tokenizer (about 36 + 12 + 8). The test
#: models' small tokenizer counts 127 for the same text: plan_check.py passes its own count.
PROMPT_TEXT_TOKENS = 64
#: the answer: the runtime's default max_new_tokens (omni_export/checkpoint/info.py: the
#: checkpoint's generation_config, else 512). The KV cache is allocated for prompt + this.
DEFAULT_MAX_NEW_TOKENS = 512
#: talker codes: its max_new_tokens default (4096, transformers' generate), 50 codes per second of speech
DEFAULT_TALKER_CODES = 4096
CODES_PER_SECOND = 50
#: source resolution of --video-seconds (width, height): 720p. qwen-omni-utils then resizes frames
#: to at most 768 tokens of 28x28 px (560x1008 for 16:9): 720 video tokens per 2 frames
DEFAULT_VIDEO_SIZE = (1280, 720)
#: the runtime's prefill chunk (omni_runtime.stages.kv_decoder.DEFAULT_PREFILL_CHUNK)
PREFILL_CHUNK = 256

# ---------------------------------------------------------------------------------------------
# runtime terms (measured: benchmarks/plan_check.py)

#: RSS of the runtime before any session: Python, numpy, onnxruntime, tokenizers, the manifest and
#: the tokenizer loaded (``OmniRunner(bundle)``: 0.113 GB measured, 7b-shape awq bundle,
#: 2025-12-04); the media decoding before the encoders adds about 0.03 GB (0.146 GB measured)
BASE_BYTES = {"cpu": 146 * MB, "cuda": 146 * MB}
#: device memory a CUDA process holds before any tensor: the CUDA context with cuBLAS/cuDNN
#: handles (assumption, not measured here: 300-600 MB on recent GPUs with lazy module loading)
CUDA_CONTEXT_BYTES = 500 * MB
#: resident bytes of a loaded session per byte of its weights, CPU (measured per graph loaded alone
#: after a warm-up, plan_check.py --calibrate, and touched by a run): float graphs 1.0; int4
#: decoders 1.14 (thinker_decoder 0.90 GB resident for 0.79 GB: MatMulNBits' packed copies). The embedding
#: tables are memory-mapped and only their gathered rows become resident (0.02 of the file after
#: load): ``memory`` counts the rows a request touches. CUDA: every initializer is copied to the device.
RESIDENT_FACTOR = {"cpu": {"float": 1.0, "int4": 1.14}, "cuda": {"float": 1.0, "int4": 1.0}}
#: graphs that only gather rows of a table (resident on CPU: the rows a request reads)
GATHER_GRAPHS = ("thinker_embedding", "talker_embedding")
#: extra resident bytes for a moment while a session is created, per byte of its weights (CPU,
#: peak during the load minus resident after it, graphs loaded alone after a warm-up: thinker
#: decoder (int4) 0.35, vision 0.21, audio 0.09, talker 0.08, DiT 0.05, BigVGAN 0.09). CUDA: 0
#: (assumption: initializers are copied to the device one by one)
LOAD_TRANSIENT = {"cpu": {"int4": 0.35, "float": 0.15}, "cuda": {"int4": 0.0, "float": 0.0}}
#: onnxruntime's arena per byte of a stage's analytic live tensors (``memory._working_sets``):
#: what the session holds once it ran (kept until it is released). CPU, measured on 7b-shape:
#: vision encoder 1.1 (1564, 4784 and 14352 patches: 0.34 / 0.92 / 1.40 GB over the loaded
#: session, the fit is within 10%); thinker 1.8 plus 0.22 GB (a 772 and a 4096-token prefill: 0.40
#: / 0.60 GB; the fixed part grows with neither the prompt nor the layer count (a 2-layer talker
#: chunk holds 128 MB, the 4-layer thinker's 150 MB)); others 2.0, onnxruntime's BFC arena grows
#: by powers of two (a 256-token decoder chunk: 150 MB held for 85 MB of live tensors). CUDA: the
#: lazy and budget policies grow the device arena by what is requested (kSameAsRequested): 1.1
#: (assumption, no GPU here).
ARENA_FACTOR = {"cpu": {"vision_encoder": 1.1, "thinker": 1.8, "default": 2.0},
                "cuda": {"default": 1.1}}
ARENA_FIXED = {"cpu": {"thinker": 220 * MB}, "cuda": {}}
#: live score tensors of the vision encoder's full-attention Loop iteration (MatMul, scale, mask,
#: softmax: heads x 512 queries x frame patches each)
VISION_SCORE_BUFFERS = 4


def human(n: float) -> str:
    """Bytes as GB with two decimals (decimal GB, as the official tables)."""
    return f"{n / GB:.2f} GB"
