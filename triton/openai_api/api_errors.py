"""Errors in OpenAI's error object, with the HTTP status each kind of mistake gets.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

A client's mistake is a 4xx naming the field (`param`); a model that is not there is a 404
`model_not_found`; Triton refusing for overload, or a model that is not ready, is a 503. Only
a failure of the server itself is a 5xx of another kind.
"""

from __future__ import annotations

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error"}


class APIError(Exception):
    """An answer that is an error: its status, message, and the field it is about."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request")
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


def bad_value(param: str, message: str) -> APIError:
    """400: a field's value is wrong; the message says what it must be."""
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


def unsupported(param: str, why: str = "") -> APIError:
    """400: a field this server cannot honour (never silently ignored)."""
    reason = why or "this server cannot honour it; leave it out"
    return APIError(400, f"{param} is not supported: {reason}", param=param, code="unsupported")


def model_not_found(model: str, known: list[str]) -> APIError:
    listed = ", ".join(sorted(known)) or "none"
    return APIError(
        404,
        f"The model '{model}' does not exist; the deployments here are: {listed} (GET /v1/models)",
        param="model",
        code="model_not_found",
    )


def wrong_task(model: str, task: str, endpoint: str, fits: str) -> APIError:
    """400: the deployment exists but serves another endpoint."""
    return APIError(
        400,
        f"The model '{model}' is a {task} deployment: {endpoint} serves {fits} deployments",
        param="model",
        code="wrong_task",
    )
