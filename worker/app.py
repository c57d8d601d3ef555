"""The worker's Celery app: ``celery -A worker.app worker --concurrency 1 -Q <QPA_QUEUE>``.

Configuration comes from ``services.queue.make_celery`` (shared with the API, which only
publishes). Two worker-side additions:

* a reaper bootstep: on start-up and every ``QPA_REAP_SECONDS`` it hands back to the queue
  running jobs whose lease is dead (heartbeat older than ``QPA_LEASE_SECONDS``, or holder
  process gone on this host), so a SIGKILLed worker's job is resumed by a live worker
  without waiting for the broker's visibility timeout;
* graceful shutdown: a warm shutdown (SIGTERM) is forwarded to the pool processes, whose
  running job checkpoints at its next step and is requeued.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from celery import bootsteps
from celery.signals import setup_logging, worker_init, worker_shutting_down

from services import store
from services.backends import apply_ibm_settings
from services.logs import configure_logging
from services.queue import enqueue_job, make_celery
from services.settings import get_settings

settings = get_settings()
logger = logging.getLogger("qpa.worker")

app = make_celery(settings)
app.conf.include = ["worker.tasks"]

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
            db = store.get_store(settings.resolved_database_url)
            with db.session() as session:
                job_ids = store.requeue_dead_jobs(session, settings.lease_seconds)
            for job_id in job_ids:
                enqueue_job(app, job_id, settings)
                logger.warning("requeued job whose worker died", extra={"job_id": job_id})
        except Exception:
            logger.exception("reaper pass failed")


app.steps["worker"].add(Reaper)


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
