"""A job's status: the one list of them, for the store, the API schema, the runner and the
client CLI (dependency-free so the client imports it without SQLAlchemy)."""

from __future__ import annotations

from enum import Enum


class JobStatus(str, Enum):
    """Where a job is. ``queued -> running -> succeeded | failed | cancelled``; a running
    job goes back to ``queued`` when its worker shuts down or dies (it resumes from its
    checkpoint). Members compare equal to their strings, which the database stores."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:  # the value, on every Python version (3.12 changed format)
        return self.value


#: Statuses a job never leaves.
TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
