"""The store's tables (SQLAlchemy 2.0 models), ids and the job statuses.

The schema is owned by Alembic (``services/migrations``): a change here needs a revision.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.status import JobStatus

KEY_PREFIX = "qpa_"
# Largest value an id or cursor may take: SQLite's INTEGER and PostgreSQL's BIGINT.
MAX_SEQ = 2**63 - 1
_ID_PATTERN = re.compile(r"[a-z]+-[0-9a-f]{24}")


def utcnow() -> datetime:
    """Naive UTC: what SQLite round-trips; converted to aware at the API edge."""
    return datetime.now(timezone.utc).replace(tzinfo=None)  # noqa: UP017 (py3.10 target)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def is_id(value: str, prefix: str) -> bool:
    """Whether ``value`` has the shape of an id ``new_id(prefix)`` makes. Lookups answer
    "not found" for anything else without sending it to the database (a NUL byte or a
    10 kB string is no id, and PostgreSQL would refuse the former)."""
    return value.startswith(f"{prefix}-") and _ID_PATTERN.fullmatch(value) is not None


def hash_key(key: str) -> str:
    # API keys are 256-bit random strings, so a fast unsalted hash is enough: there is
    # nothing to brute-force, and lookup by hash stays a single indexed query.
    return hashlib.sha256(key.encode()).hexdigest()


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON}


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime)

    def state(self, now: datetime) -> str:
        """``active``, ``revoked`` or ``expired`` (at ``now``, naive UTC)."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def problem(self, now: datetime) -> str | None:
        """Why this key may not be used at ``now`` (None: it may)."""
        return key_problem(self.id, self.revoked_at, self.expires_at, now)


def key_problem(key_id: str, revoked_at: datetime | None, expires_at: datetime | None,
                now: datetime) -> str | None:
    """Why a key with these dates may not be used at ``now`` (None: it may)."""
    if revoked_at is not None:
        return f"API key {key_id} was revoked at {revoked_at:%Y-%m-%d %H:%M:%S} UTC"
    if expires_at is not None and expires_at <= now:
        return f"API key {key_id} expired at {expires_at:%Y-%m-%d %H:%M:%S} UTC"
    return None


class File(Base):
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    filename: Mapped[str] = mapped_column(String(500))
    bytes: Mapped[int] = mapped_column(Integer)
    records: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Job(Base):
    __tablename__ = "jobs"

    # seq orders and paginates; id is what clients see.
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, index=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True, default=JobStatus.QUEUED)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    method: Mapped[str] = mapped_column(String(32))
    backend: Mapped[str] = mapped_column(String(200))
    base_model: Mapped[str] = mapped_column(String(500))
    # cpu | gpu: which queue, hence which workers, run the job.
    resource_class: Mapped[str] = mapped_column(String(8), default="cpu",
                                                server_default="cpu")

    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    # Progress, updated from the trainer's events.
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    loss: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float | None] = mapped_column(Float)
    eval_loss: Mapped[float | None] = mapped_column(Float)
    checkpoint_step: Mapped[int | None] = mapped_column(Integer)
    quantum_jobs: Mapped[int] = mapped_column(Integer, default=0)
    quantum_circuits: Mapped[int] = mapped_column(Integer, default=0)
    quantum_shots: Mapped[int] = mapped_column(Integer, default=0)
    quantum_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    # For the step-time metric: wall seconds over steps run (all attempts).
    step_seconds_total: Mapped[float] = mapped_column(Float, default=0.0)
    steps_run: Mapped[int] = mapped_column(Integer, default=0)
    # Processes the current (or last) attempt trains on: the worker's QPA_WORKER_NPROC.
    world_size: Mapped[int | None] = mapped_column(Integer)

    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)

    # Lease: who runs the job now, and when it last said so.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_host: Mapped[str | None] = mapped_column(String(200))
    lease_pid: Mapped[int | None] = mapped_column(Integer)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime)


class Event(Base):
    __tablename__ = "events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    type: Mapped[str] = mapped_column(String(32))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)


