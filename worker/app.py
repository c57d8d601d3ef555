"""The worker's Celery app: ``celery -A worker.app worker --concurrency 1``.

Configuration comes from ``services.queue.make_celery`` (shared with the API, which only
publishes). The worker consumes the queues of the resource classes it serves
(``QPA_WORKER_RESOURCES``: cpu, gpu or both; ``-Q`` on the command line overrides).
Worker-side additions:

* a reaper bootstep: on start-up and every ``QPA_REAP_SECONDS`` it hands back to the queue
  running jobs whose lease is dead (heartbeat older than ``QPA_LEASE_SECONDS``, or holder
  process gone on this host), so a SIGKILLed worker's job is resumed by a live worker
  without waiting for the broker's visibility timeout;
* a presence bootstep: the worker announces itself in Redis on the same timer
  (``services.workers``, read by ``GET /v1/workers``);
* graceful shutdown: a warm shutdown (SIGTERM) is forwarded to the pool processes, whose
  running job checkpoints at its next step and is requeued.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import redis
from celery import bootsteps
from celery.signals import setup_logging, worker_init, worker_shutting_down
from kombu import Queue

from services import store, workers
from services.backends import apply_ibm_settings
from services.logs import configure_logging
from services.queue import enqueue_job, make_celery
from services.runner import worker_store
from services.settings import get_settings

settings = get_settings()
logger = logging.getLogger("qpa.worker")

app = make_celery(settings)
app.conf.include = ["worker.tasks"]
# The queues of the resource classes this worker serves.
app.conf.task_queues = [Queue(name) for name in settings.worker_queues]

# Set in a pool process when its worker shuts down: the running job stops at its next step.
SHUTDOWN = threading.Event()


class Reaper(bootsteps.StartStopStep):
    """Requeue jobs whose worker died (runs in the worker's main process)."""

    requires = {"celery.worker.components:Timer"}

    def __init__(self, parent: Any, **kwargs: Any):
        super().__init__(parent, **kwargs)
        self.timer_ref: Any = None

    def start(self, parent: Any) -> None:
        self.reap()
        self.timer_ref = parent.timer.call_repeatedly(settings.reap_seconds, self.reap)

    def stop(self, parent: Any) -> None:
        if self.timer_ref is not None:
            self.timer_ref.cancel()

    def reap(self) -> None:
        try:
            db = worker_store(settings)
            with db.session() as session:
                requeued = store.requeue_dead_jobs(session, settings.lease_seconds)
            for job_id, resource_class in requeued:
                enqueue_job(app, job_id, settings, resource_class)
                logger.warning("requeued job whose worker died", extra={"job_id": job_id})
        except Exception:
            logger.exception("reaper pass failed")


class Presence(bootsteps.StartStopStep):
    """Announce this worker (resource classes, queues, slots) in Redis until it stops."""

    requires = {"celery.worker.components:Timer", "celery.worker.components:Pool"}

    def __init__(self, parent: Any, **kwargs: Any):
        super().__init__(parent, **kwargs)
        self.timer_ref: Any = None
        self.client: redis.Redis | None = None
        self.record: dict[str, Any] = {}

    def start(self, parent: Any) -> None:
        queues = sorted(parent.app.amqp.queues.consume_from or settings.worker_queues)
        served = [name for name in settings.worker_resources
                  if settings.queue_for(name) in queues]
        self.record = workers.worker_record(parent.hostname, store.this_host(), served,
                                            queues, parent.concurrency)
        if "gpu" in served and not self.record["gpus"]:
            logger.warning("this worker serves gpu jobs but sees no NVIDIA device")
        self.client = redis.Redis.from_url(settings.resolved_broker_url, socket_timeout=5)
        self.announce()
        self.timer_ref = parent.timer.call_repeatedly(settings.reap_seconds, self.announce)

    def announce(self) -> None:
        try:
            workers.announce(self.client, self.record,
                             workers.presence_ttl(settings.reap_seconds))
        except redis.RedisError:
            logger.exception("could not announce this worker")

    def stop(self, parent: Any) -> None:
        if self.timer_ref is not None:
            self.timer_ref.cancel()
        if self.client is not None:
            with contextlib.suppress(redis.RedisError):
                workers.withdraw(self.client, self.record["name"])
            self.client.close()


app.steps["worker"].add(Reaper)
app.steps["worker"].add(Presence)


@setup_logging.connect
def _setup_logging(**_: Any) -> None:
    # Connected, so Celery leaves logging to us: JSON lines with the job id.
    configure_logging(settings.log_level, settings.log_json)


@worker_init.connect
def _configure_ibm(**_: Any) -> None:
    apply_ibm_settings(settings)  # before the pool forks, so every job sees it


@worker_shutting_down.connect
def _forward_shutdown(**_: Any) -> None:
    # Celery's warm shutdown waits for running tasks; a training job can run for hours.
    # Tell the pool processes, so their jobs checkpoint and go back to the queue.
    me = os.getpid()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == me:
                os.kill(int(stat.parent.name), signal.SIGTERM)
        except (OSError, ValueError, IndexError):
            continue
