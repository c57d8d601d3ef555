"""The one task: run a stored job. Thin on purpose; the logic is ``services.runner``.

Idempotent: the message carries only the job id, the store holds the truth, and the
runner skips terminal jobs and jobs another live worker holds. Late acks plus
reject-on-worker-lost mean the message survives a worker dying mid-job.
"""

from __future__ import annotations

from services.queue import RUN_JOB_TASK, enqueue_job
from services.runner import run_job
from worker.app import BUSY, SHUTDOWN, app, settings


@app.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True)
def run_job_task(job_id: str) -> str:
    BUSY.set()
    try:
        return run_job(job_id, settings, shutdown=SHUTDOWN,
                       requeue=lambda requeued: enqueue_job(app, requeued, settings))
    finally:
        BUSY.clear()
