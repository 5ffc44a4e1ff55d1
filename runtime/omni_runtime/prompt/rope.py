"""Host-side TMRoPE position ids (temporal, height, width axes) and rope deltas, in numpy.

All data-dependent index preparation for the thinker lives here; the decoder graph takes
``position_ids [3, batch, sequence]`` as an input. The rules are transformers'
``Qwen2_5OmniPreTrainedModelForConditionalGeneration.get_rope_index``:

- text tokens advance all three axes together;
- an image's tokens sit on a (t, h, w) grid after ``merge_size`` pooling: t is 0, h and w are
  row and column, all offset by the position after the preceding token;
- a video's t index is ``frame_group * second_per_grid * position_id_per_seconds`` (truncated);
- audio tokens advance like text (25 per second);
- with ``use_audio_in_video`` the video's and its audio's tokens are interleaved in chunks of
  ``seconds_per_chunk`` seconds (``position_id_per_seconds * seconds_per_chunk`` t-positions);
- after the prompt, decode positions continue at ``cache length + rope_delta`` on all axes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RopeConfig:
    """The constants and token ids ``rope_index`` needs (the manifest's ``config.thinker`` has them)."""

    image_token_id: int
    video_token_id: int
    audio_token_id: int
    vision_start_token_id: int
    audio_start_token_id: int
    spatial_merge_size: int = 2
    position_id_per_seconds: int = 25
    seconds_per_chunk: int = 2


def text_position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """Positions for a left-padded text prompt, as transformers' ``get_rope_index`` computes them.

    ``attention_mask`` is ``[batch, sequence]`` (1 = token, 0 = padding). Returns
    ``[3, batch, sequence]`` int64: ``cumsum(mask) - 1`` per row, padding set to 1.
    """
    mask = np.asarray(attention_mask, dtype=np.int64)
    positions = np.cumsum(mask, axis=-1) - 1
    positions = np.where(mask == 0, 1, positions)
    return np.broadcast_to(positions[None], (3, *positions.shape)).astype(np.int64, copy=True)


def next_position_ids(last_positions: np.ndarray, steps: int = 1) -> np.ndarray:
    """Positions of the next ``steps`` tokens after each row's ``last_positions [3, batch]``."""
    last = np.asarray(last_positions, dtype=np.int64)
    offsets = np.arange(1, steps + 1, dtype=np.int64)
    return (last[..., None] + offsets).astype(np.int64)


def audio_output_length(feature_length: int) -> int:
    """Audio tokens the encoder makes from ``feature_length`` mel frames (25 per second)."""
    return ((int(feature_length) - 1) // 2 + 1 - 2) // 2 + 1


def _span(length: int, start: int) -> np.ndarray:
    return np.broadcast_to(np.arange(length, dtype=np.int64), (3, length)) + start


def _vision_positions(start: int, grid_thw, merge: int, t_index: np.ndarray) -> np.ndarray:
    grid_h, grid_w = int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
    t = np.repeat(t_index.astype(np.int64), grid_h * grid_w)
    h = np.tile(np.repeat(np.arange(grid_h, dtype=np.int64), grid_w), len(t_index))
    w = np.tile(np.arange(grid_w, dtype=np.int64), len(t_index) * grid_h)
    return np.stack([t, h, w]) + start


def _chunks(t_positions: np.ndarray, per_chunk: int, offset: int) -> list[tuple[int, int]]:
    """(start, end) slices of ``t_positions`` whose values fall in successive windows of ``per_chunk``."""
    out, start, chunk = [], 0, 1
    for i, value in enumerate(t_positions):
        if value - offset >= chunk * per_chunk:
            out.append((start, i))
            start = i
            chunk += 1
    out.append((start, len(t_positions)))
    return out


def _video_t_index(grid_t: int, second_per_grid: float, per_second: int) -> np.ndarray:
    # float32 as transformers computes it, then truncated toward zero (torch .long()).
    values = np.arange(grid_t, dtype=np.float32) * np.float32(second_per_grid) * np.float32(per_second)
    return np.trunc(values).astype(np.int64)


def _row_positions(tokens: list[int], cfg: RopeConfig, images, videos, audios, seconds, use_audio_in_video,
                   counters: dict) -> np.ndarray:
    parts: list[np.ndarray] = []

    def next_start() -> int:
        return int(parts[-1].max()) + 1 if parts else 0

    starts = [i for i, t in enumerate(tokens) if t == cfg.vision_start_token_id and i + 1 < len(tokens)]
    after_vision = [tokens[i + 1] for i in starts]
    audio_count = sum(1 for t in tokens if t == cfg.audio_start_token_id)
    image_count = sum(1 for t in after_vision if t == cfg.image_token_id)
    video_count = sum(1 for t in after_vision if t == (cfg.audio_start_token_id if use_audio_in_video
                                                         else cfg.video_token_id))
    remain = {"image": image_count, "video": video_count, "audio": audio_count}
    total = image_count + audio_count + (0 if use_audio_in_video else video_count)
    st = 0
    end = len(tokens) + 1

    def find(token: int, kind: str) -> int:
        if remain[kind] > 0 and token in tokens[st:]:
            return tokens.index(token, st)
        return end

    for _ in range(total):
        ed_image, ed_video, ed_audio = (find(cfg.image_token_id, "image"), find(cfg.video_token_id, "video"),
                                        find(cfg.audio_token_id, "audio"))
        first = min(ed_image, ed_video, ed_audio)
        if first == ed_audio:
            text = first - st - 1
            if text:
                parts.append(_span(text, next_start()))
            parts.append(_span(1, next_start()))
            length = audio_output_length(audios[counters["audio"]])
            parts.append(_span(length, next_start()))
            parts.append(_span(1, next_start()))
            st += text + 2 + length
            counters["audio"] += 1
            remain["audio"] -= 1
        elif first == ed_image:
            text = first - st - 1
            if text:
                parts.append(_span(text, next_start()))
            parts.append(_span(1, next_start()))
            grid = images[counters["image"]]
            t_index = np.arange(int(grid[0]), dtype=np.int64) * cfg.position_id_per_seconds
            parts.append(_vision_positions(next_start(), grid, cfg.spatial_merge_size, t_index))
            parts.append(_span(1, next_start()))
            st += text + 2 + int(np.prod(grid)) // cfg.spatial_merge_size ** 2
            counters["image"] += 1
            remain["image"] -= 1
        elif not use_audio_in_video:
            text = first - st - 1
            if text:
                parts.append(_span(text, next_start()))
            parts.append(_span(1, next_start()))
            grid = videos[counters["video"]]
            t_index = _video_t_index(int(grid[0]), seconds[counters["video"]], cfg.position_id_per_seconds)
            parts.append(_vision_positions(next_start(), grid, cfg.spatial_merge_size, t_index))
            parts.append(_span(1, next_start()))
            st += text + 2 + int(np.prod(grid)) // cfg.spatial_merge_size ** 2
            counters["video"] += 1
            remain["video"] -= 1
        else:  # video with its audio track, interleaved in chunks of seconds_per_chunk
            text = first - st - 2
            if text:
                parts.append(_span(text, next_start()))
            start = next_start()
            parts += [_span(1, start), _span(1, start)]
            start = next_start()
            length = audio_output_length(audios[counters["audio"]])
            audio_pos = _span(length, start)
            grid = videos[counters["video"]]
            t_index = _video_t_index(int(grid[0]), seconds[counters["video"]], cfg.position_id_per_seconds)
            video_pos = _vision_positions(start, grid, cfg.spatial_merge_size, t_index)
            per_chunk = int(cfg.position_id_per_seconds * cfg.seconds_per_chunk)
            video_chunks = _chunks(video_pos[0], per_chunk, start)
            audio_chunks = _chunks(audio_pos[0], per_chunk, start)
            for j in range(max(len(video_chunks), len(audio_chunks))):
                if j < len(video_chunks):
                    parts.append(video_pos[:, video_chunks[j][0]:video_chunks[j][1]])
                if j < len(audio_chunks):
                    parts.append(audio_pos[:, audio_chunks[j][0]:audio_chunks[j][1]])
            start = next_start()
            parts += [_span(1, start), _span(1, start)]
            st += text + 4 + length + int(np.prod(grid)) // cfg.spatial_merge_size ** 2
            counters["audio"] += 1
            counters["video"] += 1
            remain["video"] -= 1
            remain["audio"] -= 1
    if st < len(tokens):
        parts.append(_span(len(tokens) - st, next_start()))
    return np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), dtype=np.int64)


def rope_index(
    input_ids: np.ndarray,
    cfg: RopeConfig,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
    use_audio_in_video: bool = False,
    audio_seqlens: np.ndarray | None = None,
    second_per_grids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """TMRoPE ``(position_ids [3, batch, seq] int64, rope_deltas [batch, 1] int64)``.

    ``audio_seqlens`` are mel-frame counts per audio (the encoder's input lengths), in prompt
    order, as are the image and video grids (``[n, 3]``: t, h, w in patches) and the videos'
    seconds per temporal grid step. Padding (``attention_mask`` 0) gets position 1.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    if image_grid_thw is None and video_grid_thw is None:  # text (and audio): plain positions
        positions = text_position_ids(mask)
        deltas = positions.max(axis=0).max(axis=-1, keepdims=True) + 1 - mask.sum(axis=-1, keepdims=True)
        return positions, deltas.astype(np.int64)
    images = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64)
    videos = np.zeros((0, 3), np.int64) if video_grid_thw is None else np.asarray(video_grid_thw, np.int64)
    audios = np.zeros(0, np.int64) if audio_seqlens is None else np.asarray(audio_seqlens, np.int64)
    seconds = np.zeros(0, np.float32) if second_per_grids is None else np.asarray(second_per_grids, np.float32)
    positions = np.ones((3, *ids.shape), dtype=np.int64)
    deltas = np.zeros((ids.shape[0], 1), dtype=np.int64)
    counters = {"image": 0, "video": 0, "audio": 0}
    for row in range(ids.shape[0]):
        valid = mask[row] == 1
        tokens = ids[row][valid].tolist()
        row_pos = _row_positions(tokens, cfg, images, videos, audios, seconds, use_audio_in_video, counters)
        positions[:, row, valid] = row_pos
        deltas[row, 0] = int(row_pos.max()) + 1 - len(tokens)
    return positions, deltas
