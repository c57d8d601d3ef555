"""Server-sent event streams without a SQL poll per watcher.

One ``EventHub`` per API process. For each job that at least one client watches, it holds
a ``JobFeed``: one Redis subscription to the job's notification channel
(``services.events``) and one task that, per notification, reads the job's new events
from SQL once and hands them, already formatted as SSE frames, to every watcher of that
job in this process. So the SQL reads and the CPU per event do not grow with the number
of watchers; only the sending does.

The SQL store stays the record: a watcher first replays from its cursor (``after`` or
``Last-Event-ID``) out of SQL, then follows the feed, skipping what it already sent.
Events of a job are committed in id order (``services.store.add_event``), so a read
``after`` the last id seen never misses one. A notification lost while Redis was away
costs latency only: every feed also re-reads when it heard nothing for
``quiet_seconds``, and polls every ``poll_seconds`` while the subscription is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from api.schemas import EventObject
from services import store
from services.events import CHANNEL_PREFIX, channel

logger = logging.getLogger("qpa.api.events")
#: Events read per SQL query.
READ_LIMIT = 500


@dataclass
class Batch:
    """What one read found: SSE frames with their event ids, and the job's status when
    the read also looked at it (None: not looked at)."""

    frames: list[tuple[int, str]]
    status: str | None = None


def sse_frame(event: EventObject) -> str:
    return f"id: {event.id}\nevent: {event.type}\ndata: {event.model_dump_json()}\n\n"


@dataclass(eq=False)
class Watch:
    """One watcher's inbox."""

    queue: asyncio.Queue[Batch] = field(default_factory=asyncio.Queue)


class JobFeed:
    """The subscription and the reader of one job's events in this process."""

    def __init__(self, hub: EventHub, job_id: str):
        self.hub = hub
        self.job_id = job_id
        self.watches: set[Watch] = set()
        self.wake = asyncio.Event()
        self.subscribed = asyncio.Event()
        self.cursor = 0
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.hub._subscribe(self)
        # After the subscription: every event committed later is notified, every one
        # committed before is at or below this cursor (the watchers replay those).
        self.cursor = await anyio.to_thread.run_sync(self.hub.last_event_id, self.job_id)
        self.task = asyncio.create_task(self._run(), name=f"feed-{self.job_id}")

    async def _run(self) -> None:
        while True:
            if self.hub.connected and not self.subscribed.is_set():
                await self.hub._subscribe(self)
                self.wake.set()  # whatever was announced before the subscription held
            quiet = (self.hub.quiet_seconds if self.subscribed.is_set()
                     else self.hub.poll_seconds)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), quiet)
            notified = self.wake.is_set()
            self.wake.clear()
            try:
                # A notification needs the new events only (a job's end is an event); a
                # quiet spell also looks at the status, in case a notification was lost.
                batch = await anyio.to_thread.run_sync(
                    self.hub.read, self.job_id, self.cursor, not notified)
            except Exception:
                logger.exception("reading events failed", extra={"job_id": self.job_id})
                continue
            if batch.frames:
                self.cursor = batch.frames[-1][0]
            if batch.frames or batch.status is not None:
                for watch in self.watches:
                    watch.queue.put_nowait(batch)
            if len(batch.frames) == READ_LIMIT:
                self.wake.set()  # more to read


class EventHub:
    """The process's Redis subscriber and its job feeds (started on first use)."""

    def __init__(self, broker_url: str, db: store.Store, *, quiet_seconds: float = 15.0,
                 poll_seconds: float = 0.5):
        self.broker_url = broker_url
        self.db = db
        self.quiet_seconds = quiet_seconds
        self.poll_seconds = poll_seconds
        self.connected = False
        self.feeds: dict[str, JobFeed] = {}
        self._redis: aioredis.Redis | None = None
        self._pubsub: Any = None
        self._listener: asyncio.Task[None] | None = None
        self._lock: asyncio.Lock | None = None

    # -- SQL reads (in the threadpool) --------------------------------------------------

    # Autocommit reads (Store.reader): on PostgreSQL one round trip per SELECT, without
    # the BEGIN and ROLLBACK around it (measured: 3 statements per event before, 1 after).

    def last_event_id(self, job_id: str) -> int:
        with self.db.reader() as connection:
            return store.last_event_id(connection, job_id)

    def read(self, job_id: str, after: int, with_status: bool = True) -> Batch:
        """Events after ``after`` (up to READ_LIMIT), and the job's status when asked.
        The status is read first: a final status comes with its final event. Without
        it, a final ``status`` event among those read stands for it."""
        with self.db.reader() as connection:
            status = store.job_status(connection, job_id) if with_status else None
            rows = store.events_after(connection, job_id, after, READ_LIMIT)
        for row in rows:
            if row.type == "status" and row.data.get("status") in store.TERMINAL_STATUSES:
                status = row.data["status"]
        return Batch([(row.seq, sse_frame(EventObject.of(row))) for row in rows], status)

    # -- watching -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def watch(self, job_id: str) -> AsyncIterator[Watch]:
        """Register a watcher of ``job_id`` (its feed started if it is the first)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        watch = Watch()
        async with self._lock:
            await self._ensure_listener()
            feed = self.feeds.get(job_id)
            if feed is None:
                # Registered first: the listener delivers its subscription's confirmation.
                feed = self.feeds[job_id] = JobFeed(self, job_id)
                try:
                    await feed.start()
                except BaseException:
                    del self.feeds[job_id]
                    raise
            feed.watches.add(watch)
        try:
            yield watch
        finally:
            feed.watches.discard(watch)
            if not feed.watches and self.feeds.get(job_id) is feed:
                del self.feeds[job_id]
                if feed.task is not None:
                    feed.task.cancel()
                await self._unsubscribe(feed)

    async def stream(self, job_id: str, cursor: int, keepalive: float,
                     end_frame: Callable[[str], str]) -> AsyncIterator[str]:
        """SSE text for one watcher: the replay from ``cursor``, then live events, then
        ``end_frame(status)`` once the job has ended and every event was sent."""
        async with self.watch(job_id) as watch:
            status = None
            while True:  # replay
                batch = await anyio.to_thread.run_sync(self.read, job_id, cursor, True)
                status = batch.status
                for event_id, frame in batch.frames:
                    cursor = event_id
                    yield frame
                if len(batch.frames) < READ_LIMIT:
                    break
            while status not in store.TERMINAL_STATUSES:
                try:
                    batch = await asyncio.wait_for(watch.queue.get(), keepalive)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                for event_id, frame in batch.frames:
                    if event_id > cursor:
                        cursor = event_id
                        yield frame
                status = batch.status or status
            yield end_frame(status)

    # -- Redis --------------------------------------------------------------------------

    async def _ensure_listener(self) -> None:
        if self._listener is not None:
            return
        self._redis = aioredis.Redis.from_url(self.broker_url, socket_connect_timeout=2,
                                              health_check_interval=30)
        self._pubsub = self._redis.pubsub()
        self._listener = asyncio.create_task(self._listen(), name="event-hub")

    async def _subscribe(self, feed: JobFeed) -> None:
        if not self.connected:
            return  # the feed polls; _listen subscribes it once Redis answers
        try:
            await self._pubsub.subscribe(channel(feed.job_id))
            # Wait for Redis to confirm, so no publish slips between subscribing and the
            # cursor read; a confirmation that never comes leaves the feed polling.
            await asyncio.wait_for(feed.subscribed.wait(), 5)
        except (RedisError, OSError, RuntimeError, asyncio.TimeoutError) as error:
            logger.warning("could not subscribe to job events (%s); polling", error)

    async def _unsubscribe(self, feed: JobFeed) -> None:
        if self.connected:
            with contextlib.suppress(RedisError, OSError, RuntimeError):
                await self._pubsub.unsubscribe(channel(feed.job_id))

    async def _listen(self) -> None:
        delay = 0.5
        while True:
            try:
                # Always subscribed to something, so the connection has a reason to live.
                await self._pubsub.subscribe(CHANNEL_PREFIX + "_hub")
                for job_id in list(self.feeds):
                    await self._pubsub.subscribe(channel(job_id))
                self.connected = True
                delay = 0.5
                for feed in self.feeds.values():
                    feed.wake.set()  # read what a lost notification may have announced
                while True:
                    message = await self._pubsub.get_message(timeout=30)
                    if message is None:
                        continue
                    name = message["channel"].decode()
                    feed = self.feeds.get(name.removeprefix(CHANNEL_PREFIX))
                    if feed is None:
                        continue
                    if message["type"] == "message":
                        feed.wake.set()
                    elif message["type"] == "subscribe":
                        feed.subscribed.set()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, RuntimeError) as error:
                if self.connected:
                    logger.warning("event subscription lost (%s); streams poll until it "
                                   "is back", error)
                self.connected = False
                for feed in self.feeds.values():
                    feed.subscribed.clear()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def close(self) -> None:
        for feed in self.feeds.values():
            if feed.task is not None:
                feed.task.cancel()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
