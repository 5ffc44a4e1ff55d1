"""Placeholder expansion and embedding merge (omni_runtime.prompt.multimodal) against transformers.

- A video with its audio track: the interleaved placeholder sequence equals
  ``Qwen2_5OmniProcessor.replace_video_with_audio_token`` (tokenized) for random grids,
  frame spacings and audio lengths.
- The merge equals the thinker's ``masked_scatter`` of encoder rows into the embeddings.
- Count mismatches are InputErrors naming the modality.
"""

import numpy as np
import pytest
import torch

from omni_runtime.errors import InputError
from omni_runtime.prompt.multimodal import MediaTokens, Placeholders, expand_placeholders, merge_embeddings

TOKENS = MediaTokens(audio=151646, image=151655, video=151656, audio_bos=151647, audio_eos=151648)


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    from transformers import Qwen2_5OmniProcessor

    return Qwen2_5OmniProcessor.from_pretrained(tiny_checkpoint)


@pytest.mark.parametrize("seed", range(12))
def test_video_with_audio_matches_processor(processor, seed):
    rng = np.random.default_rng(seed)
    merge = processor.video_processor.merge_size
    grid = np.array([int(rng.integers(1, 12)), merge * int(rng.integers(1, 4)), merge * int(rng.integers(1, 4))])
    fps = float(rng.choice([2.0, 1.0, 0.7, 3.3]))
    seconds = processor.video_processor.temporal_patch_size / fps
    audio_tokens = int(rng.integers(1, 400))
    text = processor.replace_video_with_audio_token(
        {"video_grid_thw": [grid], "video_second_per_grid": [seconds]}, 0, {"num_audio_tokens": [audio_tokens]}, 0,
        position_id_per_seconds=25, seconds_per_chunk=2.0)
    expected = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = [1, 2, TOKENS.video, 3]
    counts = Placeholders(video=[grid], video_seconds=[seconds], video_audio=[audio_tokens])
    out = expand_placeholders(ids, counts, TOKENS, merge_size=merge)
    assert out == [1, 2, *expected, 3]


def test_expansion_counts_and_order():
    ids = [5, TOKENS.audio, 6, TOKENS.image, TOKENS.video, TOKENS.image]
    counts = Placeholders(audio=[3], image=[2, 4], video=[np.array([2, 4, 2])], video_seconds=[1.0],
                          video_audio=[None])
    out = expand_placeholders(ids, counts, TOKENS)
    assert out == [5, *[TOKENS.audio] * 3, 6, *[TOKENS.image] * 2, *[TOKENS.video] * 4, *[TOKENS.image] * 4]


def test_merge_matches_masked_scatter():
    rng = np.random.default_rng(0)
    ids = np.array([1, TOKENS.image, TOKENS.image, 2, TOKENS.audio, TOKENS.video, TOKENS.audio, 3])
    embeds = rng.standard_normal((len(ids), 8)).astype(np.float32)
    feats = {k: rng.standard_normal((int((ids == t).sum()), 8)).astype(np.float32)
             for k, t in (("audio", TOKENS.audio), ("image", TOKENS.image), ("video", TOKENS.video))}
    ours = merge_embeddings(ids, embeds, TOKENS, **feats)
    ref = torch.from_numpy(embeds.copy())
    for k, t in (("image", TOKENS.image), ("video", TOKENS.video), ("audio", TOKENS.audio)):
        mask = torch.from_numpy(ids == t)[:, None].expand_as(ref)
        ref = ref.masked_scatter(mask, torch.from_numpy(feats[k]))
    np.testing.assert_array_equal(ours, ref.numpy())


def test_mismatches_are_clear_errors():
    ids = [1, TOKENS.image, 2]
    with pytest.raises(InputError, match="1 <\\|IMAGE\\|> placeholder.*produced 2"):
        merge_embeddings(ids, np.zeros((3, 4), np.float32), TOKENS, image=np.zeros((2, 4), np.float32))
    with pytest.raises(InputError, match="1 image placeholder.*2 image input"):
        expand_placeholders(ids, Placeholders(image=[1, 1]), TOKENS)
    with pytest.raises(InputError, match="audio"):
        merge_embeddings([TOKENS.audio], np.zeros((1, 4), np.float32), TOKENS)
