"""One database per process: engine, sessions, readers and the Alembic upgrade on open."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    create_engine,
    event,
    inspect,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

#: Session.info key of the jobs whose events a transaction added (for ``notify``).
EVENT_JOBS = "qpa_event_jobs"


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
        job_ids = session.info.pop(EVENT_JOBS, None)
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
    session.info.pop(EVENT_JOBS, None)


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


MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
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


