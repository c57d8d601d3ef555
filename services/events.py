"""Job-event notifications on Redis pub/sub: "job X has new events".

The SQL store is the record of every event; this is only the doorbell. A process that
commits events (a worker's runner, the reaper, the API on cancel) publishes the job ids
on ``qpa:job-events:<job id>`` right after the commit (``Store(notify=EventPublisher)``);
the API's event streams subscribe to the jobs they watch and read the new events from
SQL once per notification for all their watchers (``api.events``). A lost notification
costs latency, not events: streams re-read on their own every keep-alive interval.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

CHANNEL_PREFIX = "qpa:job-events:"
#: After a failed publish, skip publishing this long (a broker that is down must not
#: slow every training step by a connection timeout).
BACKOFF_SECONDS = 5.0
logger = logging.getLogger("qpa.events")


def channel(job_id: str) -> str:
    return CHANNEL_PREFIX + job_id


class EventPublisher:
    """``notify`` hook of a Store: publishes the job ids of committed events."""

    def __init__(self, broker_url: str):
        # Connections are opened on first use and pooled; short timeouts (see BACKOFF).
        self.redis = redis.Redis.from_url(broker_url, socket_timeout=2,
                                          socket_connect_timeout=2)
        self._paused_until = 0.0
        self._lock = threading.Lock()

    def __call__(self, job_ids: set[str]) -> None:
        if time.monotonic() < self._paused_until:
            return
        try:
            if len(job_ids) == 1:
                self.redis.publish(channel(next(iter(job_ids))), b"1")
            else:
                with self.redis.pipeline(transaction=False) as pipe:
                    for job_id in job_ids:
                        pipe.publish(channel(job_id), b"1")
                    pipe.execute()
        except redis.RedisError as error:
            with self._lock:
                self._paused_until = time.monotonic() + BACKOFF_SECONDS
            logger.warning("could not publish job events (%s); event streams fall back to "
                           "reading the store", error)

    def close(self) -> None:
        self.redis.close()
