"""Session memory policies: which loaded sessions stay, which are freed, and the budget check.

A policy is one of (``--memory`` on the command lines, ``memory=`` in the API):

- ``lazy`` (default): a session is created on first use and freed as soon as its stage says it
  is done with it (``SessionPool.done``): the encoders after the prefill, the thinker after its
  text, the talker and token2wav after the speech. Peak memory is the largest stage.
- ``resident``: every session stays loaded once created (fastest for many requests in one
  process, peak memory is every graph used so far).
- a byte budget (``6GB``, ``6.5GiB``, ``800MB`` or a plain integer of bytes): sessions stay
  loaded while they fit; before a session is created, the least recently used sessions that
  no stage is using are evicted until it fits.

A session's size is the file bytes of its graph (graph + external data, from the manifest),
close to what its weights take once loaded, less where they stay memory-mapped (the int8
embeddings); docs/bundle-format.md gives the RSS measured per graph of the 7b-shape awq bundle.
A budget smaller than the largest stage a request needs (the sessions that stage holds at
once, ``request_stages``) is an InputError before any graph runs, naming the stage and its size.

``Residency`` is the bookkeeping alone (no onnxruntime): ``SessionPool`` asks it what to evict
before each load and whether to free a session a stage is done with.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral

from omni_runtime.bundle import names
from omni_runtime.errors import InputError

LAZY = "lazy"
RESIDENT = "resident"
BUDGET = "budget"
MODES = (LAZY, RESIDENT)

#: byte units, case-insensitive: decimal (kB = 1000) and binary (KiB = 1024)
UNITS = {"": 1, "b": 1,
         "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
         "t": 1000 ** 4, "tb": 1000 ** 4,
         "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}
_BYTES = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)\s*$", re.IGNORECASE)
MEMORY_FIX = "pass lazy, resident, or a byte budget such as 6GB, 6.5GiB, 800MB or 4000000000"


def parse_bytes(text: str) -> int:
    """``"6GB"`` -> 6000000000, ``"6.5GiB"`` -> 6979321856, ``"800MB"``, ``"4000000000"``; InputError otherwise."""
    match = _BYTES.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in UNITS:
        raise InputError(f"memory={text!r} is not lazy, resident or a byte size", fix=MEMORY_FIX, param="memory")
    value = int(float(match.group(1)) * UNITS[unit])
    if value < 1:
        raise InputError(f"memory={text!r} is a budget of 0 bytes", fix=MEMORY_FIX, param="memory")
    return value


def format_bytes(value: int) -> str:
    """Bytes for messages: ``1.23 GB`` (decimal units, as ``--memory 1.23GB`` reads them)."""
    for unit, size in (("TB", 1000 ** 4), ("GB", 1000 ** 3), ("MB", 1000 ** 2), ("kB", 1000)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value} B"


@dataclass(frozen=True)
class MemoryPolicy:
    """``mode`` ``lazy``, ``resident`` or ``budget`` (then ``budget_bytes`` is set)."""

    mode: str = LAZY
    budget_bytes: int | None = None
    text: str | None = field(default=None, compare=False)  # as the user spelled it, for messages

    @classmethod
    def parse(cls, value: "MemoryPolicy | str | int | None") -> "MemoryPolicy":
        """A policy from ``lazy``, ``resident``, a byte size (``"6GB"``, an int) or None (lazy)."""
        if value is None:
            return cls()
        if isinstance(value, MemoryPolicy):
            return value
        if isinstance(value, Integral) and not isinstance(value, bool):
            if value < 1:
                raise InputError(f"memory={value} is not a positive number of bytes", fix=MEMORY_FIX,
                                 param="memory")
            return cls(BUDGET, int(value))
        if not isinstance(value, str):
            raise InputError(f"memory must be lazy, resident or a byte budget, got {type(value).__name__}",
                             fix=MEMORY_FIX, param="memory")
        word = value.strip().lower()
        if word in MODES:
            return cls(word)
        return cls(BUDGET, parse_bytes(value), value.strip())

    def __str__(self) -> str:
        """``lazy``, ``resident`` or the budget in bytes (what ``parse`` reads back)."""
        return self.mode if self.budget_bytes is None else str(self.budget_bytes)

    def to_json(self) -> dict:
        return {"mode": self.mode, "budget_bytes": self.budget_bytes}

    @property
    def frees_when_done(self) -> bool:
        """True if a session is freed as soon as its stage is done with it (lazy)."""
        return self.mode == LAZY

    @property
    def keeps_arena(self) -> bool:
        """Whether sessions may grow memory arenas by powers of two (resident: speed over memory);
        lazy and budgets ask onnxruntime for exactly what is requested instead."""
        return self.mode == RESIDENT


class Residency:
    """Which sessions are loaded, in least-recently-used order, and which a stage is using.

    ``touch`` marks a graph in use and most recently used; ``done`` marks it idle and says
    whether to free it now (lazy); ``evictions`` says which idle sessions to free so that a
    graph of ``size`` bytes fits the budget. The pool calls ``loaded`` / ``removed`` as
    sessions come and go. Pure bookkeeping, no onnxruntime.
    """

    def __init__(self, policy: MemoryPolicy):
        self.policy = policy
        self.sizes: OrderedDict[str, int] = OrderedDict()  # loaded (or loading), least recent first
        self.in_use: set[str] = set()

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def touch(self, name: str) -> None:
        self.in_use.add(name)
        if name in self.sizes:
            self.sizes.move_to_end(name)

    def evictions(self, name: str, size: int) -> list[str]:
        """Idle sessions to free, least recently used first, before ``name`` (``size`` bytes) loads.

        Only a budget evicts; when the sessions in use leave no room, every idle one goes and
        the load proceeds over the budget (``check_stages`` refuses such budgets up front)."""
        if self.policy.budget_bytes is None:
            return []
        room = self.policy.budget_bytes - size - sum(s for n, s in self.sizes.items() if n != name)
        out = []
        for other, other_size in self.sizes.items():
            if room >= 0:
                break
            if other != name and other not in self.in_use:
                out.append(other)
                room += other_size
        return out

    def loaded(self, name: str, size: int) -> None:
        self.sizes[name] = size
        self.sizes.move_to_end(name)

    def done(self, name: str) -> bool:
        """Mark ``name`` idle; True if the policy frees it now."""
        self.in_use.discard(name)
        return name in self.sizes and self.policy.frees_when_done

    def removed(self, name: str) -> None:
        self.sizes.pop(name, None)
        self.in_use.discard(name)


# ---------------------------------------------------------------------------------------------
# stages: the graphs a stage holds at once


@dataclass(frozen=True)
class Stage:
    """A step of a request and the graphs it holds loaded at the same time."""

    name: str
    graphs: tuple[str, ...]


THINKER = Stage("thinker", (names.THINKER_EMBEDDING, names.THINKER_DECODER))
AUDIO_ENCODER = Stage("audio encoder", (names.AUDIO_ENCODER,))
VISION_ENCODER = Stage("vision encoder", (names.VISION_ENCODER,))
TALKER = Stage("talker", (names.TALKER_EMBEDDING, names.TALKER_DECODER))
TOKEN2WAV_DIT = Stage("token2wav DiT", (names.TOKEN2WAV_DIT,))
TOKEN2WAV_BIGVGAN = Stage("token2wav BigVGAN", (names.TOKEN2WAV_BIGVGAN,))
#: streamed speech: token2wav consumes the codes while the talker produces them
STREAMED_SPEECH = Stage("streamed speech", (names.TALKER_EMBEDDING, names.TALKER_DECODER, names.TOKEN2WAV_DIT,
                                            names.TOKEN2WAV_BIGVGAN))


def request_stages(audio: bool = False, vision: bool = False, speech: bool = False,
                   stream: bool = False) -> list[Stage]:
    """The stages of one request, in the order they run."""
    stages = ([AUDIO_ENCODER] if audio else []) + ([VISION_ENCODER] if vision else []) + [THINKER]
    if speech:
        stages += [STREAMED_SPEECH] if stream else [TALKER, TOKEN2WAV_DIT, TOKEN2WAV_BIGVGAN]
    return stages


def all_stages(graphs: Iterable[str]) -> list[Stage]:
    """Every stage a bundle with ``graphs`` can run (streamed speech included)."""
    present = set(graphs)
    candidates = [AUDIO_ENCODER, VISION_ENCODER, THINKER, TALKER, TOKEN2WAV_DIT, TOKEN2WAV_BIGVGAN, STREAMED_SPEECH]
    return [stage for stage in candidates if all(g in present for g in stage.graphs)]


def stage_bytes(stage: Stage, sizes: Mapping[str, int]) -> int:
    """Bytes of the stage's graphs (those the bundle has)."""
    return sum(sizes.get(g, 0) for g in stage.graphs)


def check_stages(policy: MemoryPolicy, stages: Sequence[Stage], sizes: Mapping[str, int]) -> None:
    """InputError naming the largest stage that does not fit ``policy``'s budget (no-op without one)."""
    if policy.budget_bytes is None:
        return
    too_big = [(stage_bytes(s, sizes), s) for s in stages if stage_bytes(s, sizes) > policy.budget_bytes]
    if not too_big:
        return
    need, stage = max(too_big, key=lambda item: item[0])
    graphs = " + ".join(f"{g} ({format_bytes(sizes[g])})" for g in stage.graphs if g in sizes)
    spelled = policy.text or str(policy.budget_bytes)
    raise InputError(
        f"memory={spelled} ({format_bytes(policy.budget_bytes)}) is smaller than the {stage.name} "
        f"stage, which holds {graphs} = {format_bytes(need)} at once",
        fix=f"give a budget of at least {need} bytes ({_round_up(need)}), or memory=lazy",
        param="memory")


def _round_up(value: int) -> str:
    """A budget spelling >= value, e.g. ``1.24GB``."""
    for unit, size in (("GB", 1000 ** 3), ("MB", 1000 ** 2), ("kB", 1000)):
        if value >= size:
            return f"{-(-value * 100 // size) / 100:g}{unit}"
    return f"{value}B"
