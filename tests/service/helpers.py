"""Helpers of the service tests: a stack of real processes, waiting, a tiny job config."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from services import store
from services.client import QPAClient
from services.status import TERMINAL_STATUSES
from services.supervisor import (
    WORKER,
    Supervisor,
    free_port,
    service_env,
    wait_until,
)

TERMINAL = tuple(TERMINAL_STATUSES)
# How long a wait on a state may last before the test calls it a hang. Not a speed
# claim: on a loaded two-core machine starting an API takes seconds to tens of seconds.
HANG_GUARD = 300.0
# What the fuzz test sent and got back, for the summary line at the end of the run.
FUZZ_STATS: Counter[str] = Counter()
FUZZ_OPERATIONS: set[str] = set()


def base_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment for service subprocesses: nothing QPA_ leaks in from outside."""
    return service_env(home, isolated=True, QPA_LOG_JSON="true", **extra)


class ServiceStack:
    """An API (uvicorn subprocess) and any number of Celery workers sharing one job store
    (a SQLite file, or ``database_url``), artifact store and Redis database. A worker
    started with its own ``QPA_HOME`` (``start_worker(..., home=...)``) is another host as
    far as the service can tell, when the artifacts are not a local folder."""

    def __init__(self, root: Path, redis_url: str, db_number: int, *,
                 database_url: str | None = None, **settings: str):
        self.root = root
        self.home = root / "home"
        self.children = Supervisor(base_env(
            self.home,
            QPA_BROKER_URL=f"{redis_url}/{db_number}",
            QPA_HEARTBEAT_SECONDS="0.5",
            QPA_LEASE_SECONDS="5",
            QPA_REAP_SECONDS="1",
            QPA_MAX_UPLOAD_BYTES="200000",
            **settings,
        ), log_dir=root / "logs")
        self.database_url = database_url or f"sqlite:///{self.home / 'qpa.db'}"
        if database_url:
            self.env["QPA_DATABASE_URL"] = database_url
        self.artifact_dir = self.home / "artifacts"
        # One port for the stack's life: a restarted API answers at the same URL.
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Create the tables before the processes start (they would race to).
        store.Store(self.database_url).dispose()

    @property
    def env(self) -> dict[str, str]:
        """The environment of the stack's processes."""
        return self.children.env

    @property
    def workers(self) -> dict[str, subprocess.Popen[bytes]]:
        """The workers started and not stopped or killed: name -> ``subprocess.Popen``."""
        return self.children.by_role(WORKER)

    def start_api(self) -> None:
        self.children.start_uvicorn("api", "api.main:app", port=self.port, graceful_shutdown_s=2)
        self.children.wait_http(f"{self.url}/healthz", HANG_GUARD, watch=["api"])

    def start_worker(self, name: str, wait: bool = True,
                     **env: str) -> subprocess.Popen[bytes]:
        """A worker process; ``env`` adds or overrides its variables (``QPA_HOME``,
        ``QPA_HOST_ID``, ``QPA_WORKER_RESOURCES``...)."""
        process = self.children.start_worker(name, heartbeat=False, env=env)
        if wait:
            self.children.wait_worker_ready(name, HANG_GUARD, watch=[name])
        return process

    def stop_worker(self, name: str) -> None:
        """Warm shutdown (SIGTERM), as a deployment stops a worker."""
        self.children.stop(name, 30)

    def kill_worker(self, name: str) -> None:
        """SIGKILL the worker and its pool process: no chance to ack, checkpoint or clean up."""
        self.children.kill(name)

    def kill_api(self) -> None:
        """SIGKILL the API: open connections drop mid-stream, nothing answers afterwards."""
        self.children.kill("api")

    def log(self, name: str) -> str:
        return self.children.log(name)

    def new_key(self, name: str = "test") -> str:
        db = store.Store(self.database_url)
        with db.session() as session:
            _, plaintext = store.create_api_key(session, name)
        db.dispose()
        return plaintext

    def client(self, key: str | None) -> QPAClient:
        return QPAClient(self.url, key, timeout=30)

    def stop(self) -> None:
        self.children.stop_all()


def wait_for_status(client: QPAClient, job_id: str, statuses: tuple[str, ...] = TERMINAL,
                    timeout: float = HANG_GUARD) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        job = client.get_job(job_id)
        return job if job["status"] in statuses else None

    return wait_until(check, timeout, f"job {job_id} to reach {statuses}", 0.25)


def job_config(model_dir: Path, train_id: str, eval_id: str | None = None, *, steps: int = 6,
               backend: str = "statevector", checkpoint_every: int = 2,
               **overrides: Any) -> dict[str, Any]:
    """A qpa job on the tiny Llama that trains in seconds: 448 LoRA values (q/v) in chunks
    of 64 need 3 qubits, so it also fits FakeManilaV2's 5."""
    config: dict[str, Any] = {
        "base_model": str(model_dir),
        "method": "qpa",
        "backend": backend,
        "train_file": train_id,
        "steps": steps,
        "lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]},
        "qpa": {"chunk_size": 64, "depth": 1, "mlp_hidden": [8]},
        "train": {"batch_size": 2, "max_length": 32, "checkpoint_every": checkpoint_every,
                  "eval_batches": 1, "sample_prompt": None},
    }
    if eval_id:
        config["eval_file"] = eval_id
    config.update(overrides)
    return config
