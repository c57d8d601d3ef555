"""One settings object for the service: API, worker, embedded server and CLI all read it.

Every field comes from an environment variable prefixed ``QPA_`` (``QPA_DATABASE_URL``,
``QPA_BROKER_URL``, ``QPA_ARTIFACT_URL``...) or from a ``.env`` file in the working
directory. With nothing set, all server-side state lives under ``QPA_HOME`` (default
``~/.qpa``): a SQLite database, a local artifact folder and, for ``qpa serve``, the
embedded Redis server's data. Workers on several hosts share nothing but the three URLs.
Simulator versus QPU is configuration: ``QPA_DEFAULT_BACKEND`` and ``QPA_ALLOWED_BACKENDS``.
"""

from __future__ import annotations

import fnmatch
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[list[str], NoDecode]
#: What a job needs from a worker; each class has its own queue.
RESOURCE_CLASSES = ("cpu", "gpu")


class Settings(BaseSettings):
    """Server-side configuration (environment variables ``QPA_<FIELD>``, or ``.env``)."""

    model_config = SettingsConfigDict(
        env_prefix="QPA_", env_file=".env", env_file_encoding="utf-8", extra="ignore",
        # docker-compose passes unset variables as "": treat them as not set.
        env_ignore_empty=True,
    )

    home: Path = Field(
        default=Path("~/.qpa"),
        description="Root of server-side state when nothing else is configured (QPA_HOME).",
    )
    broker_url: str | None = Field(
        default=None,
        description="Celery broker (Redis) URL. Unset: `qpa serve` starts its own Redis; "
        "a standalone api/worker uses redis://127.0.0.1:6379/0.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the job store (sqlite:///... or postgresql+psycopg://...). "
        "Unset: sqlite under QPA_HOME.",
    )
    artifact_url: str | None = Field(
        default=None,
        description="Where uploads and job outputs (checkpoints, adapters, logs) live: "
        "s3://bucket/prefix (S3-compatible object storage; endpoint and credentials from the "
        "usual AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY variables) or a "
        "local folder. Unset: QPA_ARTIFACT_DIR, else QPA_HOME/artifacts.",
    )
    artifact_dir: Path | None = Field(
        default=None,
        description="A local artifact folder (the older setting; QPA_ARTIFACT_URL wins). "
        "Workers on other hosts cannot see it: use s3:// there.",
    )
    queue: str = Field(default="qpa", description="Celery queue of cpu-class jobs.")
    gpu_queue: str = Field(default="qpa-gpu", description="Celery queue of gpu-class jobs.")
    worker_resources: CommaList = Field(
        default_factory=lambda: ["cpu"],
        description="Resource classes this worker serves (cpu, gpu or cpu,gpu): it consumes "
        "their queues and announces them in GET /v1/workers.",
    )
    host_id: str | None = Field(
        default=None,
        description="Names this machine in job leases. Unset: hostname, boot id and pid "
        "namespace, so a lease taken on this host can be judged by its pid.",
    )
    api_threads: int = Field(
        default=40, ge=1, le=1000,
        description="Threads of the API's threadpool (sync routes run there) and size of its "
        "database connection pool: one connection per thread, no request waits for one.",
    )

    default_backend: str = Field(
        default="statevector", description="Backend of a job whose config names none."
    )
    allowed_backends: CommaList = Field(
        default_factory=lambda: ["statevector", "aer", "ibm-fake:*", "ibm:*"],
        description="Comma-separated glob patterns of backends jobs may use.",
    )
    ibm_backends: CommaList = Field(
        default_factory=list,
        description="IBM backend names to list in GET /v1/backends (e.g. ibm_brisbane).",
    )
    max_qubits: int = Field(default=24, ge=1, description="Widest circuit a job may run.")
    max_quantum_seconds: float | None = Field(
        default=None, gt=0, description="Cap on quantum seconds per job (None: no cap)."
    )
    max_upload_bytes: int = Field(
        default=100 * 1024 * 1024, ge=1, description="Largest accepted JSONL upload."
    )

    ibm_channel: str | None = Field(
        default=None, description="Qiskit Runtime channel (e.g. ibm_quantum_platform); "
        "unset: QISKIT_IBM_CHANNEL or the saved account's.",
    )
    ibm_instance: str | None = Field(
        default=None, description="Qiskit Runtime instance (CRN); unset: QISKIT_IBM_INSTANCE "
        "or the saved account's.",
    )
    ibm_token_source: Literal["env", "saved"] = Field(
        default="env",
        description="env: QISKIT_IBM_TOKEN, else the saved Qiskit account; saved: only the "
        "saved account (~/.qiskit/qiskit-ibm.json).",
    )

    # Redelivery. A running job holds a lease that its worker renews every
    # heartbeat_seconds; a lease older than lease_seconds (or held by a dead process
    # on this host) is taken over and the job resumes from its checkpoint.
    heartbeat_seconds: float = Field(default=10.0, gt=0, description="How often a running "
                                     "job's worker renews its lease.")
    lease_seconds: float = Field(default=60.0, gt=0, description="A lease not renewed for "
                                 "this long is dead; the job is requeued.")
    reap_seconds: float = Field(default=15.0, gt=0, description="How often workers look "
                                "for jobs whose worker died.")
    visibility_timeout: int = Field(
        default=3600, ge=1,
        description="Redis broker visibility timeout (s): a backstop only, since the lease "
        "makes redelivered duplicates harmless.",
    )

    worker_nproc: int = Field(
        default=1, ge=1,
        description="Processes a worker trains each job with (torch.distributed data "
        "parallel on this host: the worker's process is rank 0 and starts the others; gloo "
        "on CPU, NCCL with one GPU per process). The job's train.batch_size must divide by it.",
    )

    log_level: str = Field(default="INFO", description="Log level of api, worker and serve.")
    log_json: bool = Field(default=True, description="JSON log lines (False: plain text).")

    @field_validator("allowed_backends", "ibm_backends", "worker_resources", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("worker_resources")
    @classmethod
    def _known_classes(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(RESOURCE_CLASSES))
        if unknown or not value:
            raise ValueError(f"must list resource classes from {', '.join(RESOURCE_CLASSES)}"
                             f" (got {', '.join(value) or 'none'})")
        return list(dict.fromkeys(value))

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_dir / 'qpa.db'}"

    @property
    def resolved_artifact_url(self) -> str:
        """``s3://bucket/prefix`` or an absolute local folder."""
        if self.artifact_url:
            if "://" in self.artifact_url and not self.artifact_url.startswith("file://"):
                return self.artifact_url
            return str(Path(self.artifact_url.removeprefix("file://")).expanduser())
        return str((self.artifact_dir or self.home_dir / "artifacts").expanduser())

    @property
    def scratch_dir(self) -> Path:
        """This host's own working space (a worker trains into it when artifacts are
        remote); never shared with another host."""
        return self.home_dir / "work"

    def queue_for(self, resource_class: str) -> str:
        """The Celery queue of a resource class."""
        return self.gpu_queue if resource_class == "gpu" else self.queue

    @property
    def worker_queues(self) -> list[str]:
        return [self.queue_for(name) for name in self.worker_resources]

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "redis://127.0.0.1:6379/0"

    def backend_allowed(self, spec: str) -> bool:
        return any(fnmatch.fnmatchcase(spec, pattern) for pattern in self.allowed_backends)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once; tests build their own ``Settings``)."""
    return Settings()
