"""The job store of record: API keys, uploaded files, jobs and their events, in SQL.

SQLAlchemy 2.0 models plus a small CRUD layer. SQLite by default (WAL mode, so the API
reads while a worker writes), PostgreSQL by URL. Celery's result backend is not used:
everything a client sees about a job is read from here.

Leases make redelivery safe: a worker runs a job only after atomically taking its lease,
renews it by heartbeat, and every write it makes afterwards is conditional on still
holding it. A job whose lease went stale (its worker died) is handed back to the queue.

The schema is owned by Alembic (``services/migrations``): ``Store()`` upgrades the
database to the newest revision, so a database made by an older version keeps working.

Events are the record of what happened to a job. A job's events are appended under the
job's row lock (PostgreSQL; SQLite has one writer at a time anyway), so their ids grow in
commit order per job and a reader's ``after`` cursor never steps over one still being
committed. After a commit that added events, the store calls its ``notify`` hook with the
job ids (``services.events`` publishes them on Redis, where the API's event streams wait).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import secrets
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
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
    bindparam,
    create_engine,
    event,
    func,
    inspect,
    literal,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
KEY_PREFIX = "qpa_"
# Largest value an id or cursor may take: SQLite's INTEGER and PostgreSQL's BIGINT.
MAX_SEQ = 2**63 - 1
_ID_PATTERN = re.compile(r"[a-z]+-[0-9a-f]{24}")
#: Session.info key of the jobs whose events a transaction added (for ``notify``).
_EVENT_JOBS = "qpa_event_jobs"


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
    status: Mapped[str] = mapped_column(String(16), index=True, default="queued")
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


class Store:
    """Engine and session factory for one database URL (one per process).

    ``pool_size``: connections kept open (the API sizes it to its threadpool, so no
    request waits for one); ``notify(job_ids)``: called after every commit that added
    events to those jobs.
    """

    def __init__(self, database_url: str, *, pool_size: int | None = None,
                 notify: Callable[[set[str]], None] | None = None):
        self.url = database_url
        self.engine = _make_engine(database_url, pool_size)
        # Reads outside a transaction get connections of their own, in autocommit from the
        # start and with nothing to reset on return: switching a pooled connection to
        # autocommit and back on every checkout cost more than the read (CPU per status
        # read, measured in-process: SQLite 164 -> 61 us, PostgreSQL 243-280 -> 221-262
        # us). Opened on first use, like every pooled connection.
        self.reader_engine = (self.engine if ":memory:" in database_url else
                              _make_engine(database_url, pool_size,
                                           isolation_level="AUTOCOMMIT",
                                           # no transaction to roll back on return
                                           pool_reset_on_return=None))
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.notify = notify
        event.listen(self._sessions, "after_commit", self._after_commit)
        event.listen(self._sessions, "after_rollback", _forget_events)
        migrate(self.engine)

    def _after_commit(self, session: Session) -> None:
        job_ids = session.info.pop(_EVENT_JOBS, None)
        if job_ids and self.notify is not None:
            self.notify(job_ids)

    def new_session(self) -> Session:
        """A session the caller commits and closes (no connection until first used)."""
        return self._sessions()

    @contextmanager
    def reader(self) -> Iterator[Connection]:
        """A connection for reads outside a transaction (autocommit: on PostgreSQL no
        BEGIN/ROLLBACK round trips around a single SELECT)."""
        if self.reader_engine is self.engine:
            with self.engine.connect() as connection:
                yield connection.execution_options(isolation_level="AUTOCOMMIT")
            return
        with self.reader_engine.connect() as connection:
            yield connection

    @property
    def in_process(self) -> bool:
        """Whether the database is SQLite: a library in this process, not a server."""
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session committed on success and rolled back on error."""
        with self._sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def dispose(self) -> None:
        self.engine.dispose()
        self.reader_engine.dispose()


def _forget_events(session: Session) -> None:
    session.info.pop(_EVENT_JOBS, None)


def _make_engine(url: str, pool_size: int | None, **options: Any) -> Engine:
    # A fixed pool of pool_size (no overflow) when the caller sizes it; else SQLAlchemy's
    # default (5 + 10 overflow), plenty for a worker.
    pool = {} if pool_size is None else {"pool_size": pool_size, "max_overflow": 0,
                                         "pool_use_lifo": True}
    pool.update(options)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               **(pool if ":memory:" not in url else {}))

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # WAL: readers (the API) never block the writer (a worker) and vice versa.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            # With WAL, NORMAL stays consistent across crashes (only a power loss can drop
            # the last commits) and halves a commit's cost: 1.46 -> 0.59 ms measured by
            # bench/bench_service.py's profiling, which found submissions bound by commits.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=pool_size is None, **pool)


MIGRATIONS = Path(__file__).with_name("migrations")
FIRST_REVISION = "0001"


def head_revision() -> str:
    """The newest schema revision this code knows."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(config).get_current_head()


def migrate(engine: Engine) -> None:
    """Bring the database to the newest schema revision (Alembic, ``services/migrations``).

    A database created before migrations existed (by ``create_all``) holds the first
    revision's tables without Alembic's version table: it is stamped, then upgraded.
    """
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # api and workers may start together against a fresh database; the loser of the
    # race sees the winner's tables (or version row) on its next look.
    for attempt in range(3):
        try:
            with engine.begin() as connection:
                config.attributes["connection"] = connection
                tables = set(inspect(connection).get_table_names())
                if "api_keys" in tables and "alembic_version" not in tables:
                    command.stamp(config, FIRST_REVISION)
                command.upgrade(config, "head")
            return
        except (OperationalError, ProgrammingError, IntegrityError):
            if attempt == 2:
                raise


_stores: dict[tuple[int, str], Store] = {}
_stores_lock = threading.Lock()


def get_store(database_url: str,
              notify: Callable[[set[str]], None] | None = None) -> Store:
    """The process's Store for ``database_url`` (``notify``: see ``Store``; the first
    caller's is kept). Keyed by pid: a forked Celery child must not reuse its parent's
    pooled connections."""
    key = (os.getpid(), database_url)
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = Store(database_url, notify=notify)
        elif store.notify is None:
            store.notify = notify
        return store


# --- API keys ---------------------------------------------------------------------------


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
        id=new_id("job"), owner_id=owner_id, status="queued", config=config,
        method=config["method"], backend=config["backend"], base_model=config["base_model"],
        total_steps=config["steps"], resource_class=resource_class,
    )
    session.add(job)
    session.flush()
    # Nobody can be watching a job whose id was not answered yet: no notification.
    add_event(session, job.id, {"type": "status", "status": "queued",
                                "message": "job created"}, notify=False)
    return job


def read_job_as(connection: Connection, plaintext_key: str, job_id: str) -> Row | None:
    """The status read in one query: the key's id, revocation and expiry (``key_id``,
    ``key_revoked_at``, ``key_expires_at``) and, if the key owns job ``job_id``, the
    job's public columns (``id`` is None otherwise). None: no such key."""
    if not is_id(job_id, "job"):
        job_id = ""  # matches no job; the key is still checked
    return connection.execute(_READ_JOB_AS, {"key_hash": hash_key(plaintext_key),
                                             "job_id": job_id}).first()


#: What a client sees of a job (the lease and accounting columns stay inside).
PUBLIC_JOB_COLUMNS = (
    "id", "status", "resource_class", "method", "backend", "base_model", "created_at",
    "started_at", "finished_at", "updated_at", "step", "total_steps", "loss", "lr",
    "eval_loss", "checkpoint_step", "quantum_jobs", "quantum_circuits", "quantum_shots",
    "quantum_seconds", "metrics", "error", "cancel_requested", "attempts", "world_size",
    "config",
)
_READ_JOB_AS = (
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
    if job.status == "queued":
        job.status = "cancelled"
        job.finished_at = utcnow()
        add_event(session, job.id, {"type": "status", "status": "cancelled",
                                    "message": "cancelled before it started"})
    else:
        add_event(session, job.id, {"type": "status", "status": "running",
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
        session.info.setdefault(_EVENT_JOBS, set()).add(job_id)
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
    counts = dict.fromkeys(JOB_STATUSES, 0)
    for status, count in session.execute(select(Job.status, func.count()).group_by(Job.status)):
        counts[status] = count
    return counts


# --- leases -----------------------------------------------------------------------------


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
    if job.status == "running" and not lease_is_dead(job, now, lease_seconds):
        return None
    # Compare-and-set on the lease we looked at: of two workers racing, one wins.
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == job.status,
               Job.lease_owner.is_(None) if job.lease_owner is None
               else Job.lease_owner == job.lease_owner)
        .values(status="running", lease_owner=owner, lease_host=this_host(),
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
    for job in session.scalars(select(Job).where(Job.status == "running")).all():
        if not lease_is_dead(job, now, lease_seconds):
            continue
        # A job cancelled while its worker was dying needs no new worker to say so.
        new_status = "cancelled" if job.cancel_requested else "queued"
        result = session.execute(
            update(Job).where(Job.id == job.id, Job.status == "running",
                              Job.lease_owner == job.lease_owner)
            .values(status=new_status, lease_owner=None, lease_host=None, lease_pid=None,
                    updated_at=now, finished_at=now if new_status == "cancelled" else None)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1 and new_status == "cancelled":
            add_event(session, job.id, {"type": "status", "status": "cancelled",
                                        "message": f"worker {job.lease_owner} stopped; "
                                        "cancelled as requested"}, attempt=job.attempts)
        elif result.rowcount == 1:
            resume = (f"resumes from the checkpoint at step {job.checkpoint_step}"
                      if job.checkpoint_step else "restarts (no checkpoint yet)")
            add_event(session, job.id, {
                "type": "status", "status": "queued",
                "message": f"worker {job.lease_owner} stopped; requeued, {resume}",
            }, attempt=job.attempts)
            requeued.append((job.id, job.resource_class))
    return requeued
