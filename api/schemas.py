"""Response shapes (and the job-body example) of the REST API, as pydantic models."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, Field

from services import store
from services.backends import BackendInfo
from services.status import JobStatus


def _aware(moment: datetime | None) -> datetime | None:
    return moment.replace(tzinfo=timezone.utc) if moment is not None else None  # noqa: UP017


class ErrorResponse(BaseModel):
    """Every 4xx (and the 503s) the service answers."""

    detail: str = Field(description="What is wrong, naming the field or id at fault.")
    field: str | None = Field(
        default=None, description="The part of the request at fault: a config key "
        "(`lora.r`), a parameter (`after`, `last-event-id`), `body` or `file`; null when "
        "no single part is (a missing key, an unknown id in the path).")
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="422 from request validation only: every problem found, "
        "as pydantic reports them.")


ERROR_DESCRIPTIONS = {
    400: "The body could not be read (malformed multipart framing).",
    401: "Missing, unknown, revoked or expired API key.",
    404: "No such object for this API key (also ids owned by other keys).",
    409: "The object is not in a state that allows this.",
    410: "The object's files are gone from the artifact store.",
    413: "The request body, or the uploaded file, is over the size limit.",
    422: "Invalid parameters or body; `detail` and `field` name the first problem.",
    503: "The job queue cannot be reached.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these error statuses, all ``ErrorResponse``."""
    return {code: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[code]}
            for code in codes}


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    database: str = Field(description="`ok`, or the error the database gave.")
    broker: str = Field(description="`ok`, or the error the broker gave.")


class KeyObject(BaseModel):
    """An API key's record (never the key itself: only its hash is stored)."""

    id: str
    object: Literal["api_key"] = "api_key"
    name: str
    prefix: str = Field(description="The key's first characters, to recognise it by.")
    created_at: datetime
    expires_at: datetime | None = Field(description="After this the key gets 401.")
    revoked_at: datetime | None = Field(description="When it was revoked (it then gets 401).")

    @classmethod
    def of(cls, row: store.ApiKey) -> KeyObject:
        return cls(id=row.id, name=row.name, prefix=row.prefix,
                   created_at=_aware(row.created_at), expires_at=_aware(row.expires_at),
                   revoked_at=_aware(row.revoked_at))


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    filename: str
    bytes: int
    records: int
    created_at: datetime

    @classmethod
    def of(cls, row: store.File) -> FileObject:
        return cls(id=row.id, filename=row.filename, bytes=row.bytes, records=row.records,
                   created_at=_aware(row.created_at))


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]


class Progress(BaseModel):
    step: int = Field(description="Last step trained (goes back to the checkpoint's step "
                      "when a job resumes after its worker died).")
    total_steps: int
    loss: float | None
    lr: float | None
    eval_loss: float | None
    checkpoint_step: int | None = Field(description="Step of the last saved checkpoint.")


class QuantumUsage(BaseModel):
    jobs: int
    circuits: int
    shots: int
    seconds: float


class JobObject(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    resource_class: Literal["cpu", "gpu"] = Field(
        description="Which workers run it: the config's `resource_class`, else gpu when "
        "`train.device` is cuda, else cpu.")
    method: str
    backend: str
    base_model: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    progress: Progress
    quantum: QuantumUsage
    metrics: dict[str, Any] | None
    error: str | None
    cancel_requested: bool
    attempts: int = Field(description="How many times a worker started this job.")
    world_size: int | None = Field(
        default=None, description="Processes the job trains on (data parallel; the worker's "
        "QPA_WORKER_NPROC) in its current or last attempt; null until a worker starts it.")
    config: dict[str, Any]

    @classmethod
    def of(cls, job: store.Job) -> JobObject:
        return cls(
            id=job.id, status=job.status, resource_class=job.resource_class,
            method=job.method, backend=job.backend,
            base_model=job.base_model, created_at=_aware(job.created_at),
            started_at=_aware(job.started_at), finished_at=_aware(job.finished_at),
            updated_at=_aware(job.updated_at),
            progress=Progress(step=job.step, total_steps=job.total_steps, loss=job.loss,
                              lr=job.lr, eval_loss=job.eval_loss,
                              checkpoint_step=job.checkpoint_step),
            quantum=QuantumUsage(jobs=job.quantum_jobs, circuits=job.quantum_circuits,
                                 shots=job.quantum_shots, seconds=job.quantum_seconds),
            metrics=job.metrics, error=job.error, cancel_requested=job.cancel_requested,
            attempts=job.attempts, world_size=job.world_size, config=job.config,
        )


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


class EventObject(BaseModel):
    id: int = Field(description="Increasing per server; pass as `after` for the next page.")
    job_id: str
    created_at: datetime
    type: str
    attempt: int
    data: dict[str, Any]

    @classmethod
    def of(cls, row: store.Event) -> EventObject:
        return cls(id=row.seq, job_id=row.job_id, created_at=_aware(row.created_at),
                   type=row.type, attempt=row.attempt, data=row.data)


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventObject]
    has_more: bool
    last_id: int | None


class BackendObject(BaseModel):
    name: str
    kind: Literal["simulator", "fake", "ibm"]
    available: bool
    allowed: bool
    reason: str | None
    description: str

    @classmethod
    def of(cls, info: BackendInfo) -> BackendObject:
        return cls(**info.as_dict())


class BackendList(BaseModel):
    object: Literal["list"] = "list"
    default: str
    data: list[BackendObject]


class WorkerObject(BaseModel):
    """A worker that announced itself within the last few `QPA_REAP_SECONDS`."""

    name: str = Field(description="Celery node name.")
    host: str
    resource_classes: list[Literal["cpu", "gpu"]]
    queues: list[str]
    concurrency: int = Field(description="Jobs it runs at once.")
    gpus: int = Field(description="NVIDIA devices it sees.")
    started_at: datetime
    seen_at: datetime


class CapacityObject(BaseModel):
    resource_class: Literal["cpu", "gpu"]
    workers: int = Field(description="Workers up that serve this class.")
    slots: int = Field(description="Jobs of this class they can run at once.")
    queued: int
    running: int


class WorkerList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WorkerObject]
    capacity: list[CapacityObject]


JOB_BODY_EXAMPLE: dict[str, Any] = {
    "base_model": "smollm2-135m",
    "method": "qpa",
    "backend": "statevector",
    "train_file": "file-0123456789abcdef01234567",
    "steps": 100,
    "qpa": {"chunk_size": 64, "depth": 8},
}
