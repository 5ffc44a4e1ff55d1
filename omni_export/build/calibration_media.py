"""Multimodal calibration: an msModelSlim index's samples as the thinker's language model sees them.

Each used sample (``calibration.load_index``, ``select_samples``) becomes the conversation
msModelSlim's Qwen2.5-Omni adapter builds (``msmodelslim/model/qwen2_5_omni_thinker/model_adapter.py``
``handle_dataset``): the default system prompt, then a user turn whose content is the text alone,
or the text followed by the image, the audio and the video; rendered with the generation prompt.
From there it takes the runtime's own path (``omni_runtime.prompt``: template, media decoding
and features in ``media_prompt.prepare_media``, placeholder expansion, ``merge_embeddings``,
TMRoPE ``rope_index``), except that the encoders are transformers' audio and vision towers in
float32 with the checkpoint's weights, so the thinker is calibrated on the embeddings it will
see whatever precision the bundle's encoders get.

How samples of different lengths become the ``[samples, sequence_length]`` batch AWQ and
SmoothQuant run on: as the text path does (AutoAWQ's way), the samples' streams are
concatenated in index order and cut into consecutive blocks; the remainder is dropped and too
short a stream repeats from the first sample. Positions continue across samples (each sample's
TMRoPE positions start one past the previous sample's largest), and every block's 3-D
positions are shifted so its smallest is 0, so a text-only block gets positions 0..L-1 exactly
like the text path. RoPE makes attention depend on position differences per axis, so the shift
changes nothing but rounding; padding instead would spend calibration tokens on padding and
need per-sample masks in every layer call. Samples past the tokens needed are not encoded
(counted as ``unused``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omni_runtime.errors import OmniError

from omni_export.build.calibration import CalibrationError, IndexSample, index_samples


@dataclass
class SampleInputs:
    """What the thinker's language model gets for one sample (batch 1): the expanded prompt
    ``ids`` [L], ``embeds`` [L, hidden] float32 (token embeddings with the encoder rows merged)
    and TMRoPE ``positions`` [3, L] int64."""

    ids: np.ndarray
    embeds: np.ndarray
    positions: np.ndarray


@dataclass
class MediaCalibration:
    """The calibration batch: ``hidden`` [samples, seq, hidden] float32, ``positions`` [3, samples,
    seq] int64 (per block, shifted to start at 0) and ``counts`` for the build info."""

    hidden: np.ndarray
    positions: np.ndarray
    counts: dict = field(default_factory=dict)


def counts_line(counts: dict) -> str:
    """One line for the build output, e.g. ``calibration index.jsonl: 3 of 5 samples used, 2 skipped
    (without image: 2), 0 unused, 512 tokens``."""
    skipped = counts["skipped"]
    reasons = ", ".join(f"without {kind}: {n}" for kind, n in skipped["without"].items())
    text = (f"calibration {counts['index']}: {counts['used']} of {counts['samples']} samples used, "
            f"{skipped['total']} skipped" + (f" ({reasons})" if reasons else "")
            + f", {counts['unused']} unused, {counts['tokens']} tokens")
    return text + (" (repeated to fill the blocks)" if counts["repeated"] else "")


class SamplePreparer:
    """Turns index samples into :class:`SampleInputs` for one checkpoint (towers loaded on first use)."""

    def __init__(self, ckpt, embedding: np.ndarray, use_audio_in_video: bool = True):
        from tokenizers import Tokenizer

        from omni_runtime.prompt.chat import ChatTemplate
        from omni_runtime.prompt.multimodal import MediaTokens
        from omni_runtime.prompt.rope import RopeConfig

        from omni_export.checkpoint.info import chat_template, special_tokens

        self.ckpt = ckpt
        self.embedding = embedding
        self.use_audio_in_video = use_audio_in_video
        self.template = ChatTemplate(chat_template(ckpt))
        self.tokenizer = Tokenizer.from_file(os.fspath(ckpt.root / "tokenizer.json"))
        special = special_tokens(ckpt)
        self.tokens = MediaTokens.from_manifest(special)
        thinker = ckpt.config.thinker_config
        self.rope = RopeConfig(image_token_id=special["image"], video_token_id=special["video"],
                               audio_token_id=special["audio"], vision_start_token_id=special["vision_bos"],
                               audio_start_token_id=special["audio_bos"],
                               spatial_merge_size=int(thinker.vision_config.spatial_merge_size),
                               position_id_per_seconds=int(thinker.position_id_per_seconds),
                               seconds_per_chunk=int(thinker.seconds_per_chunk))
        self._audio_config = self._vision_config = None
        self._audio_tower = self._visual = None

    # -- the checkpoint's media settings and towers (as the bundle's config blocks say them) -----
    def audio_config(self):
        if self._audio_config is None:
            from omni_runtime.bundle.config import AudioConfig

            from omni_export.modules.audio import AudioModule

            self._audio_config = AudioConfig.from_manifest(AudioModule.reference(self.ckpt).config())
        return self._audio_config

    def vision_config(self):
        if self._vision_config is None:
            from omni_runtime.bundle.config import VisionConfig

            from omni_export.modules.vision import VisionModule

            self._vision_config = VisionConfig.from_manifest(VisionModule.reference(self.ckpt).config())
        return self._vision_config

    def audio_rows(self, features: list[np.ndarray]) -> np.ndarray:
        """transformers' audio tower on each log-mel [mels, frames], as ``get_audio_features`` calls it."""
        import torch
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

        from omni_export.modules.audio import AudioModule
        from omni_export.verify.reference import reference_module

        if self._audio_tower is None:
            self._audio_tower = reference_module(self.ckpt, Qwen2_5OmniAudioEncoder,
                                                 self.ckpt.config.thinker_config.audio_config, AudioModule.prefixes)
        rows = []
        with torch.no_grad():
            for mel in features:
                lens = torch.tensor([mel.shape[1]])
                after_cnn, _ = self._audio_tower._get_feat_extract_output_lengths(lens)
                out = self._audio_tower(torch.from_numpy(np.ascontiguousarray(mel, np.float32)), feature_lens=lens,
                                        aftercnn_lens=after_cnn)
                rows.append(out.last_hidden_state.numpy())
        return np.concatenate(rows)

    def vision_rows(self, inputs) -> np.ndarray:
        """transformers' vision tower (with its merger) on each image / video's patches."""
        import torch
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniVisionEncoder

        from omni_export.modules.vision import VisionModule
        from omni_export.verify.reference import reference_module

        if self._visual is None:
            self._visual = reference_module(self.ckpt, Qwen2_5OmniVisionEncoder,
                                            self.ckpt.config.thinker_config.vision_config, VisionModule.prefixes)
        with torch.no_grad():
            return np.concatenate([self._visual(torch.from_numpy(v.pixel_values),
                                                grid_thw=torch.tensor([v.grid_thw])).pooler_output.numpy()
                                   for v in inputs])

    def release(self) -> None:
        """Drop the towers (the decoder layers need the memory next)."""
        self._audio_tower = self._visual = None

    # -- one sample ------------------------------------------------------------------------------
    @staticmethod
    def messages(sample: IndexSample) -> list[dict]:
        """The user turn msModelSlim builds: the text alone, or text, image, audio, video parts."""
        kinds = [k for k in ("image", "audio", "video") if getattr(sample, k) is not None]
        if not kinds:
            return [{"role": "user", "content": sample.text}]
        content = [{"type": "text", "text": sample.text}]
        content += [{"type": kind, kind: os.fspath(getattr(sample, kind))} for kind in kinds]
        return [{"role": "user", "content": content}]

    def inputs(self, sample: IndexSample) -> SampleInputs:
        """The sample through the runtime's preparation and the PyTorch encoders."""
        from omni_runtime.prompt.chat import DEFAULT_SYSTEM_PROMPT
        from omni_runtime.prompt.media_prompt import media_items, normalize_messages, prepare_media, rope_inputs
        from omni_runtime.prompt.multimodal import expand_placeholders, merge_embeddings
        from omni_runtime.prompt.rope import rope_index

        checked = normalize_messages(self.messages(sample), None, DEFAULT_SYSTEM_PROMPT)
        text = self.template.render(checked, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        items = media_items(checked)
        if not items:
            ids = np.asarray(ids, np.int64)
            return SampleInputs(ids, self.embedding[ids], np.tile(np.arange(ids.size, dtype=np.int64), (3, 1)))
        kinds = {item.kind for item in items}
        use_track = self.use_audio_in_video and "video" in kinds
        audio_config = self.audio_config() if "audio" in kinds or use_track else None
        vision_config = self.vision_config() if kinds & {"image", "video"} else None
        prepared = prepare_media(items, audio_config, vision_config, use_track)
        ids = np.asarray(expand_placeholders(ids, prepared.placeholders(), self.tokens,
                                             merge_size=prepared.merge_size,
                                             position_id_per_seconds=self.rope.position_id_per_seconds,
                                             seconds_per_chunk=self.rope.seconds_per_chunk), np.int64)
        features = {"audio": self.audio_rows(prepared.audio) if prepared.audio else None,
                    "image": self.vision_rows(prepared.images) if prepared.images else None,
                    "video": self.vision_rows(prepared.videos) if prepared.videos else None}
        embeds = merge_embeddings(ids, self.embedding[ids], self.tokens, **features)
        positions, _ = rope_index(ids[None], self.rope, **rope_inputs(prepared))
        return SampleInputs(ids, embeds, positions[:, 0, :])


def media_calibration(calibration, ckpt, embedding: np.ndarray) -> MediaCalibration:
    """The calibration batch of a recipe's index calibration (``calibration.index``), embedded with
    the thinker's token ``embedding`` table [vocab, hidden] of checkpoint ``ckpt``."""
    index = Path(calibration.file)
    # checked with the recipe already; read again (the index may have changed since)
    samples, used, skipped = index_samples(index, calibration.text, calibration.require)
    preparer = SamplePreparer(ckpt, embedding, calibration.use_audio_in_video)
    need = calibration.samples * calibration.sequence_length
    streams: list[SampleInputs] = []
    total = 0
    for sample in used:
        if total >= need:
            break
        try:
            streams.append(preparer.inputs(sample))
        except OmniError as exc:  # a media file the runtime refuses: name the sample, keep the fix
            where = f" ({exc.path})" if exc.path and exc.path != os.fspath(index) else ""
            fix = exc.fix or "fix or remove the sample"
            if exc.param == "use_audio_in_video":  # the runtime's fix names its API argument
                fix = "give the sample a video with an audio track, or set calibration.use_audio_in_video: false"
            raise CalibrationError(f"sample {sample.number}{where}: {exc.problem}", path=index, fix=fix) from None
        total += streams[-1].ids.size
    preparer.release()
    embeds, positions, repeated = _stream(streams, need)
    hidden = embeds.reshape(calibration.samples, calibration.sequence_length, -1)
    blocks = positions.reshape(3, calibration.samples, calibration.sequence_length)
    blocks = blocks - blocks.min(axis=(0, 2), keepdims=True)
    counts = {"index": index.name, "samples": len(samples), "used": len(streams),
              "skipped": {"total": len(samples) - len(used), "without": skipped},
              "unused": len(used) - len(streams), "tokens": total, "repeated": repeated,
              "media": {kind: sum(getattr(s, kind) is not None for s in used[:len(streams)])
                        for kind in ("image", "audio", "video")}}
    return MediaCalibration(np.ascontiguousarray(hidden, np.float32), np.ascontiguousarray(blocks), counts)


def _stream(streams: list[SampleInputs], need: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """The first ``need`` rows of the samples' streams one after the other (repeated from the first
    when short), positions continuing past each sample's largest: (embeds, positions [3, need], repeated)."""
    embeds, positions, have, offset, rounds = [], [], 0, 0, 0
    while have < need:
        rounds += 1
        for s in streams:
            take = min(s.ids.size, need - have)
            embeds.append(s.embeds[:take])
            positions.append(s.positions[:, :take] + offset)
            offset += int(s.positions.max()) + 1
            have += take
            if have >= need:
                break
    return np.concatenate(embeds), np.concatenate(positions, axis=1), rounds > 1
