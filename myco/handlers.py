"""Litestar exception handlers that answer every error in OpenAI's envelope (both processes)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException

from myco.errors import MycoError, encode_error, type_for_status

log = logging.getLogger("myco")

Handler = Callable[[Request[Any, Any, Any], Any], Response[Any]]


def exception_handlers(default_headers: Mapping[str, str]) -> dict[int | type[Exception], Handler]:
    def myco_error(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
        assert isinstance(exc, MycoError)
        return Response(exc.envelope(), status_code=exc.status, media_type="application/json",
                        headers={**default_headers, **exc.headers()})

    def http_error(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
        assert isinstance(exc, HTTPException)
        status, message, code = exc.status_code, str(exc.detail), None
        if status == 413:
            message, code = f"request body too large: {message}", "request_too_large"
        return Response(encode_error(message, type_for_status(status), None, code),
                        status_code=status, media_type="application/json",
                        headers={**default_headers, **(exc.headers or {})})

    def internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
        log.exception("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return Response(encode_error(f"internal error: {type(exc).__name__}", "api_error"),
                        status_code=500, media_type="application/json",
                        headers=dict(default_headers))

    return {MycoError: myco_error, HTTPException: http_error, Exception: internal_error}
