"""The status read on PostgreSQL from the API's event loop: psycopg's async connections.

``GET /v1/jobs/{id}`` is the call clients poll. Through SQLAlchemy it needs a trip to the
threadpool and SQLAlchemy's execution layer around a one-row SELECT; measured in-process
on the test PostgreSQL server that was 306 us of CPU per read, against 120 us for the
same statement on an async psycopg connection in autocommit, prepared once per
connection. The statement is ``services.store``'s own (``READ_JOB_AS``), compiled once
for psycopg, so there is still one definition of the query; everything else keeps using
the SQLAlchemy store. SQLite needs none of this (read in the loop, ``Store.in_process``).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from sqlalchemy.engine import make_url

from services import store


def supported(database_url: str) -> bool:
    """Whether ``AsyncReads`` can serve this database (PostgreSQL through psycopg 3)."""
    url = make_url(database_url)
    return url.get_backend_name() == "postgresql" and url.get_driver_name() == "psycopg"


class AsyncReads:
    """A small pool of async autocommit connections (opened on demand, at most ``size``;
    a broken one is dropped and replaced on the next read)."""

    def __init__(self, database_url: str, size: int):
        from psycopg.conninfo import make_conninfo
        from sqlalchemy.dialects import postgresql

        url = make_url(database_url)
        self.conninfo = make_conninfo(
            host=url.host or "", port=url.port or "", user=url.username or "",
            password=url.password or "", dbname=url.database or "",
            **{key: str(value) for key, value in url.query.items()})
        # At most ``size`` reads at once, each on an idle connection or a new one.
        self.slots = asyncio.Semaphore(size)
        self.idle: list[Any] = []
        self.statement = str(store.READ_JOB_AS.compile(dialect=postgresql.psycopg.dialect()))

    async def read_job_as(self, plaintext_key: str, job_id: str) -> Any:
        """``store.read_job_as`` from the event loop (same row fields, same None)."""
        if not store.is_id(job_id, "job"):
            job_id = ""  # matches no job; the key is still checked
        async with self.slots:
            connection = self.idle.pop() if self.idle else await self._connect()
            try:
                cursor = await connection.execute(
                    self.statement, {"key_hash": store.hash_key(plaintext_key),
                                     "job_id": job_id}, prepare=True)
                row = await cursor.fetchone()
            except BaseException:
                # Its state is unknown after an error: close it; the next read opens one.
                with contextlib.suppress(Exception):
                    await connection.close()
                raise
            self.idle.append(connection)
        return row

    async def _connect(self) -> Any:
        import psycopg
        from psycopg.rows import namedtuple_row

        return await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True,
                                                     row_factory=namedtuple_row)

    async def close(self) -> None:
        while self.idle:
            with contextlib.suppress(Exception):
                await self.idle.pop().close()
