"""OpenAI-style errors: every failure leaves the server as ``{"error": {message, type, param, code}}``.

Handlers installed by :func:`install_error_handlers` turn request-validation failures (malformed JSON,
wrong types, unknown fields), unknown routes and :class:`APIError` into 4xx bodies that name the
problem. Anything unexpected becomes a 500 whose body says only that: the traceback goes to the log,
never to the client.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("dsv4.server")

# pydantic puts the name of the union member that failed into `loc`; these are not field names.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
ROLES = ("system", "developer", "user", "assistant", "tool", "latest_reminder")


class APIError(Exception):
    """A request the server refuses; ``status`` is 4xx unless the server itself is at fault."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The JSON body OpenAI sends with an error."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.message, err.type, err.param, err.code), status_code=err.status)


def _param(loc: Sequence[int | str]) -> str | None:
    """('body', 'messages', 0, 'user', 'content', 'str') -> 'messages[0].content'."""
    out = ""
    prev: int | str | None = None
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TYPE_TAGS or "[" in part or "-" in part or (isinstance(prev, int) and part in ROLES):
            pass  # a union member's name (a message's role after its index), not a field
        else:
            out += f".{part}" if out else part
        prev = part
    return out or None


def validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    """One readable sentence for a list of pydantic errors, and the first offending parameter."""
    if any(e.get("type") == "json_invalid" for e in errors):
        ctx = next(e for e in errors if e.get("type") == "json_invalid").get("ctx") or {}
        why = f": {ctx['error']}" if "error" in ctx else ""
        return f"the request body is not valid JSON{why}", None
    located = []
    for e in errors:
        param = _param(e.get("loc", ()))
        kind = e.get("type", "")
        if kind in ("union_tag_invalid", "union_tag_not_found"):  # the discriminator (a message's role)
            tag = str((e.get("ctx") or {}).get("discriminator", "")).strip("'")
            param = f"{param}.{tag}" if param and tag else param
            if kind == "union_tag_not_found":
                kind = "missing"
        located.append((param, kind, e.get("msg", "")))
    # A union reports once per member. "Not a string" beside an error inside the list member means the
    # input was a list: the deeper error is the one that helps.
    params = [p for p, _, _ in located]
    located = [(p, k, m) for p, k, m in located
               if not (p and k.endswith("_type") and any(q and q.startswith((p + "[", p + ".")) for q in params))]
    parts: list[str] = []
    seen: set[str | None] = set()
    for param, kind, msg in located:
        if param in seen:  # the first member's complaint is enough
            continue
        seen.add(param)
        if kind == "extra_forbidden":
            parts.append(f"unsupported field `{param}`")
        elif kind == "missing":
            parts.append(f"`{param}` is required" if param else "a JSON request body is required")
        elif param is None:
            parts.append(f"request body: {msg}")
        else:
            parts.append(f"`{param}`: {msg}")
    return "; ".join(parts) or "invalid request", located[0][0] if located else None


def _log_refusal(request: Request, status: int, message: str) -> None:
    # the one line for a refused request, as a served one gets its line from its handler
    log.log(logging.WARNING if status >= 500 else logging.INFO, "%d %s %s: %s", status, request.method,
            request.url.path, message[:300])


def install_error_handlers(app: FastAPI) -> None:
    """Route every error path of ``app`` through the OpenAI error body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        _log_refusal(request, exc.status, exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc.errors())
        _log_refusal(request, 400, message)
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error while serving %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal server error (see the server log)", "internal_error"),
                            status_code=500)
