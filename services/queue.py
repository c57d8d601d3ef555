"""The Celery side both api and worker share: the app's configuration and enqueueing.

The API only publishes (``send_task`` by name), so it never imports the worker's code;
the worker registers the task under the same name. Delivery settings are what make a
killed worker's job come back: late acks, requeue when the pool process is lost, one
message prefetched at a time (a busy worker holds no second job hostage).
"""

from __future__ import annotations

from celery import Celery

from services.settings import Settings

RUN_JOB_TASK = "qpa.run_job"


def make_celery(settings: Settings) -> Celery:
    app = Celery("qpa", broker=settings.resolved_broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.queue,
        task_routes={RUN_JOB_TASK: {"queue": settings.queue}},
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        broker_connection_retry_on_startup=True,
        # The store of record is SQL; Celery keeps no results.
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


def enqueue_job(app: Celery, job_id: str, settings: Settings) -> None:
    """Publish one run of ``job_id``. Fails fast (a few retries) when the broker is down."""
    app.send_task(
        RUN_JOB_TASK, args=[job_id], queue=settings.queue, retry=True,
        retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5,
                      "interval_max": 1.0},
    )
