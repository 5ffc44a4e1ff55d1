"""AWQ against int4 RTN on outlier thinkers no AWQ setting was tuned on, across group sizes.

Each model is a tiny checkpoint with planted outliers (``omni_export.testkit.outliers``: outlier
hidden channels in embedding columns and RMSNorm weights, massive up_proj / v_proj rows) at
hidden sizes 96 (one 128-group spans a whole column), 128 and 160, seed 31 (not a seed any AWQ
setting was chosen on). The error is the thinker decoder's rel_rms against float32 as verify
computes it (``testkit.decoder_error``, equal to ``verify --json`` to 1e-7, with the CPU
runtime's int8 activation compute of MatMulNBits accuracy level 4), on 256 held-out token
embeddings (random vocabulary ids: what the decoder sees, outlier columns included).

Measured: ratios 0.38-0.55 (this test; benchmarks/awq_study.py, results/2026-12-06/awq_study.json).
On verify's own 16-token isotropic random prefill, which has no outlier columns, the same models
give 0.58-1.17: that figure is not met yet (issue 14, item 5).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from omni_export.build.recipes import load_recipe

WIDTHS = (96, 128, 160)
GROUPS = (32, 64, 128)
SEED = 31
#: AWQ's decoder error at most this share of RTN's (issue 14)
RATIO = 0.6


def recipe(name: str, group: int):
    r = load_recipe(name)
    thinker = dataclasses.replace(r.modules["thinker"], group_size=group)
    return dataclasses.replace(r, modules={**r.modules, "thinker": thinker})


@pytest.fixture(scope="module", params=WIDTHS, ids=lambda w: f"hidden{w}")
def outlier_model(request, tmp_path_factory):
    from omni_export.checkpoint.reader import Checkpoint
    from omni_export.modules.thinker import ThinkerModule
    from omni_export.testkit.outliers import OutlierSpec
    from omni_export.testkit.tiny_model import write_tiny_checkpoint

    path = tmp_path_factory.mktemp(f"outliers{request.param}") / "model"
    write_tiny_checkpoint(path, seed=SEED, hidden=request.param, outliers=OutlierSpec())
    ckpt = Checkpoint.open(path)
    table = ThinkerModule.reference(ckpt).weights().embedding()
    ids = np.random.default_rng(7).choice(table.shape[0], 256, replace=False)
    return ckpt, table[ids].reshape(4, 64, -1)


@pytest.mark.parametrize("group", GROUPS)
def test_awq_at_most_0_6_of_rtn(outlier_model, group):
    from omni_export.testkit.decoder_error import decoder_error

    ckpt, inputs = outlier_model
    rtn = decoder_error(ckpt, recipe("int4-rtn", group), inputs=inputs)["rel_rms"]
    awq = decoder_error(ckpt, recipe("awq", group), inputs=inputs)["rel_rms"]
    print(f"hidden {ckpt.text_config().hidden_size} group {group}: awq {awq:.4f} rtn {rtn:.4f} ratio {awq / rtn:.3f}")
    assert rtn > 0.05  # the outliers make int4 RTN visibly wrong: the ratio means something
    assert awq <= RATIO * rtn
