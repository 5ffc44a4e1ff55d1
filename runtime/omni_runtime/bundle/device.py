"""Devices: execution provider options from the memory policy, giving memory back, NVML readings.

- ``provider_options`` / ``session_config``: what each session is created with, from the
  providers and the memory policy (``omni_runtime.bundle.memory``). On CUDA: ``lazy`` and byte
  budgets grow the device arena by exactly what is requested (``arena_extend_strategy
  kSameAsRequested``, not powers of two), a budget caps each session's arena (``gpu_mem_limit``),
  cuDNN picks convolution algorithms by heuristics with a bounded workspace (its exhaustive
  search allocates large trial workspaces) and initializers bypass the arena
  (``session.use_device_allocator_for_initializers``), so dropping a session returns its device
  memory. ``resident`` keeps onnxruntime's defaults (power-of-two arena growth, exhaustive
  search). On CPU every policy keeps onnxruntime's per-session arena: it is freed with its
  session (measured, tests/test_memory_policy.py).
- ``return_host_memory``: glibc keeps freed heap pages of a dropped session (initializers of a
  few MB come from the heap, not from mmap) until ``malloc_trim(0)``; the pool calls it after
  freeing a session, so RSS really falls back (without it, RSS stayed at the loaded level).
- ``peak_device_memory``: the highest device memory in use that a sampler thread read through
  NVML while CUDA sessions existed (``pynvml`` / ``nvidia-ml-py`` when installed, else
  ``libnvidia-ml.so.1`` through ctypes); None without NVML or before any CUDA session.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import threading
from collections.abc import Callable, Sequence

from omni_runtime.bundle.memory import MemoryPolicy

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def provider_options(providers: Sequence[str], policy: MemoryPolicy, device_id: int = 0) -> list[dict[str, str]]:
    """onnxruntime provider options, one dict per provider of ``providers`` (the same order)."""
    out = []
    for provider in providers:
        options: dict[str, str] = {}
        if provider == CUDA:
            options["device_id"] = str(device_id)
            if policy.keeps_arena:
                options["arena_extend_strategy"] = "kNextPowerOfTwo"
                options["cudnn_conv_algo_search"] = "EXHAUSTIVE"
            else:
                options["arena_extend_strategy"] = "kSameAsRequested"
                options["cudnn_conv_algo_search"] = "HEURISTIC"
                options["cudnn_conv_use_max_workspace"] = "0"
            if policy.budget_bytes is not None:
                # a per-session cap: one session's arena can never exceed the whole budget
                options["gpu_mem_limit"] = str(policy.budget_bytes)
        out.append(options)
    return out


def provider_config(providers: Sequence[str], policy: MemoryPolicy, device_id: int = 0) -> list:
    """``InferenceSession(providers=...)``: ``(name, options)`` pairs, bare names when no option."""
    return [(p, o) if o else p for p, o in zip(providers, provider_options(providers, policy, device_id))]


def session_config(providers: Sequence[str], policy: MemoryPolicy) -> dict[str, str]:
    """Session config entries the memory policy asks for on these providers."""
    if providers and providers[0] == CUDA and not policy.keeps_arena:
        # weights allocated exactly, outside the arena: freed with the session, no arena slack
        return {"session.use_device_allocator_for_initializers": "1"}
    return {}


# ---------------------------------------------------------------------------------------------
# host memory


def _libc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def return_host_memory() -> bool:
    """Give the heap's free pages back to the system (glibc ``malloc_trim(0)``); False elsewhere."""
    if _LIBC is None:
        return False
    _LIBC.malloc_trim(0)
    return True


def rss_bytes() -> int | None:
    """This process's resident set size (Linux ``/proc/self/statm``), None elsewhere."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------------------------------------
# NVML: device memory in use


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class Nvml:
    """Reads device memory through NVML: ``used(device_id)`` is this process's device memory when
    NVML reports it per process (pynvml), else the whole device's used memory."""

    def __init__(self, read: Callable[[int], int | None], source: str):
        self.read = read
        self.source = source  # "pynvml" or "libnvidia-ml" (device-wide)

    def used(self, device_id: int = 0) -> int | None:
        try:
            return self.read(device_id)
        except Exception:  # a driver error mid-run: no reading rather than a failed request
            return None


def _pynvml() -> Nvml | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    pid = os.getpid()

    def read(device_id: int) -> int | None:
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_id)
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)

    return Nvml(read, "pynvml")


def _libnvml() -> Nvml | None:
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    try:
        if lib.nvmlInit_v2() != 0:
            return None
    except AttributeError:
        return None

    def read(device_id: int) -> int | None:
        handle = ctypes.c_void_p()
        if lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(device_id), ctypes.byref(handle)) != 0:
            return None
        info = _NvmlMemory()
        if lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(info)) != 0:
            return None
        return int(info.used)

    return Nvml(read, "libnvidia-ml")


_nvml_lock = threading.Lock()
_nvml: list = []  # [Nvml | None] once probed


def nvml() -> Nvml | None:
    """The process's NVML reader (probed once), or None without an NVIDIA driver."""
    with _nvml_lock:
        if not _nvml:
            _nvml.append(_pynvml() or _libnvml())
        return _nvml[0]


class DeviceMemorySampler:
    """A daemon thread that reads ``read()`` every ``interval`` seconds and keeps the highest value.

    NVML has no peak counter, so the peak is sampled: a spike shorter than ``interval`` can be
    missed (10 ms by default; a decoder step on a GPU takes longer)."""

    def __init__(self, read: Callable[[], int | None], interval: float = 0.01):
        self.read = read
        self.interval = interval
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        value = self.read()
        if value is not None and (self.peak is None or value > self.peak):
            self.peak = value

    def start(self) -> "DeviceMemorySampler":
        if self._thread is None:
            self.sample()
            self._thread = threading.Thread(target=self._run, name="omni-runtime-nvml", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.sample()

    def reset(self) -> None:
        self.peak = None
        self.sample()


_samplers: dict[int, DeviceMemorySampler] = {}


def watch_device(device_id: int = 0) -> DeviceMemorySampler | None:
    """Start (once per device) sampling device memory; None without NVML. The pool calls it when
    it creates a CUDA session."""
    reader = nvml()
    if reader is None:
        return None
    with _nvml_lock:
        if device_id not in _samplers:
            _samplers[device_id] = DeviceMemorySampler(lambda: reader.used(device_id)).start()
        return _samplers[device_id]


def peak_device_memory(device_id: int = 0) -> int | None:
    """Peak device memory (bytes) seen since the first CUDA session or the last
    ``reset_peak_device_memory``; None without NVML or when no CUDA session was created."""
    sampler = _samplers.get(device_id)
    if sampler is None:
        return None
    sampler.sample()
    return sampler.peak


def reset_peak_device_memory(device_id: int = 0) -> None:
    """Start a new peak from the memory in use now (e.g. before each benchmark repeat)."""
    sampler = _samplers.get(device_id)
    if sampler is not None:
        sampler.reset()
