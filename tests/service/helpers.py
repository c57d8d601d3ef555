"""Helpers of the service tests: a stack of real processes, waiting, a tiny job config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from services import store
from services.client import QPAClient
from services.embedded import free_port, terminate_group

REPO_ROOT = Path(__file__).resolve().parents[2]
TERMINAL = ("succeeded", "failed", "cancelled")
# How long a wait on a state may last before the test calls it a hang. Not a speed
# claim: on a loaded two-core machine starting an API takes seconds to tens of seconds.
HANG_GUARD = 300.0
# What the fuzz test sent and got back, for the summary line at the end of the run.
FUZZ_STATS: Counter[str] = Counter()
FUZZ_OPERATIONS: set[str] = set()


def base_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment for service subprocesses: nothing QPA_ leaks in from outside."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("QPA_", "QISKIT_IBM"))}
    env.update({
        "QPA_HOME": str(home),
        "QPA_LOG_JSON": "true",
        "PYTHONPATH": str(REPO_ROOT),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # Two shared cores: one torch thread per process keeps the workers from fighting.
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    env.update(extra)
    return env


class ServiceStack:
    """An API (uvicorn subprocess) and any number of Celery workers sharing one job store
    (a SQLite file, or ``database_url``), artifact store and Redis database. A worker
    started with its own ``QPA_HOME`` (``start_worker(..., home=...)``) is another host as
    far as the service can tell, when the artifacts are not a local folder."""

    def __init__(self, root: Path, redis_url: str, db_number: int, *,
                 database_url: str | None = None, **settings: str):
        self.root = root
        self.home = root / "home"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = base_env(
            self.home,
            QPA_BROKER_URL=f"{redis_url}/{db_number}",
            QPA_HEARTBEAT_SECONDS="0.5",
            QPA_LEASE_SECONDS="5",
            QPA_REAP_SECONDS="1",
            QPA_MAX_UPLOAD_BYTES="200000",
            **settings,
        )
        self.database_url = database_url or f"sqlite:///{self.home / 'qpa.db'}"
        if database_url:
            self.env["QPA_DATABASE_URL"] = database_url
        self.artifact_dir = self.home / "artifacts"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        # Create the tables before the processes start (they would race to).
        store.Store(self.database_url).dispose()

    def _spawn(self, name: str, command: list[str],
               env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        return subprocess.Popen(command, env={**self.env, **(env or {})}, cwd=REPO_ROOT,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start_api(self) -> None:
        self.api = self._spawn("api", [
            sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",
            "--port", str(self.port), "--log-level", "warning",
            "--timeout-graceful-shutdown", "2",
        ])
        deadline = time.monotonic() + HANG_GUARD
        while time.monotonic() < deadline:
            assert self.api.poll() is None, self.log("api")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"API did not come up:\n{self.log('api')}")

    def start_worker(self, name: str, wait: bool = True,
                     **env: str) -> subprocess.Popen[bytes]:
        """A worker process; ``env`` adds or overrides its variables (``QPA_HOME``,
        ``QPA_HOST_ID``, ``QPA_WORKER_RESOURCES``...)."""
        process = self._spawn(name, [
            sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--concurrency", "1",
            "--hostname", f"{name}-{os.getpid()}@%h", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ], env)
        self.workers[name] = process
        if wait:
            wait_for(lambda: " ready." in self.log(name) or process.poll() is not None,
                     HANG_GUARD,
                     f"worker {name} ready")
            assert process.poll() is None, self.log(name)
        return process

    def stop_worker(self, name: str) -> None:
        """Warm shutdown (SIGTERM), as a deployment stops a worker."""
        terminate_group(self.workers.pop(name), 30)

    def kill_worker(self, name: str) -> None:
        """SIGKILL the worker and its pool process: no chance to ack, checkpoint or clean up."""
        process = self.workers.pop(name)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)

    def kill_api(self) -> None:
        """SIGKILL the API: open connections drop mid-stream, nothing answers afterwards."""
        assert self.api is not None
        os.killpg(self.api.pid, signal.SIGKILL)
        self.api.wait()
        self.api = None

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def new_key(self, name: str = "test") -> str:
        db = store.Store(self.database_url)
        with db.session() as session:
            _, plaintext = store.create_api_key(session, name)
        db.dispose()
        return plaintext

    def client(self, key: str | None) -> QPAClient:
        return QPAClient(self.url, key, timeout=30)

    def stop(self) -> None:
        for name, process in list(self.workers.items()):
            terminate_group(process, 30)
            self.workers.pop(name)
        if self.api is not None:
            terminate_group(self.api, 10)


def wait_for(condition: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_for_status(client: QPAClient, job_id: str, statuses: tuple[str, ...] = TERMINAL,
                    timeout: float = HANG_GUARD) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        job = client.get_job(job_id)
        return job if job["status"] in statuses else None

    return wait_for(check, timeout, f"job {job_id} to reach {statuses}", 0.25)


def job_config(model_dir: Path, train_id: str, eval_id: str | None = None, *, steps: int = 6,
               backend: str = "statevector", checkpoint_every: int = 2,
               **overrides: Any) -> dict[str, Any]:
    """A qpa job on the tiny Llama that trains in seconds: 448 LoRA values in chunks of
    64 need 3 qubits, so it also fits FakeManilaV2's 5."""
    config: dict[str, Any] = {
        "base_model": str(model_dir),
        "method": "qpa",
        "backend": backend,
        "train_file": train_id,
        "steps": steps,
        "lora": {"r": 2},
        "qpa": {"chunk_size": 64, "depth": 1, "mlp_hidden": [8]},
        "train": {"batch_size": 2, "max_length": 32, "checkpoint_every": checkpoint_every,
                  "eval_batches": 1, "sample_prompt": None},
    }
    if eval_id:
        config["eval_file"] = eval_id
    config.update(overrides)
    return config
