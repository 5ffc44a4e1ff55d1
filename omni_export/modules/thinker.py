"""The thinker module: token embedding graph + decoder graph, compiled one layer at a time.

Recipe section ``modules.thinker`` (omni_export/build/recipes.py) decides the weights:

- ``weights: float32``: the checkpoint's weights in float32;
- ``weights: int4, method: rtn``: block-wise round-to-nearest int4 per linear;
- ``weights: int4, method: awq``: activation-aware scales searched on calibration data, folded
  into the preceding norm / linear, then clipping search and int4 (``omni_export.quant.awq``);
- an AutoAWQ GEMM checkpoint (``quantization_config`` in config.json) with an int4 recipe is
  imported exactly: its int4 levels, zero points and scales go into the bundle unchanged.

Each decoder layer is read from the safetensors files, quantized and written to the graph's
external data before the next one is read, so memory holds about one layer, plus the
embedding table and lm_head at their turn.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from omni_export.checkpoint.reader import CheckpointError
from omni_export.export import thinker_decoder, thinker_embedding
from omni_export.export.onnx_graph import Linear
from omni_export.export.thinker_decoder import LINEARS, DecoderLayer, TextDims
from omni_export.build.recipes import RecipeError
from omni_export.quant.types import QuantWeight
from omni_export.modules.base import BuildContext, Module

TABLE_BITS = {"int8": 8, "int4": 4}
ROWS_PER_SLICE = 8192


class ThinkerModule(Module):
    name = "thinker"
    graphs = (thinker_embedding.GRAPH_NAME, thinker_decoder.GRAPH_NAME)

    def __init__(self, ckpt, settings, **kwargs):
        super().__init__(ckpt, settings, **kwargs)
        self._autoawq: dict | None = None

    # -- checks and estimates ---------------------------------------------------------------
    def check(self) -> None:
        try:  # TEMP until quant.autoawq_checkpoint lands
            from omni_export.quant.autoawq_checkpoint import detect_autoawq
        except ImportError:
            detect_autoawq = lambda raw: None  # noqa: E731

        s = self.settings
        if s.weights == "float16":
            raise RecipeError("modules.thinker.weights float16 is not built yet (it arrives with the GPU recipes)",
                              path=s.name, fix="use weights: float32 or int4")
        try:
            self._autoawq = detect_autoawq(self.ckpt.raw_config)
        except ValueError as exc:
            raise CheckpointError(str(exc), path=self.ckpt.root / "config.json",
                                  fix="use an AutoAWQ GEMM 4-bit checkpoint (quant_method awq, version gemm, bits 4) "
                                      "or the original float checkpoint") from None

    @property
    def imports_autoawq(self) -> bool:
        return self._autoawq is not None and self.settings.quantized

    def dims(self) -> TextDims:
        return TextDims.from_config(self.ckpt.text_config())

    def memory_estimate(self) -> int:
        """One layer in float32 several times over (checkpoint read, torch module, quantized copy,
        calibration activations), or the float embedding table / lm_head, whichever is larger."""
        d = self.dims()
        cfg = self.ckpt.text_config()
        layer = d.layer_float_bytes(cfg.intermediate_size)
        table = 4 * d.vocab_size * d.hidden_size
        calib = 0
        if self.settings.method == "awq" and not self.imports_autoawq:
            c = self.calibration
            tokens = c.samples * c.sequence_length if c else 512
            calib = 4 * tokens * (4 * d.hidden_size + 2 * cfg.intermediate_size) * 2
        return int(max(4 * layer + calib, 2 * table + layer) + 1.5e9)

    def config(self) -> dict:
        d = self.dims()
        thinker = self.ckpt.config.thinker_config
        return {
            **d.manifest_config(),
            # TMRoPE constants (omni_runtime.prompt.rope.RopeConfig)
            "position_id_per_seconds": int(getattr(thinker, "position_id_per_seconds", 25)),
            "seconds_per_chunk": int(getattr(thinker, "seconds_per_chunk", 2)),
            "spatial_merge_size": int(thinker.vision_config.spatial_merge_size),
        }

    # -- weights ----------------------------------------------------------------------------
    def _quantize(self, weight: np.ndarray, bits: int, clip=None) -> QuantWeight:
        from omni_export.quant import rtn

        # Rows are independent: quantize in slices so the temporaries stay small next to the
        # embedding table / lm_head (152064 x 3584 floats for the real 7B).
        parts = [rtn.quantize(weight[r:r + ROWS_PER_SLICE], self.settings.group_size, bits=bits,
                              symmetric=self.settings.symmetric,
                              clip=None if clip is None else clip[r:r + ROWS_PER_SLICE])
                 for r in range(0, weight.shape[0], ROWS_PER_SLICE)]
        if len(parts) == 1:
            return parts[0]
        return QuantWeight(np.concatenate([p.q for p in parts]), np.concatenate([p.scales for p in parts]),
                           np.concatenate([p.zeros for p in parts]), parts[0].group_size, bits)

    def _quantize_layer(self, i: int, layer: DecoderLayer, clips: dict | None = None) -> DecoderLayer:
        for field, path in LINEARS.items():
            if self.settings.keeps_float(f"layers.{i}.{path}"):
                continue
            linear = getattr(layer, field)
            clip = None if clips is None else clips.get(path)
            setattr(layer, field, Linear(self._quantize(linear.weight, 4, clip), linear.bias))
        return layer

    def layers(self, ctx: BuildContext, weights) -> Iterator[DecoderLayer]:
        s = self.settings
        if self.imports_autoawq:
            for i in range(weights.num_layers):
                yield self._autoawq_layer(weights, i)
        elif self._autoawq is not None:  # a float recipe on an AutoAWQ checkpoint: dequantized weights
            for i in range(weights.num_layers):
                layer = self._autoawq_layer(weights, i)
                for field in LINEARS:
                    linear = getattr(layer, field)
                    if isinstance(linear.weight, QuantWeight):
                        setattr(layer, field, Linear(linear.weight.dequantize(), linear.bias))
                yield layer
        elif s.method == "none":
            yield from weights.float_layers()
        elif s.method == "rtn":
            for i in range(weights.num_layers):
                yield self._quantize_layer(i, weights.float_layer(i))
        else:  # awq
            from omni_export.quant.awq_pipeline import awq_layers

            yield from awq_layers(self, ctx, weights)

    def _autoawq_layer(self, weights, i: int) -> DecoderLayer:
        """Layer ``i`` of an AutoAWQ checkpoint: its int4 linears exactly as stored, norms and biases in float."""
        from omni_export.quant.autoawq_checkpoint import read_autoawq_linear

        p = f"layers.{i}."
        t = weights.read([f"{p}input_layernorm.weight", f"{p}post_attention_layernorm.weight"])
        linears = {}
        for field, path in LINEARS.items():
            target = f"{p}{path}"
            bias = weights.read([f"{target}.bias"])[f"{target}.bias"] if weights.has(f"{target}.bias") else None
            if weights.has(f"{target}.qweight"):
                qweight = weights.names[f"{target}.qweight"]
                linears[field] = Linear(read_autoawq_linear(self.ckpt, qweight[: -len(".qweight")]), bias)
            else:  # modules_to_not_convert: kept in float by AutoAWQ
                linears[field] = Linear(weights.read([f"{target}.weight"])[f"{target}.weight"], bias)
        return DecoderLayer(t[f"{p}input_layernorm.weight"], t[f"{p}post_attention_layernorm.weight"], **linears)

    def _table(self, kind: str, array_fn) -> np.ndarray | QuantWeight:
        dtype = getattr(self.settings, kind)
        array = array_fn()
        if dtype in (None, "float32"):
            return array
        return self._quantize(array, TABLE_BITS[dtype])

    # -- build ------------------------------------------------------------------------------
    def build(self, ctx: BuildContext) -> dict:
        from omni_export.export.thinker_weights import ThinkerWeights

        s = self.settings
        weights = ThinkerWeights(self.ckpt)
        dims = self.dims()
        total = dims.num_hidden_layers + 2
        ctx.progress("thinker embedding", 0, total)
        table = self._table("embeddings", weights.embedding)
        embedding = thinker_embedding.build_graph(table, ctx.out_dir)
        embed_bytes = _nbytes(table)
        del table
        ctx.progress("thinker decoder layer 1", 1, total)
        layer_bytes, layer_seconds = [], []
        marks = {"offset": 0, "time": time.perf_counter()}

        def on_layer(i: int, offset: int) -> None:
            now = time.perf_counter()
            layer_bytes.append(offset - marks["offset"])
            layer_seconds.append(now - marks["time"])
            marks.update(offset=offset, time=now)
            ctx.progress(f"thinker decoder layer {i + 2}" if i + 1 < dims.num_hidden_layers else "thinker lm_head",
                         i + 2, total)

        def lm_head() -> Linear:
            return Linear(self._table("lm_head", weights.lm_head))

        method = "autoawq" if self.imports_autoawq else s.method
        decoder = thinker_decoder.build_graph(dims, self.layers(ctx, weights), weights.final_norm(), lm_head,
                                              ctx.out_dir, emit=s.emit, accuracy_level=s.accuracy_level,
                                              on_layer=on_layer)
        ctx.progress("thinker done", total, total)
        ctx.stats["thinker"] = {"layer_bytes": layer_bytes, "layer_seconds": layer_seconds,
                                "embedding_bytes": embed_bytes}
        quant = None
        if s.quantized:
            quant = {"weights": s.weights, "method": method, "group_size": self._group_size(),
                     "symmetric": s.symmetric, "accuracy_level": s.accuracy_level, "emit": s.emit,
                     "lm_head": s.lm_head, "keep_float": list(s.keep_float)}
        embed_quant = None if s.embeddings in (None, "float32") else {
            "weights": s.embeddings, "method": "rtn", "group_size": s.group_size, "symmetric": s.symmetric}
        return {thinker_embedding.GRAPH_NAME: (embedding, embed_quant),
                thinker_decoder.GRAPH_NAME: (decoder, quant)}

    def _group_size(self) -> int:
        if self.imports_autoawq:
            return int(self._autoawq["group_size"])
        return self.settings.group_size

    def size_info(self, stats: dict) -> dict:
        """Per-layer weight bytes etc. for the manifest (used to project to the real layer count)."""
        return stats


def _nbytes(table) -> int:
    if isinstance(table, QuantWeight):
        return int(table.q.size * table.bits // 8 + table.scales.nbytes + table.zeros.nbytes)
    return int(table.nbytes)
