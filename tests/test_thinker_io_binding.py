"""The IO-binding decode loop (selected on CUDA) gives the same ids as the numpy-feed loop.

Tested on CPU by the same logic: forcing io_binding binds the K/V cache to the CPU device.
"""

import numpy as np

from omni_runtime.manifest import load_manifest
from omni_runtime.sampling import SamplingConfig
from omni_runtime.sessions import SessionPool
from omni_runtime.thinker import BoundDecoder, FeedDecoder, ThinkerGenerator


def test_io_binding_selected_for_cuda_only(tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    cuda = ThinkerGenerator(manifest, SessionPool(manifest, ["CUDAExecutionProvider", "CPUExecutionProvider"]))
    cpu = ThinkerGenerator(manifest, SessionPool(manifest, ["CPUExecutionProvider"]))
    assert cuda.io_binding and not cpu.io_binding


def test_io_binding_matches_feeds(tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    pool = SessionPool(manifest, ["CPUExecutionProvider"])
    prompts = [[151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198], [151644, 9707, 198]]
    plain = ThinkerGenerator(manifest, pool, io_binding=False)
    bound = ThinkerGenerator(manifest, pool, io_binding=True)
    assert isinstance(plain._decoder(), FeedDecoder) and isinstance(bound._decoder(), BoundDecoder)
    for sampling, seed in ((SamplingConfig(), None), (SamplingConfig(do_sample=True, top_k=20, top_p=0.9), 7)):
        a = plain.generate(prompts, 12, sampling, seed=seed)
        b = bound.generate(prompts, 12, sampling, seed=seed)
        assert a.token_ids == b.token_ids
        assert all(len(row) >= 1 for row in a.token_ids)
    assert np.all([len(r) <= 12 for r in a.token_ids])
