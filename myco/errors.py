"""The exception tree of mycoSwarm and OpenAI's error envelope.

    MycoError                      status  type
    ├── BadRequest                 400     invalid_request_error
    │   ├── BodyTooLarge           413     invalid_request_error
    │   └── UnsupportedMediaType   415     invalid_request_error
    ├── Unauthorized               401     authentication_error
    ├── Denied                     403     permission_error
    ├── NotFound                   404     invalid_request_error (a stored response)
    │   └── ModelNotFound          404     invalid_request_error (code model_not_found)
    ├── Busy                       429     rate_limit_error (carries Retry-After)
    ├── TargetFailed               502     api_error
    └── Unavailable                503     api_error
    ConfigError (a ValueError)     a startup mistake: `myco` prints "myco: WHERE: REASON", exit 2
    └── PolicyError                (gateway/policy.py) WHERE is file:line

Every HTTP error either process returns is `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import msgspec


class ErrorBody(msgspec.Struct, frozen=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(msgspec.Struct, frozen=True):
    error: ErrorBody


class MycoError(Exception):
    status = 500
    type = "api_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.extra_headers: dict[str, str] = {}  # e.g. the gateway's x-myco-* headers

    def envelope(self) -> bytes:
        return encode_error(self.message, self.type, self.param, self.code)

    def headers(self) -> dict[str, str]:
        return dict(self.extra_headers)


class BadRequest(MycoError):
    status = 400
    type = "invalid_request_error"


class BodyTooLarge(BadRequest):
    status = 413
    code = "request_too_large"


class UnsupportedMediaType(BadRequest):
    status = 415
    code = "unsupported_media_type"


class Unauthorized(MycoError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Denied(MycoError):
    status = 403
    type = "permission_error"
    code = "denied_by_policy"


class NotFound(MycoError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Busy(MycoError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {**self.extra_headers, "retry-after": str(self.retry_after)}


class TargetFailed(MycoError):
    status = 502
    code = "target_failed"


class Unavailable(MycoError):
    status = 503
    code = "no_available_target"


class ConfigError(ValueError):
    """A setting, file or variable that stops start-up: `where` names it (a `MYCO_*` variable,
    a --flag, a file, file:line), `reason` says what is wrong with it."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


def encode_error(message: str, type_: str, param: str | None = None,
                 code: str | None = None) -> bytes:
    return msgspec.json.encode(ErrorEnvelope(ErrorBody(message, type_, param, code)))


def error_message(body: bytes) -> str:
    """The message of an error envelope, or the body itself if it is not one."""
    try:
        return msgspec.json.decode(body, type=ErrorEnvelope).error.message
    except msgspec.DecodeError:
        return body.decode("utf-8", "replace")[:200]


_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def type_for_status(status: int) -> str:
    return _STATUS_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
