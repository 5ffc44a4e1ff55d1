"""thinker_embedding.onnx against transformers' thinker input embeddings (fp32, tolerance 1e-4)."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def session(tiny_bundle):
    return ort.InferenceSession(str(tiny_bundle / "thinker_embedding.onnx"), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch,sequence", [(1, 1), (1, 7), (2, 5), (3, 300)])
def test_embedding_matches_transformers(session, reference_thinker, batch, sequence):
    rng = np.random.default_rng(batch * 1000 + sequence)
    vocab = reference_thinker.config.text_config.vocab_size
    ids = rng.integers(0, vocab, size=(batch, sequence), dtype=np.int64)
    ids[0, 0] = 151644  # <|im_start|>: special ids are real rows of the table
    (ours,) = session.run(None, {"input_ids": ids})
    with torch.no_grad():
        ref = reference_thinker.get_input_embeddings()(torch.from_numpy(ids)).numpy()
    assert ours.shape == (batch, sequence, reference_thinker.config.text_config.hidden_size)
    assert np.abs(ours - ref).max() <= TOLERANCE
