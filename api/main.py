"""The FastAPI application: ``uvicorn api.main:app`` (or ``create_app(settings)``).

Wires settings, the job store, the artifact store, the Celery publisher, a Redis client
and the event hub into ``app.state`` at start-up (lifespan), mounts the routers, answers
every error as JSON ``{"detail": ..., "field": ...}`` (``api.errors``) and serves
/healthz and /metrics. The threadpool and the database pool have the same size
(``QPA_API_THREADS``): a request in the pool never waits for a connection.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import redis
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from sqlalchemy import text
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import CurrentKey
from api.errors import (
    JSON_BODY_LIMIT,
    MULTIPART_OVERHEAD,
    BodyLimit,
    ServiceRoute,
    add_error_handlers,
)
from api.events import EventHub
from api.metrics import StoreCollector
from api.routes import backends, estimates, files, jobs, keys, ui, workers
from api.schemas import Health, error_responses
from services import async_reads
from services.artifacts import open_artifacts
from services.async_reads import AsyncReads
from services.backends import apply_ibm_settings
from services.events import EventPublisher
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
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        app.state.publisher = EventPublisher(settings.resolved_broker_url)
        # One connection per thread, plus one for the status read SQLite answers in the
        # event loop (api.routes.jobs.get_job). Every trip to the threadpool returns its
        # connection before it ends (api.errors.ServiceRoute), so none waits for one.
        app.state.store = Store(settings.resolved_database_url,
                                pool_size=settings.api_threads + 1,
                                notify=app.state.publisher)
        app.state.artifacts = open_artifacts(settings.resolved_artifact_url)
        await anyio.to_thread.run_sync(app.state.artifacts.check)  # a bad bucket stops here
        app.state.celery = make_celery(settings)
        # One pooled client for /healthz and /v1/workers (no connection per call).
        app.state.redis = redis.Redis.from_url(settings.resolved_broker_url,
                                               socket_timeout=2, socket_connect_timeout=2)
        app.state.hub = EventHub(settings.resolved_broker_url, app.state.store)
        app.state.async_reads = (AsyncReads(settings.resolved_database_url,
                                            settings.api_threads)
                                 if async_reads.supported(settings.resolved_database_url)
                                 else None)
        app.state.registry.register(StoreCollector(app.state.store))
        try:
            yield
        finally:
            await app.state.hub.close()
            if app.state.async_reads is not None:
                await app.state.async_reads.close()
            app.state.celery.close()
            app.state.redis.close()
            app.state.publisher.close()
            app.state.store.dispose()

    app = FastAPI(
        title="QPA fine-tuning service",
        version="0.1.0",
        description="Submit hybrid quantum-classical fine-tuning jobs, watch them, download "
        "stock PEFT adapters. Every call but /healthz needs `Authorization: Bearer <key>`.",
        lifespan=lifespan,
    )
    app.router.route_class = ServiceRoute
    app.state.settings = settings
    app.state.registry = CollectorRegistry()
    requests_total = Counter("qpa_http_requests", "HTTP requests by route and status",
                             ["method", "route", "status"], registry=app.state.registry)

    # Uploads are the only large bodies; the files route checks the file's exact size.
    upload_limit = settings.max_upload_bytes + MULTIPART_OVERHEAD
    app.add_middleware(BodyLimit, limit_for=lambda scope: upload_limit if (
        scope["method"] == "POST" and scope["path"] == "/v1/files") else JSON_BODY_LIMIT)
    app.add_middleware(RequestCounter, counter=requests_total)

    add_error_handlers(app)
    # Jobs first: the status read is the call clients make most, and routes are matched
    # in order.
    app.include_router(jobs.router)
    app.include_router(files.router)
    app.include_router(backends.router)
    app.include_router(estimates.router)
    app.include_router(keys.router)
    app.include_router(workers.router)
    app.include_router(ui.router)
    app.mount("/ui/static", ui.static_files(), name="ui-static")

    @app.get("/healthz", tags=["ops"], response_model=Health,
             responses={503: {"model": Health, "description": "The database or the "
                              "broker does not answer."}})
    async def healthz(request: Request) -> JSONResponse:
        """Liveness and readiness: the database and the broker answer. No key needed."""
        checks = await anyio.to_thread.run_sync(_health_checks, request.app)
        healthy = all(value == "ok" for value in checks.values())
        return JSONResponse({"status": "ok" if healthy else "degraded", **checks},
                            status_code=200 if healthy else 503)

    @app.get("/metrics", tags=["ops"], response_class=Response, responses={
        **error_responses(401),
        200: {"description": "Prometheus text exposition format.",
              "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}})
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
        app.state.redis.ping()  # a pooled connection: no new one per call
        checks["broker"] = "ok"
    except Exception as error:
        checks["broker"] = f"error after {time.monotonic() - started:.1f}s: {error}"
    return checks


app = create_app()
