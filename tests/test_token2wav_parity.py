"""``omni_runtime.stages.token2wav.Token2Wav`` (torch-free ODE loop and streaming) against torch references.

- ``waveform(solver="rk4")`` equals transformers' ``Qwen2_5OmniToken2WavModel(codes, conditioning,
  reference_mel)`` (RK4, 10 steps, guidance 0.5, sway -1) within 1e-3 on the waveform, for the same
  initial noise: the test draws it and hands the same array to the runtime (``noise=``) and to
  transformers (its ``torch.randn`` call returns it, ``token2wav_refs.given_noise``).
- ``stream()`` equals the official low-VRAM chunked algorithm written in torch on transformers'
  modules (``token2wav_refs.official_stream``) chunk by chunk within 1e-3, with Euler (the default,
  as the official code) and RK4, for code counts below one chunk, at the first chunk and across
  several chunks; the first chunk comes out after 60 codes, before the codes end.
- ``seed=`` draws the documented noise (numpy ``default_rng(seed).standard_normal`` rows), sessions
  are released after each call, bad arguments are InputErrors naming the choices.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omni_export.testkit.token2wav_refs import _sample_chunk, given_noise, official_stream, open_token2wav, prepared, torch_threads

TOL = 1e-3
MEL = 80


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return prepared(tmp_path_factory)


@pytest.fixture(scope="module")
def runtime(case):
    return open_token2wav(case[1])


def codes_for(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 8194, n).tolist()


def noise_for(frames: int, seed: int) -> np.ndarray:
    return np.random.default_rng(1000 + seed).standard_normal((frames, MEL), dtype=np.float32)


def speaker_inputs(model, name: str):
    spk = model.speaker_map[name]
    return spk["cond"].float(), spk["ref_mel"].float()


@pytest.mark.parametrize("n_codes,speaker,guidance", [(24, "Chelsie", None), (37, "Ethan", None),
                                                      (16, "Chelsie", 0.0)])
def test_waveform_rk4_equals_transformers(case, runtime, n_codes, speaker, guidance):
    _, _, model = case
    t2w, pool = runtime
    codes = codes_for(n_codes, n_codes)
    noise = noise_for(n_codes * 2, n_codes)
    cond, ref_mel = speaker_inputs(model, speaker)
    kwargs = {} if guidance is None else {"guidance_scale": guidance}
    with given_noise(noise), torch.no_grad(), torch_threads():
        expected = model.token2wav(torch.tensor([codes]), cond, ref_mel, **kwargs).numpy()
    got = t2w.waveform(codes, speaker, solver="rk4", noise=noise, **kwargs)
    assert got.dtype == np.float32 and got.shape == expected.shape == (n_codes * 2 * 240,)
    assert np.abs(expected).mean() > 0.05
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)
    assert pool.loaded == {}  # sessions released after the call


def test_waveform_euler_equals_official_euler(case, runtime):
    """solver="euler": the official low-VRAM ``sample`` (Euler over the same time grid), whole."""
    _, _, model = case
    t2w, _ = runtime
    codes = codes_for(30, 3)
    noise = noise_for(60, 3)
    cond, ref_mel = speaker_inputs(model, "Chelsie")
    with torch.no_grad(), torch_threads():
        mel = _sample_chunk(model.token2wav.code2wav_dit_model, torch.from_numpy(noise)[None], cond, ref_mel,
                            torch.tensor([codes]), 10, 0.5, -1.0, "euler")
        expected = model.token2wav.code2wav_bigvgan_model(mel).numpy()
    got = t2w.waveform(codes, solver="euler", noise=noise)
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)
    assert np.abs(got - t2w.waveform(codes, solver="rk4", noise=noise)).max() > 1e-3  # the solvers differ


@pytest.mark.parametrize("n_codes,solver", [(7, "euler"), (60, "euler"), (75, "euler"), (140, "euler"),
                                            (110, "rk4")])
def test_stream_equals_official_chunked_algorithm(case, runtime, n_codes, solver):
    _, _, model = case
    t2w, pool = runtime
    codes = codes_for(n_codes, n_codes)
    noise = noise_for(n_codes * 2, n_codes)
    cond, ref_mel = speaker_inputs(model, "Ethan")
    with torch_threads():
        expected = official_stream(model.token2wav, codes, cond, ref_mel, noise, solver=solver)
    kwargs = {} if solver == "euler" else {"solver": solver}
    got = list(t2w.stream(codes, "Ethan", noise=noise, **kwargs))
    assert [last for _, last in got] == [False] * (len(expected) - 1) + [True]
    assert [len(pcm) for pcm, _ in got] == [len(e) for e in expected]
    for (pcm, _), e in zip(got, expected):
        assert pcm.dtype == np.float32
        np.testing.assert_allclose(pcm, e, rtol=0, atol=TOL)
    assert sum(len(e) for e in expected) == n_codes * 2 * 240
    assert pool.loaded == {}


def test_stream_yields_before_codes_end(runtime):
    """With codes from an iterator, the first chunk comes after 60 codes (48 + 12 right context)."""
    t2w, pool = runtime
    consumed = []

    def talker():
        for i, code in enumerate(codes_for(200, 9)):
            consumed.append(i)
            yield code

    stream = t2w.stream(talker(), seed=4)
    pcm, last = next(stream)
    assert not last and len(consumed) == 60 and len(pcm) == (96 - 20) * 240
    assert set(pool.loaded) == {"token2wav_dit", "token2wav_bigvgan"}  # held while streaming
    rest = list(stream)
    assert rest[-1][1] and len(consumed) == 200
    assert len(pcm) + sum(len(p) for p, _ in rest) == 200 * 2 * 240
    assert pool.loaded == {}


def test_stream_closed_early_releases_sessions(runtime):
    t2w, pool = runtime
    stream = t2w.stream(codes_for(150, 2), seed=1)
    next(stream)
    stream.close()
    assert pool.loaded == {}


def test_seed_draws_numpy_noise(runtime):
    """seed=s is noise = default_rng(s).standard_normal((frames, 80), float32), for both modes; the
    stream's noise is one sequence sliced per chunk, so it is the same whatever the code count."""
    t2w, _ = runtime
    codes = codes_for(20, 5)
    drawn = np.random.default_rng(11).standard_normal((40, MEL), dtype=np.float32)
    np.testing.assert_array_equal(t2w.waveform(codes, seed=11), t2w.waveform(codes, noise=drawn))
    assert np.abs(t2w.waveform(codes, seed=11) - t2w.waveform(codes, seed=12)).max() > 1e-3
    long_codes = codes_for(80, 6)
    drawn = np.random.default_rng(3).standard_normal((160, MEL), dtype=np.float32)
    a = np.concatenate([p for p, _ in t2w.stream(long_codes, seed=3)])
    b = np.concatenate([p for p, _ in t2w.stream(long_codes, noise=drawn)])
    np.testing.assert_array_equal(a, b)


def test_empty_codes(runtime):
    t2w, _ = runtime
    assert t2w.waveform([], seed=0).shape == (0,)
    chunks = list(t2w.stream(iter([]), seed=0))
    assert len(chunks) == 1 and chunks[0][1] and chunks[0][0].shape == (0,)


def test_bad_arguments(runtime):
    from omni_runtime.errors import InputError

    t2w, pool = runtime
    with pytest.raises(InputError) as err:
        t2w.waveform([1, 2, 3], "Nobody", seed=0)
    assert err.value.param == "speaker" and "Nobody" in str(err.value)
    assert "Chelsie" in err.value.fix and "Ethan" in err.value.fix
    with pytest.raises(InputError, match="Chelsie, Ethan"):
        t2w.stream([1, 2, 3], "Nobody")  # checked before any code is read
    with pytest.raises(InputError) as err:
        t2w.waveform([1, 2, 3], solver="midpoint", seed=0)
    assert err.value.param == "solver" and "rk4, euler" in err.value.fix
    with pytest.raises(InputError, match="steps"):
        t2w.waveform([1, 2, 3], steps=1, seed=0)
    with pytest.raises(InputError, match="8294 is outside"):
        t2w.waveform([1, 8294, 3], seed=0)
    with pytest.raises(InputError, match="outside"):
        list(t2w.stream([5] * 70 + [-1], seed=0))
    with pytest.raises(InputError, match="noise has 4 rows"):
        t2w.waveform([1, 2, 3], noise=np.zeros((4, MEL), np.float32))
    assert pool.loaded == {}
    assert t2w.speakers == ["Chelsie", "Ethan"]


def test_bundle_without_speech(case, tmp_path):
    """A bundle without token2wav (text-only) refuses speech with a BundleError naming the manifest."""
    import dataclasses

    from omni_runtime.errors import BundleError
    from omni_runtime.bundle.manifest import load_manifest
    from omni_runtime.bundle.sessions import SessionPool
    from omni_runtime.stages.token2wav import Token2Wav, speaker_bos_token

    manifest = load_manifest(case[1])
    assert speaker_bos_token(manifest, "Ethan") == case[2].speaker_map["Ethan"]["bos_token"]
    assert speaker_bos_token(manifest) == case[2].speaker_map["Chelsie"]["bos_token"]  # the default speaker
    data = {**manifest.data, "config": {k: v for k, v in manifest.config.items() if k != "token2wav"}}
    graphs = {k: v for k, v in manifest.graphs.items() if not k.startswith("token2wav")}
    text_only = dataclasses.replace(manifest, data=data, graphs=graphs)
    with pytest.raises(BundleError, match="no speech output") as err:
        Token2Wav(text_only, SessionPool(text_only, ["CPUExecutionProvider"]))
    assert err.value.path.endswith("manifest.json")
