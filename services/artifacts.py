"""The artifact store: uploaded JSONL files and each job's output folder on a filesystem.

Layout under the artifact directory (shared by the api and every worker, e.g. a volume):

    files/<file id>.jsonl        uploads, validated before they are stored
    jobs/<job id>/               the job's output_dir for qpa.training.finetune:
        adapter/                 stock PEFT adapter (with loss.png, shown in its model card)
        merged/, adapter.gguf    the other export formats, when the job asked for them
        metrics.json, loss.png
        state/                   checkpoint a redelivered job resumes from
    jobs/<job id>/adapter.tar.gz the download, built once the job succeeded
    jobs/<job id>/merged.tar     the merged model's download, built on first request
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
        return self._archive(job_id, "adapter", "adapter.tar.gz", "w:gz")

    def export_download(self, job_id: str, export_format: str) -> tuple[Path, str, str]:
        """(file, media type, download name) of a succeeded job's export in ``export_format``
        (``peft`` | ``merged`` | ``gguf``); archives are built on first request.

        ``merged`` is a plain tar: its safetensors barely compress, and gzip would cost a
        minute of CPU per model. Raises FileNotFoundError when the job did not write it.
        """
        if export_format == "peft":
            return (self.adapter_archive(job_id), "application/gzip",
                    f"{job_id}-adapter.tar.gz")
        if export_format == "merged":
            return (self._archive(job_id, "merged", "merged.tar", "w"), "application/x-tar",
                    f"{job_id}-merged.tar")
        if export_format == "gguf":
            path = self.job_dir(job_id) / "adapter.gguf"
            if not path.is_file():
                raise FileNotFoundError(f"job {job_id} has no adapter.gguf")
            return path, "application/octet-stream", f"{job_id}-adapter.gguf"
        raise ValueError(f"unknown export format {export_format!r}")

    def loss_plot(self, job_id: str) -> Path:
        """The job's loss.png (written at every checkpoint and at the end); may not exist."""
        return self.job_dir(job_id) / "loss.png"

    def _archive(self, job_id: str, folder: str, name: str, mode: str) -> Path:
        archive = self.job_dir(job_id) / name
        if archive.is_file():
            return archive
        source = self.job_dir(job_id) / folder
        if not source.is_dir():
            raise FileNotFoundError(f"job {job_id} has no {folder} folder")
        fd, tmp_name = tempfile.mkstemp(dir=archive.parent, suffix=".part")
        os.close(fd)
        try:
            with tarfile.open(tmp_name, mode) as tar:
                tar.add(source, arcname=folder)
            Path(tmp_name).replace(archive)
        finally:
            Path(tmp_name).unlink(missing_ok=True)
        return archive
