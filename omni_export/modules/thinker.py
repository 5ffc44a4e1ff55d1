"""The thinker module: token embedding graph + decoder graph, compiled one layer at a time.

Recipe section ``modules.thinker`` (every key of ``omni_export.build.recipes.KEYS``) decides the weights:

- ``weights: float32`` / ``float16``: the checkpoint's weights in that type (a float16 decoder
  computes in float16 with a float16 KV cache, ``config.thinker.kv_dtype``; ``keep_fp32: [norm]``
  keeps its RMSNorms and residual stream in float32);
- ``dtype: float16`` with int4 weights: float16 activations, scales and KV cache (the cuda target);
- ``weights: int4, method: rtn``: block-wise round-to-nearest int4 per linear;
- ``weights: int4, method: awq``: activation-aware scales searched on calibration data, folded
  into the preceding norm / linear, then clipping search and int4 (``omni_export.quant.awq``);
- an AutoAWQ GEMM checkpoint (``quantization_config`` in config.json) with an int4 recipe is
  imported exactly: its int4 levels, zero points and scales go into the bundle unchanged;
- ``weights: int8, activations: int8_per_token`` (W8A8, recipes/w8a8.yaml): int8 weights per
  output channel and int8 activations quantized per token at run time
  (``omni_export.quant.w8a8``, graph ``omni_export.export.w8a8_linear``); ``smooth_alpha``
  folds SmoothQuant scales from calibration activations into the RMSNorms first;
- msModelSlim's AscendV1 output (``quant_model_description.json``) with a W8A8 recipe is
  imported exactly: its W8A8_DYNAMIC and static W8A8 int8 weights and scales go into the bundle unchanged, its
  FLOAT linears stay float, whatever the recipe's ``keep_float`` / ``smooth_alpha`` say
  (``omni_export.checkpoint.modelslim``). With any other recipe its int8 linears are dequantized.

Each decoder layer is read from the safetensors files, quantized and written to the graph's
external data before the next one is read, so memory holds about one layer, plus the
embedding table and lm_head at their turn. The build info records each layer's time and
bytes, the embedding and lm_head bytes, and the AWQ statistics of each layer.

Checkpoint names: the text model's tensors under ``prefixes`` (``layers.<i>.<linear>.weight``,
``embed_tokens.weight``, ``norm.weight``), the lm_head under ``thinker.`` (tied to the embedding
when the config says so); an AutoAWQ linear is ``<linear>.qweight/qzeros/scales``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from omni_runtime.bundle.names import MODULE_GRAPHS

from omni_export.build.recipes import KEYS
from omni_export.export.decoder_weights import LINEARS, DecoderWeights
from omni_export.modules.base import BuildContext, Module, ModuleBuild
from omni_export.quant.types import QuantWeight

if TYPE_CHECKING:  # pragma: no cover
    from omni_export.export.decoder_graph import DecoderLayer, TextDims

#: bits of a quantized embedding table / lm_head, by recipe value
TABLE_BITS = {"int8": 8, "int4": 4}
EMBEDDING = "embed_tokens.weight"
FINAL_NORM = "norm.weight"
#: the lm_head, local name under HEAD_PREFIXES
LM_HEAD = "lm_head.weight"
HEAD_PREFIXES = ("thinker.",)


def _scale_range(s: np.ndarray) -> dict:
    """A smoothing scale vector's range, as the build info records it."""
    return {"scale_min": round(float(s.min()), 5), "scale_max": round(float(s.max()), 5)}


@dataclasses.dataclass
class CalibrationLog:
    """What a calibrated thinker build reports while its layers are made: per-layer statistics
    (AWQ's search, or smoothing's scales), an index calibration's sample counts
    (``calibration_media.MediaCalibration.counts``) and where the counts line is said."""

    layers: list[dict] = dataclasses.field(default_factory=list)
    counts: dict | None = None
    say: Callable[[str], None] = lambda message: None


class ThinkerModule(Module):
    name = "thinker"
    description = "the thinker's text decoder, with its token embeddings and lm_head"
    graphs = MODULE_GRAPHS[name]
    recipe_keys = tuple(KEYS)
    precisions = ("float32", "float16", "int4")
    #: int8 weights are built with int8 activations only (W8A8); weight-only int8 is not offered
    planned = {"int8": "int8 thinker weights are built with int8 activations (W8A8): set activations: "
                       "int8_per_token (recipes/w8a8.yaml)"}
    methods = ("rtn", "awq")
    fp32_parts = ("norm",)
    prefixes = ("thinker.model.language_model.", "thinker.model.")  # transformers 5.x, 4.5x
    linears = tuple(LINEARS.values())

    # -- checks and estimates ---------------------------------------------------------------
    @property
    def imports_autoawq(self) -> bool:
        """An AutoAWQ checkpoint built with an int4 recipe: its int4 weights go in as they are."""
        return self.ckpt.autoawq is not None and self.settings.quantized

    @property
    def imports_modelslim(self) -> bool:
        """An msModelSlim AscendV1 checkpoint built with a W8A8 recipe: its int8 weights go in as they are."""
        return self.ckpt.modelslim is not None and self.settings.w8a8

    def check(self) -> None:
        """Also refuse, before any work, an msModelSlim checkpoint whose thinker linears this
        importer does not read (the error names the tensor and its type)."""
        super().check()
        if not self.imports_modelslim:
            return
        from omni_export.checkpoint.modelslim import SUPPORTED_TYPES, W8A8_DYNAMIC, ModelSlimError

        desc = self.ckpt.modelslim
        weights = self.weights()
        targets = [f"{weights.layer_path(i)}{path}" for i in range(weights.num_layers) for path in LINEARS.values()]
        names = [weights.names[f"{t}.weight"] for t in targets if weights.has(f"{t}.weight")]
        names.append(weights.lm_head_name())
        for name in names:
            kind = desc.type_of(name)
            if kind not in SUPPORTED_TYPES:
                raise ModelSlimError(f"tensor {name} has quantization type {kind}, which this importer does not read "
                                     f"(it reads {', '.join(SUPPORTED_TYPES)})", path=desc.path,
                                     fix="re-export with msModelSlim's W8A8 dynamic recipe, or build from the float "
                                         "checkpoint with --recipe w8a8")
        if self.settings.activations != "int8_per_token" and any(desc.type_of(n) == W8A8_DYNAMIC for n in names):
            raise ModelSlimError(f"msModelSlim's W8A8_DYNAMIC activations are per token, the recipe asks for "
                                 f"{self.settings.activations}", path=desc.path, fix="set activations: int8_per_token")

    def dims(self) -> TextDims:
        from omni_export.export.decoder_graph import TextDims

        # a float16 decoder's KV cache is float16 (decoder_graph.build_decoder_graph)
        return dataclasses.replace(TextDims.from_config(self.ckpt.text_config()), kv_dtype=self.settings.dtype)

    def memory_estimate(self) -> int:
        """One layer in float32 several times over (checkpoint read, torch module, quantized copy,
        calibration activations), or the float embedding table / lm_head, whichever is larger."""
        d = self.dims()
        cfg = self.ckpt.text_config()
        layer = d.layer_float_bytes(cfg.intermediate_size)
        table = 4 * d.vocab_size * d.hidden_size
        calib = 0
        if self.settings.calibrates and not self.imports_autoawq and not self.imports_modelslim:
            c = self.calibration
            tokens = c.samples * c.sequence_length if c else 512
            calib = 4 * tokens * (4 * d.hidden_size + 2 * cfg.intermediate_size) * 2
        media = 0
        if calib and self.calibration is not None and self.calibration.index:
            # the index's samples are embedded with the float32 audio and vision towers beside the table
            from omni_export.modules.audio import AudioModule
            from omni_export.modules.vision import VisionModule

            towers = sum(self.ckpt.numel(self.ckpt.tensor_names(m.prefixes).values()) for m in (AudioModule, VisionModule))
            media = 4 * towers * 2 + table
        return int(max(4 * layer + calib, 2 * table + layer, media) + 1.5e9)

    def config(self) -> dict:
        thinker = self.ckpt.config.thinker_config
        return {
            **self.dims().manifest_config(),
            # TMRoPE constants (omni_runtime.prompt.rope.RopeConfig), transformers' config defaults them
            "position_id_per_seconds": int(thinker.position_id_per_seconds),
            "seconds_per_chunk": int(thinker.seconds_per_chunk),
            "spatial_merge_size": int(thinker.vision_config.spatial_merge_size),
        }

    # -- weights ----------------------------------------------------------------------------
    def weights(self) -> ThinkerWeights:
        """The text model's float tensors: embedding, decoder layers, final norm, lm_head."""
        return ThinkerWeights(self.ckpt)

    def float_layers(self) -> Iterator[DecoderLayer]:
        """The decoder layers in float32 (the float recipes' weights); an AutoAWQ checkpoint's
        int4 linears dequantized, what the checkpoint means."""
        weights = self.weights()
        if self.ckpt.autoawq is None:
            yield from weights.float_layers()
            return
        from omni_export.export.onnx_graph import Linear

        for i in range(weights.num_layers):
            layer = self._autoawq_layer(weights, i)
            for field in LINEARS:
                linear = getattr(layer, field)
                if isinstance(linear.weight, QuantWeight):
                    setattr(layer, field, Linear(linear.weight.dequantize(), linear.bias))
            yield layer

    def _quantize(self, weight: np.ndarray, bits: int, clip=None) -> QuantWeight:
        from omni_export.quant import rtn

        return rtn.quantize_rows(weight, self.settings.group_size, bits=bits, symmetric=self.settings.symmetric,
                                 clip=clip)

    def _quantize_layer(self, i: int, layer: DecoderLayer, clips: dict | None = None,
                        static: dict | None = None) -> DecoderLayer:
        """Layer ``i``'s linears quantized as the recipe says (``keep_float`` ones left float);
        ``clips``: AWQ's clipping per linear path; ``static``: the calibrated (input_scale,
        input_offset) per linear path of the ``static_activations`` W8A8 linears."""
        from omni_export.export.onnx_graph import Linear

        for field, path in LINEARS.items():
            if self.settings.keeps_float(f"{self.layer_prefix}.{i}.{path}"):
                continue
            linear = getattr(layer, field)
            if self.settings.w8a8:
                from omni_export.quant.w8a8 import quantize_weight, quantize_weight_static

                if static and path in static:  # the bias goes into quant_bias, as msModelSlim's W8A8
                    setattr(layer, field, Linear(quantize_weight_static(linear.weight, linear.bias, *static[path])))
                else:
                    setattr(layer, field, Linear(quantize_weight(linear.weight, self.w8a8_activations), linear.bias))
                continue
            clip = None if clips is None else clips.get(path)
            setattr(layer, field, Linear(self._quantize(linear.weight, 4, clip), linear.bias))
        return layer

    @property
    def w8a8_activations(self) -> str:
        """``per_token`` / ``per_tensor``: the W8A8 activation scales of the recipe (``activations``)."""
        return self.settings.activations.removeprefix("int8_")

    def _layers(self, weights: ThinkerWeights, log: CalibrationLog) -> Iterator[DecoderLayer]:
        """The decoder layers as the recipe builds them; a calibrated build (AWQ, smoothing,
        static activations) reports into ``log``."""
        s = self.settings
        if self.imports_autoawq:
            for i in range(weights.num_layers):
                yield self._autoawq_layer(weights, i)
        elif self.imports_modelslim:
            for i in range(weights.num_layers):
                yield self._modelslim_layer(weights, i)
        elif s.w8a8 and (s.smooth_alpha is not None or s.static_activations):
            yield from self._smoothed_layers(weights, log)
        elif s.method == "none":  # float weights (an AutoAWQ checkpoint's dequantized)
            yield from self.float_layers()
        elif s.method == "rtn":
            for i in range(weights.num_layers):
                yield self._quantize_layer(i, weights.float_layer(i))
        else:
            yield from self._awq_layers(weights, log)

    def _awq_layers(self, weights: ThinkerWeights, log: CalibrationLog) -> Iterator[DecoderLayer]:
        """AWQ over the thinker, one decoder layer at a time.

        The calibration token ids (``omni_export.build.calibration``) are embedded with the
        checkpoint's table; then for each layer its float weights become a transformers
        ``Qwen2_5OmniDecoderLayer``, ``quant.awq.awq_layer`` searches and folds the scales and
        searches the clipping values, the layer's output on the calibration states becomes the
        next layer's input (the scaled float layer computes the same function as the original),
        and the scaled weights are quantized to int4. Only one layer's weights and the
        calibration activations are in memory at a time."""
        import torch

        from omni_export.export.decoder_graph import DecoderLayer
        from omni_export.export.thinker_weights import torch_decoder_layer
        from omni_export.quant.awq import AwqConfig, AwqStats, awq_layer

        text_config, hidden, kwargs = self._calibration_states(weights, log)
        config = AwqConfig(group_size=self.settings.group_size, symmetric=self.settings.symmetric)
        for i in range(weights.num_layers):
            started = time.perf_counter()
            layer = torch_decoder_layer(text_config, i, weights.float_layer(i))
            layer_stats = AwqStats()
            clips = awq_layer(layer, hidden, kwargs, config, layer_stats)
            with torch.no_grad():
                out = layer(hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
            scaled = DecoderLayer(
                layer.input_layernorm.weight.detach().numpy().copy(),
                layer.post_attention_layernorm.weight.detach().numpy().copy(),
                **{field: _torch_linear(layer, path) for field, path in LINEARS.items()})
            del layer
            log.layers.append({"layer": i, "seconds": round(time.perf_counter() - started, 2),
                               "search_seconds": {k: round(v, 2) for k, v in layer_stats.seconds.items()},
                               "ratios": layer_stats.ratios})
            yield self._quantize_layer(i, scaled, clips)

    def _calibration_states(self, weights: ThinkerWeights, log: CalibrationLog):
        """What AWQ and SmoothQuant run the float layers on: the text config, the calibration
        tokens' embeddings ``[samples, seq, hidden]`` (torch) and the decoder layers' keyword
        arguments (positions, mask) for that sequence length.

        An msModelSlim index (``calibration.index``) gives multimodal blocks instead: token
        embeddings with transformers' audio / vision tower rows merged at the placeholders and
        their TMRoPE positions per block (``omni_export.build.calibration_media``); the sample
        counts go to ``log`` (the build output and the build info's ``calibration``)."""
        import torch

        from omni_export.build.calibration import calibration_ids
        from omni_export.quant.awq import layer_kwargs_for

        text_config = self.ckpt.text_config()
        if self.calibration.index:
            from omni_export.build.calibration_media import counts_line, media_calibration

            batch = media_calibration(self.calibration, self.ckpt, weights.embedding())
            log.counts = batch.counts
            log.say(counts_line(batch.counts))
            kwargs = layer_kwargs_for(text_config, batch.hidden.shape[1],
                                      position_ids=torch.from_numpy(batch.positions))
            return text_config, torch.from_numpy(batch.hidden), kwargs
        ids = calibration_ids(self.calibration, self.ckpt)
        table = weights.embedding()
        hidden = torch.from_numpy(table[ids])
        del table
        return text_config, hidden, layer_kwargs_for(text_config, ids.shape[1])

    def _smoothed_layers(self, weights: ThinkerWeights, log: CalibrationLog) -> Iterator[DecoderLayer]:
        """W8A8 calibrated one decoder layer at a time: the calibration tokens are embedded and run
        through the float layers (transformers' ``Qwen2_5OmniDecoderLayer``), recording each
        linear's input range per channel. With ``smooth_alpha``, the per-channel absmax of the
        activation entering q/k/v and gate/up gives the smoothing scales
        (``quant.w8a8.smooth_scales``), folded into the two RMSNorms and those linears; that of
        the activation entering o_proj and down_proj (where they are quantized), folded into
        v_proj's and up_proj's output rows (``fold_linear_smoothing``; o_proj's query-head
        columns share their KV head's v channel). The smoothed float layer computes the same
        function, so the float output is the next layer's input. The ``static_activations``
        linears take their per-tensor scale and offset from the range of the input they will see (after smoothing: channel ``k``'s range divided by
        ``s[k] > 0``). Then the linears are quantized (``_quantize_layer``)."""
        import torch

        from omni_export.export.thinker_weights import torch_decoder_layer
        from omni_export.quant.gqa import value_channel_of_column
        from omni_export.quant.w8a8 import (fold_linear_smoothing, fold_smoothing, smooth_scales,
                                            static_activation_params)

        text_config, hidden, kwargs = self._calibration_states(weights, log)
        alpha = self.settings.smooth_alpha
        groups = (("input_layernorm", ("q_proj", "k_proj", "v_proj")),
                  ("post_attention_layernorm", ("gate_proj", "up_proj")))
        #: the linear whose input each group's statistics are recorded on (the others read the same)
        readers = {field: norm for norm, fields in groups for field in fields}
        static = [f for f, path in LINEARS.items()
                  if any(self.settings.static_linear(f"{self.layer_prefix}.{j}.{path}") for j in range(weights.num_layers))]
        #: (previous linear, reading linear): smoothing moved into the previous linear's output rows
        chains = (("v_proj", "o_proj"), ("up_proj", "down_proj"))
        dims = self.dims()
        o_expand = value_channel_of_column(dims.num_attention_heads, dims.num_key_value_heads, dims.head_dim)
        watched = {norm: LINEARS[fields[0]] for norm, fields in groups}
        watched.update({f: LINEARS[f] for f in static if f not in readers})
        if alpha is not None:
            watched.update({f: LINEARS[f] for _, f in chains})
        for i in range(weights.num_layers):
            started = time.perf_counter()
            layer = weights.float_layer(i)
            module = torch_decoder_layer(text_config, i, layer)
            ranges: dict[str, list[torch.Tensor]] = {}

            def hook(name):
                def record(_module, args):
                    x = args[0].detach().reshape(-1, args[0].shape[-1])
                    lo, hi = x.amin(dim=0), x.amax(dim=0)
                    if name in ranges:
                        lo, hi = torch.minimum(ranges[name][0], lo), torch.maximum(ranges[name][1], hi)
                    ranges[name] = [lo, hi]
                return record

            handles = [module.get_submodule(path).register_forward_pre_hook(hook(name))
                       for name, path in watched.items()]
            with torch.no_grad():
                out = module(hidden, **kwargs)
            for handle in handles:
                handle.remove()
            hidden = out[0] if isinstance(out, tuple) else out
            del module
            layer_stats = {"layer": i}
            smoothing = {}
            if alpha is not None:
                for norm, fields in groups:
                    linears = [getattr(layer, f) for f in fields]
                    lo, hi = ranges[norm]
                    absmax = torch.maximum(lo.abs(), hi.abs()).numpy()
                    sc = smooth_scales(absmax, [lin.weight for lin in linears], float(alpha))
                    new_norm, new_weights = fold_smoothing(getattr(layer, norm), [lin.weight for lin in linears], sc)
                    setattr(layer, norm, new_norm)
                    for lin, w in zip(linears, new_weights):
                        lin.weight = w
                    smoothing[norm] = sc
                    layer_stats[norm] = _scale_range(sc)
                for prev_field, field in chains:
                    if self.settings.keeps_float(f"{self.layer_prefix}.{i}.{LINEARS[field]}"):
                        continue  # a float linear gains nothing from smoothing
                    prev, linear = getattr(layer, prev_field), getattr(layer, field)
                    expand = o_expand if field == "o_proj" else None
                    lo, hi = ranges[field]
                    absmax = torch.maximum(lo.abs(), hi.abs()).numpy()
                    sc = smooth_scales(absmax, [linear.weight], float(alpha), expand)
                    prev_w, prev_b, w = fold_linear_smoothing(prev.weight, prev.bias, linear.weight, sc, expand)
                    setattr(layer, prev_field, dataclasses.replace(prev, weight=prev_w, bias=prev_b))
                    setattr(layer, field, dataclasses.replace(linear, weight=w))
                    smoothing[field] = sc if expand is None else sc[expand]  # per input column of ``field``
                    layer_stats[field] = _scale_range(sc)
            params = {}
            for field in static:
                if not self.settings.static_linear(f"{self.layer_prefix}.{i}.{LINEARS[field]}"):
                    continue
                source = readers.get(field, field)
                lo, hi = (r.numpy().astype(np.float32) for r in ranges[source])
                if source in smoothing:  # the input the quantized linear reads: x / s per channel
                    lo, hi = lo / smoothing[source], hi / smoothing[source]
                params[LINEARS[field]] = static_activation_params(lo.min(), hi.max())
            if params:
                layer_stats["static"] = {path: {"input_scale": float(sc[0]), "input_offset": float(off[0])}
                                         for path, (sc, off) in params.items()}
            layer_stats["seconds"] = round(time.perf_counter() - started, 2)
            log.layers.append(layer_stats)
            yield self._quantize_layer(i, layer, static=params)

    def _modelslim_layer(self, weights: ThinkerWeights, i: int) -> DecoderLayer:
        """Layer ``i`` of an msModelSlim checkpoint: its W8A8_DYNAMIC linears exactly as stored
        (int8 levels, float32 scales), its FLOAT linears, norms and biases in float."""
        from omni_export.checkpoint.modelslim import read_w8a8_linear
        from omni_export.export.decoder_graph import DecoderLayer
        from omni_export.export.onnx_graph import Linear
        from omni_export.quant.types import W8A8StaticWeight

        p = weights.layer_path(i)
        linears = {}
        for field, path in LINEARS.items():
            target = f"{p}{path}"
            prefix = weights.names[f"{target}.weight"][: -len(".weight")]
            w8a8 = read_w8a8_linear(self.ckpt, self.ckpt.modelslim, prefix)
            if w8a8 is None:
                linears[field] = weights.linear(target)
            elif isinstance(w8a8, W8A8StaticWeight):  # its quant_bias carries the float bias
                linears[field] = Linear(w8a8)
            else:
                bias = weights.read([f"{target}.bias"])[f"{target}.bias"] if weights.has(f"{target}.bias") else None
                linears[field] = Linear(w8a8, bias)
        return DecoderLayer(**weights.norms(i), **linears)

    def _modelslim_lm_head(self, weights: ThinkerWeights):
        """The lm_head of an msModelSlim checkpoint: W8A8 as stored, or the recipe's table of a FLOAT one."""
        from omni_export.checkpoint.modelslim import read_w8a8_linear
        from omni_export.export.onnx_graph import Linear

        w8a8 = read_w8a8_linear(self.ckpt, self.ckpt.modelslim, weights.lm_head_name()[: -len(".weight")])
        return Linear(w8a8) if w8a8 is not None else Linear(self._table("lm_head", weights.lm_head))

    def _modelslim_keep_float(self, weights: ThinkerWeights) -> list[str]:
        """The thinker linears msModelSlim left FLOAT (local names, as ``keep_float`` names them)."""
        return self._modelslim_linears(weights, "FLOAT")

    def _modelslim_linears(self, weights: ThinkerWeights, kind: str) -> list[str]:
        """The thinker linears msModelSlim typed ``kind`` (local names, as the recipe names them)."""
        desc = self.ckpt.modelslim
        return [f"{weights.layer_path(i)}{path}" for i in range(weights.num_layers) for path in LINEARS.values()
                if desc.type_of(weights.names[f"{weights.layer_path(i)}{path}.weight"]) == kind]

    def _autoawq_layer(self, weights: ThinkerWeights, i: int) -> DecoderLayer:
        """Layer ``i`` of an AutoAWQ checkpoint: its int4 linears exactly as stored, norms and biases in float."""
        from omni_export.checkpoint.autoawq import read_autoawq_linear
        from omni_export.export.decoder_graph import DecoderLayer
        from omni_export.export.onnx_graph import Linear

        p = weights.layer_path(i)
        linears = {}
        for field, path in LINEARS.items():
            target = f"{p}{path}"
            if weights.has(f"{target}.qweight"):
                bias = weights.read([f"{target}.bias"])[f"{target}.bias"] if weights.has(f"{target}.bias") else None
                prefix = weights.names[f"{target}.qweight"][: -len(".qweight")]  # the checkpoint's name
                linears[field] = Linear(read_autoawq_linear(self.ckpt, prefix), bias)
            else:  # modules_to_not_convert: kept in float by AutoAWQ
                linears[field] = weights.linear(target)
        return DecoderLayer(**weights.norms(i), **linears)

    def _table(self, kind: str, array_fn) -> np.ndarray | QuantWeight:
        dtype = getattr(self.settings, kind)
        array = array_fn()
        if dtype in (None, "float32"):
            return array
        return self._quantize(array, TABLE_BITS[dtype])

    # -- build and verify -------------------------------------------------------------------
    def write(self, ctx: BuildContext) -> ModuleBuild:
        from omni_export.export import thinker_decoder, thinker_embedding
        from omni_export.export.onnx_graph import Linear

        s = self.settings
        weights = self.weights()
        dims = self.dims()
        total = dims.num_hidden_layers + 2
        ctx.progress("thinker embedding", 0, total)
        table = self._table("embeddings", weights.embedding)
        embedding = thinker_embedding.build_graph(table, ctx.out_dir, dtype=s.dtype)
        embed_bytes = int(table.nbytes)
        del table
        ctx.progress("thinker decoder layer 1", 1, total)
        layer_bytes, layer_seconds = [], []
        log = CalibrationLog(say=ctx.say)
        marks = {"offset": 0, "time": time.perf_counter()}

        def on_layer(i: int, offset: int) -> None:
            now = time.perf_counter()
            layer_bytes.append(offset - marks["offset"])
            layer_seconds.append(now - marks["time"])
            marks.update(offset=offset, time=now)
            ctx.progress(f"thinker decoder layer {i + 2}" if i + 1 < dims.num_hidden_layers else "thinker lm_head",
                         i + 2, total)

        def lm_head() -> Linear:
            if self.imports_modelslim:
                return self._modelslim_lm_head(weights)
            return Linear(self._table("lm_head", weights.lm_head))

        builder = {}
        if s.w8a8:
            from omni_export.export.w8a8_linear import W8A8GraphBuilder

            builder = {"builder": W8A8GraphBuilder}
        decoder = thinker_decoder.build_graph(dims, self._layers(weights, log), weights.final_norm(), lm_head,
                                              ctx.out_dir, emit=s.emit, accuracy_level=s.accuracy_level,
                                              on_layer=on_layer, dtype=s.dtype, keep_fp32=s.keep_fp32, **builder)
        ctx.progress("thinker done", total, total)
        quant = None
        if s.w8a8:
            quant = self._w8a8_quantization()
        elif s.quantized:
            quant = {"weights": s.weights, "method": "autoawq" if self.imports_autoawq else s.method,
                     "group_size": self.ckpt.autoawq["group_size"] if self.imports_autoawq else s.group_size,
                     "symmetric": s.symmetric, "accuracy_level": s.accuracy_level, "emit": s.emit,
                     "lm_head": s.lm_head, "keep_float": list(s.keep_float)}
        embed_quant = None if s.embeddings in (None, "float32") else {
            "weights": s.embeddings, "method": "rtn", "group_size": s.group_size, "symmetric": s.symmetric}
        decoder_bytes = sum((ctx.out_dir / f).stat().st_size for f in decoder.external_data)
        info = {"layer_seconds": [round(t, 3) for t in layer_seconds],
                # per decoder layer, embedding table, lm_head and the rest (to project to the real layer count)
                "weight_bytes": {"per_layer": layer_bytes, "embeddings": embed_bytes,
                                 "lm_head_and_norm": max(0, decoder_bytes - sum(layer_bytes))}}
        if log.layers:
            info["smoothing" if s.w8a8 else "awq"] = log.layers
        if log.counts is not None:
            info["calibration"] = log.counts
        return ModuleBuild({thinker_embedding.GRAPH_NAME: (embedding, embed_quant),
                            thinker_decoder.GRAPH_NAME: (decoder, quant)}, info)

    def _w8a8_quantization(self) -> dict:
        """The decoder's manifest ``quantization`` block of a W8A8 build."""
        s = self.settings
        quant = {"weights": "int8", "method": "rtn", "granularity": "channel", "symmetric": True,
                 "activations": s.activations, "emit": s.emit, "lm_head": s.lm_head, "keep_float": list(s.keep_float),
                 "smooth_alpha": s.smooth_alpha}
        if s.static_activations:
            quant["static_activations"] = list(s.static_activations)
        if self.imports_modelslim:
            weights = self.weights()
            head = self.ckpt.modelslim.type_of(weights.lm_head_name())
            quant.update(method="modelslim", activations="int8_per_token", smooth_alpha=None,
                         keep_float=self._modelslim_keep_float(weights), source=self.ckpt.modelslim.source(),
                         lm_head="int8" if head in ("W8A8_DYNAMIC", "W8A8") else s.lm_head)
            quant.pop("static_activations", None)
            static = self._modelslim_linears(weights, "W8A8")
            if static:
                quant["static_activations"] = static
            if head in ("W8A8_DYNAMIC", "W8A8"):
                return quant
        if quant["lm_head"] in ("int8", "int4"):  # a block-quantized lm_head: DequantizeLinear + MatMul
            quant["accuracy_level"] = s.accuracy_level
        return quant

    def verify(self, ctx):
        from omni_export.verify.checks import thinker
        return thinker.verify(self, ctx)


class ThinkerWeights(DecoderWeights):
    """Lazy float32 access to the thinker text model's tensors, grouped per decoder layer."""

    def __init__(self, ckpt):
        super().__init__(ckpt, ThinkerModule.prefixes, ckpt.text_config().num_hidden_layers)

    def final_norm(self) -> np.ndarray:
        return self.read([FINAL_NORM])[FINAL_NORM]

    def linear(self, target: str):
        """The float linear ``target``; an msModelSlim W8A8 linear dequantized (what it means)."""
        w8a8 = self._modelslim_w8a8(self.names.get(f"{target}.weight"))
        if w8a8 is None:
            return super().linear(target)
        from omni_export.export.onnx_graph import Linear

        bias = self.read([f"{target}.bias"])[f"{target}.bias"] if self.has(f"{target}.bias") else None
        return Linear(w8a8.dequantize(), bias)

    def _modelslim_w8a8(self, name: str | None):
        """The W8A8Weight of checkpoint weight ``name`` if it is an msModelSlim int8 tensor, else None."""
        desc = self.ckpt.modelslim
        if desc is None or name is None or desc.type_of(name) in (None, "FLOAT"):
            return None
        from omni_export.checkpoint.modelslim import read_w8a8_linear

        return read_w8a8_linear(self.ckpt, desc, name[: -len(".weight")])

    def embedding(self) -> np.ndarray:
        """The token embedding table [vocab, hidden] float32."""
        return self.read([EMBEDDING])[EMBEDDING]

    def _lm_head(self) -> tuple[tuple[str, ...], str]:
        """(prefixes, local name) of the lm_head weight: its own, or the embedding table when tied."""
        tied = self.ckpt.config.thinker_config.text_config.tie_word_embeddings
        if tied and LM_HEAD not in self.ckpt.tensor_names(HEAD_PREFIXES):
            return self.prefixes, EMBEDDING
        return HEAD_PREFIXES, LM_HEAD

    def lm_head_name(self) -> str:
        """The checkpoint name of the lm_head weight (the embedding table's when tied)."""
        prefixes, name = self._lm_head()
        self.ckpt.require(prefixes, [name])
        return self.ckpt.prefix(prefixes) + name

    def lm_head(self) -> np.ndarray:
        """The lm_head weight [vocab, hidden] float32 (the embedding table when tied)."""
        prefixes, name = self._lm_head()
        w8a8 = self._modelslim_w8a8(self.ckpt.prefix(prefixes) + name)
        if w8a8 is not None:
            return w8a8.dequantize()
        return self.ckpt.tensors(prefixes, [name])[name].numpy()


def _torch_linear(layer, path: str):
    """The float ``Linear`` (arrays copied) of the torch submodule ``path`` of ``layer``."""
    from omni_export.export.onnx_graph import Linear

    m = layer.get_submodule(path)
    bias = None if m.bias is None else m.bias.detach().numpy().copy()
    return Linear(m.weight.detach().numpy().copy(), bias)
