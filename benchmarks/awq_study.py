"""AWQ's gain over int4 RTN on outlier thinkers it was not tuned on, and SmoothQuant's alpha for W8A8.

Each model is a tiny random checkpoint with planted outliers (``omni_export.testkit.outliers``:
outlier hidden channels in embedding columns and RMSNorm weights, massive up_proj / v_proj rows)
at a given width and seed. The error is verify's ``thinker_decoder`` ``rel_rms``
(``omni_export.testkit.decoder_error``, equal to ``verify --json``: tests/test_awq_sweep.py) on
three inputs (``_inputs``): verify's own, 256 other token embeddings, and the isotropic noise
verify used before, which has none of the embedding table's outlier columns (``--noise``: also
noise with those columns put back). docs/awq.md has the results. AWQ variants (``--variants``)
patch ``AwqConfig`` fields or the calibration size. The alpha sweep builds W8A8 (per token) with
``smooth_alpha`` in ALPHAS on the same models.

    PYTHONPATH=$PWD:$PWD/runtime python benchmarks/awq_study.py --widths 96 --seeds 31 --groups 32,64,128
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

ALPHAS = (0.0, 0.25, 0.5, 0.65, 0.8, 1.0)
#: name -> (AwqConfig overrides, (samples, sequence_length) or None)
VARIANTS = {
    "base": ({}, None),
    "grid20": ({"grid": 20}, None),
    "noduo": ({"duo_scaling": False}, None),
    "noclip": ({"clip": False}, None),
    "cal8x128": ({}, (8, 128)),
    "cal16x256": ({}, (16, 256)),
}
#: planted outliers: the testkit's default, fewer and stronger, more and milder
OUTLIERS = {
    "default": {},
    "strong": {"channels": 2, "embed_gain": 8.0, "norm_gain": 32.0, "massive_rows": 2, "row_gain": 32.0},
    "mild": {"channels": 8, "embed_gain": 2.0, "norm_gain": 8.0, "massive_rows": 8, "row_gain": 8.0},
}
OUT = Path(__file__).parent / "results" / "2026-12-06" / "awq_study.json"


def _recipe(name: str, group: int | None = None, calibration=None, alpha=None):
    from omni_export.build.recipes import load_recipe

    r = load_recipe(name)
    changes = {}
    if group is not None:
        changes["group_size"] = group
    if alpha is not None:
        changes["smooth_alpha"] = alpha
    cal = r.calibration
    if calibration is not None and cal is not None:
        cal = dataclasses.replace(cal, samples=calibration[0], sequence_length=calibration[1])
    return dataclasses.replace(r, calibration=cal,
                               modules={**r.modules, "thinker": dataclasses.replace(r.modules["thinker"], **changes)})


def _patched_awq(overrides: dict):
    """``omni_export.quant.awq.AwqConfig`` with ``overrides`` (the thinker builds its config from it)."""
    import omni_export.quant.awq as awq

    base = awq.AwqConfig

    class Patched(base):
        def __init__(self, *args, **kwargs):  # the dataclass __init__ calls no subclass __post_init__
            super().__init__(*args, **kwargs)
            for key, value in overrides.items():
                setattr(self, key, value)

    return base, Patched


def _inputs(ckpt, noise: bool = False, spec=None, seed: int = 0):
    """The decoder inputs each error is measured on: verify's (``decoder_sample``: the token
    embeddings of its 128 seeded random ids), 256 other token embeddings (4 x 64), and verify's
    input up to dcbed96 (16 tokens of isotropic noise at the table's std, no outlier columns).
    ``noise``: also 128 tokens of noise at the std of the table's ordinary columns, without and
    with the planted outlier columns (``spec``, ``seed``) scaled by their embedding gain."""
    from omni_export.modules.thinker import ThinkerModule
    from omni_export.testkit.outliers import outlier_channels
    from omni_export.verify.context import EMBEDDING_SAMPLES, SEED

    table = ThinkerModule.reference(ckpt).weights().embedding()
    ids = np.random.default_rng(7).choice(table.shape[0], 256, replace=False)
    rng = np.random.default_rng(SEED)  # verify's former draw: its embedding sample ids, then the noise
    rng.choice(table.shape[0], EMBEDDING_SAMPLES - 2, replace=False)
    noise16 = rng.standard_normal((1, 16, table.shape[1])) * table.std()
    inputs = {"verify": None, "tokens256": table[ids].reshape(4, 64, -1), "noise16": noise16.astype(np.float32)}
    if noise:
        channels = outlier_channels(table.shape[1], seed, spec)
        ordinary = np.setdiff1d(np.arange(table.shape[1]), channels)
        plain = np.random.default_rng(SEED).standard_normal((1, 128, table.shape[1])) * table[:, ordinary].std()
        columns = plain.copy()
        columns[..., channels] *= spec.embed_gain
        inputs.update(noise128=plain.astype(np.float32), noise128_columns=columns.astype(np.float32))
    return inputs


def _summary(rows: list[dict]) -> dict:
    """(outliers, variant, ratio key) -> (mean, min, max, count) of AWQ / RTN over widths, seeds, groups."""
    out = {}
    for key in sorted({k for r in rows for k in r if k.startswith("ratio_")}):
        for kind, variant in sorted({(r["outliers"], r["variant"]) for r in rows}):
            values = [r[key] for r in rows if (r["outliers"], r["variant"]) == (kind, variant)]
            out[(kind, variant, key)] = (float(np.mean(values)), min(values), max(values), len(values))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="96,128,192")
    p.add_argument("--seeds", default="31")
    p.add_argument("--groups", default="32,64,128")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--outliers", default="default", help=f"comma-separated, of {', '.join(OUTLIERS)}")
    p.add_argument("--alpha", action="store_true", help="also the W8A8 smoothing alpha sweep")
    p.add_argument("--noise", action="store_true", help="also 128 tokens of noise without / with the outlier columns")
    p.add_argument("--work", default="/tmp/awq/study")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)

    import omni_export.quant.awq as awq
    from omni_export.checkpoint.reader import Checkpoint
    from omni_export.testkit.decoder_error import decoder_error
    from omni_export.testkit.outliers import OutlierSpec
    from omni_export.testkit.tiny_model import write_tiny_checkpoint

    rows, alpha_rows = [], []
    models = [(k, w, s) for k in a.outliers.split(",") for w in map(int, a.widths.split(",")) for s in map(int, a.seeds.split(","))]
    for kind, width, seed in models:  # one checkpoint per (outliers, width, seed)
        spec = OutlierSpec(**OUTLIERS[kind])
        path = Path(a.work) / f"{kind}-h{width}-s{seed}"
        if not path.exists():
            write_tiny_checkpoint(path, seed=seed, hidden=width, outliers=spec)
        ckpt = Checkpoint.open(path)
        inputs = _inputs(ckpt, a.noise, spec, seed)
        for group in map(int, a.groups.split(",")):
            rtn = {k: decoder_error(ckpt, _recipe("int4-rtn", group), inputs=x)["rel_rms"] for k, x in inputs.items()}
            for variant in a.variants.split(","):
                overrides, cal = VARIANTS[variant]
                base, patched = _patched_awq(overrides)
                awq.AwqConfig = patched
                try:
                    err = {k: decoder_error(ckpt, _recipe("awq", group, cal), inputs=x)["rel_rms"]
                           for k, x in inputs.items()}
                finally:
                    awq.AwqConfig = base
                row = {"outliers": kind, "width": width, "seed": seed, "group": group, "variant": variant,
                       **{f"rtn_{k}": v for k, v in rtn.items()}, **{f"awq_{k}": v for k, v in err.items()},
                       **{f"ratio_{k}": err[k] / rtn[k] for k in err}}
                rows.append(row)
                print(f"{kind:8s} h{width:4d} s{seed:3d} g{group:4d} {variant:10s} " + "  ".join(
                    f"{k} {err[k]:.4f}/{rtn[k]:.4f}={err[k] / rtn[k]:.3f}" for k in err), flush=True)
        if a.alpha:
            for alpha in ALPHAS:
                err = {k: decoder_error(ckpt, _recipe("w8a8", alpha=alpha), inputs=x)["rel_rms"]
                       for k, x in inputs.items()}
                alpha_rows.append({"outliers": kind, "width": width, "seed": seed, "alpha": alpha, **err})
                print(f"{kind:8s} h{width:4d} s{seed:3d} w8a8 alpha {alpha:.2f} " + "  ".join(f"{k} {v:.4f}" for k, v in err.items()),
                      flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = _summary(rows)
    for (kind, variant, key), (mean, lo, hi, n) in summary.items():
        print(f"{kind:8s} {variant:10s} {key:16s} mean {mean:.3f} range {lo:.3f}-{hi:.3f} ({n} models x groups)")
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:],
                               "outliers": {k: OutlierSpec(**v).to_json() for k, v in OUTLIERS.items()},
                               "summary": [{"outliers": k, "variant": v, "input": i, "mean": m, "min": lo, "max": hi,
                                            "count": n} for (k, v, i), (m, lo, hi, n) in summary.items()],
                               "variants": {k: {"awq": v[0], "calibration": v[1]} for k, v in VARIANTS.items()},
                               "awq": rows, "w8a8_alpha": alpha_rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
