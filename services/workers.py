"""Which workers are up, and what they serve: presence records in Redis.

Every worker's main process writes ``qpa:workers:<node name>`` (a JSON object with its
resource classes, queues, slots and GPU count) at start-up and every ``QPA_REAP_SECONDS``,
with an expiry of a few intervals, and deletes it on a clean shutdown; a worker that died
drops out when its record expires. ``GET /v1/workers`` lists the records and sums them
per resource class beside the jobs queued and running in that class.
"""

from __future__ import annotations

import glob
import json
import os
from datetime import datetime, timezone
from typing import Any

PREFIX = "qpa:workers:"


def gpu_count() -> int:
    """NVIDIA devices visible to this process (what a container's device reservation
    mounts). Read from /dev, not CUDA: a worker's main process must not initialise CUDA
    before it forks its pool."""
    return len(glob.glob("/dev/nvidia[0-9]*"))


def presence_ttl(reap_seconds: float) -> int:
    """Seconds a presence record outlives its last refresh (three missed refreshes)."""
    return max(10, int(3 * reap_seconds + 5))


def announce(client: Any, record: dict[str, Any], ttl: int) -> None:
    record = {**record, "seen_at": datetime.now(timezone.utc).isoformat()}  # noqa: UP017
    client.set(PREFIX + record["name"], json.dumps(record), ex=ttl)


def withdraw(client: Any, name: str) -> None:
    client.delete(PREFIX + name)


def list_workers(client: Any) -> list[dict[str, Any]]:
    """The live presence records, by name."""
    keys = sorted(client.scan_iter(match=PREFIX + "*", count=500))
    if not keys:
        return []
    return [json.loads(value) for value in client.mget(keys) if value is not None]


def worker_record(name: str, host: str, resource_classes: list[str], queues: list[str],
                  concurrency: int) -> dict[str, Any]:
    return {"name": name, "host": host, "pid": os.getpid(),
            "resource_classes": resource_classes, "queues": queues,
            "concurrency": concurrency, "gpus": gpu_count(),
            "started_at": datetime.now(timezone.utc).isoformat()}  # noqa: UP017
