"""The token2wav module: the DiT (codes -> mel) and BigVGAN (mel -> waveform) graphs and the speakers.

Recipe section ``modules.token2wav``: ``weights: float32`` (the only choice: transformers runs
token2wav in float32 too). The DiT's decoder layers are read one at a time and written to the
graph's external data.

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
"""

from __future__ import annotations

import re

import numpy as np

from omni_export.checkpoint.reader import CheckpointError
from omni_export.export import token2wav_bigvgan, token2wav_dit
from omni_export.export.onnx_graph import Linear
from omni_export.export.token2wav_bigvgan import AMPBlock, BigVGANDims, BigVGANWeights, Conv, Snake
from omni_export.export.token2wav_dit import DiTDims, DiTLayer, DiTWeights
from omni_export.build.recipes import RecipeError
from omni_export.modules.base import BuildContext, Module

DIT_PREFIX = "token2wav.code2wav_dit_model."
BIGVGAN_PREFIX = "token2wav.code2wav_bigvgan_model."
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

_LAYER_LINEARS = {"attn_norm": "attn_norm.linear", "to_q": "attn.to_q", "to_k": "attn.to_k", "to_v": "attn.to_v",
                  "to_out": "attn.to_out.0", "ff_in": "ff.ff.0", "ff_out": "ff.ff.3"}
_DIT_LINEARS = {"time_mlp_in": "time_embed.time_mlp.0", "time_mlp_out": "time_embed.time_mlp.2",
                "input_proj": "input_embed.proj", "norm_out": "norm_out.linear", "proj_out": "proj_out"}
_CODEC_EMBED = "text_embed.codec_embed.weight"
_SPK_ENCODER = "input_embed.spk_encoder."


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
    graphs = (token2wav_dit.GRAPH_NAME, token2wav_bigvgan.GRAPH_NAME)
    requires = ("talker",)  # codes come from the talker: no talker, no speech

    def __init__(self, ckpt, settings, **kwargs):
        super().__init__(ckpt, settings, **kwargs)
        self._speakers: dict | None = None

    # -- what the checkpoint holds ------------------------------------------------------------
    def _token2wav_config(self):
        return self.ckpt.config.token2wav_config

    def dit_dims(self) -> DiTDims:
        return DiTDims.from_config(self._token2wav_config().dit_config)

    def bigvgan_dims(self) -> BigVGANDims:
        return BigVGANDims.from_config(self._token2wav_config().bigvgan_config)

    def skip_reason(self) -> str | None:
        """Why this checkpoint has no token2wav to export (the bundle is then text-only), or None."""
        if not self.ckpt.raw_config.get("enable_audio_output", True):
            return "enable_audio_output is false in config.json"
        if not isinstance(self.ckpt.raw_config.get("token2wav_config"), dict):
            return "config.json has no token2wav_config"
        if not any(name.startswith("token2wav.") for name in self.ckpt.weight_map):
            return "the checkpoint has no token2wav weights (token2wav.*)"
        return None

    def _needed(self) -> list[str]:
        d, v = self.dit_dims(), self.bigvgan_dims()
        names = [DIT_PREFIX + _CODEC_EMBED]
        names += [f"{DIT_PREFIX}{p}.{kind}" for p in _DIT_LINEARS.values() for kind in ("weight", "bias")]
        names += [f"{DIT_PREFIX}transformer_blocks.{i}.{p}.{kind}" for i in range(d.num_hidden_layers)
                  for p in _LAYER_LINEARS.values() for kind in ("weight", "bias")]
        names += [f"{BIGVGAN_PREFIX}{n}" for n in ("conv_pre.weight", "conv_pre.bias", "conv_post.weight",
                                                   "activation_post.act.alpha", "activation_post.act.beta")]
        names += [f"{BIGVGAN_PREFIX}ups.{i}.0.{kind}" for i in range(len(v.upsample_rates))
                  for kind in ("weight", "bias")]
        for r in range(len(v.upsample_rates) * len(v.resblock_kernel_sizes)):
            names += [f"{BIGVGAN_PREFIX}resblocks.{r}.{c}.{i}.{kind}" for c in ("convs1", "convs2") for i in range(3)
                      for kind in ("weight", "bias")]
            names += [f"{BIGVGAN_PREFIX}resblocks.{r}.activations.{i}.act.{p}" for i in range(6)
                      for p in ("alpha", "beta")]
        return names

    def check(self) -> None:
        s = self.settings
        if s.weights != "float32":
            raise RecipeError(f"modules.token2wav.weights {s.weights}: token2wav is exported in float32 only",
                              path=s.name, fix="set modules.token2wav.weights: float32 (method: none)")
        if self.skip_reason() is not None:
            return
        missing = [n for n in self._needed() if n not in self.ckpt.weight_map]
        if missing:
            raise CheckpointError(f"token2wav weights are missing: {', '.join(missing[:3])}"
                                  + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""),
                                  path=self.ckpt.root,
                                  fix="the checkpoint is incomplete: download all weight shards, or set "
                                      "enable_audio_output: false in config.json for a text-only bundle")
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
        names = [n for n in self.ckpt.weight_map if n.startswith("token2wav.")]
        bigvgan = self.ckpt.numel([n for n in names if n.startswith(BIGVGAN_PREFIX)])
        layer0 = f"{DIT_PREFIX}transformer_blocks.0."
        dit = self.ckpt.numel([n for n in names if n.startswith(DIT_PREFIX) and ".transformer_blocks." not in n])
        dit += self.ckpt.numel([n for n in names if n.startswith(layer0)])
        return int(3 * 4 * max(bigvgan, dit) + 1.0e9)

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
    def _read(self, names: list[str]) -> dict[str, np.ndarray]:
        import torch

        return {k: v.numpy() for k, v in self.ckpt.read({n: n for n in names}, torch.float32).items()}

    def _linear(self, t: dict, name: str) -> Linear:
        return Linear(t[f"{name}.weight"], t[f"{name}.bias"])

    def dit_weights(self) -> DiTWeights:
        names = [DIT_PREFIX + _CODEC_EMBED] + [f"{DIT_PREFIX}{p}.{k}" for p in _DIT_LINEARS.values()
                                               for k in ("weight", "bias")]
        t = self._read(names)
        lin = {field: self._linear(t, DIT_PREFIX + p) for field, p in _DIT_LINEARS.items()}
        return DiTWeights(codec_embed=t[DIT_PREFIX + _CODEC_EMBED], **lin)

    def dit_layer(self, i: int) -> DiTLayer:
        p = f"{DIT_PREFIX}transformer_blocks.{i}."
        t = self._read([f"{p}{path}.{k}" for path in _LAYER_LINEARS.values() for k in ("weight", "bias")])
        return DiTLayer(**{field: self._linear(t, p + path) for field, path in _LAYER_LINEARS.items()})

    def bigvgan_weights(self) -> BigVGANWeights:
        v = self.bigvgan_dims()
        t = self._read([n for n in self.ckpt.weight_map if n.startswith(BIGVGAN_PREFIX)])
        p = BIGVGAN_PREFIX

        def conv(name: str) -> Conv:
            return Conv(t[f"{p}{name}.weight"], t.get(f"{p}{name}.bias"))

        def snake(name: str) -> Snake:
            return Snake(t[f"{p}{name}.act.alpha"], t[f"{p}{name}.act.beta"])

        blocks = [AMPBlock([conv(f"resblocks.{r}.convs1.{i}") for i in range(3)],
                           [conv(f"resblocks.{r}.convs2.{i}") for i in range(3)],
                           [snake(f"resblocks.{r}.activations.{i}") for i in range(6)])
                  for r in range(len(v.upsample_rates) * len(v.resblock_kernel_sizes))]
        return BigVGANWeights(conv("conv_pre"), [conv(f"ups.{i}.0") for i in range(len(v.upsample_rates))], blocks,
                              snake("activation_post"), conv("conv_post"))

    def speaker_encodings(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per speaker, the DiT speaker encoder's output for its reference mel and for a zero mel of the
        same length ([enc_dim] each, float32), computed with transformers' ECAPA_TimeDelayNet."""
        import torch
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import ECAPA_TimeDelayNet

        names = [n for n in self.ckpt.weight_map if n.startswith(DIT_PREFIX + _SPK_ENCODER)]
        state = self.ckpt.read({n: n[len(DIT_PREFIX + _SPK_ENCODER):] for n in names}, torch.float32)
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

    def build(self, ctx: BuildContext) -> dict:
        d = self.dit_dims()
        total = d.num_hidden_layers + 3
        ctx.progress("token2wav speakers", 0, total)
        self.write_speakers(ctx)
        ctx.progress("token2wav DiT layer 1", 1, total)

        def on_layer(i: int, offset: int) -> None:
            ctx.progress(f"token2wav DiT layer {i + 2}" if i + 1 < d.num_hidden_layers else "token2wav BigVGAN",
                         i + 2, total)

        dit = token2wav_dit.build_graph(d, self.dit_weights(), (self.dit_layer(i) for i in range(d.num_hidden_layers)),
                                        ctx.out_dir, on_layer=on_layer)
        bigvgan = token2wav_bigvgan.build_graph(self.bigvgan_dims(), self.bigvgan_weights(), ctx.out_dir)
        ctx.progress("token2wav done", total, total)
        return {token2wav_dit.GRAPH_NAME: (dit, None), token2wav_bigvgan.GRAPH_NAME: (bigvgan, None)}
