"""The artifact store: uploaded JSONL files and each job's output folder on a filesystem.

Layout under the artifact directory (shared by the api and every worker, e.g. a volume):

    files/<file id>.jsonl        uploads, validated before they are stored
    jobs/<job id>/               the job's output_dir for qpa.training.finetune:
        adapter/                 stock PEFT adapter
        metrics.json
        state/                   checkpoint a redelivered job resumes from
    jobs/<job id>/adapter.tar.gz the download, built once the job succeeded
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path
from typing import IO

from qpa.data import validate_jsonl
from qpa.errors import ConfigError

CHUNK = 1024 * 1024


class UploadTooLarge(ValueError):
    """An upload is over the configured size limit."""


class ArtifactStore:
    """Paths and atomic writes under one root directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        (self.root / "files").mkdir(parents=True, exist_ok=True)
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)

    def file_path(self, file_id: str) -> Path:
        return self.root / "files" / f"{file_id}.jsonl"

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def adapter_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "adapter"

    def has_checkpoint(self, job_id: str) -> bool:
        state = self.job_dir(job_id) / "state"
        return state.is_dir() and any(state.iterdir())

    def save_upload(self, file_id: str, source: IO[bytes], max_bytes: int) -> tuple[int, int]:
        """Copy an upload into place, validating it line by line; returns (bytes, records).

        Raises UploadTooLarge or ConfigError (field ``file``, reason naming the line); in
        both cases nothing is kept.
        """
        target = self.file_path(file_id)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, suffix=".part")
        tmp = Path(tmp_name)
        try:
            size = 0
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise UploadTooLarge(
                            f"larger than the {max_bytes}-byte upload limit"
                        )
                    out.write(chunk)
            try:
                records = validate_jsonl(tmp, field="file")
            except ConfigError as error:
                # The client knows its file by its own name, not our temporary one.
                raise ConfigError("file", error.reason.replace(str(tmp), "the file")) from None
            tmp.replace(target)
            return size, records
        finally:
            tmp.unlink(missing_ok=True)

    def adapter_archive(self, job_id: str) -> Path:
        """The adapter folder as adapter.tar.gz (built on first request, atomically)."""
        archive = self.job_dir(job_id) / "adapter.tar.gz"
        if archive.is_file():
            return archive
        source = self.adapter_dir(job_id)
        if not source.is_dir():
            raise FileNotFoundError(f"job {job_id} has no adapter folder")
        fd, tmp_name = tempfile.mkstemp(dir=archive.parent, suffix=".part")
        os.close(fd)
        try:
            with tarfile.open(tmp_name, "w:gz") as tar:
                tar.add(source, arcname="adapter")
            Path(tmp_name).replace(archive)
        finally:
            Path(tmp_name).unlink(missing_ok=True)
        return archive
