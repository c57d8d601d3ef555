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

import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import IO

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
                            f"file is larger than the {max_bytes}-byte upload limit"
                        )
                    out.write(chunk)
            try:
                records = validate_jsonl(tmp)
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


def validate_jsonl(path: str | Path) -> int:
    """Count the records of a training JSONL file, raising ConfigError naming the bad line.

    The rule lives in qpa (``qpa.data.validate_jsonl``); this falls back to the same rule
    when the library predates it.
    """
    try:
        from qpa.data import validate_jsonl as library_validate
    except ImportError:
        return _validate_jsonl_fallback(Path(path))
    return library_validate(path, field="file")


def _validate_jsonl_fallback(path: Path) -> int:
    records = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise ConfigError("file", f"line {number}: not UTF-8 text") from None
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError("file", f"line {number}: not valid JSON ({error.msg})") from None
            problem = _record_problem(record)
            if problem:
                raise ConfigError("file", f"line {number}: {problem}")
            records += 1
    if records == 0:
        raise ConfigError("file", "has no records (expected one JSON object per line)")
    return records


def _record_problem(record: object) -> str | None:
    if not isinstance(record, dict):
        return "must be a JSON object"
    if "text" in record:
        return None if isinstance(record["text"], str) else '"text" must be a string'
    if "prompt" in record or "completion" in record:
        if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
            return None
        return '"prompt" and "completion" must both be strings'
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return '"messages" must be a non-empty list'
        for message in messages:
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                return 'each message needs string "role" and "content"'
        return None
    return 'needs "text", "prompt" and "completion", or "messages"'
