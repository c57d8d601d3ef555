"""Several hosts, simulated honestly: workers that share nothing but Redis, a PostgreSQL
server and an S3-compatible object store (all real processes the suite starts). Each
worker has its own ``QPA_HOME`` and scratch folder and its own host id, so the reaper may
not judge its lease by pid: a killed host's job comes back only when its heartbeat is
stale, as it would across machines.

* a job started on host A, SIGKILLed there (and A's disk wiped), resumes on host B from
  the checkpoint in the object store; two SSE watchers follow it through the hand-over on
  the Redis fan-out, a reconnect with ``Last-Event-ID`` replays the rest from SQL, and
  the adapter downloads through the API;
* a job's resource class picks its queue: a gpu job waits on its own queue while a cpu
  worker idles, ``GET /v1/workers`` shows the capacity, and a worker that serves gpu
  runs it.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from qpa.export import CHECKPOINT
from services.client import QPAClient
from services.queue import resource_class_of
from services.settings import Settings

from .helpers import HANG_GUARD, ServiceStack, job_config, wait_for_status, wait_until
from .servers import PostgresServer, S3Server

PREFIX = "deploy"
API_THREADS = 4


@pytest.fixture(scope="module")
def hosts(redis_server: str, postgres_server: PostgresServer, s3_server: S3Server,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceStack]:
    """The API on PostgreSQL and S3; the tests add workers, each on its own 'host'."""
    bucket = s3_server.bucket("qpa-scaleout")
    # A small threadpool (and database pool, the same size) so that a few concurrent
    # requests already exceed it (test_more_streams_than_threads).
    service = ServiceStack(tmp_path_factory.mktemp("scaleout"), redis_server, 4,
                           database_url=postgres_server.database("scaleout"),
                           QPA_ARTIFACT_URL=f"{bucket}/{PREFIX}", QPA_API_THREADS=str(API_THREADS),
                           **s3_server.env)
    try:
        service.start_api()
        yield service
    finally:
        service.stop()


def _host(stack: ServiceStack, name: str, **env: str) -> dict[str, str]:
    """The environment that makes a worker another host: its own home and host id."""
    return {"QPA_HOME": str(stack.root / name), "QPA_HOST_ID": name, **env}


def _cpu_host(stack: ServiceStack) -> str:
    """A cpu worker on host B: the one the previous test left running, else a new one
    (starting a worker takes seconds to tens of them on a loaded machine)."""
    if "host-b" not in stack.workers:
        stack.start_worker("host-b", **_host(stack, "host-b"))
    return "host-b"


def _messages(client: QPAClient, job_id: str) -> list[str]:
    return [event["data"].get("message") or "" for event in
            client.events(job_id, limit=1000)["data"]]


class Watcher(threading.Thread):
    """One SSE watcher of a job, in its own connection, until the job ends."""

    def __init__(self, url: str, key: str, job_id: str):
        super().__init__(daemon=True)
        self.url, self.key, self.job_id = url, key, job_id
        self.ids: list[int] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with QPAClient(self.url, self.key, timeout=30) as client:
                self.ids = [event["id"] for event in client.stream_events(self.job_id)]
        except BaseException as error:  # reported by the test
            self.error = error


def _sse(url: str, key: str, job_id: str, last_event_id: int) -> list[tuple[str, str]]:
    """(event, id) of a whole SSE stream opened with ``Last-Event-ID``."""
    frames, current = [], {}
    headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream",
               "Last-Event-ID": str(last_event_id)}
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", headers=headers,
                      timeout=httpx.Timeout(30, read=None)) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line:
                if current:
                    frames.append((current.get("event", ""), current.get("id", "")))
                current = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                current[name] = value
    return frames


def test_job_killed_on_one_host_resumes_on_another_from_the_object_store(
        hosts: ServiceStack, s3_server: S3Server, tiny_llama_dir: Path,
        data_files: tuple[Path, Path], tmp_path: Path) -> None:
    key = hosts.new_key("two-hosts")
    hosts.start_worker("host-a", **_host(hosts, "host-a"))
    with hosts.client(key) as client:
        train = client.upload_file(data_files[0])["id"]
        # Long enough that host A is still training when the test sees its first stored
        # checkpoint: the 58 steps after it take seconds (with a push to the store every
        # second step), the test polls every 0.25 s.
        job = client.create_job(job_config(tiny_llama_dir, train, steps=60,
                                           checkpoint_every=2))
        watchers = [Watcher(hosts.url, key, job["id"]) for _ in range(2)]
        for watcher in watchers:
            watcher.start()

        def stored_checkpoint() -> dict[str, Any] | None:
            seen = client.get_job(job["id"])
            return seen if seen["progress"]["checkpoint_step"] else None

        at_kill = wait_until(stored_checkpoint, HANG_GUARD, "host A's first stored checkpoint")
        hosts.kill_worker("host-a")
        assert client.get_job(job["id"])["status"] == "running"  # nobody has taken it yet
        # Nothing host A kept on its own disk survives: B can only use the object store.
        shutil.rmtree(hosts.root / "host-a")
        assert "host-b" not in hosts.workers
        _cpu_host(hosts)
        done = wait_for_status(client, job["id"])
        for watcher in watchers:
            watcher.join(HANG_GUARD)
        listed = client.events(job["id"], limit=1000)["data"]
        adapter = client.download_adapter(job["id"], tmp_path / "download")

    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2 and done["progress"]["step"] == 60
    messages = [event["data"].get("message") or "" for event in listed]
    assert any(message.startswith("running on host-a/") for message in messages)
    assert any(message.startswith("running on host-b/") for message in messages)
    resumed = [int(match.group(1)) for message in messages
               if (match := re.match(r"resumed from checkpoint at step (\d+)", message))]
    assert resumed and resumed[-1] >= at_kill["progress"]["checkpoint_step"] > 0

    # The job's outputs live in the bucket, and only there.
    stored = {item["Key"] for page in s3_server.client().get_paginator("list_objects_v2")
              .paginate(Bucket="qpa-scaleout", Prefix=f"{PREFIX}/jobs/{job['id']}/")
              for item in page.get("Contents", ())}
    base = f"{PREFIX}/jobs/{job['id']}"
    assert {f"{base}/state/{CHECKPOINT}", f"{base}/adapter/adapter_model.safetensors",
            f"{base}/adapter/adapter_config.json", f"{base}/metrics.json",
            f"{base}/events.jsonl", f"{base}/adapter.tar.gz"} <= stored
    assert not (hosts.home / "artifacts").exists()
    assert not (hosts.root / "host-b" / "work" / "jobs" / job["id"]).exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 2
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0

    # Both watchers saw every event of the record once, in order, across the hand-over.
    record = [event["id"] for event in listed]
    for watcher in watchers:
        assert watcher.error is None, watcher.error
        assert watcher.ids == record
    # A watcher that reconnects replays what it missed from SQL, then the end.
    middle = record[len(record) // 2]
    replay = _sse(hosts.url, key, job["id"], middle)
    assert [int(event_id) for _, event_id in replay[:-1]] == [i for i in record if i > middle]
    assert replay[-1][0] == "end"


def test_resource_class_picks_the_queue_and_workers_show_capacity(
        hosts: ServiceStack, tiny_llama_dir: Path, data_files: tuple[Path, Path]) -> None:
    settings = Settings(_env_file=None)
    assert resource_class_of({"train": {"device": "cuda"}}) == "gpu"
    assert resource_class_of({"train": {"device": "cuda"}, "resource_class": "cpu"}) == "cpu"
    assert resource_class_of({"train": {"device": "auto"}}) == "cpu"
    key = hosts.new_key("gpu")
    broker = redis.Redis.from_url(hosts.env["QPA_BROKER_URL"])
    cpu_host = _cpu_host(hosts)
    headers = {"Authorization": f"Bearer {key}"}
    with hosts.client(key) as client, httpx.Client(base_url=hosts.url, headers=headers,
                                                   timeout=30) as http:
        train = client.upload_file(data_files[0])["id"]
        bad = http.post("/v1/jobs", json=job_config(tiny_llama_dir, train,
                                                    resource_class="tpu"))
        assert bad.status_code == 422 and bad.json()["field"] == "resource_class", bad.text
        job = client.create_job(job_config(tiny_llama_dir, train, steps=2,
                                           resource_class="gpu"))
        assert job["resource_class"] == "gpu"
        # The idle cpu worker leaves it alone: its message waits on the gpu queue.
        wait_until(lambda: broker.llen(settings.gpu_queue) == 1, HANG_GUARD,
                 "the job's message on the gpu queue")
        assert client.get_job(job["id"])["status"] == "queued"
        # The status read on PostgreSQL (async connections) checks key and owner as well.
        assert http.get("/v1/jobs/job-nope").json()["detail"] == "no job 'job-nope'"
        other = hosts.new_key("other")
        foreign = http.get(f"/v1/jobs/{job['id']}", headers={"Authorization": f"Bearer {other}"})
        assert foreign.status_code == 404
        unknown = http.get(f"/v1/jobs/{job['id']}", headers={"Authorization": "Bearer qpa_x"})
        assert unknown.status_code == 401 and unknown.json()["detail"] == "invalid API key"
        capacity = {row["resource_class"]: row for row in
                    http.get("/v1/workers").json()["capacity"]}
        assert capacity["gpu"] == {"resource_class": "gpu", "workers": 0, "slots": 0,
                                   "queued": 1, "running": 0}
        assert capacity["cpu"]["workers"] == 1 and capacity["cpu"]["slots"] == 1

        hosts.start_worker("gpu-host",
                                        **_host(hosts, "gpu-host", QPA_WORKER_RESOURCES="gpu"))
        done = wait_for_status(client, job["id"])
        assert done["status"] == "succeeded", done["error"]
        assert any(message.startswith("running on gpu-host/")
                   for message in _messages(client, job["id"]))
        listed = {row["host"]: row for row in http.get("/v1/workers").json()["data"]}
        assert listed["gpu-host"]["resource_classes"] == ["gpu"]
        assert listed["gpu-host"]["queues"] == [settings.gpu_queue]
        assert listed[cpu_host]["queues"] == [settings.queue]

        # A worker that stops cleanly withdraws at once (a dead one when its record expires).
        hosts.stop_worker("gpu-host")
        wait_until(lambda: "gpu-host" not in {row["host"] for row in
                                            http.get("/v1/workers").json()["data"]},
                 HANG_GUARD, "the stopped gpu worker to leave /v1/workers")


def test_more_streams_than_threads_all_finish(hosts: ServiceStack, tiny_llama_dir: Path,
                                              data_files: tuple[Path, Path]) -> None:
    """Ten times as many event streams at once as the API has threads and pooled
    connections: each replays the job's record and ends (a session that kept its
    connection across trips to the threadpool deadlocked here)."""
    key = hosts.new_key("streams")
    with hosts.client(key) as client:
        train = client.upload_file(data_files[0])["id"]
        # gpu class with no gpu worker up: it stays queued, so the cancel ends it at once.
        job = client.create_job(job_config(tiny_llama_dir, train, resource_class="gpu"))
        assert client.cancel_job(job["id"])["status"] == "cancelled"
        record = [event["id"] for event in client.events(job["id"])["data"]]
    streams = 10 * API_THREADS

    async def read_all() -> list[list[str]]:
        # All opened at once, as a burst of dashboard tabs would.
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=hosts.url, headers=headers,
                                     timeout=httpx.Timeout(30, read=None),
                                     limits=httpx.Limits(max_connections=streams)) as http:
            async def one() -> list[str]:
                response = await http.get(f"/v1/jobs/{job['id']}/events",
                                          params={"stream": "true"})
                assert response.status_code == 200, response.text
                return [line for line in response.text.splitlines()
                        if line.startswith(("id: ", "event: end"))]

            return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(streams))),
                                          HANG_GUARD)

    expected = [f"id: {event_id}" for event_id in record] + ["event: end"]
    assert asyncio.run(read_all()) == [expected] * streams
