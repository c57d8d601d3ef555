"""POST /v1/files (JSONL upload, validated line by line), GET /v1/files[/{id}]."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, UploadFile, status

from api.deps import ArtifactsDep, CurrentKey, SessionDep, SettingsDep
from api.schemas import ErrorResponse, FileList, FileObject
from services import store
from services.artifacts import UploadTooLarge

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=FileObject,
             responses={413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}})
def upload_file(file: UploadFile, key: CurrentKey, session: SessionDep,
                settings: SettingsDep, artifacts: ArtifactsDep) -> FileObject:
    """Upload training data: JSONL with one `{"text"}`, `{"prompt","completion"}` or
    `{"messages"}` object per line. A bad line is rejected with its line number."""
    file_id = store.new_id("file")
    try:
        size, records = artifacts.save_upload(file_id, file.file, settings.max_upload_bytes)
    except UploadTooLarge as error:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, str(error)) from None
    row = store.create_file(session, file_id=file_id, owner_id=key.id,
                            filename=file.filename or "upload.jsonl", size=size,
                            records=records)
    return FileObject.of(row)


@router.get("", response_model=FileList)
def list_files(key: CurrentKey, session: SessionDep) -> FileList:
    return FileList(data=[FileObject.of(row) for row in store.list_files(session, key.id)])


@router.get("/{file_id}", response_model=FileObject, responses={404: {"model": ErrorResponse}})
def get_file(file_id: str, key: CurrentKey, session: SessionDep) -> FileObject:
    row = store.get_file(session, file_id, key.id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no file {file_id!r}")
    return FileObject.of(row)
