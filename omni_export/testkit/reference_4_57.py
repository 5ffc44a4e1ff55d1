"""transformers 4.57.3's ``Qwen2_5OmniForConditionalGeneration.generate``: the oracle for the talker's generation.

Why a second transformers: the released model was trained and published with code that always hands
the talker an attention mask (Qwen's 4.51.3 preview; msModelSlim pins 4.57.3), and its talker adds the
codec pad / bos embeddings to the last two prefill rows (and computes its TMRoPE positions) only when
it receives one. transformers 5 drops an all-ones mask before the talker's forward, so on the unpadded
prompt a user passes (``generate(**processor(...))``) its talker skips both. The runtime implements the
released behaviour, so its talker is compared with 4.57.3 here; single forward passes of every module
(identical in both versions) are compared with the installed 5.23. docs/reference-versions.md says more.

Two halves:

- **parent side** (any interpreter, imports no transformers): :func:`generate` writes the requests to a
  temporary directory, runs this module with ``.venv``'s Python and the reference directory first on
  ``PYTHONPATH`` (``make ref-env``: transformers 4.57.3 and the huggingface-hub / tokenizers it needs,
  ``pip install --target`` without dependencies; torch, numpy and safetensors come from ``.venv``) and
  reads back one :class:`ReferenceRun` per request;
- **child side** (``python -m omni_export.testkit.reference_4_57 REQUESTS OUT``): checks that it runs
  transformers 4.57.3 from that directory, loads each checkpoint with ``from_pretrained`` (float32,
  sdpa) and calls ``generate`` as a user does: ``input_ids`` and ``attention_mask`` (all ones: what the
  processor returns for one prompt), ``speaker``, ``return_audio=True``, ``thinker_do_sample=False``,
  ``talker_do_sample=False`` and the talker's other defaults (repetition penalty 1.05, eos 8292/8294).
  ``talker.generate`` is wrapped to record its tokens, per-step raw logits and processed scores and the
  inputs generate built for it; ``token2wav.forward`` is replaced by a recorder of the codes it gets
  (the waveform is a module forward: compare it with 5.23's token2wav on these codes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omni_runtime.errors import OmniError

VERSION = "4.57.3"
ROOT = Path(__file__).resolve().parents[2]
#: where ``make ref-env`` installs transformers 4.57.3 (``OMNI_REF_TRANSFORMERS`` overrides it)
DEFAULT_DIR = ROOT / "build" / f"ref-transformers-{VERSION}"
ENV_VAR = "OMNI_REF_TRANSFORMERS"
FIX = f"run `make ref-env` in {ROOT} (installs transformers {VERSION} into {DEFAULT_DIR.relative_to(ROOT)}/)"
TIMEOUT = 600.0


class ReferenceEnvError(OmniError):
    """The transformers 4.57.3 reference environment is missing, broken or not the right version."""


@dataclass(frozen=True)
class Request:
    """One ``generate`` call: a text prompt's ids on checkpoint ``model``."""

    model: Path
    input_ids: list[int]
    #: None: generate's defaults (1024 and 4096, the runtime's too)
    thinker_max_new_tokens: int | None = None
    talker_max_new_tokens: int | None = None
    speaker: str = "Chelsie"
    #: the thinker's stop ids and pad id (the bundle's ``generation``); None: the checkpoint's defaults
    thinker_eos_token_id: list[int] | None = None
    thinker_pad_token_id: int | None = None
    #: False calls generate without ``attention_mask`` (4.57.3's generate then makes an all-ones one)
    attention_mask: bool = True

    def to_json(self) -> dict:
        return {"model": str(self.model), "input_ids": [int(t) for t in self.input_ids],
                "thinker_max_new_tokens": self.thinker_max_new_tokens,
                "talker_max_new_tokens": self.talker_max_new_tokens, "speaker": self.speaker,
                "thinker_eos_token_id": None if self.thinker_eos_token_id is None else
                [int(t) for t in self.thinker_eos_token_id],
                "thinker_pad_token_id": self.thinker_pad_token_id, "attention_mask": bool(self.attention_mask)}


@dataclass
class ReferenceRun:
    """What transformers 4.57.3's generate did for one :class:`Request`."""

    transformers_version: str
    #: where the child imported transformers from, and its torch version (``.venv``'s)
    transformers_file: str
    torch_version: str
    #: the thinker's new ids up to and including its first stop id
    reply: list[int]
    #: "eos" or "length"
    thinker_finish: str
    #: ``talker.generate``'s new tokens, its stop id (8292 or 8294) last when it stopped on one
    talker_tokens: list[int]
    #: "eos" or "length"
    talker_finish: str
    #: the codes generate handed to token2wav (``talker_tokens[:-1]``: 4.57.3 always drops the last)
    token2wav_codes: list[int]
    #: per talker step, the top-2 margin of the processed scores (near-tie diagnostics)
    margins: list[float]
    #: the talker's raw logits at its first step (after the prefill), [vocab]
    first_logits: np.ndarray = field(repr=False)
    #: the talker's processed scores at its first step (penalty, suppressed bos), [vocab]
    first_scores: np.ndarray = field(repr=False)
    #: ``inputs_embeds`` generate built for the talker's prefill (before its forward adds the codec rows)
    prefill_embeds: np.ndarray = field(repr=False)
    #: ``thinker_reply_part``: the dual-track text stream fed at the talker's decode steps
    reply_part: np.ndarray = field(repr=False)


# ----------------------------------------------------------------------------------- parent side
def env_dir() -> Path:
    """The reference directory: ``$OMNI_REF_TRANSFORMERS`` or :data:`DEFAULT_DIR`."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)


def check_env() -> Path:
    """The reference directory, or ReferenceEnvError when transformers 4.57.3 is not installed there."""
    where = env_dir()
    meta = where / f"transformers-{VERSION}.dist-info"
    if not (where / "transformers" / "__init__.py").is_file() or not meta.is_dir():
        raise ReferenceEnvError(f"no transformers {VERSION} reference environment", path=where, fix=FIX)
    return where


def _child_env(where: Path) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    # the reference first, so its transformers shadows .venv's; this repository for omni_export
    parts = [str(where), str(ROOT)] + ([path] if path else [])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(parts), "PYTHONUNBUFFERED": "1",
            "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}


def generate(requests: list[Request], timeout: float = TIMEOUT) -> list[ReferenceRun]:
    """Run ``requests`` through transformers 4.57.3 in a subprocess (one process, each checkpoint loaded once)."""
    where = check_env()
    with tempfile.TemporaryDirectory(prefix="omni-ref-4.57-") as tmp:
        tmp = Path(tmp)
        (tmp / "requests.json").write_text(json.dumps([r.to_json() for r in requests]))
        proc = subprocess.run([sys.executable, "-m", __name__, str(tmp / "requests.json"), str(tmp / "out")],
                              capture_output=True, text=True, timeout=timeout, env=_child_env(where), cwd=tmp)
        if proc.returncode != 0:
            raise ReferenceEnvError(f"the transformers {VERSION} reference failed (exit {proc.returncode}):\n"
                                    f"{proc.stderr[-4000:]}", path=where, fix=FIX)
        results = json.loads((tmp / "out" / "results.json").read_text())
        runs = []
        for i, item in enumerate(results):
            arrays = {name: np.load(tmp / "out" / f"{i}.{name}.npy")
                      for name in ("first_logits", "first_scores", "prefill_embeds", "reply_part")}
            runs.append(ReferenceRun(**item, **arrays))
    return runs


# ----------------------------------------------------------------------------------- child side
def _check_child() -> None:
    import transformers

    where = env_dir().resolve()
    found = Path(transformers.__file__).resolve()
    if transformers.__version__ != VERSION or where not in found.parents:
        raise SystemExit(f"expected transformers {VERSION} from {where}, imported {transformers.__version__} "
                         f"from {found}; fix: {FIX}")


def _load(model_dir: str):
    import torch
    from transformers import Qwen2_5OmniForConditionalGeneration

    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32,
                                                                 attn_implementation="sdpa")
    return model.eval()


def _run_one(model, request: dict) -> tuple[dict, dict[str, np.ndarray]]:
    import torch

    recorded: dict = {}
    talker_generate = model.talker.generate

    def recording_generate(*args, **kwargs):
        recorded["prefill_embeds"] = kwargs["inputs_embeds"].detach().clone()  # the forward adds to it in place
        recorded["reply_part"] = kwargs["thinker_reply_part"].detach().clone()
        recorded["prompt_width"] = kwargs["input_ids"].shape[1]
        recorded["eos"] = kwargs["eos_token_id"]
        out = talker_generate(*args, **kwargs, output_scores=True, output_logits=True, return_dict_in_generate=True)
        recorded["out"] = out
        return out.sequences

    def recording_token2wav(code, **kwargs):
        recorded["token2wav_codes"] = code[0].tolist()
        return torch.zeros(code.shape[1] * 480)

    ids = torch.tensor([request["input_ids"]], dtype=torch.long)
    kwargs = dict(speaker=request["speaker"], return_audio=True, thinker_do_sample=False, talker_do_sample=False)
    if request["attention_mask"]:
        kwargs["attention_mask"] = torch.ones_like(ids)
    for key in ("thinker_max_new_tokens", "talker_max_new_tokens", "thinker_eos_token_id", "thinker_pad_token_id"):
        if request[key] is not None:
            kwargs[key] = request[key]
    model.talker.generate = recording_generate
    model.token2wav.forward = recording_token2wav
    try:
        with torch.no_grad():
            sequences, _ = model.generate(input_ids=ids, **kwargs)
    finally:
        del model.talker.generate, model.token2wav.forward

    eos = request["thinker_eos_token_id"]
    if eos is None:
        eos = model.thinker.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else (eos or []))
    reply, thinker_finish = [], "length"
    for token in sequences[0, ids.shape[1]:].tolist():
        reply.append(token)
        if token in eos:
            thinker_finish = "eos"
            break
    out = recorded["out"]
    tokens = out.sequences[0, recorded["prompt_width"]:].tolist()
    talker_eos = set(recorded["eos"])
    talker_finish = "eos" if tokens and tokens[-1] in talker_eos else "length"
    margins = []
    for scores in out.scores:
        top2 = torch.topk(scores[0].float(), 2).values
        margins.append(float(top2[0] - top2[1]))
    import transformers

    result = {"transformers_version": transformers.__version__, "transformers_file": transformers.__file__,
              "torch_version": torch.__version__, "reply": reply, "thinker_finish": thinker_finish,
              "talker_tokens": tokens, "talker_finish": talker_finish,
              "token2wav_codes": recorded["token2wav_codes"], "margins": margins}
    arrays = {"first_logits": out.logits[0][0].float().numpy(), "first_scores": out.scores[0][0].float().numpy(),
              "prefill_embeds": recorded["prefill_embeds"][0].float().numpy(),
              "reply_part": recorded["reply_part"][0].float().numpy()}
    return result, arrays


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m omni_export.testkit.reference_4_57 REQUESTS.json OUT_DIR", file=sys.stderr)
        return 2
    _check_child()
    import torch

    torch.manual_seed(0)  # greedy everywhere: nothing should draw, but a stray draw is then reproducible
    requests = json.loads(Path(argv[0]).read_text())
    out_dir = Path(argv[1])
    out_dir.mkdir(parents=True)
    models: dict[str, object] = {}
    results = []
    for i, request in enumerate(requests):
        if request["model"] not in models:
            models[request["model"]] = _load(request["model"])
        result, arrays = _run_one(models[request["model"]], request)
        results.append(result)
        for name, array in arrays.items():
            np.save(out_dir / f"{i}.{name}.npy", array)
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results))
    os.replace(tmp, out_dir / "results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
