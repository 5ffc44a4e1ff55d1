"""The ``omni-runtime`` command line: chat with a bundle without omni-export or torch.

    omni-runtime run BUNDLE --prompt TEXT [--audio F]... [--image F]... [--video F]...
                 [--use-audio-in-video] [--video-fps FPS] [--system TEXT] [--max-new-tokens N]
                 [--greedy | --sample] [--temperature T] [--top-k K] [--top-p P]
                 [--repetition-penalty R] [--seed S] [--device auto|cpu|cuda]
                 [--memory lazy|resident|BYTES] [--json]
                 [--wav OUT [--speaker NAME] [--stream-audio] [--max-speech-seconds S]]

``omni-export run`` is this same command (it calls :func:`run_main`). Errors are OmniErrors
printed as one message naming the file or value and the fix, exit code 2, no traceback; the
API's parameter names in them (``max_new_tokens``) are shown as flags (``--max-new-tokens``).

Only the standard library here (argparse): the runtime depends on numpy, tokenizers, jinja2
and onnxruntime alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

from omni_runtime import __version__
from omni_runtime.errors import BundleError, InputError, OmniError
from omni_runtime.bundle.sessions import DEVICES

# API parameter -> command-line flag, for error messages.
FLAGS = {
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "repetition_penalty": "--repetition-penalty",
    "do_sample": "--sample",
    "seed": "--seed",
    "device": "--device",
    "system": "--system",
    "prompt": "--prompt",
    "use_audio_in_video": "--use-audio-in-video",
    "video_fps": "--video-fps",
    "speaker": "--speaker",
    "max_speech_seconds": "--max-speech-seconds",
    "memory": "--memory",
}
# Names translated wherever they appear as a word; "seed", "device" and "speaker" only when the
# error is about that parameter (``exc.param``); "prompt" and "system" never (plain English words).
_ALWAYS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "do_sample",
           "use_audio_in_video", "video_fps", "max_speech_seconds")
_BY_PARAM = ("seed", "device", "speaker")
_ASSIGNMENT = re.compile(r"(?<![\w-])(" + "|".join(FLAGS) + r")=(\"[^\"]*\"|'[^']*'|[^\s,;)]+)")

SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "seed")  # each implies --sample

RUN_DESCRIPTION = ("Chat with a bundle: renders the chat template (with audio, images and video), generates "
                   "with a KV cache and streams the answer; --wav also speaks it into a WAV file.")
RUN_EPILOG = """\
media:
  --audio, --image and --video (each repeatable) put files in the user message before the
  prompt text: audios, then images, then videos, each in the order given. Audio: wav, flac,
  mp3, ogg, ... or the audio track of a video file; images: PNG, JPEG, WebP, ...; videos: MP4,
  MKV, WebM, MOV, AVI, ... sampled at --video-fps frames per second (default 2.0).
  --use-audio-in-video also feeds each video's audio track, interleaved with its frames in
  2-second chunks (every video needs an audio track then). --prompt may be left out when a
  media file is given.

decoding:
  Without --greedy or --sample the bundle's generation defaults decide (its do_sample,
  temperature, top_k, top_p, repetition_penalty). --greedy decodes greedily; --sample samples
  with the bundle's defaults. --temperature, --top-k, --top-p and --seed each turn sampling on
  (they override that default) and conflict with --greedy. --repetition-penalty applies to
  greedy decoding and sampling alike.

length:
  Prompt + new tokens never exceed the model's context (config.thinker.max_position_embeddings).
  An explicit --max-new-tokens that would overflow it is an error naming the largest allowed
  value; the bundle's default is shortened to fit (finish_reason "context").

speech:
  --wav OUT also speaks the answer (bundles with a talker and token2wav) and writes it to OUT:
  a mono 24 kHz 32-bit float WAV file, written to a temporary file next to it and renamed when
  complete (nothing is left behind on an error or Ctrl-C). --speaker NAME picks the voice
  (default: the bundle's, Chelsie). --greedy makes the talker greedy too (its repetition
  penalty 1.05 kept); otherwise it samples with the bundle's talker defaults (top-k 40, top-p
  0.8, temperature 0.9). The audio is made at once, as transformers' generate makes it (RK4
  solver); --stream-audio runs token2wav in chunks while the talker produces codes instead (the
  official streaming scheme, Euler solver: the first audio comes sooner, the waveform differs
  slightly). token2wav's initial noise is drawn from --seed (0 without it), so the same
  command gives the same audio. --max-speech-seconds S stops the talker after S seconds of
  codes (a random talker never says its stop code; a real one can ramble).

memory:
  --memory lazy (default) creates each graph's session when a stage needs it and frees it
  after the stage: the encoders after the prefill, the thinker after its text, the talker and
  token2wav after the speech. --memory resident keeps every session once created. A byte
  budget (6GB, 6.5GiB, 800MB or a number of bytes; a session counts its graph's file bytes)
  keeps sessions while they fit and evicts the least recently used idle one; a budget smaller
  than the largest stage the request needs is an error naming that stage and its size.

output:
  The answer is streamed to stdout. --json prints one JSON object instead: text, prompt_ids,
  token_ids and finish_reason ("eos", "length" or "context"); with media also "media", the
  token counts: {"audio_tokens": [...], "image_tokens": [...], "video_tokens": [...]} (and
  "video_audio_tokens" with --use-audio-in-video); with --wav also "codes" (the talker's),
  "speaker", "sample_rate", "first_audio_seconds" (from the start of the request),
  "audio_seconds", "speech_finish_reason" ("eos": the talker's stop code, "length": its code
  limit, "seconds": --max-speech-seconds) and "wav" (the file written).
"""


def cli_message(exc: OmniError) -> str:
    """``str(exc)`` for a command line: API parameter names in an InputError become flags.

    ``max_new_tokens=5`` becomes ``--max-new-tokens 5`` and ``do_sample=False`` ``--greedy``;
    snake_case parameter names (and ``seed``/``device`` when ``exc.param`` names them) become
    their flags. Paths are never changed.
    """
    if not isinstance(exc, InputError):
        return str(exc)
    words = set(_ALWAYS) | ({exc.param} if exc.param in _BY_PARAM else set())
    bare = re.compile(r"(?<![\w-])(" + "|".join(sorted(words, key=len, reverse=True)) + r")(?![\w])")

    def translate(text: str | None) -> str | None:
        if text is None:
            return None
        text = _ASSIGNMENT.sub(_assignment, text)
        return bare.sub(lambda m: FLAGS[m.group(1)], text)

    problem, fix = translate(exc.problem), translate(exc.fix)
    message = problem if exc.path is None else f"{exc.path}: {problem}"
    if fix is not None:
        message += f"\n  fix: {fix}"
    return message


def _assignment(match: re.Match) -> str:
    name, value = match.group(1), match.group(2).strip("\"'")
    if name == "do_sample":
        return "--sample" if value == "True" else "--greedy"
    if name == "use_audio_in_video":
        return "--use-audio-in-video" if value == "True" else "no --use-audio-in-video"
    return f"{FLAGS[name]} {value}"


def print_error(message: str, stream: TextIO | None = None) -> None:
    """``error: MESSAGE`` on stderr (the prefix in red on a terminal, unless NO_COLOR is set)."""
    stream = sys.stderr if stream is None else stream
    prefix = "error:"
    if stream.isatty() and "NO_COLOR" not in os.environ:
        prefix = "\033[1;31merror:\033[0m"
    stream.write(f"{prefix} {message}\n")
    stream.flush()


@dataclass(frozen=True)
class RunOptions:
    """The options of ``run`` (both ``omni-runtime run`` and ``omni-export run``)."""

    bundle: str
    prompt: str | None
    system: str | None = None
    max_new_tokens: int | None = None
    greedy: bool = False
    sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    device: str = "auto"
    json: bool = False
    audio: list[str] | None = None  # files, in order (each repeatable flag)
    image: list[str] | None = None
    video: list[str] | None = None
    use_audio_in_video: bool = False
    video_fps: float | None = None  # None: the bundle's (2.0)
    wav: str | None = None  # speak the answer into this WAV file
    speaker: str | None = None  # None: the bundle's default speaker
    stream_audio: bool = False
    max_speech_seconds: float | None = None
    memory: str = "lazy"  # session policy: lazy, resident or a byte budget

    @property
    def has_media(self) -> bool:
        return bool(self.audio or self.image or self.video)

    def content(self) -> list[dict]:
        """The media parts of the user message (audio, then images, then videos)."""
        return ([{"type": "audio", "audio": f} for f in self.audio or ()]
                + [{"type": "image", "image": f} for f in self.image or ()]
                + [{"type": "video", "video": f} for f in self.video or ()])


def check_run_options(opts: RunOptions) -> None:
    """Checks that need no bundle: conflicting decoding flags. InputError in terms of flags."""
    implied = [FLAGS[name] for name in SAMPLING_FLAGS if getattr(opts, name) is not None]
    if opts.greedy and opts.sample:
        raise InputError("--greedy and --sample conflict",
                         fix="pass --greedy for greedy decoding or --sample to sample, not both")
    if opts.greedy and implied:
        raise InputError(f"--greedy conflicts with {', '.join(implied)} (sampling options)",
                         fix=f"drop --greedy to sample, or drop {', '.join(implied)} to decode greedily")
    if opts.prompt is None and not opts.has_media:
        raise InputError("nothing to answer: no --prompt and no --audio, --image or --video",
                         fix="pass --prompt TEXT (and/or media files with --audio, --image, --video)")
    if opts.use_audio_in_video and not opts.video:
        raise InputError("--use-audio-in-video needs a --video", fix="add --video FILE, or drop --use-audio-in-video")
    if opts.video_fps is not None and not opts.video:
        raise InputError("--video-fps needs a --video", fix="add --video FILE, or drop --video-fps")
    from omni_runtime.bundle.memory import MemoryPolicy

    MemoryPolicy.parse(opts.memory)
    if opts.wav is None:
        for flag, value in (("--speaker", opts.speaker), ("--stream-audio", opts.stream_audio),
                            ("--max-speech-seconds", opts.max_speech_seconds)):
            if value is not None and value is not False:
                raise InputError(f"{flag} needs --wav", fix=f"add --wav OUT.wav to hear the answer, or drop {flag}")
    else:
        check_wav_path(opts.wav)


def check_wav_path(wav: str) -> None:
    """InputError unless a file can be created at ``wav`` (its directory exists and is writable)."""
    target = Path(wav)
    if wav.strip() == "" or target.name in ("", ".", ".."):
        raise InputError(f"--wav needs a file name, got {wav!r}", fix="pass e.g. --wav answer.wav")
    if target.is_dir():
        raise InputError("is a directory", path=target, fix="pass a file name for --wav, e.g. --wav answer.wav")
    parent = target.parent
    if not parent.exists():
        raise InputError(f"directory does not exist, so --wav cannot write {target.name!r} into it", path=parent,
                         fix="create the directory first (mkdir -p), or choose another --wav path")
    if not parent.is_dir():
        raise InputError(f"is a file, so --wav cannot write {target.name!r} under it", path=parent,
                         fix="choose another --wav path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"no write access to the directory of --wav {target.name!r}", path=parent,
                         fix="choose a --wav path in a directory you can write to")


def _import_soundfile():
    try:
        import soundfile
    except (ImportError, OSError) as exc:
        raise OmniError(f"--wav needs the soundfile package ({exc})",
                        fix="pip install 'omni-runtime[cpu]' (or pip install soundfile)") from None
    return soundfile


def write_wav(path: str, audio, sample_rate: int) -> None:
    """Write mono float32 ``audio`` to ``path`` as a 32-bit float WAV, atomically: a temporary file
    in the same directory, renamed over ``path`` when complete, removed on any error or Ctrl-C."""
    from omni_runtime.atomic import write_atomic

    soundfile = _import_soundfile()
    target = Path(path)
    try:
        write_atomic(target, lambda tmp: soundfile.write(tmp, audio, sample_rate, format="WAV", subtype="FLOAT"))
    except (OSError, RuntimeError) as exc:  # soundfile's LibsndfileError is a RuntimeError
        raise OmniError(f"cannot write the WAV file ({getattr(exc, 'strerror', None) or exc})", path=target,
                        fix="check the disk space and permissions, or choose another --wav path") from None


def sampling_for(opts: RunOptions, defaults):
    """The SamplingConfig of ``opts`` on top of the bundle's ``defaults`` (see RUN_EPILOG)."""
    changes = {name: getattr(opts, name) for name in ("temperature", "top_k", "top_p", "repetition_penalty")
               if getattr(opts, name) is not None}
    sampling = replace(defaults, **changes)
    if opts.greedy:
        return replace(sampling, do_sample=False)
    if opts.sample or any(getattr(opts, name) is not None for name in SAMPLING_FLAGS):
        return replace(sampling, do_sample=True)
    return sampling


def chat_request(opts: RunOptions):
    """The ChatRequest of ``opts`` (sampling left to the bundle's defaults, see ``sampling_for``)."""
    from omni_runtime.request import ChatRequest

    speech = {}
    if opts.wav is not None:
        speech = dict(speech=True, speaker=opts.speaker, stream=opts.stream_audio,
                      max_speech_seconds=opts.max_speech_seconds,
                      noise_seed=0 if opts.seed is None else opts.seed)
    if not opts.has_media:
        return ChatRequest(prompt=opts.prompt, system=opts.system, max_new_tokens=opts.max_new_tokens,
                           seed=opts.seed, **speech)
    content = opts.content()
    if opts.prompt is not None:
        content.append({"type": "text", "text": opts.prompt})
    return ChatRequest(messages=[{"role": "user", "content": content}], system=opts.system,
                       use_audio_in_video=opts.use_audio_in_video, video_fps=opts.video_fps,
                       max_new_tokens=opts.max_new_tokens, seed=opts.seed, **speech)


def run_chat(opts: RunOptions, stdout: TextIO | None = None):
    """Run ``opts``: stream the answer (or print the JSON object) to ``stdout``; return the ChatResult.

    Raises OmniError (InputError, BundleError) for bad input, before any graph runs.
    """
    from omni_runtime.runner import OmniRunner

    stdout = sys.stdout if stdout is None else stdout
    check_run_options(opts)
    request = chat_request(opts)  # every value checked before the bundle is opened
    if opts.wav is not None:
        _import_soundfile()
    runner = OmniRunner(opts.bundle, device=opts.device, memory=opts.memory)
    if opts.wav is not None and not runner.has_speech:
        raise BundleError("this bundle has no speech output (no talker or token2wav graphs), so --wav cannot be "
                          "written", path=runner.manifest.manifest_path,
                          fix="leave out --wav for a text answer, or rebuild the bundle from a checkpoint with "
                              "a talker (enable_audio_output true) with a recipe that exports modules.talker and "
                              "modules.token2wav (e.g. --recipe fp32)")
    changes = {"sampling": sampling_for(opts, runner.default_sampling())}
    if opts.wav is not None and opts.greedy:
        changes["talker_sampling"] = runner.default_talker_sampling(False)
    request = replace(request, **changes)

    def stream(piece: str) -> None:
        stdout.write(piece)
        stdout.flush()

    result = runner.chat(request, on_text=None if opts.json else stream)
    if opts.wav is not None:
        write_wav(opts.wav, result.audio, result.sample_rate)
    if opts.json:
        body = result.to_json()
        body.pop("prompt", None)
        if opts.wav is not None:
            body["wav"] = opts.wav
        stdout.write(json.dumps(body, ensure_ascii=False) + "\n")
    else:
        stdout.write("\n")
    stdout.flush()
    if opts.wav is not None and not opts.json:
        sys.stderr.write(f"wrote {opts.wav}: {result.audio_seconds:.2f} s of audio ({result.speaker}, "
                         f"{result.sample_rate} Hz)\n")
    return result


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that raises on bad usage, so the message goes out in the usual error format."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise _UsageError(message)


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``run`` (kept in one place for both command lines)."""
    parser.add_argument("bundle", metavar="BUNDLE", help="bundle directory (with manifest.json)")
    parser.add_argument("--prompt", metavar="TEXT", help="user prompt text (optional with media files)")
    parser.add_argument("--audio", action="append", metavar="F",
                        help="audio file (or a video's audio track) in the user message; repeatable")
    parser.add_argument("--image", action="append", metavar="F", help="image file in the user message; repeatable")
    parser.add_argument("--video", action="append", metavar="F", help="video file in the user message; repeatable")
    parser.add_argument("--use-audio-in-video", action="store_true",
                        help="also feed each video's audio track, interleaved with its frames")
    parser.add_argument("--video-fps", type=_finite, metavar="FPS",
                        help="video frames sampled per second (default: 2.0)")
    parser.add_argument("--system", metavar="TEXT", help="system prompt (default: the Qwen2.5-Omni one)")
    parser.add_argument("--max-new-tokens", type=_integer, metavar="N",
                        help="generation limit (default: the bundle's, shortened to fit the context)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="greedy decoding")
    mode.add_argument("--sample", action="store_true", help="sample, with the bundle's generation defaults")
    parser.add_argument("--temperature", type=_finite, metavar="T", help="sampling temperature (implies --sample)")
    parser.add_argument("--top-k", type=_integer, metavar="K", help="top-k filter, 0 = off (implies --sample)")
    parser.add_argument("--top-p", type=_finite, metavar="P", help="top-p (nucleus) filter (implies --sample)")
    parser.add_argument("--repetition-penalty", type=_finite, metavar="R",
                        help="repetition penalty, 1 = off (greedy or sampled)")
    parser.add_argument("--seed", type=_integer, metavar="S", help="sampling seed (implies --sample)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto (CUDA when available), cpu or cuda (default: auto)")
    parser.add_argument("--memory", metavar="POLICY", default="lazy",
                        help="session memory policy: lazy (free each stage's sessions after it), resident (keep "
                             "them) or a byte budget such as 6GB, 6.5GiB, 800MB (default: lazy)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (text, prompt_ids, token_ids, finish_reason; media token "
                             "counts with media; codes, first_audio_seconds, audio_seconds, wav with --wav)")
    parser.add_argument("--wav", metavar="OUT",
                        help="also speak the answer into OUT (24 kHz mono float WAV; needs a bundle with a talker)")
    parser.add_argument("--speaker", metavar="NAME", help="voice for --wav (default: the bundle's, Chelsie)")
    parser.add_argument("--stream-audio", action="store_true",
                        help="with --wav: make the audio in chunks while the talker runs (official streaming "
                             "scheme, Euler) instead of at once (transformers' RK4)")
    parser.add_argument("--max-speech-seconds", type=_finite, metavar="S",
                        help="with --wav: stop the talker after S seconds of speech (default: no bound but the "
                             "talker's code limit)")


def run_parser(prog: str = "omni-runtime run") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=RUN_DESCRIPTION, epilog=RUN_EPILOG, allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    return parser


def run_main(argv: list[str], prog: str = "omni-runtime run") -> int:
    """``run`` with command-line arguments ``argv``; returns the exit code (0, 2 on bad input)."""
    try:
        args = run_parser(prog).parse_args(argv)
    except _UsageError as exc:
        print_error(f"{exc}\n  fix: see `{prog} --help`")
        return 2
    opts = RunOptions(**{key: value for key, value in vars(args).items()})
    return _guarded(lambda: run_chat(opts))


def _guarded(action) -> int:
    """Run ``action``: OmniError -> message and exit code 2; Ctrl-C -> 130; closed stdout -> quiet."""
    try:
        action()
    except OmniError as exc:
        print_error(cli_message(exc))
        return 2
    except KeyboardInterrupt:
        print_error("interrupted")
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, and keep Python from complaining at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``omni-runtime [-h] [--version] run|serve ...``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _Parser(prog="omni-runtime", allow_abbrev=False,
                     description="Run Qwen2.5-Omni ONNX bundles built by omni-export (no torch needed).",
                     epilog="Run `omni-runtime run --help` for the options of run.")
    parser.add_argument("--version", action="version", version=f"omni-runtime {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("run", help=RUN_DESCRIPTION, add_help=False)
    commands.add_parser("serve", help="serve a bundle over an OpenAI-compatible HTTP API (needs "
                                      "omni-runtime[serve])", add_help=False)
    if argv and argv[0] == "run":
        return run_main(argv[1:])
    if argv and argv[0] == "serve":
        from omni_runtime.server.main import serve_main

        return serve_main(argv[1:])
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print_error(f"{exc}\n  fix: see `omni-runtime --help`")
        return 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return 0  # pragma: no cover - "run" is dispatched above


if __name__ == "__main__":
    sys.exit(main())
