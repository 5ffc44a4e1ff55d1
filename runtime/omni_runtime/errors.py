"""Errors the runtime (and the omni-export CLI) report to users.

Every error carries the problem, optionally the file or directory concerned and a fix.
``str(error)`` is a complete message: ``"<path>: <problem>\\n  fix: <fix>"``.

Errors raised by the Python API speak in API terms (``max_new_tokens must be >= 1``); an error
about one argument names it in ``param``. The command lines translate those names to their
flags (``--max-new-tokens``) when they print the error (``omni_runtime.cli.cli_message``).
"""

from __future__ import annotations

import os


class OmniError(Exception):
    """Base class of user-facing errors: a problem, the path it concerns and how to fix it."""

    def __init__(self, problem: str, *, path: str | os.PathLike | None = None, fix: str | None = None,
                 param: str | None = None):
        super().__init__(problem)
        self.problem = problem
        self.path = None if path is None else os.fspath(path)
        self.fix = fix
        self.param = param  # the API argument at fault (e.g. "max_new_tokens"), if any

    def __str__(self) -> str:
        message = self.problem if self.path is None else f"{self.path}: {self.problem}"
        if self.fix is not None:
            message += f"\n  fix: {self.fix}"
        return message


class BundleError(OmniError):
    """A bundle is missing, incomplete, of another schema version, unsafe or corrupt."""


class InputError(OmniError):
    """The user's input is invalid (empty prompt, bad sampling parameters, unavailable device, ...)."""
