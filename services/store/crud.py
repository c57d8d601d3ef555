"""Reads and writes of API keys, files, jobs and events (each takes an open session)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    bindparam,
    func,
    literal,
    select,
)
from sqlalchemy.engine import Connection, Row
from sqlalchemy.orm import Session

from services.status import TERMINAL_STATUSES, JobStatus
from services.store.database import EVENT_JOBS
from services.store.models import (
    KEY_PREFIX,
    ApiKey,
    Event,
    File,
    Job,
    hash_key,
    is_id,
    new_id,
    utcnow,
)


def create_api_key(session: Session, name: str = "",
                   expires_at: datetime | None = None) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the plaintext key (shown once, stored hashed)."""
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=new_id("key"), name=name, key_hash=hash_key(plaintext),
                 prefix=plaintext[:8], expires_at=expires_at)
    session.add(row)
    session.flush()
    return row, plaintext


def find_api_key(session: Session, plaintext: str) -> ApiKey | None:
    """The key with this plaintext, whatever its state (``ApiKey.problem`` tells)."""
    return session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(plaintext)))


def get_api_key(session: Session, key_id: str) -> ApiKey | None:
    if not is_id(key_id, "key"):
        return None
    return session.get(ApiKey, key_id)


def list_api_keys(session: Session) -> Sequence[ApiKey]:
    return session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)).all()


def revoke_api_key(session: Session, key: ApiKey) -> ApiKey:
    """Revoke a key (from now on it gets 401); revoking it again keeps the first time."""
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


# --- files ------------------------------------------------------------------------------


def create_file(session: Session, *, file_id: str, owner_id: str, filename: str, size: int,
                records: int) -> File:
    row = File(id=file_id, owner_id=owner_id, filename=filename, bytes=size, records=records)
    session.add(row)
    session.flush()
    return row


def get_file(session: Session, file_id: str, owner_id: str) -> File | None:
    """The file if it exists and belongs to ``owner_id`` (else None: callers answer 404)."""
    if not is_id(file_id, "file"):
        return None
    return session.scalar(select(File).where(File.id == file_id, File.owner_id == owner_id))


def list_files(session: Session, owner_id: str) -> Sequence[File]:
    return session.scalars(
        select(File).where(File.owner_id == owner_id).order_by(File.created_at.desc())
    ).all()


# --- jobs -------------------------------------------------------------------------------


def create_job(session: Session, *, owner_id: str, config: dict[str, Any],
               resource_class: str = "cpu") -> Job:
    job = Job(
        id=new_id("job"), owner_id=owner_id, status=JobStatus.QUEUED, config=config,
        method=config["method"], backend=config["backend"], base_model=config["base_model"],
        total_steps=config["steps"], resource_class=resource_class,
    )
    session.add(job)
    session.flush()
    # Nobody can be watching a job whose id was not answered yet: no notification.
    add_event(session, job.id, {"type": "status", "status": JobStatus.QUEUED,
                                "message": "job created"}, notify=False)
    return job


def read_job_as(connection: Connection, plaintext_key: str, job_id: str) -> Row | None:
    """The status read in one query: the key's id, revocation and expiry (``key_id``,
    ``key_revoked_at``, ``key_expires_at``) and, if the key owns job ``job_id``, the
    job's public columns (``id`` is None otherwise). None: no such key."""
    if not is_id(job_id, "job"):
        job_id = ""  # matches no job; the key is still checked
    return connection.execute(READ_JOB_AS, {"key_hash": hash_key(plaintext_key),
                                             "job_id": job_id}).first()


#: What a client sees of a job (the lease and accounting columns stay inside).
PUBLIC_JOB_COLUMNS = (
    "id", "status", "resource_class", "method", "backend", "base_model", "created_at",
    "started_at", "finished_at", "updated_at", "step", "total_steps", "loss", "lr",
    "eval_loss", "checkpoint_step", "quantum_jobs", "quantum_circuits", "quantum_shots",
    "quantum_seconds", "metrics", "error", "cancel_requested", "attempts", "world_size",
    "config",
)
READ_JOB_AS = (
    select(ApiKey.id.label("key_id"), ApiKey.revoked_at.label("key_revoked_at"),
           ApiKey.expires_at.label("key_expires_at"),
           *(Job.__table__.c[name] for name in PUBLIC_JOB_COLUMNS))
    .select_from(ApiKey)
    .outerjoin(Job, (Job.owner_id == ApiKey.id) & (Job.id == bindparam("job_id")))
    .where(ApiKey.key_hash == bindparam("key_hash"))
)


def get_job(session: Session, job_id: str, owner_id: str | None = None) -> Job | None:
    """The job, or None when it does not exist or is not ``owner_id``'s."""
    if not is_id(job_id, "job"):
        return None
    query = select(Job).where(Job.id == job_id)
    if owner_id is not None:
        query = query.where(Job.owner_id == owner_id)
    return session.scalar(query)


def list_jobs(session: Session, owner_id: str, *, limit: int, after: str | None = None,
              status: str | None = None) -> tuple[Sequence[Job], bool] | None:
    """Newest first, ``limit`` at a time after the job ``after``; None if ``after`` is unknown."""
    query = select(Job).where(Job.owner_id == owner_id)
    if after is not None:
        cursor = get_job(session, after, owner_id)
        if cursor is None:
            return None
        query = query.where(Job.seq < cursor.seq)
    if status is not None:
        query = query.where(Job.status == status)
    rows = session.scalars(query.order_by(Job.seq.desc()).limit(limit + 1)).all()
    return rows[:limit], len(rows) > limit


def request_cancel(session: Session, job: Job) -> Job:
    """Flag a job for cancellation. A queued job is cancelled at once; a running one stops
    at its next step (its worker polls the flag)."""
    if job.status in TERMINAL_STATUSES:
        return job
    job.cancel_requested = True
    if job.status == JobStatus.QUEUED:
        job.status = JobStatus.CANCELLED
        job.finished_at = utcnow()
        add_event(session, job.id, {"type": "status", "status": JobStatus.CANCELLED,
                                    "message": "cancelled before it started"})
    else:
        add_event(session, job.id, {"type": "status", "status": JobStatus.RUNNING,
                                    "message": "cancel requested; stopping at the next step"})
    session.flush()
    return job


def add_event(session: Session, job_id: str, data: dict[str, Any], attempt: int = 0, *,
              notify: bool = True) -> Event:
    """Append an event to the job's record; watchers are notified after the commit."""
    if session.get_bind().dialect.name != "sqlite":
        # The job's row lock orders its events: a second writer waits for this commit
        # before it draws its id (SQLite writers are serialised already).
        session.execute(select(literal(1)).select_from(Job).where(Job.id == job_id)
                        .with_for_update())
    row = Event(job_id=job_id, type=str(data.get("type", "log")), attempt=attempt, data=data)
    session.add(row)
    if notify:
        session.info.setdefault(EVENT_JOBS, set()).add(job_id)
    return row


def list_events(session: Session, job_id: str, *, after: int = 0,
                limit: int = 100) -> tuple[Sequence[Event], bool]:
    rows = session.scalars(
        select(Event).where(Event.job_id == job_id, Event.seq > after)
        .order_by(Event.seq).limit(limit + 1)
    ).all()
    return rows[:limit], len(rows) > limit


def events_after(connection: Connection, job_id: str, after: int,
                 limit: int) -> Sequence[Row]:
    """Up to ``limit`` events of a job with ids over ``after``, oldest first, as rows
    (``seq, job_id, created_at, type, attempt, data``): the event streams' read."""
    return connection.execute(_EVENTS_AFTER, {"job_id": job_id, "after": after,
                                              "limit": limit}).all()


_EVENTS_AFTER = (
    select(*Event.__table__.columns)
    .where(Event.job_id == bindparam("job_id"), Event.seq > bindparam("after"))
    .order_by(Event.seq).limit(bindparam("limit"))
)


def job_status(connection: Connection, job_id: str) -> str | None:
    return connection.execute(select(Job.status).where(Job.id == job_id)).scalar()


def last_event_id(connection: Connection, job_id: str) -> int:
    """The id of the job's newest event (0: none)."""
    return int(connection.execute(select(func.max(Event.seq)).where(Event.job_id == job_id))
               .scalar() or 0)


def count_jobs_by_status(session: Session) -> dict[str, int]:
    counts = dict.fromkeys((status.value for status in JobStatus), 0)
    for status, count in session.execute(select(Job.status, func.count()).group_by(Job.status)):
        counts[status] = count
    return counts


