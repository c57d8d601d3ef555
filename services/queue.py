"""The Celery side both api and worker share: the app's configuration and enqueueing.

The API only publishes (``send_task`` by name), so it never imports the worker's code;
the worker registers the task under the same name. Delivery settings are what make a
killed worker's job come back: late acks, requeue when the pool process is lost, one
message prefetched at a time (a busy worker holds no second job hostage).

A job's resource class picks its queue (``QPA_QUEUE`` for cpu, ``QPA_GPU_QUEUE`` for gpu);
a worker consumes the queues of the classes it serves (``QPA_WORKER_RESOURCES``).
"""

from __future__ import annotations

from typing import Any

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


RETRY_POLICY: dict[str, Any] = {"max_retries": 3, "interval_start": 0.2,
                                "interval_step": 0.5, "interval_max": 1.0}


def resource_class_of(config: dict[str, Any]) -> str:
    """cpu | gpu: the config's ``resource_class`` if set, else gpu when ``train.device``
    is cuda (a job that may run anywhere is cpu: any worker can take it)."""
    explicit = config.get("resource_class")
    if explicit:
        return str(explicit)
    return "gpu" if (config.get("train") or {}).get("device") == "cuda" else "cpu"


def enqueue_job(app: Celery, job_id: str, settings: Settings,
                resource_class: str = "cpu") -> None:
    """Publish one run of ``job_id`` on its class's queue. Fails fast (a few retries)
    when the broker is down."""
    app.send_task(RUN_JOB_TASK, args=[job_id], queue=settings.queue_for(resource_class),
                  retry=True, retry_policy=RETRY_POLICY)
