"""The FastAPI application: ``uvicorn api.main:app`` (or ``create_app(settings)``).

Wires settings, the job store, the artifact store and the Celery publisher into
``app.state`` at start-up (lifespan), mounts the routers, maps library errors to 4xx JSON
(``{"detail": ...}`` naming the problem) and serves /healthz and /metrics.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from sqlalchemy import text
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import CurrentKey
from api.metrics import StoreCollector
from api.routes import backends, files, jobs, ui
from qpa.errors import ConfigError
from services.artifacts import ArtifactStore
from services.backends import apply_ibm_settings
from services.jobs import NotFoundError
from services.logs import configure_logging
from services.queue import make_celery
from services.settings import Settings, get_settings
from services.store import Store


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_level, settings.log_json)
        apply_ibm_settings(settings)
        app.state.store = Store(settings.resolved_database_url)
        app.state.artifacts = ArtifactStore(settings.resolved_artifact_dir)
        app.state.celery = make_celery(settings)
        app.state.registry.register(StoreCollector(app.state.store))
        try:
            yield
        finally:
            app.state.celery.close()
            app.state.store.dispose()

    app = FastAPI(
        title="QPA fine-tuning service",
        version="0.1.0",
        description="Submit hybrid quantum-classical fine-tuning jobs, watch them, download "
        "stock PEFT adapters. Every call but /healthz needs `Authorization: Bearer <key>`.",
        lifespan=lifespan,
        # Uploads are the only large bodies; the files route checks the exact limit.
        max_body_size=settings.max_upload_bytes + 1024 * 1024,
    )
    app.state.settings = settings
    app.state.registry = CollectorRegistry()
    requests_total = Counter("qpa_http_requests", "HTTP requests by route and status",
                             ["method", "route", "status"], registry=app.state.registry)

    app.add_middleware(RequestCounter, counter=requests_total)

    _add_error_handlers(app)
    app.include_router(files.router)
    app.include_router(jobs.router)
    app.include_router(backends.router)
    app.include_router(ui.router)
    app.mount("/ui/static", ui.static_files(), name="ui-static")

    @app.get("/healthz", tags=["ops"])
    async def healthz(request: Request) -> JSONResponse:
        """Liveness and readiness: the database and the broker answer. No key needed."""
        checks = await anyio.to_thread.run_sync(_health_checks, request.app)
        healthy = all(value == "ok" for value in checks.values())
        return JSONResponse({"status": "ok" if healthy else "degraded", **checks},
                            status_code=200 if healthy else 503)

    @app.get("/metrics", tags=["ops"], response_class=Response)
    def metrics(_: CurrentKey) -> Response:
        """Prometheus metrics: jobs by status, queue wait, step time, quantum usage."""
        return Response(generate_latest(app.state.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class RequestCounter:
    """Counts requests by method, route template and status as a plain ASGI middleware.

    ``@app.middleware("http")`` wraps every response in a streaming proxy; profiling
    (bench/bench_service.py) put that at ~1.5 ms of server CPU per status read, more than
    the SQL lookup. The router writes the matched route into the shared scope dict.
    """

    def __init__(self, app: ASGIApp, counter: Counter):
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status_code = 500  # if the app raises before starting a response

        async def send_and_note(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            self.counter.labels(scope["method"], getattr(route, "path", "unmatched"),
                                str(status_code)).inc()


def _health_checks(app: FastAPI) -> dict[str, str]:
    checks: dict[str, str] = {}
    try:
        with app.state.store.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as error:
        checks["database"] = f"error: {error}"
    started = time.monotonic()
    try:
        with app.state.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as error:
        checks["broker"] = f"error after {time.monotonic() - started:.1f}s: {error}"
    return checks


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ConfigError)
    async def config_error(_: Request, error: ConfigError) -> JSONResponse:
        return JSONResponse({"detail": f"{error.field}: {error.reason}", "field": error.field},
                            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(NotFoundError)
    async def not_found(_: Request, error: NotFoundError) -> JSONResponse:
        return JSONResponse({"detail": error.detail}, status_code=status.HTTP_404_NOT_FOUND)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        # One readable sentence naming the first problem, plus the full list for tools.
        errors = error.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message = f"malformed JSON: {first.get('ctx', {}).get('error', message)}"
        elif first.get("type") == "missing":
            message = "is required"
        detail = f"{where}: {message}" if where else message
        return JSONResponse({"detail": detail, "errors": _plain(errors)},
                            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


def _plain(errors: Any) -> Any:
    # Validation errors can carry exceptions in ctx; keep them JSON-serialisable.
    return [{key: (str(value) if key == "ctx" else value) for key, value in item.items()
             if key != "input"} for item in errors]


app = create_app()
