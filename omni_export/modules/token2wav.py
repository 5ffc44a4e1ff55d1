"""The token2wav module: the DiT (codes -> mel) and BigVGAN (mel -> waveform) graphs and the speakers.

Recipe section ``modules.token2wav``: ``weights: float32 | float16 | int8`` (transformers runs
token2wav in float32; int8: the DiT's linears and the BigVGAN's convolutions symmetric per
output channel, activations ``dtype: float32 | float16``), ``keep_fp32`` for a float16 graph
(``norm``, ``softmax``, ``residual``: the DiT's norms, attention softmax and residual stream, the
BigVGAN's AMP residual streams). The DiT's decoder layers are read one at a time and written to
the graph's external data. The speaker encoder runs at build time in float32 whatever the recipe.

Speakers come from the checkpoint's ``spk_dict.pt``, read with ``torch.load(weights_only=True)``
(no arbitrary unpickling) and written as plain ``.npy`` files (``numpy.load(allow_pickle=False)``
reads them) under ``token2wav_speakers/``. Per speaker:

- ``speaker_embedding.npy`` [enc_emb_dim]: the x-vector ``cond`` of spk_dict.pt;
- ``reference_embedding.npy`` [enc_dim]: the DiT's speaker encoder (ECAPA-TDNN) run on the speaker's
  reference mel ``ref_mel``, and ``null_reference_embedding.npy`` [enc_dim]: the encoder run on a zero
  mel of the same length (classifier-free guidance's unconditioned row). The encoder sees nothing
  else, so it runs here, once per speaker, in float32 with transformers' own module, instead of
  being a graph;
- the talker's text-stream start token ``bos_token``, in the manifest.

The manifest's ``config.token2wav`` block (``config()``) holds the constants of the host-side ODE
and streaming (``omni_runtime.stages.token2wav``) and the speakers. A checkpoint without a talker
(``enable_audio_output: false``, or no ``token2wav.*`` tensors) builds a text-only bundle:
``skip_reason()`` says why and the module is left out.

Checkpoint names: the DiT's under ``DIT_PREFIX`` (``DIT_LINEARS``, ``DIT_TENSORS``, and
``transformer_blocks.<i>.`` + ``LAYER_LINEARS``), the BigVGAN's under ``BIGVGAN_PREFIX``
(read whole; ``bigvgan_tensors()`` lists what the graph needs).
"""

from __future__ import annotations

import re

import numpy as np

from omni_runtime.bundle.names import MODULE_GRAPHS

from omni_export.checkpoint.reader import CheckpointError
from omni_export.modules.base import (BuildContext, Module, ModuleBuild, channel_quantization, linear,
                                      quantize_linear, weight_and_bias)
from omni_export.modules.talker import TalkerModule, no_speech_reason

PREFIX = "token2wav."
DIT_PREFIX = f"{PREFIX}code2wav_dit_model."
BIGVGAN_PREFIX = f"{PREFIX}code2wav_bigvgan_model."
SPEAKER_FILE = "spk_dict.pt"
SPEAKER_DIR = "token2wav_speakers"
SPEAKER_TENSORS = ("speaker_embedding", "reference_embedding", "null_reference_embedding")
DEFAULT_SPEAKER = "Chelsie"  # Qwen2_5OmniForConditionalGeneration.generate(speaker="Chelsie")

#: Output sample rate of Qwen2.5-Omni's vocoder (24 kHz; 240 samples per 10 ms mel frame).
SAMPLE_RATE = 24000

#: transformers' Qwen2_5OmniToken2WavModel.forward defaults (num_steps, guidance_scale, sway_coefficient);
#: its DiT integrates with RK4 (RungeKutta4ODESolver). The official low-VRAM streaming code
#: integrates each chunk with Euler (``sample_chunk``).
ODE_DEFAULTS = {"solver": "rk4", "stream_solver": "euler", "steps": 10, "guidance_scale": 0.5,
                "sway_coefficient": -1.0}

#: The official low-VRAM streaming scheme (QwenLM/Qwen2.5-Omni, low-VRAM-mode/
#: modeling_qwen2_5_omni_low_VRAM_mode.py, Qwen2_5OmniToken2WavModel.forward(return_audio_in_chunk=True)):
#: ``dit_chunk_size = 48``, ``dit_left_context = 24``, ``dit_right_context = 12`` (codes),
#: ``vocoder_left_context = vocoder_right_context = 20`` (mel frames), ``vocoder_upsample_rate = 240``.
STREAM_DEFAULTS = {"dit_chunk_codes": 48, "dit_left_context_codes": 24, "dit_right_context_codes": 12,
                   "vocoder_left_context_frames": 20, "vocoder_right_context_frames": 20}

#: DiTLayer field -> path inside ``transformer_blocks.<i>.`` (weight and bias each)
LAYER_LINEARS = {"attn_norm": "attn_norm.linear", "to_q": "attn.to_q", "to_k": "attn.to_k", "to_v": "attn.to_v",
                 "to_out": "attn.to_out.0", "ff_in": "ff.ff.0", "ff_out": "ff.ff.3"}
#: DiTWeights field -> path: its linears (weight and bias each) and the codec table
DIT_LINEARS = {"time_mlp_in": "time_embed.time_mlp.0", "time_mlp_out": "time_embed.time_mlp.2",
               "input_proj": "input_embed.proj", "norm_out": "norm_out.linear", "proj_out": "proj_out"}
CODEC_EMBED = "text_embed.codec_embed.weight"
DIT_TENSORS = [CODEC_EMBED, *weight_and_bias(DIT_LINEARS.values())]
LAYER_TENSORS = weight_and_bias(LAYER_LINEARS.values())
#: the DiT's speaker encoder (ECAPA-TDNN, run here with transformers' module), read whole
SPK_ENCODER = "input_embed.spk_encoder."


def speaker_file_stems(names: list[str]) -> dict[str, str]:
    """A distinct file-name-safe stem per speaker: the name itself when it is plain (and not taken
    case-insensitively), else ``speaker<index>``."""
    stems: dict[str, str] = {}
    taken: set[str] = set()
    for index, name in enumerate(names):
        stem = name if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name) else f"speaker{index}"
        while stem.lower() in taken:
            stem = f"{stem}_{index}"
        taken.add(stem.lower())
        stems[name] = stem
    return stems


class Token2WavModule(Module):
    name = "token2wav"
    description = "token2wav: the DiT (speech codes -> mel, one ODE velocity per run) and the BigVGAN vocoder"
    graphs = MODULE_GRAPHS[name]
    prefixes = (PREFIX,)
    dit_prefixes = (DIT_PREFIX,)
    bigvgan_prefixes = (BIGVGAN_PREFIX,)
    layer_prefix = "transformer_blocks"
    linears = tuple(LAYER_LINEARS.values())
    requires = ("talker",)  # codes come from the talker: no talker, no speech
    missing_fix = TalkerModule.missing_fix  # or a text-only bundle, as without a talker
    recipe_keys = ("weights", "dtype", "keep_fp32")
    precisions = ("float32", "float16", "int8")
    fp32_parts = ("norm", "softmax", "residual")

    def __init__(self, ckpt, settings, **kwargs):
        super().__init__(ckpt, settings, **kwargs)
        self._speakers: dict | None = None

    # -- what the checkpoint holds ------------------------------------------------------------
    def _token2wav_config(self):
        return self.ckpt.config.token2wav_config

    def dit_dims(self):
        from omni_export.export.token2wav_dit import DiTDims

        return DiTDims.from_config(self._token2wav_config().dit_config)

    def bigvgan_dims(self):
        from omni_export.export.token2wav_bigvgan import BigVGANDims

        return BigVGANDims.from_config(self._token2wav_config().bigvgan_config)

    def skip_reason(self) -> str | None:
        """Why this checkpoint has no token2wav to export (the bundle is then text-only), or None."""
        return no_speech_reason(self, "token2wav_config")

    def bigvgan_tensors(self) -> list[str]:
        """The BigVGAN tensors the graph needs (local names under ``BIGVGAN_PREFIX``)."""
        v = self.bigvgan_dims()
        names = ["conv_pre.weight", "conv_pre.bias", "conv_post.weight", "activation_post.act.alpha",
                 "activation_post.act.beta"]
        names += weight_and_bias(f"ups.{i}.0" for i in range(len(v.upsample_rates)))
        for r in range(len(v.upsample_rates) * len(v.resblock_kernel_sizes)):
            names += weight_and_bias(f"resblocks.{r}.{c}.{i}" for c in ("convs1", "convs2") for i in range(3))
            names += [f"resblocks.{r}.activations.{i}.act.{p}" for i in range(6) for p in ("alpha", "beta")]
        return names

    def required_tensors(self) -> list[str]:
        """Local names under ``token2wav.``."""
        dit = self.ckpt.prefix(self.dit_prefixes)[len(PREFIX):]
        bigvgan = self.ckpt.prefix(self.bigvgan_prefixes)[len(PREFIX):]
        names = [dit + n for n in DIT_TENSORS]
        names += [f"{dit}{self.layer_prefix}.{i}.{n}" for i in range(self.dit_dims().num_hidden_layers)
                  for n in LAYER_TENSORS]
        return names + [bigvgan + n for n in self.bigvgan_tensors()]

    def check(self) -> None:
        if self.skip_reason() is not None:
            return
        super().check()
        v = self.bigvgan_dims()
        if any(len(d) != 3 for d in v.resblock_dilation_sizes):
            raise CheckpointError("bigvgan_config.resblock_dilation_sizes must hold 3 dilations per kernel size",
                                  path=self.ckpt.root / "config.json", fix="use the original config.json")
        path = self.ckpt.root / SPEAKER_FILE
        if not path.is_file():
            raise CheckpointError(f"{SPEAKER_FILE} is missing: token2wav needs the speakers' conditioning",
                                  path=path, fix="copy spk_dict.pt of the original checkpoint into the model "
                                                 "directory, or set enable_audio_output: false in config.json")
        self.speakers()  # read and check now, before any build work

    def speakers(self) -> dict[str, dict]:
        """spk_dict.pt as ``{name: {"bos_token": int, "cond": [enc_emb_dim], "ref_mel": [T, mel]}}`` (float32)."""
        if self._speakers is not None:
            return self._speakers
        import torch

        path = self.ckpt.root / SPEAKER_FILE
        d = self.dit_dims()
        fix = "use the spk_dict.pt of the original checkpoint"
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for anything but plain tensors/containers, or a corrupt file
            raise CheckpointError(f"cannot read {SPEAKER_FILE} with torch.load(weights_only=True) ({exc})",
                                  path=path, fix=fix) from None
        if not isinstance(raw, dict) or not raw:
            raise CheckpointError(f"{SPEAKER_FILE} must map speaker names to their parameters", path=path, fix=fix)
        speakers = {}
        for name, params in raw.items():
            where = f"speaker {name!r}"
            if not isinstance(name, str) or not isinstance(params, dict):
                raise CheckpointError(f"{where}: expected a name and a dict of parameters", path=path, fix=fix)
            lacking = [k for k in ("bos_token", "cond", "ref_mel") if k not in params]
            if lacking:
                raise CheckpointError(f"{where} has no {', '.join(lacking)}", path=path, fix=fix)
            bos = params["bos_token"]
            bos = int(bos.item()) if torch.is_tensor(bos) else bos
            cond = torch.as_tensor(params["cond"]).float().reshape(-1).numpy()
            ref_mel = torch.as_tensor(params["ref_mel"]).float()
            if ref_mel.ndim == 3 and ref_mel.shape[0] == 1:
                ref_mel = ref_mel[0]
            if not isinstance(bos, int) or cond.shape != (d.enc_emb_dim,) or ref_mel.ndim != 2 \
                    or ref_mel.shape[1] != d.mel_dim or ref_mel.shape[0] < 1:
                raise CheckpointError(f"{where}: bos_token must be an int, cond [1, {d.enc_emb_dim}] and ref_mel "
                                      f"[1, frames, {d.mel_dim}] (got cond {tuple(cond.shape)}, ref_mel "
                                      f"{tuple(ref_mel.shape)})", path=path, fix=fix)
            speakers[name] = {"bos_token": bos, "cond": cond, "ref_mel": ref_mel.numpy()}
        self._speakers = speakers
        return speakers

    def memory_estimate(self) -> int:
        """The larger of the BigVGAN (read whole) and the DiT's non-layer tensors plus one layer (the
        layers are streamed), in float32 three times over (checkpoint read, numpy copy, graph
        writer), plus a margin for torch and the speaker encoder."""
        if self.skip_reason() is not None:
            return 0
        bigvgan = self.ckpt.numel(self.ckpt.tensor_names(self.bigvgan_prefixes).values())
        dit = self.ckpt.tensor_names(self.dit_prefixes)
        layers, layer0 = f"{self.layer_prefix}.", f"{self.layer_prefix}.0."
        dit_numel = self.ckpt.numel(n for local, n in dit.items() if not local.startswith(layers))
        dit_numel += self.ckpt.numel(n for local, n in dit.items() if local.startswith(layer0))
        return int(3 * 4 * max(bigvgan, dit_numel) + 1.0e9)

    def config(self) -> dict:
        d, v = self.dit_dims(), self.bigvgan_dims()
        speakers = {}
        stems = speaker_file_stems(list(self.speakers()))
        for name, params in self.speakers().items():
            stem = f"{SPEAKER_DIR}/{stems[name]}"
            speakers[name] = {"bos_token": params["bos_token"],
                              **{t: f"{stem}.{t}.npy" for t in SPEAKER_TENSORS}}
        return {
            "sample_rate": SAMPLE_RATE,
            "mel_dim": d.mel_dim,
            "mel_per_code": d.repeats,
            "hop_length": v.hop_length,
            "num_embeds": d.num_embeds,  # codes 0 .. num_embeds are valid DiT inputs
            "block_size": d.block_size,
            "max_mel_frames": d.max_position_embeddings,  # transformers refuses longer non-streamed outputs
            "enc_dim": d.enc_dim,
            "enc_emb_dim": d.enc_emb_dim,
            "ode": dict(ODE_DEFAULTS),
            "stream": dict(STREAM_DEFAULTS),
            "default_speaker": DEFAULT_SPEAKER if DEFAULT_SPEAKER in speakers else next(iter(speakers)),
            "speakers": speakers,
        }

    # -- weights ----------------------------------------------------------------------------
    def dit_weights(self):
        from omni_export.export.token2wav_dit import DiTWeights

        t = self.arrays(DIT_TENSORS, self.dit_prefixes)
        return DiTWeights(codec_embed=t[CODEC_EMBED],
                          **{field: quantize_linear(linear(t, p), self.settings) for field, p in DIT_LINEARS.items()})

    def dit_layer(self, i: int):
        from omni_export.export.token2wav_dit import DiTLayer

        p = f"{self.layer_prefix}.{i}."
        t = self.arrays([p + n for n in LAYER_TENSORS], self.dit_prefixes)
        return DiTLayer(**{field: quantize_linear(linear(t, p + path), self.settings)
                           for field, path in LAYER_LINEARS.items()})

    def bigvgan_weights(self):
        from omni_export.export.token2wav_bigvgan import AMPBlock, BigVGANWeights, Conv, Snake

        v = self.bigvgan_dims()
        t = self.arrays(None, self.bigvgan_prefixes)

        int8 = self.settings.weights == "int8"

        def conv(name: str, transposed: bool = False) -> Conv:
            from omni_export.quant.rtn import quantize_channels

            weight = t[f"{name}.weight"]
            if int8:  # per output channel: axis 0 of a Conv1d, axis 1 of a ConvTranspose1d
                weight = quantize_channels(np.swapaxes(weight, 0, 1) if transposed else weight)
            return Conv(weight, t.get(f"{name}.bias"))

        def snake(name: str) -> Snake:
            return Snake(t[f"{name}.act.alpha"], t[f"{name}.act.beta"])

        blocks = [AMPBlock([conv(f"resblocks.{r}.convs1.{i}") for i in range(3)],
                           [conv(f"resblocks.{r}.convs2.{i}") for i in range(3)],
                           [snake(f"resblocks.{r}.activations.{i}") for i in range(6)])
                  for r in range(len(v.upsample_rates) * len(v.resblock_kernel_sizes))]
        return BigVGANWeights(conv("conv_pre"), [conv(f"ups.{i}.0", True) for i in range(len(v.upsample_rates))],
                              blocks, snake("activation_post"), conv("conv_post"))

    def speaker_encodings(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per speaker, the DiT speaker encoder's output for its reference mel and for a zero mel of the
        same length ([enc_dim] each, float32), computed with transformers' ECAPA_TimeDelayNet."""
        import torch
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import ECAPA_TimeDelayNet

        state = self.ckpt.tensors([p + SPK_ENCODER for p in self.dit_prefixes])
        encoder = ECAPA_TimeDelayNet(self._token2wav_config().dit_config).float().eval()
        encoder.load_state_dict(state, strict=True)
        out = {}
        with torch.no_grad():
            for name, params in self.speakers().items():
                mel = torch.from_numpy(params["ref_mel"])[None]
                # [2, enc_dim]: the reference mel and a zero mel in one batch, as transformers runs them
                enc = encoder(torch.cat([mel, torch.zeros_like(mel)], dim=0))
                out[name] = (enc[0].numpy().astype(np.float32), enc[1].numpy().astype(np.float32))
        return out

    # -- build ------------------------------------------------------------------------------
    def write_speakers(self, ctx: BuildContext) -> None:
        config = self.config()["speakers"]
        encodings = self.speaker_encodings()
        (ctx.out_dir / SPEAKER_DIR).mkdir(parents=True, exist_ok=True)
        for name, params in self.speakers().items():
            ref, null = encodings[name]
            arrays = {"speaker_embedding": params["cond"], "reference_embedding": ref, "null_reference_embedding": null}
            for tensor, array in arrays.items():
                np.save(ctx.out_dir / config[name][tensor], np.ascontiguousarray(array, dtype="<f4"),
                        allow_pickle=False)

    def write(self, ctx: BuildContext) -> ModuleBuild:
        from omni_export.export import token2wav_bigvgan, token2wav_dit

        d = self.dit_dims()
        total = d.num_hidden_layers + 3
        ctx.progress("token2wav speakers", 0, total)
        self.write_speakers(ctx)
        ctx.progress("token2wav DiT layer 1", 1, total)

        def on_layer(i: int, offset: int) -> None:
            ctx.progress(f"token2wav DiT layer {i + 2}" if i + 1 < d.num_hidden_layers else "token2wav BigVGAN",
                         i + 2, total)

        s = self.settings
        dit = token2wav_dit.build_graph(d, self.dit_weights(), (self.dit_layer(i) for i in range(d.num_hidden_layers)),
                                        ctx.out_dir, on_layer=on_layer, dtype=s.dtype, keep_fp32=s.keep_fp32)
        bigvgan = token2wav_bigvgan.build_graph(self.bigvgan_dims(), self.bigvgan_weights(), ctx.out_dir,
                                                dtype=s.dtype, keep_fp32=tuple(p for p in s.keep_fp32 if p == "residual"))
        ctx.progress("token2wav done", total, total)
        quant = channel_quantization(s)
        return ModuleBuild({token2wav_dit.GRAPH_NAME: (dit, quant), token2wav_bigvgan.GRAPH_NAME: (bigvgan, quant)})

    def verify(self, ctx):
        from omni_export.verify.checks import token2wav
        return token2wav.verify(self, ctx)
