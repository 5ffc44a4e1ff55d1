"""Multimodal prompts on the host: placeholder expansion and the embedding merge, in numpy.

The chat template renders one ``<|AUDIO|>``, ``<|IMAGE|>`` or ``<|VIDEO|>`` per media item.
``expand_placeholders`` repeats each to the number of features its encoder produces, as
``Qwen2_5OmniProcessor`` does (for a video with its audio track, the video's and the audio's
tokens interleave in ``seconds_per_chunk`` chunks between ``<|audio_bos|>`` and
``<|audio_eos|>``). ``merge_embeddings`` then puts the encoder rows at those positions, in
order, over the token embeddings (what the thinker does with ``masked_scatter``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from omni_runtime.errors import InputError


@dataclass(frozen=True)
class MediaTokens:
    """Special token ids used by the expansion and the merge (the manifest's special_tokens)."""

    audio: int
    image: int
    video: int
    audio_bos: int
    audio_eos: int

    @classmethod
    def from_manifest(cls, special: dict) -> "MediaTokens":
        return cls(special["audio"], special["image"], special["video"], special["audio_bos"], special["audio_eos"])


@dataclass
class Placeholders:
    """Feature counts per media item, in prompt order."""

    audio: list[int] = field(default_factory=list)          # tokens per standalone audio
    image: list[int] = field(default_factory=list)          # tokens per image
    video: list[np.ndarray] = field(default_factory=list)   # per video: grid_thw (t, h, w) in patches
    video_seconds: list[float] = field(default_factory=list)  # seconds per temporal grid step
    video_audio: list[int | None] = field(default_factory=list)  # audio tokens of each video's track (None: no audio)


def _chunk_bounds(indices: np.ndarray, per_chunk: int) -> list[tuple[int, int]]:
    out, start, chunk = [], 0, 1
    for i, value in enumerate(indices):
        if value >= chunk * per_chunk:
            out.append((start, i))
            start = i
            chunk += 1
    out.append((start, len(indices)))
    return out


def video_with_audio_ids(grid_thw, second_per_grid: float, audio_tokens: int, tokens: MediaTokens,
                         merge_size: int, position_id_per_seconds: float, seconds_per_chunk: float) -> list[int]:
    """``<|audio_bos|>`` + video and audio placeholders interleaved per chunk + ``<|audio_eos|>``."""
    t, h, w = (int(v) for v in grid_thw)
    per_frame = (h // merge_size) * (w // merge_size)
    video_t = np.repeat(np.arange(t), per_frame) * float(second_per_grid) * position_id_per_seconds
    per_chunk = int(position_id_per_seconds * seconds_per_chunk)
    video_chunks = _chunk_bounds(video_t, per_chunk)
    audio_chunks = _chunk_bounds(np.arange(audio_tokens), per_chunk)
    ids = [tokens.audio_bos]
    for j in range(max(len(video_chunks), len(audio_chunks))):
        if j < len(video_chunks):
            ids += [tokens.video] * (video_chunks[j][1] - video_chunks[j][0])
        if j < len(audio_chunks):
            ids += [tokens.audio] * (audio_chunks[j][1] - audio_chunks[j][0])
    return ids + [tokens.audio_eos]


def expand_placeholders(ids: list[int], counts: Placeholders, tokens: MediaTokens, merge_size: int = 2,
                        position_id_per_seconds: float = 25, seconds_per_chunk: float = 2.0) -> list[int]:
    """Repeat each single media placeholder of ``ids`` to its feature count (processor rules)."""
    want = {"audio": len(counts.audio), "image": len(counts.image), "video": len(counts.video)}
    have = {"audio": ids.count(tokens.audio), "image": ids.count(tokens.image), "video": ids.count(tokens.video)}
    for kind in want:
        if want[kind] != have[kind]:
            raise InputError(f"the prompt has {have[kind]} {kind} placeholder(s) but {want[kind]} {kind} input(s) "
                             "were given", fix=f"pass one {kind} per <|{kind.upper()}|> placeholder")
    out: list[int] = []
    index = {"audio": 0, "image": 0, "video": 0}
    for token in ids:
        if token == tokens.audio:
            out += [tokens.audio] * int(counts.audio[index["audio"]])
            index["audio"] += 1
        elif token == tokens.image:
            out += [tokens.image] * int(counts.image[index["image"]])
            index["image"] += 1
        elif token == tokens.video:
            i = index["video"]
            grid = counts.video[i]
            audio = counts.video_audio[i] if i < len(counts.video_audio) else None
            if audio is None:
                out += [tokens.video] * (int(np.prod(grid)) // merge_size ** 2)
            else:
                out += video_with_audio_ids(grid, counts.video_seconds[i], audio, tokens, merge_size,
                                            position_id_per_seconds, seconds_per_chunk)
            index["video"] += 1
        else:
            out.append(token)
    return out


def merge_embeddings(ids: list[int] | np.ndarray, embeds: np.ndarray, tokens: MediaTokens,
                     audio: np.ndarray | None = None, image: np.ndarray | None = None,
                     video: np.ndarray | None = None) -> np.ndarray:
    """``embeds [seq, hidden]`` with the encoder rows written at their placeholder positions, in order.

    ``audio``, ``image`` and ``video`` are the concatenated encoder outputs ``[rows, hidden]`` of
    all items of that modality (a video's audio track belongs to ``audio``). A row count that
    differs from the placeholder count is an InputError.
    """
    ids = np.asarray(ids)
    out = np.array(embeds, dtype=np.float32, copy=True)
    for name, token, features in (("audio", tokens.audio, audio), ("image", tokens.image, image),
                                  ("video", tokens.video, video)):
        positions = np.flatnonzero(ids == token)
        rows = 0 if features is None else features.shape[0]
        if rows != positions.size:
            raise InputError(f"{positions.size} <|{name.upper()}|> placeholder(s) in the prompt but the {name} "
                             f"encoder produced {rows} feature row(s)",
                             fix=f"give exactly one {name} input per placeholder, or let the runtime expand them")
        if rows:
            if features.shape[1] != out.shape[1]:
                raise InputError(f"{name} features have width {features.shape[1]}, the thinker expects {out.shape[1]}",
                                 fix="the encoder and the thinker come from different bundles: rebuild the bundle")
            out[positions] = features
    return out
