"""Jobs: create, list, read, events (list or server-sent events), cancel, adapter
(in each exported format), loss plot."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Body, Header, Query, Request, Response, status
from fastapi.responses import FileResponse, StreamingResponse

from api.deps import (
    BEARER_SECURITY,
    ArtifactsDep,
    CeleryDep,
    CurrentKey,
    HubDep,
    SessionDep,
    SettingsDep,
    bearer_token,
    refuse_key,
)
from api.errors import RequestError, ServiceRoute
from api.schemas import (
    JOB_BODY_EXAMPLE,
    ErrorResponse,
    EventList,
    EventObject,
    JobList,
    JobObject,
    error_responses,
)
from qpa.config import JobConfig
from services import store
from services.artifacts import Download
from services.jobs import prepare_config
from services.queue import enqueue_job, resource_class_of
from services.status import JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=ServiceRoute,
                   responses=error_responses(401))
SSE_KEEPALIVE_SECONDS = 15.0
# A file served as it is (archive, GGUF, PNG).
BINARY = {"schema": {"type": "string", "format": "binary"}}


def _owned_job(session: Any, job_id: str, owner_id: str) -> store.Job:
    job = store.get_job(session, job_id, owner_id)
    if job is None:
        raise RequestError(status.HTTP_404_NOT_FOUND, f"no job {job_id!r}")
    return job


@router.get("/{job_id}", response_model=JobObject, responses=error_responses(404, 422),
            openapi_extra=BEARER_SECURITY)
async def get_job(job_id: str, request: Request) -> Response:
    """Status, progress (step, loss, eval loss), quantum usage, timestamps, metrics."""
    # The call clients poll (bench/bench_service.py), first in the router so it is
    # matched first: no dependency to solve, the key check and the job read in one query,
    # the response serialised once. On SQLite that query runs right here: it is a library
    # call of tens of microseconds, a third of what the trip to the threadpool costs, and
    # a WAL read never waits for a writer. PostgreSQL through psycopg is read from the
    # loop on async connections (services.async_reads); another server from the pool.
    token = bearer_token(request)
    db: store.Store = request.app.state.store
    if db.in_process:
        row = _read_job_as(db, token, job_id)
    elif request.app.state.async_reads is not None:
        row = await request.app.state.async_reads.read_job_as(token, job_id)
    else:
        row = await anyio.to_thread.run_sync(_read_job_as, db, token, job_id)
    refuse_key(row and row.key_id,
               row and store.key_problem(row.key_id, row.key_revoked_at, row.key_expires_at,
                                         store.utcnow()))
    if row.id is None:
        raise RequestError(status.HTTP_404_NOT_FOUND, f"no job {job_id!r}")
    return Response(JobObject.of(row).model_dump_json(), media_type="application/json")


def _read_job_as(db: store.Store, token: str, job_id: str) -> Any:
    with db.reader() as connection:
        return store.read_job_as(connection, token, job_id)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobObject,
             responses=error_responses(400, 404, 413, 422, 503))
def create_job(
    config: Annotated[JobConfig, Body(
        description="A job config (the same schema as `qpa finetune`'s YAML) with "
        "`train_file`/`eval_file` set to uploaded file ids. `output_dir` is ignored; a "
        "missing `backend` is the server's default.",
        examples=[JOB_BODY_EXAMPLE])],
    key: CurrentKey, session: SessionDep, settings: SettingsDep, celery: CeleryDep,
) -> JobObject:
    """Validate the config, store the job as `queued` and hand it to the workers of its
    resource class (`resource_class`, else gpu when `train.device` is cuda, else cpu)."""
    stored = prepare_config(session, settings, key.id, config)
    resource_class = resource_class_of(stored)
    job = store.create_job(session, owner_id=key.id, config=stored,
                           resource_class=resource_class)
    # Commit before publishing: a worker may pick the message up at once.
    session.commit()
    try:
        enqueue_job(celery, job.id, settings, resource_class)
    except Exception as error:
        job.status, job.finished_at = JobStatus.FAILED, store.utcnow()
        job.error = f"could not reach the job queue: {error}"
        store.add_event(session, job.id, {"type": "status", "status": JobStatus.FAILED,
                                          "message": job.error})
        session.commit()
        raise RequestError(status.HTTP_503_SERVICE_UNAVAILABLE,
                           f"job queue unavailable ({error}); job {job.id} was not started"
                           ) from None
    return JobObject.of(job)


@router.get("", response_model=JobList, responses=error_responses(404, 422))
def list_jobs(
    key: CurrentKey, session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
    after: Annotated[str | None, Query(description="Id of the last job of the previous "
                                       "page (`last_id`).")] = None,
    status_filter: Annotated[str | None, Query(
        alias="status", pattern="^(queued|running|succeeded|failed|cancelled)$")] = None,
) -> JobList:
    """Jobs of this API key, newest first."""
    page = store.list_jobs(session, key.id, limit=limit, after=after, status=status_filter)
    if page is None:
        raise RequestError(status.HTTP_404_NOT_FOUND, f"after: no job {after!r}", "after")
    rows, has_more = page
    data = [JobObject.of(job) for job in rows]
    return JobList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                   last_id=data[-1].id if data else None)


# One server-sent event, as OpenAPI before 3.2 describes a stream's items: a job event
# (`id`, `event` = its type, `data` = the EventObject as JSON), or the final `end`.
SSE_EVENT_SCHEMA = {"oneOf": [
    {"type": "object", "required": ["id", "event", "data"], "properties": {
        "id": {"type": "string", "pattern": "^[0-9]+$"},
        "event": {"type": "string", "not": {"const": "end"}},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"$ref": "#/components/schemas/EventObject"}}}},
    {"type": "object", "required": ["event", "data"], "properties": {
        "event": {"const": "end"},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"type": "object", "required": ["status"], "properties": {
                     "status": {"enum": sorted(s.value for s in store.TERMINAL_STATUSES)}}}}}},
]}


@router.get("/{job_id}/events", response_model=EventList, responses={
    **error_responses(404, 422),
    200: {"description": "A page of events (JSON), or with `stream=true` (or `Accept: "
          "text/event-stream`) server-sent events: `id: <event id>`, `event: <type>`, "
          "`data: <event JSON>`, and a final `event: end` once the job has ended.",
          "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}}}})
def job_events(
    job_id: str, request: Request, key: CurrentKey, session: SessionDep, hub: HubDep,
    after: Annotated[int, Query(ge=0, le=store.MAX_SEQ,
                                description="Return events with id > after.")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000, description="Page size.")] = 100,
    stream: Annotated[bool, Query(description="Server-sent events until the job ends "
                                  "(also chosen by `Accept: text/event-stream`).")] = False,
    # Typed int, not int | None: the header is an integer when present, and absent is
    # its only "none" (the schema would otherwise invite `Last-Event-ID: null`).
    last_event_id: Annotated[int, Header(
        alias="Last-Event-ID", ge=0, le=store.MAX_SEQ,
        description="SSE reconnection: the last event id seen (overrides `after`).")] = None,
) -> Any:
    """Progress events: a page (`after`, `limit`), or a live SSE stream that replays
    from `after` (or `Last-Event-ID`) and ends once the job is finished."""
    _owned_job(session, job_id, key.id)
    if stream or "text/event-stream" in request.headers.get("accept", ""):
        cursor = last_event_id if last_event_id is not None else after
        return StreamingResponse(hub.stream(job_id, cursor, SSE_KEEPALIVE_SECONDS, _end_frame),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})
    rows, has_more = store.list_events(session, job_id, after=after, limit=limit)
    data = [EventObject.of(row) for row in rows]
    return EventList(data=data, has_more=has_more, last_id=data[-1].id if data else None)


def _end_frame(job_status: str | None) -> str:
    return f"event: end\ndata: {json.dumps({'status': job_status})}\n\n"


@router.post("/{job_id}/cancel", response_model=JobObject,
             responses=error_responses(404, 409, 422))
def cancel_job(job_id: str, key: CurrentKey, session: SessionDep) -> JobObject:
    """Stop a job: a queued one at once, a running one within one training step (its last
    checkpoint is kept). Cancelling a cancelled job is a no-op."""
    job = _owned_job(session, job_id, key.id)
    if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        raise RequestError(status.HTTP_409_CONFLICT,
                           f"job {job_id} already {job.status}; nothing to cancel")
    return JobObject.of(store.request_cancel(session, job))


@router.get("/{job_id}/adapter", response_class=FileResponse,
            responses={**error_responses(409, 410, 422),
                       404: {"model": ErrorResponse, "description": "No such job for this "
                             "API key, or the job did not export this format."},
                       200: {"description": "peft: `adapter/…` as a .tar.gz; merged: "
                             "`merged/…` as a .tar; gguf: the file `adapter.gguf`.",
                             "content": {media_type: BINARY for media_type in (
                                 "application/gzip", "application/x-tar",
                                 "application/octet-stream")}}})
def download_adapter(
    job_id: str, key: CurrentKey, session: SessionDep, artifacts: ArtifactsDep,
    export_format: Annotated[Literal["peft", "merged", "gguf"], Query(
        alias="format",
        description="peft: `adapter/…` in a .tar.gz (stock PEFT; with loss.png); merged: "
        "`merged/…` in a .tar (transformers folder with the adapter merged in); gguf: the "
        "llama.cpp LoRA adapter file. merged and gguf exist when the job's "
        "`export.formats` asked for them.")] = "peft",
) -> Response:
    """A succeeded job's adapter in one of the formats it exported."""
    job = _owned_job(session, job_id, key.id)
    if job.status != JobStatus.SUCCEEDED:
        raise RequestError(status.HTTP_409_CONFLICT,
                           f"job {job_id} is {job.status}; the adapter is available once "
                           "it has succeeded")
    exported = (job.config.get("export") or {}).get("formats") or ["peft"]
    if export_format != "peft" and export_format not in exported:
        raise RequestError(status.HTTP_404_NOT_FOUND,
                           f"format: job {job_id} did not export {export_format!r} (its "
                           f"export.formats is {exported}); submit the job with export: "
                           f"{{formats: [peft, {export_format}]}}", "format")
    try:
        download, media_type, filename = artifacts.export_download(job_id, export_format)
    except FileNotFoundError:
        raise RequestError(status.HTTP_410_GONE,
                           f"job {job_id}'s {export_format} export is missing from the "
                           f"artifact store ({artifacts.location})") from None
    return send_download(download, media_type, filename)


@router.get("/{job_id}/plot", response_class=Response,
            responses={**error_responses(422),
                       404: {"model": ErrorResponse, "description": "No such job for this "
                             "API key, or no plot yet (before the first checkpoint)."},
                       200: {"description": "The loss curve (train loss per step, eval loss "
                             "at each evaluation).", "content": {"image/png": BINARY}}})
def loss_plot(job_id: str, key: CurrentKey, session: SessionDep,
              artifacts: ArtifactsDep) -> Response:
    """The job's loss curve as PNG: train loss per step, eval loss at each evaluation.
    Written at every checkpoint while the job runs and once more when it ends."""
    _owned_job(session, job_id, key.id)
    try:
        # Read whole (tens of KB): the trainer replaces the file atomically at checkpoints.
        png = artifacts.loss_plot(job_id)
    except FileNotFoundError:
        raise RequestError(status.HTTP_404_NOT_FOUND,
                           f"job {job_id} has no loss plot yet (it is written at the "
                           "first checkpoint)") from None
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-cache"})


def send_download(download: Download, media_type: str, filename: str) -> Response:
    """A stored file as the response: sent from disk, or streamed from object storage."""
    if download.path is not None:
        return FileResponse(download.path, media_type=media_type, filename=filename)
    return StreamingResponse(download.chunks, media_type=media_type, headers={
        "Content-Length": str(download.size),
        "Content-Disposition": f'attachment; filename="{filename}"'})
