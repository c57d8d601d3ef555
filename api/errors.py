"""One error shape for every 4xx: ``{"detail": "<field or id>: <what is wrong>", "field": ...}``.

Routes raise ``RequestError`` (or the library's ``ConfigError``, or ``NotFoundError``);
the framework's own 400/404/405/413/422 go through the same handlers. Two things the
framework would answer differently are handled here as well:

- request bodies are capped by ``BodyLimit`` (Starlette's limiter answers plain text);
- JSON bodies are parsed by ``ServiceRoute``'s request, which turns nesting too deep for
  the parser into a 422 naming the field, where FastAPI answers a bare 400.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qpa.errors import ConfigError
from services.jobs import NotFoundError

# JSON bodies (job configs) are a few kB; uploads have their own, configured limit.
JSON_BODY_LIMIT = 1024 * 1024
# Multipart framing around an upload (boundaries, part headers), with room to spare.
MULTIPART_OVERHEAD = 1024 * 1024
# A job config nests three levels; anything deeper than this is not one.
MAX_JSON_DEPTH = 64


class RequestError(HTTPException):
    """A 4xx answered as ``{"detail": ..., "field": ...}``; ``field`` names the request
    part at fault (a config key, a parameter, ``body``, ``file``), when there is one."""

    def __init__(self, status_code: int, detail: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status_code, detail, headers)
        self.field = field


def error_response(status_code: int, detail: str, field: str | None = None,
                   headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": detail, "field": field, **extra}, status_code=status_code,
                        headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ConfigError)
    async def config_error(_: Request, error: ConfigError) -> JSONResponse:
        return error_response(status.HTTP_422_UNPROCESSABLE_CONTENT,
                              f"{error.field}: {error.reason}", error.field)

    @app.exception_handler(NotFoundError)
    async def not_found(_: Request, error: NotFoundError) -> JSONResponse:
        return error_response(status.HTTP_404_NOT_FOUND, error.detail, error.field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        field = getattr(error, "field", None)
        detail = str(error.detail)
        headers = dict(error.headers or {})
        if error.status_code == status.HTTP_400_BAD_REQUEST and field is None:
            # The framework's 400s all come from reading the body (multipart framing).
            field, detail = "body", f"body: {detail}"
        elif error.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
            # Starlette names the methods of the first route whose path matched only.
            allowed = _methods_for(request)
            if allowed:
                headers["Allow"] = ", ".join(allowed)
                detail = f"{request.method} is not allowed here; use {' or '.join(allowed)}"
        return error_response(error.status_code, detail, field, headers or None)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        # One readable sentence naming the first problem, plus the full list for tools.
        errors = error.errors()
        field, message = describe_validation_error(errors[0] if errors else {})
        detail = f"{field}: {message}" if field else message
        return error_response(status.HTTP_422_UNPROCESSABLE_CONTENT, detail, field,
                              errors=_plain(errors))


def _methods_for(request: Request) -> list[str]:
    """The methods the OpenAPI document lists for this request's path."""
    methods: set[str] = set()
    for template, operations in request.app.openapi()["paths"].items():
        pattern = "".join("[^/]+" if part.startswith("{") else re.escape(part)
                          for part in re.split(r"(\{[^/}]+\})", template))
        if re.fullmatch(pattern, request.url.path):
            methods.update(method.upper() for method in operations)
    return sorted(methods)


def describe_validation_error(error: dict[str, Any]) -> tuple[str | None, str]:
    """(field, message) of one pydantic/FastAPI error, worded as ``qpa.config`` words a
    ConfigError: a job body and a CLI config file get the same sentences."""
    raised = (error.get("ctx") or {}).get("error")
    if isinstance(raised, ConfigError):  # a cross-field check of the job config names its field
        return raised.field, raised.reason
    location = list(error.get("loc", ()))
    if location[:1] in (["body"], ["query"], ["header"], ["path"]):
        location = location[1:]
    field = ".".join(str(part) for part in location) or None
    kind = error.get("type")
    message = str(error.get("msg", "invalid request")).removeprefix("Value error, ")
    if kind == "json_invalid":
        field = "body"
        message = f"malformed JSON: {error.get('ctx', {}).get('error', message)}"
    elif kind == "missing":
        message = "is required"
    elif kind == "extra_forbidden":
        message = "is not a known config key"
    return field, message


def _plain(errors: Any) -> Any:
    # Validation errors can carry exceptions in ctx; keep them JSON-serialisable.
    return [{key: (str(value) if key == "ctx" else value) for key, value in item.items()
             if key != "input"} for item in errors]


class BodyLimit:
    """Caps request bodies: ``limit_for(scope)`` bytes, answered with a JSON 413.

    A declared Content-Length over the cap is refused before the body is read; a body
    that streams past it fails the route's read with the same error.
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], int]):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            # Nothing reads a GET's body (a request that sends one anyway is answered
            # without it being read).
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            response = error_response(status.HTTP_413_CONTENT_TOO_LARGE,
                                      _too_large(limit), "body",
                                      headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise RequestError(status.HTTP_413_CONTENT_TOO_LARGE, _too_large(limit),
                                       "body")
            return message

        await self.app(scope, limited_receive, send)


def _too_large(limit: int) -> str:
    return f"body: the request body is over this call's {limit}-byte limit"


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class ServiceRequest(Request):
    """A request whose JSON body parses without unbounded recursion errors escaping."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = json.loads(body)
            except RecursionError:
                field = _too_deep_at(body, MAX_JSON_DEPTH) or "body"
                raise RequestError(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                   f"{field}: JSON nested more than {MAX_JSON_DEPTH} "
                                   "levels deep", field) from None
            except UnicodeDecodeError as error:
                raise RequestError(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                   f"body: malformed JSON: not UTF-8 ({error.reason})",
                                   "body") from None
        return self._json


class ServiceRoute(APIRoute):
    """The route class of every router: hands the endpoint a ``ServiceRequest``, and ends
    a sync endpoint's database transaction in the endpoint's own thread.

    Why the latter: a session's connection is held until its transaction ends. Ended in
    the session dependency's teardown, that would be a second trip to the threadpool with
    the connection still held; with as many pooled connections as threads
    (``QPA_API_THREADS``), 200 concurrent event streams filled the pool with connections
    waiting for a thread while every thread waited for a connection (bench_service
    --fanout hung). So every trip to the threadpool gives its connection back before it
    ends, and the teardown, with nothing left to do on the database, stays in the loop.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any):
        if not inspect.iscoroutinefunction(endpoint):
            endpoint = _ending_transactions(endpoint)
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def service_handler(request: Request) -> Response:
            return await handler(ServiceRequest(request.scope, request.receive))

        return service_handler


def _ending_transactions(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """``endpoint``, committing (or, if it raises, rolling back) the sessions it was given
    before it returns. FastAPI reads the signature through ``__wrapped__``."""

    @functools.wraps(endpoint)
    def run(**arguments: Any) -> Any:
        sessions = [value for value in arguments.values() if isinstance(value, Session)]
        try:
            result = endpoint(**arguments)
        except BaseException:
            for session in sessions:
                session.rollback()
            raise
        for session in sessions:
            session.commit()
        return result

    return run


# A JSON string (with an optional ": " making it a key) or a bracket; nothing else
# changes the nesting.
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"(?:\s*:)?|[\[\]{}]')


def _too_deep_at(body: bytes, max_depth: int) -> str | None:
    """Dotted object keys leading to where ``body`` first nests deeper than ``max_depth``
    (one pass, no recursion); None if it never does or no key leads there."""
    keys: list[str | None] = []
    for token in _JSON_TOKEN.finditer(body):
        text = token.group()
        if text in (b"{", b"["):
            if len(keys) >= max_depth:
                return ".".join(key for key in keys if key) or None
            keys.append(None)
        elif text in (b"}", b"]"):
            if keys:
                keys.pop()
        elif text.endswith(b":") and keys:
            keys[-1] = text[: text.rindex(b'"')][1:].decode("utf-8", "replace")
    return None
