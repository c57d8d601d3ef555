"""Leases make redelivery safe: a worker runs a job only after atomically taking its lease,
renews it by heartbeat, and every write it makes afterwards is conditional on still
holding it. A job whose lease went stale (its worker died) is handed back to the queue."""

from __future__ import annotations

import functools
import os
import socket
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    func,
    select,
    update,
)
from sqlalchemy.orm import Session

from services.status import TERMINAL_STATUSES, JobStatus
from services.store.crud import add_event, get_job
from services.store.models import Job, utcnow


@functools.cache
def this_host() -> str:
    """Where a pid means something: hostname, kernel boot and pid namespace (or
    ``QPA_HOST_ID`` when set).

    Two containers may share a hostname, and a restarted machine reuses pids; only a
    lease taken in this same boot and pid namespace may be judged by its pid.
    """
    from services.settings import get_settings

    configured = get_settings().host_id
    if configured:
        return configured
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8])
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass
    return "/".join(parts)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (zombies count as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def lease_is_dead(job: Job, now: datetime, lease_seconds: float) -> bool:
    """A lease is dead when its heartbeat is older than ``lease_seconds`` or, faster, when
    its holder was a process on this very host that no longer exists."""
    if job.lease_owner is None:
        return True
    if job.heartbeat_at is None or job.heartbeat_at < now - timedelta(seconds=lease_seconds):
        return True
    return job.lease_host == this_host() and job.lease_pid is not None and \
        not pid_alive(job.lease_pid)


def acquire_lease(session: Session, job_id: str, owner: str, lease_seconds: float) -> Job | None:
    """Atomically make ``owner`` the runner of a queued job, or of a running job whose
    lease is dead. Returns the job, or None if it is terminal or someone alive holds it."""
    job = get_job(session, job_id)
    if job is None or job.status in TERMINAL_STATUSES:
        return None
    now = utcnow()
    if job.status == JobStatus.RUNNING and not lease_is_dead(job, now, lease_seconds):
        return None
    # Compare-and-set on the lease we looked at: of two workers racing, one wins.
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == job.status,
               Job.lease_owner.is_(None) if job.lease_owner is None
               else Job.lease_owner == job.lease_owner)
        .values(status=JobStatus.RUNNING, lease_owner=owner, lease_host=this_host(),
                lease_pid=os.getpid(), heartbeat_at=now, attempts=Job.attempts + 1,
                started_at=func.coalesce(Job.started_at, now), updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return None
    session.flush()
    session.refresh(job)
    return job


def renew_lease(session: Session, job_id: str, owner: str) -> bool:
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.lease_owner == owner)
        .values(heartbeat_at=utcnow()).execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def update_leased_job(session: Session, job_id: str, owner: str, **values: Any) -> bool:
    """Update a job only while ``owner`` holds its lease (a worker that lost its lease
    must not overwrite the progress of the worker that took over)."""
    values.setdefault("updated_at", utcnow())
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.lease_owner == owner).values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def requeue_dead_jobs(session: Session, lease_seconds: float) -> list[tuple[str, str]]:
    """Hand running jobs whose worker died back to the queue; returns their (id,
    resource class) pairs.

    The caller sends one task per returned job to its class's queue. The CAS on the lease
    owner makes sure two workers reaping at once requeue a job only once.
    """
    now = utcnow()
    requeued = []
    for job in session.scalars(select(Job).where(Job.status == JobStatus.RUNNING)).all():
        if not lease_is_dead(job, now, lease_seconds):
            continue
        # A job cancelled while its worker was dying needs no new worker to say so.
        new_status = JobStatus.CANCELLED if job.cancel_requested else JobStatus.QUEUED
        result = session.execute(
            update(Job).where(Job.id == job.id, Job.status == JobStatus.RUNNING,
                              Job.lease_owner == job.lease_owner)
            .values(status=new_status, lease_owner=None, lease_host=None, lease_pid=None,
                    updated_at=now, finished_at=now if new_status == JobStatus.CANCELLED else None)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1 and new_status == JobStatus.CANCELLED:
            add_event(session, job.id, {"type": "status", "status": JobStatus.CANCELLED,
                                        "message": f"worker {job.lease_owner} stopped; "
                                        "cancelled as requested"}, attempt=job.attempts)
        elif result.rowcount == 1:
            resume = (f"resumes from the checkpoint at step {job.checkpoint_step}"
                      if job.checkpoint_step else "restarts (no checkpoint yet)")
            add_event(session, job.id, {
                "type": "status", "status": JobStatus.QUEUED,
                "message": f"worker {job.lease_owner} stopped; requeued, {resume}",
            }, attempt=job.attempts)
            requeued.append((job.id, job.resource_class))
    return requeued
