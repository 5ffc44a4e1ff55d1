"""Session memory policies: parsing, the LRU budget, stage checks, the runner's stages, CUDA options,
and a released session giving its memory back (RSS, in a clean child process)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import omni_runtime.bundle.sessions as sessions
from omni_runtime.bundle import device
from omni_runtime.bundle import names
from omni_runtime.bundle.memory import (
    BUDGET, LAZY, RESIDENT, STREAMED_SPEECH, THINKER, MemoryPolicy, Residency, all_stages, check_stages,
    format_bytes, parse_bytes, request_stages,
)
from omni_runtime.bundle.sessions import CPU, CUDA, SessionPool, SessionSettings
from omni_runtime.errors import InputError

from conftest import run_cli


# ---------------------------------------------------------------------------------------------
# parsing


@pytest.mark.parametrize("text, expected", [
    ("6GB", 6_000_000_000), ("6.5GiB", int(6.5 * 1024 ** 3)), ("800MB", 800_000_000), ("800mb", 800_000_000),
    ("4000000000", 4_000_000_000), ("1.5 GB", 1_500_000_000), ("512KiB", 512 * 1024), ("2kB", 2000),
    ("3g", 3_000_000_000), ("7B", 7),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected
    policy = MemoryPolicy.parse(text)
    assert (policy.mode, policy.budget_bytes) == (BUDGET, expected)
    assert MemoryPolicy.parse(str(policy)) == policy  # str() reads back


@pytest.mark.parametrize("value, mode", [("lazy", LAZY), ("RESIDENT", RESIDENT), (" lazy ", LAZY), (None, LAZY)])
def test_parse_modes(value, mode):
    policy = MemoryPolicy.parse(value)
    assert policy.mode == mode and policy.budget_bytes is None and str(policy) == mode


def test_parse_int_and_policy():
    assert MemoryPolicy.parse(123) == MemoryPolicy(BUDGET, 123)
    policy = MemoryPolicy.parse("1GB")
    assert MemoryPolicy.parse(policy) is policy
    assert policy.to_json() == {"mode": "budget", "budget_bytes": 1_000_000_000}


@pytest.mark.parametrize("value", ["6XB", "", "GB", "-1GB", "0", "0.0001B", "lazyy", "1e9", 0, -5, True, 1.5, [1]])
def test_parse_rejects(value):
    with pytest.raises(InputError) as info:
        MemoryPolicy.parse(value)
    assert info.value.param == "memory" and "lazy, resident" in info.value.fix


# ---------------------------------------------------------------------------------------------
# the LRU bookkeeping


def test_residency_evicts_least_recently_used_idle():
    r = Residency(MemoryPolicy.parse(100))
    for name in ("a", "b"):
        r.touch(name)
        assert r.evictions(name, 40) == []
        r.loaded(name, 40)
    r.touch("c")
    assert r.evictions("c", 40) == []  # a and b are in use: nothing can go, the load goes over
    assert not r.done("a") and not r.done("b")  # a budget keeps idle sessions
    assert r.evictions("c", 40) == ["a"]  # least recently used first, only as many as needed
    r.touch("a")  # a used again: now b is the least recent
    r.done("a")
    assert r.evictions("c", 40) == ["b"]
    assert r.evictions("c", 80) == ["b", "a"]
    assert r.evictions("c", 20) == []  # 80 + 20 fits


def test_residency_lazy_and_resident():
    lazy, resident = Residency(MemoryPolicy.parse("lazy")), Residency(MemoryPolicy.parse("resident"))
    for r in (lazy, resident):
        r.touch("a")
        r.loaded("a", 10)
        assert r.evictions("b", 10 ** 12) == []  # no budget, no eviction
    assert lazy.done("a") is True and resident.done("a") is False
    assert lazy.done("never-loaded") is False


def test_request_stages():
    assert request_stages() == [THINKER]
    assert [s.name for s in request_stages(audio=True, vision=True, speech=True)] == [
        "audio encoder", "vision encoder", "thinker", "talker", "token2wav DiT", "token2wav BigVGAN"]
    assert request_stages(speech=True, stream=True)[-1] == STREAMED_SPEECH
    assert STREAMED_SPEECH.graphs == (names.TALKER_EMBEDDING, names.TALKER_DECODER, names.TOKEN2WAV_DIT,
                                      names.TOKEN2WAV_BIGVGAN)
    assert [s.name for s in all_stages([names.THINKER_EMBEDDING, names.THINKER_DECODER, names.AUDIO_ENCODER])] == [
        "audio encoder", "thinker"]


SIZES = {names.THINKER_EMBEDDING: 300, names.THINKER_DECODER: 700, names.TALKER_EMBEDDING: 50,
         names.TALKER_DECODER: 400, names.TOKEN2WAV_DIT: 150, names.TOKEN2WAV_BIGVGAN: 450}


def test_check_stages_names_the_largest_stage_that_does_not_fit():
    check_stages(MemoryPolicy.parse("lazy"), request_stages(speech=True, stream=True), SIZES)
    check_stages(MemoryPolicy.parse(1050), request_stages(speech=True, stream=True), SIZES)  # speech 1050 fits
    with pytest.raises(InputError) as info:
        check_stages(MemoryPolicy.parse("1kB"), request_stages(speech=True, stream=True), SIZES)
    message = str(info.value)
    assert "memory=1kB (1.00 kB) is smaller than the streamed speech stage" in message
    assert "talker_embedding (50 B) + talker_decoder (400 B) + token2wav_dit (150 B) + token2wav_bigvgan (450 B)" \
        in message and "= 1.05 kB at once" in message
    assert "at least 1050 bytes" in info.value.fix and info.value.param == "memory"
    with pytest.raises(InputError, match="smaller than the thinker stage"):
        check_stages(MemoryPolicy.parse(999), request_stages(speech=True), SIZES)  # unstreamed: talker 450 fits


# ---------------------------------------------------------------------------------------------
# the pool's policy, with sessions that cost nothing (no onnxruntime)


@dataclass(frozen=True)
class FakeSpec:
    name: str
    file: str
    files: tuple


class FakeManifest:
    def __init__(self, sizes):
        self.graphs = {name: FakeSpec(name, f"{name}.onnx", (f"{name}.onnx",)) for name in sizes}
        self.files = {f"{name}.onnx": {"bytes": size} for name, size in sizes.items()}

    def graph(self, name):
        return self.graphs[name]


@pytest.fixture
def fake_pool(monkeypatch):
    created = []

    def create(pool, spec):
        created.append(spec.name)
        return object(), {"seconds": 0.0, "cached": False}

    monkeypatch.setattr(SessionPool, "_create", create)

    def make(memory):
        return SessionPool(FakeManifest(SIZES), [CPU], memory=memory), created

    return make


def test_pool_lazy_frees_when_done(fake_pool):
    pool, created = fake_pool("lazy")
    first = pool.get(names.THINKER_DECODER)
    assert pool.get(names.THINKER_DECODER) is first and created == [names.THINKER_DECODER]
    assert pool.in_use == {names.THINKER_DECODER}
    pool.done(names.THINKER_DECODER)
    assert pool.loaded == {} and pool.in_use == set()
    pool.get(names.THINKER_DECODER)
    assert created == [names.THINKER_DECODER] * 2
    assert [e["graph"] for e in pool.load_log] == created and pool.load_log[0]["bytes"] == 700
    assert set(pool.load_log[0]) >= {"graph", "seconds", "bytes", "cached"}


def test_pool_resident_keeps_until_released(fake_pool):
    pool, created = fake_pool("resident")
    for name in SIZES:
        pool.get(name)
        pool.done(name)
    assert pool.loaded == SIZES and pool.loaded_bytes == sum(SIZES.values())
    pool.get(names.THINKER_DECODER)
    assert len(created) == len(SIZES)  # nothing re-created
    pool.release(names.THINKER_DECODER)  # a forced release frees whatever the policy
    assert names.THINKER_DECODER not in pool.loaded
    pool.release_all()
    assert pool.loaded == {}


def test_pool_budget_evicts_lru_idle(fake_pool):
    pool, created = fake_pool(1100)
    pool.get(names.THINKER_EMBEDDING)
    pool.get(names.THINKER_DECODER)  # 1000 in use
    pool.get(names.TALKER_EMBEDDING)  # 1050: fits
    pool.done(names.THINKER_EMBEDDING)
    pool.done(names.THINKER_DECODER)
    assert list(pool.loaded) == [names.THINKER_EMBEDDING, names.THINKER_DECODER, names.TALKER_EMBEDDING]
    pool.get(names.TALKER_DECODER)  # 1450 > 1100: the embedding (least recent, idle) goes, then 1150: the decoder
    assert list(pool.loaded) == [names.TALKER_EMBEDDING, names.TALKER_DECODER]
    pool.done(names.TALKER_EMBEDDING)
    pool.done(names.TALKER_DECODER)
    pool.get(names.TALKER_EMBEDDING)  # used again: most recent
    pool.done(names.TALKER_EMBEDDING)
    pool.get(names.TOKEN2WAV_BIGVGAN)  # 450 + 450 = 900: fits, nothing evicted
    pool.get(names.TOKEN2WAV_DIT)  # 1050: fits
    pool.get(names.THINKER_EMBEDDING)  # 1350: the talker decoder (least recent idle) goes -> 950
    assert list(pool.loaded) == [names.TALKER_EMBEDDING, names.TOKEN2WAV_BIGVGAN, names.TOKEN2WAV_DIT,
                                 names.THINKER_EMBEDDING]
    assert pool.loaded_bytes <= 1100


def test_pool_budget_never_evicts_in_use(fake_pool):
    pool, _ = fake_pool(800)
    pool.get(names.THINKER_DECODER)
    pool.get(names.TOKEN2WAV_BIGVGAN)  # over the budget: the decoder is in use, so both stay
    assert set(pool.loaded) == {names.THINKER_DECODER, names.TOKEN2WAV_BIGVGAN}


def test_pool_check_stages(fake_pool):
    pool, created = fake_pool("900B")
    with pytest.raises(InputError, match="smaller than the thinker stage"):
        pool.check_stages(request_stages())
    assert created == []


def test_pool_threads_create_once(fake_pool):
    import threading

    pool, created = fake_pool("lazy")
    got = []
    threads = [threading.Thread(target=lambda: got.append(pool.get(names.TALKER_DECODER))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert created == [names.TALKER_DECODER] and len({id(s) for s in got}) == 1


# ---------------------------------------------------------------------------------------------
# the runner on the tiny bundle: which sessions each policy leaves, the budget errors


def chat(runner, **kw):
    import dataclasses

    greedy = dataclasses.replace(runner.default_sampling(), do_sample=False)
    if kw.get("speech"):
        kw["talker_sampling"] = runner.default_talker_sampling(False)
    return runner.chat("Hi", max_new_tokens=3, sampling=greedy, **kw)


def test_runner_lazy_frees_every_stage(tiny_bundle):
    from omni_runtime.runner import OmniRunner

    runner = OmniRunner(tiny_bundle, device="cpu")
    assert runner.pool.policy == MemoryPolicy.parse("lazy")
    chat(runner, speech=True, max_speech_seconds=0.5, noise_seed=0)
    assert runner.pool.loaded == {} and runner.pool.in_use == set()
    loaded = [e["graph"] for e in runner.pool.load_log]
    assert set(loaded) == {names.THINKER_EMBEDDING, names.THINKER_DECODER, names.TALKER_EMBEDDING,
                           names.TALKER_DECODER, names.TOKEN2WAV_DIT, names.TOKEN2WAV_BIGVGAN}
    assert loaded.count(names.THINKER_EMBEDDING) == 1  # the talker's rows were taken while it was loaded


def test_runner_resident_keeps_and_gives_the_same_answer(tiny_bundle):
    from omni_runtime.runner import OmniRunner

    lazy = chat(OmniRunner(tiny_bundle, device="cpu"), speech=True, max_speech_seconds=0.5, noise_seed=0)
    runner = OmniRunner(tiny_bundle, device="cpu", memory="resident")
    first = chat(runner, speech=True, max_speech_seconds=0.5, noise_seed=0)
    assert set(runner.pool.loaded) == {names.THINKER_EMBEDDING, names.THINKER_DECODER, names.TALKER_EMBEDDING,
                                       names.TALKER_DECODER, names.TOKEN2WAV_DIT, names.TOKEN2WAV_BIGVGAN}
    count = len(runner.pool.load_log)
    second = chat(runner, speech=True, max_speech_seconds=0.5, noise_seed=0)
    assert len(runner.pool.load_log) == count  # nothing loaded again
    assert first.token_ids == second.token_ids == lazy.token_ids and first.codes == lazy.codes
    np.testing.assert_array_equal(first.audio, lazy.audio)


def test_runner_budget_too_small(tiny_bundle):
    from omni_runtime.runner import OmniRunner

    probe = OmniRunner(tiny_bundle, device="cpu")
    sizes = {name: probe.pool.graph_bytes(name) for name in probe.manifest.graphs}
    thinker = sizes[names.THINKER_EMBEDDING] + sizes[names.THINKER_DECODER]
    with pytest.raises(InputError, match="smaller than the thinker stage") as info:
        OmniRunner(tiny_bundle, device="cpu", memory=thinker - 1)
    assert f"= {format_bytes(thinker)} at once" in str(info.value)
    assert f"at least {thinker} bytes" in info.value.fix
    budget = thinker + sizes[names.TALKER_EMBEDDING]
    runner = OmniRunner(tiny_bundle, device="cpu", memory=budget)
    # the tiny talker and token2wav are smaller than the tiny thinker: count BigVGAN as the budget
    real = runner.pool.graph_bytes
    monkey = {names.TOKEN2WAV_BIGVGAN: budget}
    runner.pool.graph_bytes = lambda name: monkey.get(name, real(name))
    with pytest.raises(InputError, match="smaller than the streamed speech stage"):
        runner.chat("Hi", max_new_tokens=2, speech=True, stream=True)
    assert runner.pool.load_log == []  # refused before any graph ran
    chat(runner, speech=True, stream=False, max_speech_seconds=0.5)  # unstreamed: one graph at a time fits
    result = chat(runner)  # text fits
    assert result.token_ids and runner.pool.loaded_bytes <= budget


def test_cli_memory_flag(tiny_bundle):
    proc = run_cli("run", str(tiny_bundle), "--prompt", "Hi", "--max-new-tokens", "2", "--memory", "1kB")
    assert proc.returncode == 2
    assert "--memory 1kB (1.00 kB) is smaller than the thinker stage" in proc.stderr and "fix:" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("run", str(tiny_bundle), "--prompt", "Hi", "--max-new-tokens", "2", "--memory", "resident",
                   "--greedy", "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["token_ids"]) == 2


# ---------------------------------------------------------------------------------------------
# CUDA options and bindings, decided by the same logic on CPU


def test_cuda_provider_options():
    lazy, resident, budget = (MemoryPolicy.parse(v) for v in ("lazy", "resident", "6GB"))
    assert device.provider_config([CPU], lazy) == [CPU]
    (cuda, cpu) = device.provider_config([CUDA, CPU], lazy, device_id=1)
    assert cpu == CPU and cuda == (CUDA, {"device_id": "1", "arena_extend_strategy": "kSameAsRequested",
                                          "cudnn_conv_algo_search": "HEURISTIC", "cudnn_conv_use_max_workspace": "0"})
    assert device.provider_options([CUDA, CPU], budget)[0]["gpu_mem_limit"] == "6000000000"
    assert device.provider_options([CUDA, CPU], resident)[0] == {
        "device_id": "0", "arena_extend_strategy": "kNextPowerOfTwo", "cudnn_conv_algo_search": "EXHAUSTIVE"}
    assert device.session_config([CUDA, CPU], lazy) == {"session.use_device_allocator_for_initializers": "1"}
    assert device.session_config([CUDA, CPU], resident) == {} and device.session_config([CPU], lazy) == {}


class FakeOrt:
    """Records what the pool hands onnxruntime (no CUDA here)."""

    __version__ = "0.0-fake"

    class GraphOptimizationLevel:
        ORT_DISABLE_ALL, ORT_ENABLE_BASIC, ORT_ENABLE_EXTENDED, ORT_ENABLE_ALL = range(4)

    class SessionOptions:
        def __init__(self):
            self.entries = {}

        def add_session_config_entry(self, key, value):
            self.entries[key] = value

    def __init__(self, spec):
        self.calls = []
        outer = self

        class Session:
            def __init__(self, path, sess_options=None, providers=None):
                outer.calls.append((path, sess_options, providers))

            def get_inputs(self):
                return [_Arg(t.name, t.dtype) for t in spec.inputs]

            def get_outputs(self):
                return [_Arg(t.name, t.dtype) for t in spec.outputs]

        self.InferenceSession = Session


@dataclass
class _Arg:
    name: str
    dtype: str

    @property
    def type(self):
        return {"float32": "tensor(float)", "int64": "tensor(int64)"}[self.dtype]


def test_pool_passes_cuda_options_and_graph_config(monkeypatch, tmp_path):
    from test_sessions import make_bundle

    import dataclasses

    from omni_runtime import load_manifest

    manifest = load_manifest(make_bundle(tmp_path / "bundle"))
    spec = manifest.graphs["tiny"]
    manifest.graphs["tiny"] = dataclasses.replace(spec, session_config={"session.intra_op.allow_spinning": "0",
                                                                        "bad": 1})
    fake = FakeOrt(spec)
    monkeypatch.setattr(sessions, "import_onnxruntime", lambda: fake)
    monkeypatch.setattr(device, "watch_device", lambda device_id=0: None)
    pool = SessionPool(manifest, [CUDA, CPU], SessionSettings(optimized_copies=False), memory="2GB", device_id=0)
    pool.get("tiny")
    (path, options, providers), = fake.calls
    assert path.endswith("tiny.onnx")
    assert providers == [(CUDA, {"device_id": "0", "arena_extend_strategy": "kSameAsRequested",
                                 "cudnn_conv_algo_search": "HEURISTIC", "cudnn_conv_use_max_workspace": "0",
                                 "gpu_mem_limit": "2000000000"}), CPU]
    assert options.entries == {"session.use_device_allocator_for_initializers": "1",
                               "session.intra_op.allow_spinning": "0"}  # the manifest's string entries


class RecordingSession:
    """A decoder session stand-in recording allocations and bindings (the CUDA path, on CPU values)."""

    def __init__(self, ort):
        self.ort = ort
        self.allocated = []
        self.bound = []

    def create_ortvalue_from_shape_and_type(self, shape, dtype, device_type, device_id):
        self.allocated.append((tuple(shape), device_type, device_id))
        return self.ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cpu", 0)

    def io_binding(self):
        session = self

        class Binding:
            def bind_cpu_input(self, name, array):
                session.bound.append(("cpu_input", name))

            def bind_output(self, name, device_type="cpu", device_id=0):
                session.bound.append(("output", name, device_type, device_id))

            def bind_ortvalue_input(self, name, value):
                session.bound.append(("ortvalue_input", name))

            def bind_ortvalue_output(self, name, value):
                session.bound.append(("ortvalue_output", name))

            def get_outputs(self):
                logits = np.zeros((1, 1, 8), np.float32)
                return [session.ort.OrtValue.ortvalue_from_numpy(logits),
                        session.ort.OrtValue.ortvalue_from_numpy(np.ones((1, 1, 4), np.float32))]

        return Binding()

    def run_with_iobinding(self, binding):
        pass


def test_kv_decoder_cuda_bindings():
    import onnxruntime as ort

    from omni_runtime.bundle.manifest import GraphSpec, TensorSpec
    from omni_runtime.stages.kv_decoder import KVDecoder

    kv = [TensorSpec(f"past_key_values.0.{k}", "float32", (1, 2, "past_sequence", 4)) for k in ("key", "value")]
    spec = GraphSpec("thinker_decoder", "d.onnx", (), 21, "float32", None,
                     (TensorSpec("inputs_embeds", "float32", ("batch", "sequence", 4)),
                      TensorSpec("position_ids", "int64", (3, "batch", "sequence")),
                      TensorSpec("seqlens_k", "int32", ("batch",)),
                      TensorSpec("total_sequence_length", "int32", ()), *kv),
                     (TensorSpec("logits", "float32", ("batch", "sequence", 8)),
                      TensorSpec("last_hidden_state", "float32", ("batch", "sequence", 4)),
                      *[TensorSpec(f"present.0.{k}", "float32", (1, 2, "total_sequence", 4)) for k in ("key", "value")]))
    session = RecordingSession(ort)
    decoder = KVDecoder(session, spec, ort, device="cuda", device_id=1)
    cache = decoder.new_cache(16)
    assert session.allocated == [((1, 2, 16, 4), "cuda", 1)] * 2  # the session's own allocator, on the device
    decoder.step(cache, np.zeros((1, 1, 4), np.float32), np.zeros((3, 1, 1), np.int64))
    assert ("output", "logits", "cpu", 0) in session.bound
    assert ("output", "last_hidden_state", "cuda", 1) in session.bound  # unwanted hidden states stay there
    assert ("ortvalue_input", "past_key_values.0.key") in session.bound
    assert ("ortvalue_output", "present.0.value") in session.bound
    session.bound.clear()
    decoder.step(cache, np.zeros((1, 1, 4), np.float32), np.zeros((3, 1, 1), np.int64), want_hidden=True)
    assert ("output", "last_hidden_state", "cpu", 0) in session.bound  # the talker's input, on the host
    cpu = KVDecoder(RecordingSession(ort), spec, ort, device="cpu")
    cpu.new_cache(4)
    assert cpu.session.allocated == []  # on the CPU the process allocator holds the cache


# ---------------------------------------------------------------------------------------------
# NVML


def test_device_memory_sampler_keeps_the_peak():
    values = iter([100, 300, 200, None, 250])
    sampler = device.DeviceMemorySampler(lambda: next(values, 120), interval=60)
    sampler.sample()
    sampler.sample()
    sampler.sample()
    sampler.sample()  # a failed reading (None) changes nothing
    assert sampler.peak == 300
    sampler.reset()  # the next reading starts a new peak
    assert sampler.peak == 250


def test_no_nvml_here_means_none():
    assert device.nvml() is None  # no NVIDIA driver on this machine
    assert device.watch_device(0) is None
    assert device.peak_device_memory() is None
    device.reset_peak_device_memory()  # no sampler: a no-op


def test_peak_device_memory_reads_the_watched_device(monkeypatch):
    readings = iter([1000, 5000, 3000])
    monkeypatch.setattr(device, "nvml", lambda: device.Nvml(lambda i: next(readings, 2000), "fake"))
    monkeypatch.setattr(device, "_samplers", {})
    monkeypatch.setattr(device.DeviceMemorySampler, "start", lambda self: (self.sample(), self)[1])
    sampler = device.watch_device(0)
    assert sampler is not None and device.watch_device(0) is sampler
    assert device.peak_device_memory(0) == 5000  # 1000, then 5000 sampled
    assert device.peak_device_memory(1) is None


# ---------------------------------------------------------------------------------------------
# a released session gives its memory back


RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from omni_runtime import load_manifest
    from omni_runtime.bundle.device import rss_bytes, return_host_memory
    from omni_runtime.bundle.sessions import CPU, SessionPool, SessionSettings

    manifest = load_manifest(sys.argv[1])
    x = np.ones((8, int(sys.argv[2])), np.float32)
    out = {}
    for policy in ("lazy", "resident"):
        pool = SessionPool(manifest, [CPU], SessionSettings(intra_op_threads=1), memory=policy)
        # warm-up: the library, its thread pools (no optimized copy written)
        warm = SessionPool(manifest, [CPU], SessionSettings(intra_op_threads=1, optimized_copies=False))
        warm.get("chain").run(None, {"x": x[:, :]}); warm.release("chain"); return_host_memory()
        for load in range(2):  # the first load writes the optimized copy, the second reads it
            before = rss_bytes()
            pool.get("chain").run(None, {"x": x})
            loaded = rss_bytes()
            pool.done("chain")
            kept = rss_bytes()
            pool.release("chain")
            out[f"{policy}{load}"] = {"before": before, "loaded": loaded, "done": kept, "released": rss_bytes(),
                                      "cached": pool.load_log[-1]["cached"]}
    print(json.dumps(out))
""")


def write_chain_bundle(root: Path, width: int, layers: int) -> Path:
    """A bundle with one graph ``chain``: ``layers`` MatMuls of [width, width] float32 weights
    (the shape of real decoder weights: many initializers of a few MB, from the heap)."""
    import hashlib

    import onnx
    import onnx.helper as helper
    import onnx.numpy_helper

    from test_sessions import make_bundle

    bundle = make_bundle(root)
    rng = np.random.default_rng(0)
    nodes, weights, prev = [], [], "x"
    for i in range(layers):
        weights.append(onnx.numpy_helper.from_array(
            (rng.standard_normal((width, width), dtype=np.float32) / np.sqrt(width)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", width])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", width])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save_model(model, bundle / "chain.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="chain.onnx.data", size_threshold=0)
    body = json.loads((bundle / "manifest.json").read_text())
    for name in ("chain.onnx", "chain.onnx.data"):
        data = (bundle / name).read_bytes()
        body["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    body["graphs"]["chain"] = {"file": "chain.onnx", "external_data": ["chain.onnx.data"], "opset": 18,
                               "dtype": "float32", "quantization": None,
                               "inputs": [{"name": "x", "dtype": "float32", "shape": ["b", width]}],
                               "outputs": [{"name": "y", "dtype": "float32", "shape": ["b", width]}]}
    (bundle / "manifest.json").write_text(json.dumps(body))
    return bundle


def test_released_session_gives_its_memory_back(tmp_path):
    width, layers = 1024, 48  # 48 x 4 MiB = 201 MB of weights
    bundle = write_chain_bundle(tmp_path / "bundle", width, layers)
    weights = width * width * 4 * layers
    env = {**__import__("os").environ, "OMNI_RUNTIME_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(bundle), str(width)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [runs[k]["cached"] for k in ("lazy0", "lazy1", "resident0", "resident1")] == [False, True, True, True]
    for key, r in runs.items():
        assert r["loaded"] - r["before"] > 0.8 * weights, (key, r)  # the weights really were resident
        assert abs(r["released"] - r["before"]) <= 0.1 * r["before"], (key, r)  # within 10% of before the load
        assert r["released"] - r["before"] <= 0.1 * weights, (key, r)  # and 90% of what the load took is back
        if key.startswith("lazy"):
            assert r["done"] - r["before"] <= 0.1 * weights, (key, r)  # lazy: done frees
        else:
            assert r["done"] - r["before"] > 0.8 * weights, (key, r)  # resident: done keeps
