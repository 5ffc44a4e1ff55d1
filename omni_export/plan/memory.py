"""The stage model: peak memory of each stage of one request, under a session policy.

A request runs in stages (the names ``omni-export bench`` reports too)::

    audio_encoder    the audio clip and the video's sound track -> audio tokens
    vision_encoder   images and the video's frames -> vision tokens (one graph call for all)
    thinker_prefill  the expanded prompt through the thinker, 256 tokens per decoder run
    thinker_decode   the answer, one token per run
    speech           the talker and token2wav together, streamed (talker codes -> DiT chunks -> BigVGAN)

Each stage's peak is ``base + weights + host + max(kv + activations + arena, load)``:

- ``weights``: the weight bytes (``params``) of the sessions loaded at the stage under the policy
  (``lazy``: the stage's own; ``resident``: every session loaded so far; a byte budget: what
  fits, least recently used evicted first);
- ``kv``: the preallocated K/V buffers (thinker: prompt + answer; talker: its prefill + codes);
- ``activations``: the analytic largest live tensors of the stage's graph runs (``_working_sets``);
  ``arena``: what the sessions' onnxruntime arenas hold beyond them (measured factors, kept until
  a session is released: the thinker's prefill peak stays in its arena while it decodes);
- ``host``: numpy arrays of the runtime at the stage (pixels, embeddings, the thinker states the
  talker needs);
- ``load``: extra bytes for a moment while a session of the stage is created (the larger of it
  and the run for a stage that loads then runs; added for the streamed speech, whose two threads
  load while the talker runs);
- ``base``: the runtime itself (``constants.BASE_BYTES``).

On ``--target cuda`` the peak is device memory: weights, KV, activations and arena live on the
GPU (IO binding keeps the KV there) and ``base`` is the CUDA context; the host side (runtime,
numpy arrays) is reported as ``host_peak_bytes``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omni_runtime.bundle import names

from omni_export.plan import constants as C
from omni_export.plan import params
from omni_export.plan.config import ModelShape, PlanError
from omni_export.plan.media import MediaPlan, audio_chunks, plan_media

STAGES = ("audio_encoder", "vision_encoder", "thinker_prefill", "thinker_decode", "speech")
#: the graphs each stage holds (omni_runtime.bundle.memory.request_stages, streamed speech)
STAGE_GRAPHS = {
    "audio_encoder": (names.AUDIO_ENCODER,),
    "vision_encoder": (names.VISION_ENCODER,),
    "thinker_prefill": (names.THINKER_EMBEDDING, names.THINKER_DECODER),
    "thinker_decode": (names.THINKER_EMBEDDING, names.THINKER_DECODER),
    # the talker's three thinker-table rows are embedded before the thinker stage ends
    "speech": (names.TALKER_EMBEDDING, names.TALKER_DECODER, names.TOKEN2WAV_DIT, names.TOKEN2WAV_BIGVGAN),
}
#: stages that free their sessions together under ``lazy`` ("the thinker after its text")
LAZY_GROUPS = {"thinker_prefill": "thinker", "thinker_decode": "thinker"}
POLICIES = ("lazy", "resident")

def parse_bytes(text: str, flag: str) -> int:
    """``8GB``, ``7.5GiB``, ``512MB``, ``4000000000`` -> bytes (the runtime's ``--memory`` units);
    PlanError naming ``flag`` otherwise."""
    from omni_runtime.bundle.memory import parse_bytes as runtime_parse_bytes
    from omni_runtime.errors import InputError

    try:
        return runtime_parse_bytes(str(text))
    except InputError:
        raise PlanError(f"{flag} {text!r} is not a size", param=flag,
                        fix=f"write a number with a unit: e.g. {flag} 8GB, 7.5GiB, 512MB (or plain bytes)") from None


def parse_policy(text: str) -> str | int:
    """``lazy``, ``resident`` or a byte budget (``6GB``)."""
    if text in POLICIES:
        return text
    try:
        return parse_bytes(text, "--memory")
    except PlanError:
        raise PlanError(f"--memory {text!r} is not a policy", param="--memory",
                        fix="use lazy, resident or a byte budget such as 6GB") from None


@dataclass(frozen=True)
class Request:
    """The planned request (``omni-export plan`` flags)."""

    video_seconds: float = 0.0
    video_size: tuple[int, int] = C.DEFAULT_VIDEO_SIZE
    audio_seconds: float = 0.0
    images: tuple[tuple[int, int], ...] = ()
    speech: bool = True
    max_new_tokens: int | None = None  # None: the runtime's default, clamped to the context
    max_speech_seconds: float | None = None  # None: the talker's code limit (4096)
    text_tokens: int = C.PROMPT_TEXT_TOKENS


@dataclass
class Stage:
    name: str
    graphs: list[str]  # sessions loaded at the stage's peak
    loads: list[str]  # sessions created during the stage
    weights_bytes: int
    kv_bytes: int
    activations_bytes: int
    arena_bytes: int
    base_bytes: int
    host_bytes: int
    load_bytes: int
    peak_bytes: int
    host_peak_bytes: int

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Plan:
    model: str
    recipe: str
    target: str
    policy: str | int
    request: Request
    media: MediaPlan
    graph_bytes: dict[str, int]
    stages: list[Stage]
    device_memory_bytes: int
    device_memory_source: str
    context: dict
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> Stage:
        return max(self.stages, key=lambda s: s.peak_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.peak.peak_bytes

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.device_memory_bytes and self.context["fits"]

    def to_json(self) -> dict:
        return {
            "peak_bytes": self.peak_bytes,
            "fits": self.fits,
            "peak_stage": self.peak.name,
            "device_memory_bytes": self.device_memory_bytes,
            "device_memory_source": self.device_memory_source,
            "host_peak_bytes": max(s.host_peak_bytes for s in self.stages),
            "model": self.model,
            "recipe": self.recipe,
            "target": self.target,
            "memory_policy": self.policy,
            "request": {**asdict(self.request), "images": [list(i) for i in self.request.images],
                        "video_size": list(self.request.video_size)},
            "media": self.media.summary(),
            "context": self.context,
            "graphs": self.graph_bytes,
            "stages": [s.to_json() for s in self.stages],
            "notes": self.notes,
        }


# ---------------------------------------------------------------------------------------------
# weights


@dataclass(frozen=True)
class _ModuleSettings:
    """A module's recipe values as a bundle's manifest records them (``recipe.modules.<name>``)."""

    weights: str
    dtype: str | None
    group_size: int | None
    emit: str | None
    lm_head: str | None
    embeddings: str | None
    keep_float: tuple[str, ...]
    keep_fp32: tuple[str, ...] = ()


@dataclass(frozen=True)
class BundleRecipe:
    """The recipe a bundle was built with (``--recipe BUNDLE``): plans exactly what it holds."""

    name: str
    source: str
    target: str
    modules: dict


def bundle_recipe(bundle: Path) -> BundleRecipe:
    try:
        manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
        recipe = manifest["recipe"]
        modules = {name: _ModuleSettings(m["weights"], m.get("dtype"), m.get("group_size"), m.get("emit"),
                                         m.get("lm_head"), m.get("embeddings"), tuple(m.get("keep_float") or ()),
                                         tuple(m.get("keep_fp32") or ()))
                   for name, m in recipe["modules"].items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PlanError(f"cannot read the bundle's recipe from manifest.json ({exc})", path=bundle / "manifest.json",
                        fix="pass a recipe name or YAML file, or a bundle written by omni-export build") from None
    target = (manifest.get("build") or {}).get("target") or recipe.get("target") or "cpu"
    return BundleRecipe(recipe.get("name", bundle.name), str(bundle / "manifest.json"), target, modules)


def load_plan_recipe(name_or_path: str, target: str):
    """The recipe resolved for ``target`` (its ``targets.<target>`` settings applied, as
    ``omni-export build --target`` resolves it), or a bundle directory's own recipe."""
    from omni_export.build.recipes import load_recipe

    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "manifest.json").is_file():
            raise PlanError("this directory is not a bundle (no manifest.json)", path=path,
                            fix="pass a recipe name (fp32, int4-rtn, awq), a recipe YAML file or a bundle directory")
        return bundle_recipe(path)
    try:
        return load_recipe(name_or_path, target=target)
    except TypeError:  # a recipes module without build targets: module_storage models the target
        return load_recipe(name_or_path)


def module_storage(recipe, module: str, target: str) -> params.Storage:
    """How the recipe stores ``module`` on ``target``. A recipe resolved for the target gives its
    float type (``dtype``: activations, norms, biases, scales); without target support in the
    recipe, ``constants.TARGET_FLOAT`` is applied: on cuda float32 weights and float parts become
    float16."""
    m = recipe.modules[module]
    dtype = getattr(m, "dtype", None)
    if dtype is not None and getattr(recipe, "target", None) == target:
        weights, float_dtype = m.weights, dtype
    else:
        float_dtype = C.TARGET_FLOAT[target] if m.weights in ("float32", "int4", "int8") else m.weights
        weights = float_dtype if m.weights == "float32" else m.weights
    return params.Storage(weights, float_dtype, m.group_size or 128, m.emit or "qdq", m.lm_head, m.embeddings,
                          tuple(m.keep_float or ()), tuple(getattr(m, "keep_fp32", None) or ()))


def check_precisions(recipe) -> None:
    """PlanError for a precision of the recipe the byte model does not know (a new one)."""
    for name, m in recipe.modules.items():
        if m.weights not in C.PRECISIONS:
            raise PlanError(f"modules.{name}.weights: {m.weights} has no byte formula in omni_export/plan/constants.py",
                            path=recipe.source, fix="add it to PRECISIONS (bytes of a linear [out, in])")


def storages(shape: ModelShape, recipe, target: str) -> dict[str, params.Storage]:
    """How each module the recipe builds from this model is stored (speech modules only with a talker)."""
    check_precisions(recipe)
    return {module: module_storage(recipe, module, target) for module in recipe.modules
            if shape.speech or module not in ("talker", "token2wav")}


def graph_weight_bytes(shape: ModelShape, recipe, target: str) -> dict[str, int]:
    """Bytes of every graph the recipe builds from this model."""
    out = {}
    for module, storage in storages(shape, recipe, target).items():
        for graph, tensors in params.inventory(module, shape).items():
            out[graph] = params.graph_bytes(tensors, storage)
    return out


# ---------------------------------------------------------------------------------------------
# activations: the largest tensors alive together in each graph run (elements)


def _working_sets(shape: ModelShape, media: MediaPlan, prompt: int, answer: int, codes: int,
                  target: str) -> dict[str, dict[str, float]]:
    """Per stage: graph -> elements of its largest live tensors in one run (analytic, before the
    measured factor), and ``host`` -> float32 elements of the runtime's numpy arrays."""
    cuda = target == "cuda"
    t, a, v = shape.text, shape.audio, shape.vision
    out: dict[str, dict[str, float]] = {}
    # audio encoder: chunks of 2 * n_window mel frames, 100 positions each after the stride-2 conv
    chunks, longest = audio_chunks(media.audio_frames, a.n_window)
    if chunks:
        pos = (longest - 1) // 2 + 1
        conv = 2 * chunks * a.d_model * longest
        layer = chunks * pos * (3 * a.d_model + 2 * a.encoder_ffn_dim)
        attn = chunks * pos * 5 * a.d_model + 2 * chunks * a.encoder_attention_heads * pos * pos
        host = chunks * a.num_mel_bins * longest + media.audio_tokens * a.output_dim
        out["audio_encoder"] = {names.AUDIO_ENCODER: max(conv, layer, attn), "host": host}
    # vision encoder: every patch in one call; the MLP holds x, its norm, the packed gate/up
    # output and its two halves; attention runs in Loop chunks (heads x 512 x frame patches)
    n = media.patches
    if n:
        # the MLP: the residual, the packed gate/up output and one half split off; the attention
        # Loop: score-sized buffers of one iteration (one frame, 512 queries)
        mlp = n * (v.hidden_size + 3 * v.intermediate_size)
        scores = C.VISION_SCORE_BUFFERS * v.num_heads * 512 * media.largest_frame_patches
        tokens = media.video_tokens + media.image_tokens
        host = n * v.patch_dim + tokens * v.out_hidden_size
        out["vision_encoder"] = {names.VISION_ENCODER: mlp + scores, "host": host}
    # thinker prefill: a chunk of 256 prompt tokens against the whole cache; onnxruntime's CPU
    # GroupQueryAttention holds heads x chunk x total scores (flash attention on CUDA does not)
    chunk = min(C.PREFILL_CHUNK, prompt)
    scores = 0 if cuda else t.num_attention_heads * chunk * prompt
    mlp = chunk * (2 * t.hidden_size + 4 * t.intermediate_size)
    attn = chunk * (2 * t.hidden_size + 3 * t.q_width + 2 * t.kv_width) + scores
    speech = shape.speech and codes > 0
    rows = prompt * t.hidden_size
    # host: the merged prompt embeddings; with speech also the talker's copy of them and the
    # prefill's hidden states (chunks + their concatenation)
    out["thinker_prefill"] = {names.THINKER_EMBEDDING: 1.25 * rows,  # int8 rows + float output
                              names.THINKER_DECODER: max(mlp, attn) + t.vocab_size,
                              "host": rows * (4 if speech else 1)}
    # decode: one token; the states grow by one row per token and are concatenated at the end
    step_scores = 0 if cuda else t.num_attention_heads * (prompt + answer)
    out["thinker_decode"] = {names.THINKER_EMBEDDING: t.hidden_size,
                             names.THINKER_DECODER: 2 * t.hidden_size + 4 * t.intermediate_size + step_scores
                             + t.vocab_size,
                             "host": rows + (4 * (prompt + answer) * t.hidden_size if speech else 0)}
    if speech:
        tk, d, b = shape.talker, shape.dit, shape.bigvgan
        total = prompt + 2
        tchunk = min(C.PREFILL_CHUNK, total)
        tscores = 0 if cuda else tk.num_attention_heads * tchunk * total
        talker = max(tchunk * (tk.embedding_size + 2 * tk.hidden_size + 4 * tk.intermediate_size),
                     tchunk * (tk.embedding_size + 2 * tk.hidden_size + 3 * tk.q_width) + tscores)
        # DiT: a streamed chunk of 24 + 48 + 12 codes, guidance batch 2, attention over 3 blocks
        frames = 84 * d.repeats
        dit = 2 * frames * (8 * d.hidden_size + 2 * d.num_attention_heads * 3 * d.block_size)
        # BigVGAN: 96 + 40 mel frames per run; channels x samples is largest in the late stages
        mel = 136
        length, widest = mel, 0
        for stage, rate in enumerate(b.upsample_rates):
            length *= rate
            widest = max(widest, b.channels(stage) * length)
        bigvgan = 9 * widest
        states = prompt + answer
        host = (5 * states + 2) * tk.embedding_size + rows  # states, their sum, the prefill, the reply
        out["speech"] = {names.TALKER_EMBEDDING: tk.embedding_size * 2,
                         names.TALKER_DECODER: talker, names.TOKEN2WAV_DIT: dit, names.TOKEN2WAV_BIGVGAN: bigvgan,
                         "host": host}
    return out


def weight_kind(stored: dict[str, params.Storage], graph: str) -> str:
    """``int4`` for a graph of int4 linears (MatMulNBits), else ``float``."""
    module = next(m for m, graphs in names.MODULE_GRAPHS.items() if graph in graphs)
    return "int4" if stored[module].weights == "int4" and graph not in C.GATHER_GRAPHS else "float"


def _resident_bytes(shape: ModelShape, stored: dict[str, params.Storage], sizes: dict[str, int], target: str,
                    tokens: int, codes: int) -> dict[str, float]:
    """Bytes a loaded session keeps resident, per graph (``constants.RESIDENT_FACTOR``): on CPU the
    gathered tables only the rows a request reads (the thinker's: the prompt and the answer, at
    most its vocabulary; the talker's: its codes)."""
    out = {}
    for graph, size in sizes.items():
        out[graph] = size * C.RESIDENT_FACTOR[target][weight_kind(stored, graph)]
    if target == "cpu":
        rows = {names.THINKER_EMBEDDING: (min(tokens, shape.text.vocab_size), shape.text.vocab_size)}
        if shape.talker is not None:
            rows[names.TALKER_EMBEDDING] = (min(codes + 3, shape.talker.vocab_size), shape.talker.vocab_size)
        for graph, (used, vocab) in rows.items():
            if graph in out:
                out[graph] = sizes[graph] * used / vocab
    return out


def kv_bytes(decoder, capacity: int, width: int) -> int:
    """K and V buffers of every layer for ``capacity`` positions of ``width`` bytes (the decoder's float type)."""
    return 2 * decoder.num_hidden_layers * decoder.kv_width * capacity * width


# ---------------------------------------------------------------------------------------------
# sessions under a policy


class _Sessions:
    """Which sessions are loaded, stage by stage, under ``policy``."""

    def __init__(self, policy, sizes: dict[str, int]):
        self.policy = policy
        self.sizes = sizes
        self.loaded: list[str] = []  # least recently used first

    def enter(self, stage: str, previous: str | None) -> list[str]:
        """Load ``stage``'s graphs; returns the ones created now."""
        needed = [g for g in STAGE_GRAPHS[stage] if g in self.sizes]
        if self.policy == "lazy" and previous is not None:
            group = LAZY_GROUPS.get(stage)
            if group is None or LAZY_GROUPS.get(previous) != group:
                self.loaded = []  # the previous stage's sessions were freed after it
        loads = [g for g in needed if g not in self.loaded]
        if isinstance(self.policy, int):
            own = sum(self.sizes[g] for g in needed)
            if own > self.policy:
                raise PlanError(f"--memory {self.policy} bytes is smaller than the {stage} stage's sessions "
                                f"({', '.join(needed)}: {C.human(own)})", param="--memory",
                                fix=f"give a budget of at least {C.human(own)} (or lazy)")
            for g in loads:
                while sum(self.sizes[x] for x in self.loaded) + self.sizes[g] > self.policy:
                    victim = next(x for x in self.loaded if x not in needed)
                    self.loaded.remove(victim)
                self.loaded.append(g)
        else:
            self.loaded += loads
        for g in needed:  # most recently used last
            self.loaded.remove(g)
            self.loaded.append(g)
        return loads


def device_memory(target: str, given: int | None) -> tuple[int, str]:
    """(bytes, where the figure comes from) of the memory the plan must fit in."""
    if given is not None:
        return given, "--device-memory"
    if target == "cpu":
        try:
            for line in open("/proc/meminfo", encoding="ascii"):
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024, "this machine's MemTotal"
        except OSError:
            pass
        return int(8 * C.GB), "assumed 8 GB (no /proc/meminfo)"
    try:  # the first GPU, when NVML is there
        import pynvml

        pynvml.nvmlInit()
        total = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total
        return int(total), "GPU 0 (NVML)"
    except Exception:  # noqa: BLE001 - no NVML, no GPU
        return int(8 * C.GB), "assumed 8 GB (no GPU found; pass --device-memory)"


def plan(shape: ModelShape, recipe, target: str = "cpu", request: Request = Request(), policy: str | int = "lazy",
         device_memory_bytes: int | None = None) -> Plan:
    """The per-stage peaks of ``request`` on ``shape`` built with ``recipe`` for ``target``."""
    if target not in C.TARGETS:
        raise PlanError(f"--target {target!r} is not a target", param="--target", fix="use cpu or cuda")
    stored = storages(shape, recipe, target)
    sizes = graph_weight_bytes(shape, recipe, target)
    # bytes of one activation value per graph: its module's float type
    width = {graph: int(C.PRECISIONS[stored[module].float_dtype].bytes_per_param)
             for module, graphs in names.MODULE_GRAPHS.items() if module in stored for graph in graphs}
    media = plan_media(shape, request.video_seconds, request.video_size, request.audio_seconds, request.images,
                       request.text_tokens)
    notes: list[str] = []
    context = shape.text.max_position_embeddings
    prompt = media.prompt_tokens
    answer = C.DEFAULT_MAX_NEW_TOKENS if request.max_new_tokens is None else request.max_new_tokens
    room = context - prompt
    fits_context = room >= 1 and (request.max_new_tokens is None or answer <= room)
    if not fits_context:
        notes.append(f"the prompt is {prompt} tokens (+ {answer} answer tokens) and the thinker's context "
                     f"{context}: the runtime refuses this request (InputError); the figures are what it would need")
    elif request.max_new_tokens is None and answer > room:
        answer = room  # the runtime clamps its default to the context (finish_reason "context")
    speech = request.speech and shape.speech and names.TALKER_DECODER in sizes
    if request.speech and not speech:
        notes.append("no speech: the model or the recipe has no talker / token2wav")
    codes = 0
    if speech:
        codes = C.DEFAULT_TALKER_CODES
        if request.max_speech_seconds is not None:
            codes = min(codes, max(1, int(request.max_speech_seconds * C.CODES_PER_SECOND)))
    stages = [s for s in STAGES
              if (s != "audio_encoder" or media.audio_frames) and (s != "vision_encoder" or media.grids)
              and (s != "speech" or speech)]
    for s in stages:
        missing = [g for g in STAGE_GRAPHS[s] if g not in sizes]
        if missing and s != "speech":
            raise PlanError(f"the recipe builds no {', '.join(missing)}, which the {s} stage needs",
                            path=recipe.source, fix="use a recipe that lists the module, or drop that input")
    sets = _working_sets(shape, media, prompt, answer, codes, target)
    sessions = _Sessions(policy, sizes)
    resident = _resident_bytes(shape, stored, sizes, target, prompt + answer, codes)
    arena_kept: dict[str, float] = {}  # graph -> bytes its arena holds (its largest run so far)
    out: list[Stage] = []
    previous = None
    for name in stages:
        loads = sessions.enter(name, previous)
        for g in list(arena_kept):
            if g not in sessions.loaded:
                del arena_kept[g]  # a released session returns its arena
        ws = sets[name]
        active = {g: ws[g] * width[g] for g in ws if g != "host"}
        key = "thinker" if name.startswith("thinker") else name
        factor = C.ARENA_FACTOR[target].get(key, C.ARENA_FACTOR[target]["default"])
        fixed = C.ARENA_FIXED[target].get(key, 0.0)
        for g, b in active.items():
            held = b * factor + (fixed if g == names.THINKER_DECODER else 0.0)
            arena_kept[g] = max(arena_kept.get(g, 0.0), held)
        activations = sum(active.values())
        arena = sum(arena_kept.values()) - activations
        weights = sum(resident[g] for g in sessions.loaded)
        kv = 0
        if name in ("thinker_prefill", "thinker_decode"):
            kv = kv_bytes(shape.text, prompt + answer, width[names.THINKER_DECODER])
        elif name == "speech":
            kv = kv_bytes(shape.talker, prompt + 2 + codes, width[names.TALKER_DECODER])
        transients = [resident[g] * C.LOAD_TRANSIENT[target][weight_kind(stored, g)] for g in loads]
        host = ws["host"] * 4
        base = C.BASE_BYTES[target]
        # a stage creates its sessions one at a time, then runs them (streamed speech too: token2wav's
        # sessions are created before the talker's thread starts, omni_runtime.stages.speech)
        load = max(transients, default=0.0)
        running = max(kv + activations + arena, load)
        if target == "cuda":
            peak = C.CUDA_CONTEXT_BYTES + weights + running
            host_peak = base + host
            device_base = C.CUDA_CONTEXT_BYTES
        else:
            peak = base + weights + host + running
            host_peak = peak
            device_base = base
        out.append(Stage(name, list(sessions.loaded), loads, int(weights), int(kv), int(activations), int(arena),
                         int(device_base), int(host if target == "cpu" else 0), int(load), int(peak),
                         int(host_peak)))
        previous = name
    memory, source = device_memory(target, device_memory_bytes)
    ctx = {"prompt_tokens": prompt, "max_new_tokens": answer, "context_length": context, "fits": fits_context}
    if speech:
        ctx["talker_codes"] = codes
    return Plan(shape.source, recipe.name, target, policy, request, media, sizes, out, memory, source, ctx, notes)
