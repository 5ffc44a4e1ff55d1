"""TMRoPE position ids and rope deltas (omni_runtime.prompt.rope) against transformers' get_rope_index.

The reference is ``Qwen2_5OmniThinkerForConditionalGeneration.get_rope_index`` of the tiny
model; equality is exact (positions are integers). A seeded property test draws random
prompts mixing text, images, videos, audios and videos with their audio
(``use_audio_in_video``), in batches with left padding.
"""

import numpy as np
import pytest
import torch

from omni_runtime.prompt.rope import RopeConfig, rope_index, text_position_ids

IDS = dict(image=151655, video=151656, audio=151646, vision_bos=151652, vision_eos=151653,
           audio_bos=151647, audio_eos=151648)


@pytest.fixture(scope="module")
def cfg(reference_thinker):
    c = reference_thinker.config
    return RopeConfig(image_token_id=c.image_token_id, video_token_id=c.video_token_id,
                      audio_token_id=c.audio_token_id, vision_start_token_id=c.vision_start_token_id,
                      audio_start_token_id=c.audio_start_token_id,
                      spatial_merge_size=c.vision_config.spatial_merge_size,
                      position_id_per_seconds=c.position_id_per_seconds, seconds_per_chunk=c.seconds_per_chunk)


def audio_tokens(frames):
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def random_prompt(rng, merge, use_audio_in_video):
    """(tokens, image grids, video grids, audio frame counts, seconds per grid) in prompt order."""
    tokens, images, videos, audios, seconds = [], [], [], [], []
    for _ in range(rng.integers(1, 6)):
        kind = rng.choice(["text", "image", "video", "audio"])
        tokens += rng.integers(0, 151000, rng.integers(1, 6)).tolist()
        if kind == "image":
            grid = [1, 2 * merge * int(rng.integers(1, 4)) // 2 * 1, merge * int(rng.integers(1, 5))]
            grid[1] = merge * int(rng.integers(1, 5))
            images.append(grid)
            tokens += [IDS["vision_bos"]] + [IDS["image"]] * (np.prod(grid) // merge ** 2) + [IDS["vision_eos"]]
        elif kind == "video":
            grid = [int(rng.integers(1, 6)), merge * int(rng.integers(1, 4)), merge * int(rng.integers(1, 4))]
            videos.append(grid)
            seconds.append(float(rng.choice([0.5, 1.0, 2.0 / 3.0, 1.7])))
            n_video = np.prod(grid) // merge ** 2
            if use_audio_in_video:
                frames = int(rng.integers(20, 900))
                audios.append(frames)
                tokens += ([IDS["vision_bos"], IDS["audio_bos"]] + [IDS["video"]] * n_video
                           + [IDS["audio"]] * audio_tokens(frames) + [IDS["audio_eos"], IDS["vision_eos"]])
            else:
                tokens += [IDS["vision_bos"]] + [IDS["video"]] * n_video + [IDS["vision_eos"]]
        elif kind == "audio":
            frames = int(rng.integers(10, 900))
            audios.append(frames)
            tokens += [IDS["audio_bos"]] + [IDS["audio"]] * audio_tokens(frames) + [IDS["audio_eos"]]
    tokens += rng.integers(0, 151000, rng.integers(0, 4)).tolist()
    return tokens, images, videos, audios, seconds


def as_tensor(x, dtype=torch.long):
    return torch.tensor(x, dtype=dtype) if len(x) else None


@pytest.mark.parametrize("seed", range(40))
def test_rope_index_matches_transformers(reference_thinker, cfg, seed):
    rng = np.random.default_rng(seed)
    use_audio_in_video = bool(seed % 3 == 0)
    rows = [random_prompt(rng, cfg.spatial_merge_size, use_audio_in_video) for _ in range(1 + seed % 2)]
    width = max(len(r[0]) for r in rows)
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r[0]):] = r[0]
        mask[i, width - len(r[0]):] = 1
    images = sum((r[1] for r in rows), [])
    videos = sum((r[2] for r in rows), [])
    audios = sum((r[3] for r in rows), [])
    seconds = sum((r[4] for r in rows), [])
    ref_pos, ref_delta = reference_thinker.get_rope_index(
        torch.from_numpy(ids), as_tensor(images), as_tensor(videos), torch.from_numpy(mask),
        use_audio_in_video, as_tensor(audios), as_tensor(seconds, torch.float32))
    pos, delta = rope_index(ids, cfg, np.array(images) if images else None, np.array(videos) if videos else None,
                            mask, use_audio_in_video, np.array(audios) if audios else None,
                            np.array(seconds) if seconds else None)
    assert pos.dtype == np.int64 and pos.shape == (3, *ids.shape)
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy().reshape(-1, 1))


def test_text_positions_match_transformers(reference_thinker):
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    ids = np.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    ref_pos, ref_delta = reference_thinker.get_rope_index(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    np.testing.assert_array_equal(text_position_ids(mask), ref_pos.numpy())
