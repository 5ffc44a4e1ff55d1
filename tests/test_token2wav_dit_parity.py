"""The ``token2wav_dit`` graph against transformers' ``Qwen2_5OmniToken2WavDiTModel.forward`` (fp32, 1e-4).

One velocity evaluation, for the rows the runtime feeds: classifier-free guidance's batch of two
(conditioned row + unconditioned row: codes 0, x-vector 0, the speaker encoder's output for a zero
mel, as transformers builds with ``apply_cfg=True``) and the single conditioned row
(``apply_cfg=False``). transformers runs its speaker encoder on the speaker's reference mel itself;
the graph gets the encoder outputs the build stored in the bundle. Lengths cover one frame, block
boundaries (24 frames) and odd block counts; weights are the fan-in scaled ones of
``token2wav_refs.loud_checkpoint``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omni_export.testkit.token2wav_refs import graph_session, prepared, torch_threads

TOL = 1e-4


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return prepared(tmp_path_factory)


@pytest.fixture(scope="module")
def session(case):
    return graph_session(case[1], "token2wav_dit")


def stored(bundle, name: str, tensor: str) -> np.ndarray:
    return np.load(bundle / "token2wav_speakers" / f"{name}.{tensor}.npy", allow_pickle=False)


@pytest.mark.parametrize("speaker", ["Chelsie", "Ethan"])
@pytest.mark.parametrize("n_codes,t", [(1, 0.0), (12, 0.37), (13, 0.9), (37, 0.5), (61, 1.0)])
def test_dit_velocity_with_guidance_rows(case, session, speaker, n_codes, t):
    _, bundle, model = case
    dit = model.token2wav.code2wav_dit_model
    spk = model.speaker_map[speaker]
    gen = torch.Generator().manual_seed(n_codes)
    frames = n_codes * dit.repeats
    codes = torch.randint(0, dit.config.num_embeds + 1, (1, n_codes), generator=gen)
    x = torch.randn(1, frames, dit.mel_dim, generator=gen)
    with torch.no_grad(), torch_threads():
        expected = dit(hidden_states=x, condition_vector=spk["ref_mel"].float(),
                       speaker_embedding=spk["cond"].float()[:, None].repeat(1, frames, 1), quantized_code=codes,
                       time_step=torch.tensor(t), apply_cfg=True).numpy()
    cond = stored(bundle, speaker, "speaker_embedding")
    feeds = {"x": np.concatenate([x.numpy()] * 2), "codes": np.concatenate([codes.numpy(), np.zeros_like(codes)]),
             "time": np.full(2, t, np.float32), "speaker_embedding": np.stack([cond, np.zeros_like(cond)]),
             "reference_embedding": np.stack([stored(bundle, speaker, "reference_embedding"),
                                              stored(bundle, speaker, "null_reference_embedding")])}
    (got,) = session.run(["velocity"], feeds)
    assert got.shape == expected.shape == (2, frames, dit.mel_dim)
    assert np.abs(expected).max() > 0.1  # a real signal, not a vanishing one
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)


@pytest.mark.parametrize("n_codes", [5, 24, 50])
def test_dit_velocity_without_guidance(case, session, n_codes):
    """apply_cfg=False (guidance_scale < 1e-5): one conditioned row, and a batch of different rows."""
    _, bundle, model = case
    dit = model.token2wav.code2wav_dit_model
    gen = torch.Generator().manual_seed(100 + n_codes)
    frames = n_codes * dit.repeats
    rows = []
    for speaker, t in (("Chelsie", 0.25), ("Ethan", 0.75)):
        spk = model.speaker_map[speaker]
        codes = torch.randint(0, dit.config.num_embeds + 1, (1, n_codes), generator=gen)
        x = torch.randn(1, frames, dit.mel_dim, generator=gen)
        with torch.no_grad(), torch_threads():
            expected = dit(hidden_states=x, condition_vector=spk["ref_mel"].float(),
                           speaker_embedding=spk["cond"].float()[:, None].repeat(1, frames, 1), quantized_code=codes,
                           time_step=torch.tensor(t), apply_cfg=False).numpy()
        feeds = {"x": x.numpy(), "codes": codes.numpy(), "time": np.array([t], np.float32),
                 "speaker_embedding": stored(bundle, speaker, "speaker_embedding")[None],
                 "reference_embedding": stored(bundle, speaker, "reference_embedding")[None]}
        (got,) = session.run(["velocity"], feeds)
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)
        rows.append((feeds, expected))
    batch = {k: np.concatenate([rows[0][0][k], rows[1][0][k]]) for k in rows[0][0]}
    (got,) = session.run(["velocity"], batch)
    np.testing.assert_allclose(got, np.concatenate([rows[0][1], rows[1][1]]), rtol=0, atol=TOL)


def test_speaker_files_and_manifest(case):
    """The speakers of spk_dict.pt are in the manifest with their bos tokens; the x-vector is stored as is."""
    from omni_runtime.bundle.manifest import load_manifest

    _, bundle, model = case
    manifest = load_manifest(bundle)
    cfg = manifest.config["token2wav"]
    assert list(cfg["speakers"]) == list(model.speaker_map)
    assert cfg["default_speaker"] == "Chelsie"
    for name, params in model.speaker_map.items():
        entry = cfg["speakers"][name]
        assert entry["bos_token"] == params["bos_token"]
        for tensor in ("speaker_embedding", "reference_embedding", "null_reference_embedding"):
            assert entry[tensor] in manifest.files
        np.testing.assert_array_equal(stored(bundle, name, "speaker_embedding"), params["cond"].float().numpy()[0])
    assert cfg["stream"] == {"dit_chunk_codes": 48, "dit_left_context_codes": 24, "dit_right_context_codes": 12,
                             "vocoder_left_context_frames": 20, "vocoder_right_context_frames": 20}
    assert (cfg["sample_rate"], cfg["hop_length"], cfg["mel_per_code"]) == (24000, 240, 2)
    assert cfg["ode"] == {"solver": "rk4", "stream_solver": "euler", "steps": 10, "guidance_scale": 0.5,
                          "sway_coefficient": -1.0}


class Evil:  # spk_dict.pt must never be unpickled with arbitrary classes
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_module_skip_reason_and_checks(case, tmp_path):
    """No talker (enable_audio_output false, or no token2wav tensors) -> skipped; missing tensors,
    a missing or unsafe spk_dict.pt -> CheckpointError naming the file."""
    import dataclasses
    import shutil
    from types import SimpleNamespace

    from omni_export.checkpoint.reader import Checkpoint, CheckpointError
    from omni_export.modules.token2wav import Token2WavModule

    settings = SimpleNamespace(weights="float32", name="token2wav")
    ckpt = Checkpoint.open(case[0])
    assert Token2WavModule(ckpt, settings).skip_reason() is None
    off = dataclasses.replace(ckpt, raw_config={**ckpt.raw_config, "enable_audio_output": False})
    assert "enable_audio_output" in Token2WavModule(off, settings).skip_reason()
    bare = dataclasses.replace(ckpt, weight_map={k: v for k, v in ckpt.weight_map.items()
                                                 if not k.startswith("token2wav.")})
    assert "no token2wav weights" in Token2WavModule(bare, settings).skip_reason()
    Token2WavModule(bare, settings).check()  # skipped modules check nothing else

    partial = dataclasses.replace(ckpt, weight_map={k: v for k, v in ckpt.weight_map.items()
                                                    if "code2wav_bigvgan_model.conv_post" not in k})
    with pytest.raises(CheckpointError, match="conv_post.weight"):
        Token2WavModule(partial, settings).check()

    copy = tmp_path / "ckpt"
    shutil.copytree(case[0], copy)
    (copy / "spk_dict.pt").unlink()
    with pytest.raises(CheckpointError, match="spk_dict.pt is missing"):
        Token2WavModule(Checkpoint.open(copy), settings).check()
    torch.save({"Chelsie": {"bos_token": 1, "cond": torch.zeros(1, 192), "ref_mel": torch.zeros(1, 4, 80),
                            "note": Evil()}}, copy / "spk_dict.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        Token2WavModule(Checkpoint.open(copy), settings).check()
