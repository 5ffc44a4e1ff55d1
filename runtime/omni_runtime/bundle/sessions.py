"""ONNX Runtime sessions for a bundle's graphs: provider choice, lazy loading and release.

onnxruntime is imported only when needed, so the rest of the runtime imports without it.
Sessions are created on first use (after checking the sha256 of the graph's files and its
inputs/outputs against the manifest) and can be released after use; the pool remembers the
file bytes of each loaded graph so a memory budget can be enforced on top of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from omni_runtime.errors import BundleError, InputError, OmniError
from omni_runtime.bundle.manifest import GraphSpec, Manifest, verify_file

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
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
    """``onnxruntime.SessionOptions`` settings; 0 threads means onnxruntime's default."""

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    optimization: str = "all"
    log_severity: int = 3

    def session_options(self, ort):
        """Build the ``SessionOptions`` for the given onnxruntime module."""
        if self.optimization not in _OPTIMIZATION_LEVELS:
            raise InputError(
                f"unknown graph optimization level {self.optimization!r}",
                fix=f"use one of: {', '.join(_OPTIMIZATION_LEVELS)}",
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPTIMIZATION_LEVELS[self.optimization])
        options.log_severity_level = self.log_severity
        return options


class SessionPool:
    """Lazily created inference sessions of one bundle's graphs."""

    def __init__(self, manifest: Manifest, providers: list[str], settings: SessionSettings = SessionSettings()):
        self.manifest = manifest
        self.providers = list(providers)
        self.settings = settings
        self._sessions = {}
        self._bytes: dict[str, int] = {}
        self._verified: set[str] = set()

    def get(self, graph_name: str):
        """The ``onnxruntime.InferenceSession`` of ``graph_name``, created on first use.

        Before the first load the graph's files are checked against their sha256 (once per
        pool) and the session's inputs/outputs against the manifest; BundleError otherwise.
        """
        session = self._sessions.get(graph_name)
        if session is not None:
            return session
        spec = self.manifest.graph(graph_name)
        for relpath in spec.files:
            if relpath not in self._verified:
                verify_file(self.manifest, relpath)
                self._verified.add(relpath)
        ort = import_onnxruntime()
        options = self.settings.session_options(ort)
        for key, value in graph_session_config(spec).items():
            options.add_session_config_entry(key, value)
        path = self.manifest.path(spec.file)
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise BundleError(
                f"onnxruntime {ort.__version__} cannot load graph {graph_name!r}: {e}",
                path=path,
                fix="install onnxruntime >= 1.20, or rebuild the bundle",
            ) from e
        _check_io(session, spec, path)
        self._sessions[graph_name] = session
        self._bytes[graph_name] = sum(self.manifest.files[relpath]["bytes"] for relpath in spec.files)
        return session

    def release(self, graph_name: str) -> None:
        """Free the session of ``graph_name`` if it is loaded (it is re-created on the next get)."""
        self._sessions.pop(graph_name, None)
        self._bytes.pop(graph_name, None)

    def release_all(self) -> None:
        """Free every loaded session."""
        self._sessions.clear()
        self._bytes.clear()

    @property
    def loaded(self) -> dict[str, int]:
        """Loaded graph name -> bytes of its files (graph plus external data), in load order."""
        return dict(self._bytes)

    @property
    def loaded_bytes(self) -> int:
        """Total file bytes of the loaded graphs."""
        return sum(self._bytes.values())


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
