"""Errors the server answers with, in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from omni_runtime.errors import BundleError, InputError, OmniError


class APIError(Exception):
    """An error answer: HTTP ``status`` and the OpenAI error fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def from_omni_error(exc: OmniError, params: dict[str, str] | None = None) -> APIError:
    """The answer to a runtime error: InputError -> 400 naming the OpenAI field (``params`` maps the
    runtime's parameter names to the request's), a bundle that cannot do what was asked -> 400,
    any other BundleError -> 500 (the message, never a traceback)."""
    params = params or {}
    param = params.get(exc.param, exc.param) if exc.param else None
    message = str(exc)
    if exc.param and param != exc.param and "_" in exc.param:  # identifiers only, not words like "prompt"
        message = message.replace(exc.param, param)
    if isinstance(exc, InputError):
        code = "context_length_exceeded" if "context" in exc.problem and exc.param in (
            "max_new_tokens", "prompt") else "invalid_value"
        return APIError(400, message, param=param, code=code)
    if isinstance(exc, BundleError) and "no speech output" in exc.problem:
        return APIError(400, message, param="modalities", code="unsupported_value")
    return APIError(500, message, type="server_error", code="bundle_error")
