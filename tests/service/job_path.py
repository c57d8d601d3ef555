"""The job path: which project files run code from ``POST /v1/jobs`` to the adapter file.

``python -m tests.service.job_path [method]`` prints them for one job (the number issue 10
asks about); ``test_job_path.py`` checks what a classical job must never run. The API
answers in this process (Starlette's TestClient) so that a profiler sees its calls; Redis,
the SQLite store and the trainer are the real ones, and the worker's side is ``run_job``,
which the Celery task calls. A file counts when one of its functions is called: module
and class bodies (import time) do not. ``chains`` are the files on the call stack where the
job changes hands (queued; adapter file written): the chain it passes through.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
#: Where the profiler looks: the project's own packages (not tests/, not the venv).
PROJECT = ("api", "qpa", "services", "worker")


#: Where the job changes hands: the API puts it on the queue; the worker writes the adapter
#: file (stock PEFT saves it with safetensors).
HANDOFFS = {"enqueued": ("enqueue_job", "services/queue.py"),
            "adapter written": ("save_file", "safetensors/torch.py")}


def _project_file(filename: str) -> str | None:
    path = Path(filename)
    if path.is_relative_to(ROOT) and path.relative_to(ROOT).parts[0] in PROJECT:
        return path.relative_to(ROOT).as_posix()
    return None


def _stack_files(frame: FrameType | None) -> list[str]:
    """The project files on the call stack, outermost first."""
    files: list[str] = []
    while frame is not None:
        file = _project_file(frame.f_code.co_filename)
        if file and file not in files:
            files.insert(0, file)
        frame = frame.f_back
    return files


class _Profiler:
    """Adds to ``into`` every project file whose functions run meanwhile, in any thread."""

    def __init__(self) -> None:
        self.into: set[str] | None = None
        #: The project files on the stack at the two hand-offs (see ``HANDOFFS``).
        self.chains: dict[str, list[str]] = {}

    def __call__(self, frame: FrameType, event: str, _arg: Any) -> None:
        code = frame.f_code
        if self.into is None or event != "call" or not code.co_flags & inspect.CO_NEWLOCALS:
            return
        for name, (function, where) in HANDOFFS.items():
            if code.co_name == function and code.co_filename.endswith(where):
                self.chains.setdefault(name, _stack_files(frame))
        if file := _project_file(code.co_filename):
            self.into.add(file)

    @contextmanager
    def installed(self) -> Iterator[None]:
        # Before any thread starts: the TestClient's event loop and the API's threadpool
        # run the request in threads, which take the profile set when they start.
        threading.setprofile(self)
        sys.setprofile(self)
        try:
            yield
        finally:
            sys.setprofile(None)
            threading.setprofile(None)

    @contextmanager
    def recording(self, into: set[str]) -> Iterator[None]:
        self.into = into
        try:
            yield
        finally:
            self.into = None


def trace_job(method: str, home: Path, broker_url: str) -> dict[str, Any]:
    """Submit one two-step ``method`` job on the tiny Llama and run it; the files each side
    ran (``api``: the POST request; ``worker``: ``run_job``) and the job's final status."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from qpa.tiny_models import build_tiny_llama
    from services import store
    from services.runner import run_job, worker_store
    from services.settings import Settings
    from tests.service.helpers import job_config

    settings = Settings(home=home, broker_url=broker_url, log_json=False)
    model_dir = build_tiny_llama(home / "model")
    data = home / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of some words"}) + "\n"
                            for i in range(40)))
    db = store.Store(settings.resolved_database_url)
    with db.session() as session:
        _, key = store.create_api_key(session, "job-path")
    db.dispose()
    files: dict[str, set[str]] = {"api": set(), "worker": set()}
    profiler = _Profiler()
    with profiler.installed():
        with TestClient(create_app(settings)) as client:
            client.headers["Authorization"] = f"Bearer {key}"
            file_id = client.post("/v1/files", files={"file": ("t.jsonl", data.read_bytes())})
            body = job_config(model_dir, file_id.json()["id"], steps=2, method=method)
            del body["backend"]  # the server's default, as most jobs have it
            if method != "qpa":
                del body["qpa"]
            if method == "compound":
                body["compound"] = {"blocks": 4}  # the tiny model's 32 inputs: blocks of 8
            with profiler.recording(files["api"]):
                response = client.post("/v1/jobs", json=body)
        assert response.status_code == 201, response.text
        worker_store(settings)  # a worker's start-up (it migrates the store), not the job's
        with profiler.recording(files["worker"]):
            status = run_job(response.json()["id"], settings)
    every = files["api"] | files["worker"]
    # The chain: the files the job passes through (the Celery task, worker/tasks.py, calls
    # run_job in a worker; here the test calls it), not the helpers they call on the way.
    chain = [file for stack in profiler.chains.values() for file in stack]
    return {"method": method, "status": status, "files": len(every),
            **{side: sorted(ran) for side, ran in files.items()},
            "chain_files": len(set(chain)), "chains": profiler.chains}


if __name__ == "__main__":
    from services.supervisor import Supervisor

    with tempfile.TemporaryDirectory() as folder, \
            Supervisor(log_dir=Path(folder) / "logs") as children:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        redis_url = children.start_redis(Path(folder) / "redis")
        print(json.dumps(trace_job(sys.argv[1] if len(sys.argv) > 1 else "lora",
                                   Path(folder) / "home", f"{redis_url}/0"), indent=1))
