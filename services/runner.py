"""The job runner: run one stored job with ``qpa.training.finetune``, idempotently.

Both sides call it: the Celery task is a one-line wrapper, and tests or a future
in-process executor can call ``run_job`` directly. It

1. skips a job that is terminal, or whose lease a live worker holds (redelivered duplicate);
2. takes the job's lease atomically and renews it from a heartbeat thread;
3. runs training into the job's workspace with ``resume=True``: the artifact folder itself,
   or, with object storage, a folder on this host filled from the store first, so a job
   whose previous worker died (on any host) continues from the stored checkpoint;
4. writes every trainer event to the store and mirrors progress onto the job row, each
   write conditional on still holding the lease; at every checkpoint, pushes the
   checkpoint and the logs to the artifact store before the job row records it;
5. stops within one step when the cancel flag is set, the lease is lost, or the worker
   is shutting down, and records the outcome. Failed jobs keep events and checkpoint.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import secrets
import shutil
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from services import store
from services.artifacts import ADAPTER_ARCHIVE, ArtifactStore, Workspace, build_archive
from services.artifacts import open_artifacts as _open_artifacts
from services.events import EventPublisher
from services.logs import JobLogger
from services.settings import Settings, get_settings
from services.status import JobStatus

logger = logging.getLogger("qpa.runner")

# Outcomes of run_job besides the terminal statuses.
SKIPPED = "skipped"  # terminal already, or another live worker holds the job
LOST = "lost"  # the lease was taken over while running; the new holder reports
INTERRUPTED = "interrupted"  # this worker is shutting down; job requeued from checkpoint


Requeue = Callable[[str, str], None]


def worker_store(settings: Settings) -> store.Store:
    """This process's job store, publishing event notifications on the broker."""
    return store.get_store(settings.resolved_database_url,
                           notify=_publisher(os.getpid(), settings.resolved_broker_url))


@functools.cache
def _publisher(_pid: int, broker_url: str) -> EventPublisher:
    return EventPublisher(broker_url)


@functools.cache
def _artifacts(_pid: int, url: str) -> ArtifactStore:
    # Per process: a forked pool process must not reuse its parent's HTTP connections.
    return _open_artifacts(url)


def open_artifacts(settings: Settings) -> ArtifactStore:
    """This process's artifact store."""
    return _artifacts(os.getpid(), settings.resolved_artifact_url)


def run_job(job_id: str, settings: Settings | None = None, *,
            shutdown: threading.Event | None = None,
            requeue: Requeue | None = None) -> str:
    """Run (or resume) one job; returns its final status or SKIPPED/LOST/INTERRUPTED.

    ``shutdown``: set by the worker on warm shutdown; training then checkpoints, the job
    goes back to ``queued`` and ``requeue(job_id, resource_class)`` publishes it again.
    """
    settings = settings or get_settings()
    db = worker_store(settings)
    artifacts = open_artifacts(settings)
    owner = f"{store.this_host()}/{os.getpid()}/{secrets.token_hex(4)}"
    log = JobLogger(logger, {"job_id": job_id})

    with db.session() as session:
        job = store.get_job(session, job_id)
        if job is None:
            log.warning("job does not exist; message dropped")
            return SKIPPED
        if job.status in store.TERMINAL_STATUSES:
            log.info("job is already %s; not run again", job.status)
            return SKIPPED
        job = store.acquire_lease(session, job_id, owner, settings.lease_seconds)
        if job is None:
            log.info("job is held by a live worker; duplicate delivery skipped")
            return SKIPPED
        attempt = job.attempts
        config_data = dict(job.config)
        resource_class = job.resource_class
        if job.cancel_requested:
            _finish(session, job_id, owner, attempt, JobStatus.CANCELLED,
                    "cancelled before it started")
            return JobStatus.CANCELLED
        resuming = artifacts.has_checkpoint(job_id)
        store.update_leased_job(session, job_id, owner, world_size=settings.worker_nproc)
        message = f"running on {owner} (attempt {attempt})"
        if settings.worker_nproc > 1:
            message += f" with {settings.worker_nproc} processes"
        if resuming:
            message += f"; resuming from the checkpoint at step {job.checkpoint_step}"
        store.add_event(session, job_id, {"type": "status", "status": JobStatus.RUNNING,
                                          "message": message}, attempt=attempt)
    log.info(message, extra={"attempt": attempt})

    workspace = artifacts.workspace(job_id, settings.scratch_dir)
    inputs = settings.scratch_dir / "inputs" / job_id
    job_run = _JobRun(job_id, owner, attempt, settings, db, log, shutdown, workspace)
    job_run.start_heartbeat()
    try:
        return job_run.train(config_data, artifacts, inputs,
                             requeue and (lambda: requeue(job_id, resource_class)))
    finally:
        job_run.stop_heartbeat()
        workspace.close()
        shutil.rmtree(inputs, ignore_errors=True)


class _JobRun:
    """State of one attempt: the lease holder's heartbeat and the trainer's callbacks."""

    def __init__(self, job_id: str, owner: str, attempt: int, settings: Settings,
                 db: store.Store, log: JobLogger, shutdown: threading.Event | None,
                 workspace: Workspace):
        self.workspace = workspace
        self.job_id = job_id
        self.owner = owner
        self.attempt = attempt
        self.settings = settings
        self.db = db
        self.log = log
        self.shutdown = shutdown or threading.Event()
        self.lease_lost = threading.Event()
        self._done = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._last_step_at: float | None = None

    # -- lease ------------------------------------------------------------------------

    def start_heartbeat(self) -> None:
        self._heartbeat = threading.Thread(target=self._beat, name=f"heartbeat-{self.job_id}",
                                           daemon=True)
        self._heartbeat.start()

    def stop_heartbeat(self) -> None:
        self._done.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)

    def _beat(self) -> None:
        # A thread, not the training loop, renews the lease: one step on a QPU can take
        # longer than the lease, and the job must not look dead meanwhile.
        while not self._done.wait(self.settings.heartbeat_seconds):
            try:
                with self.db.session() as session:
                    held = store.renew_lease(session, self.job_id, self.owner)
            except Exception:
                self.log.exception("heartbeat failed; retrying")
                continue
            if not held:
                self.log.warning("lease lost to another worker; stopping")
                self.lease_lost.set()
                return

    # -- trainer callbacks -------------------------------------------------------------

    def should_stop(self) -> bool:
        if self.lease_lost.is_set() or self.shutdown.is_set():
            return True
        try:
            with self.db.session() as session:
                return bool(session.scalar(
                    select(store.Job.cancel_requested).where(store.Job.id == self.job_id)))
        except Exception:
            self.log.exception("could not read the cancel flag; training goes on")
            return False

    def on_event(self, event: dict[str, Any]) -> None:
        event = _json_safe(event)
        kind = event.get("type")
        values: dict[str, Any] = {}
        if kind == "step":
            now = time.monotonic()
            values.update(step=int(event["step"]), loss=event.get("loss"), lr=event.get("lr"))
            if event.get("total_steps"):
                values["total_steps"] = int(event["total_steps"])
            quantum = event.get("quantum") or {}
            for field in ("jobs", "circuits", "shots", "seconds"):
                if quantum.get(field) is not None:
                    values[f"quantum_{field}"] = quantum[field]
            # The trainer times its steps; without that, time between step events (the
            # first step of an attempt also pays model loading, so it is not counted).
            seconds = event.get("step_seconds")
            if seconds is None and self._last_step_at is not None:
                seconds = now - self._last_step_at
            if seconds is not None:
                values["step_seconds_total"] = store.Job.step_seconds_total + float(seconds)
                values["steps_run"] = store.Job.steps_run + 1
            self._last_step_at = now
        elif kind == "eval" and event.get("eval_loss") is not None:
            values["eval_loss"] = event["eval_loss"]
        elif kind == "checkpoint" and self._store_checkpoint(int(event["step"])):
            values["checkpoint_step"] = int(event["step"])
        try:
            with self.db.session() as session:
                if values and not store.update_leased_job(session, self.job_id, self.owner,
                                                          **values):
                    self.lease_lost.set()
                    return
                store.add_event(session, self.job_id, event, attempt=self.attempt)
        except Exception:
            # Losing one progress event must not kill hours of training.
            self.log.exception("could not record event %s", kind)
        if kind in ("status", "eval", "checkpoint"):
            self.log.info("%s", event.get("message") or kind,
                          extra={k: v for k, v in event.items() if k not in ("type", "message")})

    def _store_checkpoint(self, step: int) -> bool:
        """Push the checkpoint just written (and the logs) to the artifact store; whether
        it is stored. The job row only ever names a checkpoint another host can resume."""
        if self.lease_lost.is_set():
            return False  # the worker that took over owns the stored checkpoint now
        try:
            self.workspace.push()
        except Exception as error:
            self.log.exception("could not store the checkpoint at step %s", step)
            self.on_event({"type": "log", "level": "warning", "message":
                           f"checkpoint at step {step} not stored ({error}); training goes on"})
            return False
        return True

    def _push_quietly(self) -> None:
        try:
            self.workspace.push()
        except Exception:
            self.log.exception("could not store the job's files")

    # -- the run -----------------------------------------------------------------------

    def train(self, config_data: dict[str, Any], artifacts: ArtifactStore, inputs: Any,
              requeue: Callable[[], None] | None) -> str:
        from qpa.config import parse_config
        from qpa.errors import ConfigError, JobCancelled, QuantumBudgetExceeded

        try:
            from qpa.training import finetune

            self.workspace.pull()
            # The stored config is the API's validated form, server policy applied; it is
            # read back as is, and only its file ids become this host's paths.
            config = parse_config(config_data)
            paths = {}
            for field in ("train_file", "eval_file"):
                file_id = getattr(config, field)
                if file_id:
                    try:
                        paths[field] = str(artifacts.upload_path(file_id, inputs))
                    except FileNotFoundError:
                        raise ConfigError(field, f"uploaded file {file_id} is gone") from None
            config = config.model_copy(update=paths)
            metrics = finetune(config, self.workspace.dir, on_event=self.on_event,
                               should_stop=self.should_stop, resume=True,
                               nproc=self.settings.worker_nproc)
        except JobCancelled as stopped:
            return self._stopped(stopped.step, requeue)
        except ConfigError as error:
            return self._fail(f"{error.field}: {error.reason}")
        except QuantumBudgetExceeded as error:
            return self._fail(f"quantum budget exceeded: {error}")
        except ImportError as error:
            return self._fail(f"the worker cannot train: {error}")
        except Exception as error:
            self.on_event({"type": "log", "level": "error",
                           "message": traceback.format_exc(limit=20)})
            return self._fail(f"{type(error).__name__}: {error}")
        try:
            build_archive(self.workspace.dir, "adapter", ADAPTER_ARCHIVE, "w:gz")
        except Exception:  # the API builds it on demand if this failed
            self.log.exception("could not pre-build the adapter archive")
        try:
            self.workspace.push()
        except Exception as error:
            self.log.exception("could not store the job's results")
            return self._fail(f"could not store the results in the artifact store: {error}")
        with self.db.session() as session:
            if not _finish(session, self.job_id, self.owner, self.attempt, JobStatus.SUCCEEDED,
                           "training finished", metrics=_json_safe(metrics)):
                return LOST
        self.log.info("job succeeded")
        return JobStatus.SUCCEEDED

    def _stopped(self, step: int, requeue: Callable[[], None] | None) -> str:
        if self.lease_lost.is_set():
            self.log.warning("stopped at step %s after losing the lease", step)
            return LOST
        self._push_quietly()  # the checkpoint training just wrote, and the logs
        with self.db.session() as session:
            job = store.get_job(session, self.job_id)
            cancelled = job is not None and job.cancel_requested
            if cancelled:
                _finish(session, self.job_id, self.owner, self.attempt, JobStatus.CANCELLED,
                        f"cancelled at step {step}; checkpoint kept")
                self.log.info("job cancelled at step %s", step)
                return JobStatus.CANCELLED
            # Worker shutdown: hand the job back; the next worker resumes from the
            # checkpoint training just wrote.
            store.update_leased_job(session, self.job_id, self.owner, status=JobStatus.QUEUED,
                                    lease_owner=None, lease_host=None, lease_pid=None)
            store.add_event(session, self.job_id, {
                "type": "status", "status": JobStatus.QUEUED,
                "message": f"worker shutting down at step {step}; requeued to resume "
                "from its checkpoint"}, attempt=self.attempt)
        if requeue is not None:
            requeue()
        self.log.info("job interrupted by worker shutdown at step %s; requeued", step)
        return INTERRUPTED

    def _fail(self, error: str) -> str:
        self.log.error("job failed: %s", error)
        if not self.lease_lost.is_set():
            self._push_quietly()  # a failed job keeps its last checkpoint and its logs
        with self.db.session() as session:
            if not _finish(session, self.job_id, self.owner, self.attempt, JobStatus.FAILED, error,
                           error=error):
                return LOST
        return JobStatus.FAILED


def _finish(session: Any, job_id: str, owner: str, attempt: int, status: str, message: str,
            **values: Any) -> bool:
    """Record a terminal status and release the lease, if ``owner`` still holds it."""
    done = store.update_leased_job(
        session, job_id, owner, status=status, finished_at=store.utcnow(),
        lease_owner=None, lease_host=None, lease_pid=None, heartbeat_at=None, **values)
    if done:
        event: dict[str, Any] = {"type": "status", "status": status, "message": message}
        if values.get("error"):
            event["error"] = values["error"]
        store.add_event(session, job_id, event, attempt=attempt)
    return done


def _json_safe(value: Any) -> Any:
    """Events go into JSON columns: numbers from numpy/torch become floats, NaN/inf None."""
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):
        return _json_safe(value.item())
    return str(value)
