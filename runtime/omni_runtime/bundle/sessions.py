"""ONNX Runtime sessions for a bundle's graphs: provider choice, creation on demand, memory policy.

onnxruntime is imported only when needed, so the rest of the runtime imports without it.
A session is created on first ``get`` (after checking the sha256 of the graph's files and its
inputs/outputs against the manifest). A stage calls ``done`` when it no longer needs a graph
and the pool's memory policy (``omni_runtime.bundle.memory``: ``lazy``, ``resident`` or a byte
budget) decides whether to free it; ``release`` always frees. A freed session gives its memory
back (``omni_runtime.bundle.device.return_host_memory``).

Sessions are created with the provider options of the policy (``device.provider_options``) and
the session config entries of the graph's manifest entry. The first load of a graph saves an
optimized copy that later loads read with optimizations off (``omni_runtime.bundle.ort_cache``).
On the CPU provider a float16 graph runs only where onnxruntime has float16 kernels: a graph
whose nodes onnxruntime would run in float32 through inserted Casts, or that has nodes without a
CPU kernel, is a BundleError naming the graph and the fix (rebuild for the CPU, or use CUDA).

``load_log`` records every session creation: ``{"graph", "seconds", "bytes", "cached"}``
(``cached``: read from an optimized copy). ``loaded`` / ``loaded_bytes`` are what is loaded now.
"""

from __future__ import annotations

import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from omni_runtime.errors import BundleError, InputError, OmniError
from omni_runtime.bundle import device, ort_cache
from omni_runtime.bundle.device import return_host_memory
from omni_runtime.bundle.manifest import GraphSpec, Manifest, verify_file
from omni_runtime.bundle.memory import MemoryPolicy, Residency, check_stages

CUDA = device.CUDA
CPU = device.CPU
DEVICES = ("auto", "cpu", "cuda")

# onnxruntime's type strings -> the manifest's dtype names.
ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(uint16)": "uint16",
    "tensor(int32)": "int32",
    "tensor(uint32)": "uint32",
    "tensor(int64)": "int64",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}

_OPTIMIZATION_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def import_onnxruntime():
    """Import and return the onnxruntime module; OmniError with the install fix if it is missing."""
    try:
        import onnxruntime
    except ImportError as e:
        raise OmniError(
            f"onnxruntime is not installed ({e})",
            fix="pip install omni-runtime[cpu] (or omni-runtime[gpu] for CUDA; never both)",
        ) from e
    return onnxruntime


def available_providers() -> list[str]:
    """The execution providers the installed onnxruntime reports as available."""
    return list(import_onnxruntime().get_available_providers())


def select_providers(device: str = "auto", available: list[str] | None = None) -> list[str]:
    """Providers to use for ``device`` (``auto``, ``cpu`` or ``cuda``), in priority order.

    ``auto`` puts CUDA first when available, then CPU. ``available`` defaults to what the
    installed onnxruntime reports (pass a list to decide without onnxruntime).
    """
    if device not in DEVICES:
        raise InputError(f"unknown device {device!r}", fix=f"use one of: {', '.join(DEVICES)}")
    if available is None:
        available = available_providers()
    if device == "cpu":
        return [CPU]
    if CUDA in available:
        return [CUDA, CPU]
    if device == "cuda":
        raise InputError(
            f"CUDA was requested but onnxruntime has no {CUDA} (available: {', '.join(available) or 'none'})",
            fix="pip uninstall onnxruntime && pip install omni-runtime[gpu], or use device=\"cpu\"",
        )
    return [CPU]


def io_binding_enabled(providers: list[str]) -> bool:
    """Whether the decode loop should use IO binding (keep tensors on the device): True on CUDA."""
    return bool(providers) and providers[0] == CUDA


@dataclass(frozen=True)
class SessionSettings:
    """``onnxruntime.SessionOptions`` settings; 0 threads means onnxruntime's default.

    ``optimized_copies``: save an optimized copy of each graph at its first load and create
    later sessions from it (``omni_runtime.bundle.ort_cache``; also off with
    ``OMNI_RUNTIME_OPTIMIZED_COPIES=off`` or ``OMNI_RUNTIME_CACHE_DIR=off``). ``allow_cpu_casts``: let a float16 graph run on the CPU
    provider although onnxruntime runs some of its nodes in float32 through inserted Casts (a
    slow path, for parity tests; refused by default).
    """

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    optimization: str = "all"
    log_severity: int = 3
    optimized_copies: bool = True
    allow_cpu_casts: bool = False

    def session_options(self, ort, optimization: str | None = None):
        """Build the ``SessionOptions`` for the given onnxruntime module (``optimization``
        overrides the level, e.g. ``disable`` for an already optimized copy)."""
        level = self.optimization if optimization is None else optimization
        if level not in _OPTIMIZATION_LEVELS:
            raise InputError(
                f"unknown graph optimization level {level!r}",
                fix=f"use one of: {', '.join(_OPTIMIZATION_LEVELS)}",
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPTIMIZATION_LEVELS[level])
        options.log_severity_level = self.log_severity
        return options


#: the name onnxruntime gives the Casts it inserts to run float16 nodes in float32 on the CPU
_INSERTED_CAST = b"InsertedPrecisionFreeCast_"
_CUDA_FIX = ("rebuild the bundle for the CPU (omni-export build --target cpu), or run it on a CUDA device "
             "(--device cuda, with onnxruntime-gpu)")


class _CastsRefused(BundleError):
    """A float16 graph onnxruntime would run in float32 on the CPU (never retried from the bundle)."""


class SessionPool:
    """Inference sessions of one bundle's graphs, created on demand and kept or freed by a memory policy.

    ``memory``: ``"lazy"`` (default), ``"resident"``, a byte budget (``"6GB"``, an int) or a
    ``MemoryPolicy``. Thread-safe: the streamed speech loads the talker and token2wav from two
    threads at once (different graphs load in parallel; one graph is created once).
    """

    def __init__(self, manifest: Manifest, providers: list[str], settings: SessionSettings = SessionSettings(),
                 memory: MemoryPolicy | str | int | None = None, device_id: int = 0):
        self.manifest = manifest
        self.providers = list(providers)
        self.settings = settings
        self.policy = MemoryPolicy.parse(memory)
        self.device_id = int(device_id)
        self.load_log: list[dict] = []
        self._sessions: dict = {}
        self._bytes: dict[str, int] = {}
        self._verified: set[str] = set()
        self._residency = Residency(self.policy)
        self._lock = threading.RLock()
        self._loading: dict[str, threading.Lock] = {}

    # -- sizes and stages ---------------------------------------------------------------------
    def graph_bytes(self, graph_name: str) -> int:
        """File bytes of a graph (graph + external data, from the manifest): its size for the budget."""
        spec = self.manifest.graph(graph_name)
        return sum(self.manifest.files[relpath]["bytes"] for relpath in spec.files)

    def check_stages(self, stages) -> None:
        """InputError (before any graph runs) if the policy's budget is smaller than one of
        ``stages`` (``memory.Stage``; graphs the bundle lacks count 0)."""
        sizes = {name: self.graph_bytes(name) for name in self.manifest.graphs}
        check_stages(self.policy, stages, sizes)

    # -- sessions -----------------------------------------------------------------------------
    def get(self, graph_name: str):
        """The ``onnxruntime.InferenceSession`` of ``graph_name``, created on first use; the graph
        counts as in use (never evicted) until ``done``.

        Before the first load the graph's files are checked against their sha256 (once per
        pool, remembered across processes) and the session's inputs/outputs against the
        manifest; BundleError otherwise.
        """
        with self._lock:
            session = self._sessions.get(graph_name)
            if session is not None:
                self._residency.touch(graph_name)
                return session
            spec = self.manifest.graph(graph_name)
            self._residency.touch(graph_name)
            loading = self._loading.setdefault(graph_name, threading.Lock())
        with loading:  # one creation per graph; other graphs load meanwhile
            with self._lock:
                session = self._sessions.get(graph_name)
                if session is not None:
                    return session
                size = self.graph_bytes(graph_name)
                evicted = [self._drop(name) for name in self._residency.evictions(graph_name, size)]
                self._residency.loaded(graph_name, size)  # reserved while it loads
            if evicted:
                del evicted
                return_host_memory()
            try:
                session, record = self._create(spec)
            except BaseException:
                with self._lock:
                    self._residency.removed(graph_name)
                raise
            with self._lock:
                self._sessions[graph_name] = session
                self._bytes[graph_name] = size
                self.load_log.append({"graph": graph_name, "bytes": size, **record})
            return session

    def done(self, graph_name: str) -> None:
        """The calling stage no longer needs ``graph_name``: the policy frees it now (lazy), keeps
        it (resident) or keeps it until the budget needs the room (evicted least recently used first)."""
        with self._lock:
            session = self._drop(graph_name) if self._residency.done(graph_name) else None
        if session is not None:
            del session
            return_host_memory()

    def release(self, graph_name: str) -> None:
        """Free the session of ``graph_name`` whatever the policy (re-created on the next get)."""
        with self._lock:
            session = self._drop(graph_name)
        if session is not None:
            del session
            return_host_memory()

    def release_all(self) -> None:
        """Free every loaded session."""
        with self._lock:
            sessions = [self._drop(name) for name in list(self._sessions)]
        if sessions:
            del sessions
            return_host_memory()

    def _drop(self, graph_name: str):
        """Forget a session (under the lock); the caller drops the returned reference outside it."""
        self._bytes.pop(graph_name, None)
        self._residency.removed(graph_name)
        return self._sessions.pop(graph_name, None)

    @property
    def loaded(self) -> dict[str, int]:
        """Loaded graph name -> bytes of its files (graph plus external data), in load order."""
        with self._lock:
            return dict(self._bytes)

    @property
    def loaded_bytes(self) -> int:
        """Total file bytes of the loaded graphs."""
        with self._lock:
            return sum(self._bytes.values())

    @property
    def in_use(self) -> set[str]:
        """Graphs a stage has taken (``get``) and not given back (``done``)."""
        with self._lock:
            return set(self._residency.in_use)

    # -- creation -----------------------------------------------------------------------------
    def _create(self, spec: GraphSpec):
        """(session, load_log fields): verify, then create from the optimized copy or the bundle."""
        started = time.perf_counter()
        for relpath in spec.files:
            if relpath not in self._verified:
                verify_file(self.manifest, relpath)
                self._verified.add(relpath)
        hashed = time.perf_counter()
        ort = import_onnxruntime()
        entries = {**graph_session_config(spec), **device.session_config(self.providers, self.policy),
                   **_manifest_session_config(spec)}
        providers = device.provider_config(self.providers, self.policy, self.device_id)
        path = self.manifest.path(spec.file)
        fp16_on_cpu = self._fp16_on_cpu(spec)
        copies = self.settings.optimized_copies and self.settings.optimization != "disable" and ort_cache.enabled()
        inputs = self._copy_inputs(spec, ort, providers, entries)
        key = ort_cache.copy_key(inputs) if copies else None
        # copies of this graph file under these settings: a newer one replaces them (rebuilt
        # bundle, new onnxruntime); other settings keep their own copy
        settings = {k: v for k, v in inputs.items() if k not in ("files", "onnxruntime")}
        source = f"{path.resolve()}|{ort_cache.copy_key(settings)}"
        session, cached = None, False
        copy = ort_cache.find(key) if key is not None else None
        if copy is not None:
            try:
                session = self._session(ort, spec, copy.model, entries, providers, optimization="disable")
                _check_io(session, spec, path)
                if fp16_on_cpu:
                    self._refuse_casts(spec, copy.model.read_bytes(), path)
                cached = True
            except _CastsRefused:
                raise
            except BundleError:
                ort_cache.discard(copy)  # unusable copy: rebuilt from the bundle below
                session = None
        if session is None:
            staging = ort_cache.start(key) if key is not None else None
            if staging is None and fp16_on_cpu:
                staging = Path(tempfile.mkdtemp(prefix="omni-runtime-check-"))  # only to look for Casts
            try:
                try:
                    session = self._session(ort, spec, path, entries, providers, staging=staging)
                except BundleError as e:
                    if staging is None or fp16_on_cpu or "NOT_IMPLEMENTED" in e.problem:
                        raise
                    ort_cache.discard(staging)  # the copy could not be written (disk full?): load without it
                    staging = None
                    session = self._session(ort, spec, path, entries, providers)
                _check_io(session, spec, path)
                if fp16_on_cpu:
                    model = staging / ort_cache.MODEL
                    self._refuse_casts(spec, model.read_bytes() if model.exists() else b"", path)
            except BaseException:
                if staging is not None:
                    ort_cache.discard(staging)
                raise
            if staging is not None:
                written = ort_cache.commit(key, staging, source=source) if key is not None else None
                if key is None:
                    ort_cache.discard(staging)
                if written is not None:
                    # a session that saved its optimized graph keeps the unpacked initializers as well
                    # (+0.7 GB for the 7b-shape awq thinker decoder, measured): reopen from the copy
                    del session
                    return_host_memory()
                    session = self._session(ort, spec, written.model, entries, providers, optimization="disable")
                    _check_io(session, spec, path)
        if self.providers and self.providers[0] == CUDA:
            device.watch_device(self.device_id)
        now = time.perf_counter()
        return session, {"seconds": now - started, "cached": cached, "hash_seconds": hashed - started}

    def _session(self, ort, spec: GraphSpec, model: Path, entries: dict, providers: list,
                 optimization: str | None = None, staging: Path | None = None):
        options = self.settings.session_options(ort, optimization)
        for key, value in entries.items():
            options.add_session_config_entry(key, value)
        if staging is not None:
            options.optimized_model_filepath = str(staging / ort_cache.MODEL)
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             ort_cache.DATA)
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                             str(ort_cache.EXTERNAL_MIN_BYTES))
        try:
            return ort.InferenceSession(str(model), sess_options=options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            if "NOT_IMPLEMENTED" in str(e) and self.providers[0] == CPU:
                raise BundleError(
                    f"graph {spec.name!r} has nodes onnxruntime {ort.__version__}'s CPU provider has no kernel for "
                    f"(a graph built for --target cuda?): {e}", path=self.manifest.path(spec.file), fix=_CUDA_FIX) from e
            raise BundleError(
                f"onnxruntime {ort.__version__} cannot load graph {spec.name!r}: {e}",
                path=model,
                fix="install onnxruntime >= 1.20, or rebuild the bundle",
            ) from e

    def _fp16_on_cpu(self, spec: GraphSpec) -> bool:
        """True if a float16 (or bfloat16) graph is about to run on the CPU provider."""
        if not self.providers or self.providers[0] != CPU or self.settings.allow_cpu_casts:
            return False
        halves = {"float16", "bfloat16"}
        return (spec.dtype in halves or manifest_target(self.manifest) == "cuda"
                or any(t.dtype in halves for t in (*spec.inputs, *spec.outputs)))

    def _refuse_casts(self, spec: GraphSpec, optimized: bytes, path: Path) -> None:
        """BundleError if onnxruntime inserted float32 Casts into the optimized graph."""
        if _INSERTED_CAST not in optimized:
            return
        ort = import_onnxruntime()
        names = sorted({m.decode("utf-8", "replace") for m in re.findall(re.escape(_INSERTED_CAST) + rb"([\w./:-]{1,80})",
                                                                          optimized)})
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise _CastsRefused(
            f"graph {spec.name!r} is {spec.dtype} but onnxruntime {ort.__version__}'s CPU provider has no float16 "
            f"kernel for some of its nodes: it would run them in float32 through inserted Casts, slowly "
            f"(Casts on {shown})", path=path, fix=_CUDA_FIX)

    def _copy_inputs(self, spec: GraphSpec, ort, providers: list, entries: dict) -> dict:
        """What the optimized copy of ``spec`` depends on (its cache key)."""
        return {"files": [self.manifest.files[relpath]["sha256"] for relpath in spec.files],
                "onnxruntime": ort.__version__, "providers": providers, "optimization": self.settings.optimization,
                "session_config": entries}


def graph_session_config(spec: GraphSpec) -> dict[str, str]:
    """Session config entries a graph's manifest entry asks for.

    A quantized graph records the MatMulNBits ``accuracy_level`` of its recipe (0 = the op's
    default, 1 = fp32, 2 = fp16, 3 = bf16, 4 = int8 compute): onnxruntime applies it when it
    fuses the graph's DequantizeLinear + MatMul pairs into MatMulNBits.
    """
    quant = spec.quantization if isinstance(spec.quantization, dict) else {}
    level = quant.get("accuracy_level")
    if isinstance(level, int) and not isinstance(level, bool) and 0 <= level <= 4:
        return {"session.qdq_matmulnbits_accuracy_level": str(level)}
    return {}


def manifest_target(manifest: Manifest) -> str:
    """The device the bundle was built for: ``cpu`` (default) or ``cuda`` (``omni-export build --target``)."""
    target = getattr(manifest, "target", None)
    if not isinstance(target, str):
        target = manifest.data.get("target", "cpu")
    return target if isinstance(target, str) else "cpu"


def _manifest_session_config(spec: GraphSpec) -> dict[str, str]:
    """The graph entry's ``session_config`` (string keys and values; others are ignored)."""
    config = getattr(spec, "session_config", None) or {}
    if not isinstance(config, dict):
        return {}
    return {k: v for k, v in config.items() if isinstance(k, str) and isinstance(v, str)}


def _check_io(session, spec: GraphSpec, path) -> None:
    """BundleError listing every input/output name or dtype that differs from the manifest."""
    problems = []
    for kind, actual, expected in (
        ("input", session.get_inputs(), spec.inputs),
        ("output", session.get_outputs(), spec.outputs),
    ):
        actual = {arg.name: arg for arg in actual}
        expected = {tensor.name: tensor for tensor in expected}
        problems += [f"the manifest's {kind} {name!r} is missing" for name in expected if name not in actual]
        problems += [f"unexpected {kind} {name!r}" for name in actual if name not in expected]
        for name in expected.keys() & actual.keys():
            dtype = ORT_DTYPES.get(actual[name].type, actual[name].type)
            if dtype != expected[name].dtype:
                problems.append(f"{kind} {name!r} is {dtype}, the manifest says {expected[name].dtype}")
    if problems:
        raise BundleError(
            f"graph {spec.name!r} does not match the manifest: {'; '.join(sorted(problems))}",
            path=path,
            fix="rebuild the bundle (the graph file and manifest.json come from different builds?)",
        )
