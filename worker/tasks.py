"""The one task: run a stored job. Thin on purpose; the logic is ``services.runner``.

Idempotent: the message carries only the job id, the store holds the truth, and the
runner skips terminal jobs and jobs another live worker holds. Late acks plus
reject-on-worker-lost mean the message survives a worker dying mid-job.
"""

from __future__ import annotations

import signal
from typing import Any

from sqlalchemy.exc import OperationalError

from services.queue import RUN_JOB_TASK, enqueue_job
from services.runner import run_job
from worker.app import SHUTDOWN, app, settings


def _on_sigterm(_signum: int, _frame: Any) -> None:
    SHUTDOWN.set()  # the job checkpoints at its next step and is requeued


# A database that is briefly unreachable must not cost the message (Celery acks a failed
# task): retry with backoff instead.
@app.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True,
          autoretry_for=(OperationalError,), retry_backoff=2, retry_backoff_max=60,
          max_retries=20)
def run_job_task(job_id: str) -> str:
    # Only while a job runs: an idle pool process keeps billiard's exit-on-SIGTERM.
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return run_job(job_id, settings, shutdown=SHUTDOWN,
                       requeue=lambda requeued, resource_class: enqueue_job(
                           app, requeued, settings, resource_class))
    finally:
        signal.signal(signal.SIGTERM, previous)
