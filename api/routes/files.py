"""POST /v1/files (JSONL upload, validated line by line), GET /v1/files[/{id}]."""

from __future__ import annotations

import unicodedata

from fastapi import APIRouter, UploadFile, status

from api.deps import ArtifactsDep, CurrentKey, SessionDep, SettingsDep
from api.errors import RequestError, ServiceRoute
from api.schemas import FileList, FileObject, error_responses
from services import store
from services.artifacts import UploadTooLarge

router = APIRouter(prefix="/v1/files", tags=["files"], route_class=ServiceRoute,
                   responses=error_responses(401))
FILENAME_CHARS = 255


@router.post("", status_code=status.HTTP_201_CREATED, response_model=FileObject,
             responses=error_responses(400, 413, 422))
def upload_file(file: UploadFile, key: CurrentKey, session: SessionDep,
                settings: SettingsDep, artifacts: ArtifactsDep) -> FileObject:
    """Upload training data: JSONL with one `{"text"}`, `{"prompt","completion"}` or
    `{"messages"}` object per line. A bad line is rejected with its line number; a file
    with no record at all is rejected too."""
    file_id = store.new_id("file")
    try:
        size, records = artifacts.save_upload(file_id, file.file, settings.max_upload_bytes)
    except UploadTooLarge as error:
        raise RequestError(status.HTTP_413_CONTENT_TOO_LARGE, f"file: {error}",
                           "file") from None
    row = store.create_file(session, file_id=file_id, owner_id=key.id,
                            filename=_display_name(file.filename), size=size, records=records)
    return FileObject.of(row)


def _display_name(filename: str | None) -> str:
    """The client's name for the file, as a label: control characters dropped, length
    capped (it is only ever shown back, never used as a path)."""
    name = "".join(char for char in filename or ""
                   if unicodedata.category(char)[0] != "C")[:FILENAME_CHARS]
    return name or "upload.jsonl"


@router.get("", response_model=FileList)
def list_files(key: CurrentKey, session: SessionDep) -> FileList:
    """Your uploads, newest first."""
    return FileList(data=[FileObject.of(row) for row in store.list_files(session, key.id)])


@router.get("/{file_id}", response_model=FileObject, responses=error_responses(404, 422))
def get_file(file_id: str, key: CurrentKey, session: SessionDep) -> FileObject:
    row = store.get_file(session, file_id, key.id)
    if row is None:
        raise RequestError(status.HTTP_404_NOT_FOUND, f"no file {file_id!r}")
    return FileObject.of(row)
