"""The artifact store: uploaded JSONL files and each job's output folder.

Two implementations behind one interface, chosen by ``QPA_ARTIFACT_URL``
(``open_artifacts``):

* ``LocalArtifactStore``: a folder (the embedded default, ``QPA_HOME/artifacts``). The
  trainer writes straight into it; only processes on this host can see it.
* ``ObjectArtifactStore``: ``s3://bucket/prefix`` on S3-compatible object storage, through
  boto3 (endpoint and credentials from the standard ``AWS_*`` variables). A worker trains
  into a scratch folder of its own host and pushes to the store at every checkpoint and
  when the job ends; a worker that takes the job over pulls it first. No worker ever
  reads another worker's disk.

Layout (folders, or key prefixes under ``prefix/``):

    files/<file id>.jsonl        uploads, validated before they are stored
    jobs/<job id>/               the job's output_dir for qpa.training.finetune:
        adapter/                 stock PEFT adapter (with loss.png, shown in its model card)
        merged/, adapter.gguf    the other export formats, when the job asked for them
        metrics.json, loss.png, events.jsonl, tensorboard/   results and logs
        state/                   checkpoint a redelivered job resumes from
    jobs/<job id>/adapter.tar.gz the download, built once the job succeeded
    jobs/<job id>/merged.tar     the merged model's download, built on first request
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from qpa.errors import ConfigError
from qpa.paths import CHECKPOINT
from qpa.records import validate_jsonl

CHUNK = 1024 * 1024
ADAPTER_ARCHIVE = "adapter.tar.gz"
MERGED_ARCHIVE = "merged.tar"
logger = logging.getLogger("qpa.artifacts")


class UploadTooLarge(ValueError):
    """An upload is over the configured size limit."""


class ArtifactStoreError(RuntimeError):
    """The artifact store cannot be used (missing bucket, refused credentials...)."""


@dataclass
class Download:
    """A stored file to send: a local ``path``, or ``chunks`` streamed from the store."""

    size: int
    path: Path | None = None
    chunks: Iterator[bytes] | None = None


class Workspace(ABC):
    """The folder a job trains into (``dir``), and its link to the store."""

    dir: Path

    def pull(self) -> None:
        """Bring the job's stored files (checkpoint, logs) into ``dir``."""

    def push(self) -> None:
        """Store what changed in ``dir`` since the last push (the checkpoint last)."""

    def close(self) -> None:
        """Release this host's copy (nothing to do when ``dir`` is the store itself)."""


class ArtifactStore(ABC):
    """Uploads and job folders, wherever they are kept."""

    #: Where the store is, for messages (a folder or an s3:// URL).
    location: str

    def save_upload(self, file_id: str, source: IO[bytes], max_bytes: int) -> tuple[int, int]:
        """Copy an upload into place, validating it line by line; returns (bytes, records).

        Raises UploadTooLarge or ConfigError (field ``file``, reason naming the line); in
        both cases nothing is kept.
        """
        fd, tmp_name = tempfile.mkstemp(dir=self._staging_dir(), suffix=".part")
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
            self._keep_upload(file_id, tmp)
            return size, records
        finally:
            tmp.unlink(missing_ok=True)

    @abstractmethod
    def _staging_dir(self) -> Path | None:
        """Where an upload is written while it is validated."""

    @abstractmethod
    def _keep_upload(self, file_id: str, validated: Path) -> None:
        """Store a validated upload under its id."""

    @abstractmethod
    def upload_path(self, file_id: str, scratch: Path) -> Path:
        """A local path of the upload the trainer can read (copied into ``scratch`` when
        the store is remote). Raises FileNotFoundError when it is gone."""

    @abstractmethod
    def workspace(self, job_id: str, scratch: Path) -> Workspace:
        """The folder to train job ``job_id`` in; ``scratch`` is this host's own space."""

    @abstractmethod
    def has_checkpoint(self, job_id: str) -> bool:
        """Whether the job has a stored checkpoint to resume from."""

    @abstractmethod
    def download(self, job_id: str, name: str) -> Download:
        """A file of the job's folder (``name`` relative to it). FileNotFoundError if none."""

    @abstractmethod
    def archive(self, job_id: str, folder: str, name: str, mode: str) -> Download:
        """The job's ``folder`` as the tar file ``name`` (tarfile ``mode``), built on the
        first request when the worker did not build it. FileNotFoundError if no folder."""

    def adapter_archive(self, job_id: str) -> Download:
        """The adapter folder as adapter.tar.gz."""
        return self.archive(job_id, "adapter", ADAPTER_ARCHIVE, "w:gz")

    def export_download(self, job_id: str, export_format: str) -> tuple[Download, str, str]:
        """(file, media type, download name) of a succeeded job's export in ``export_format``
        (``peft`` | ``merged`` | ``gguf``); archives are built on first request.

        ``merged`` is a plain tar: its safetensors barely compress, and gzip would cost a
        minute of CPU per model. Raises FileNotFoundError when the job did not write it.
        """
        if export_format == "peft":
            return (self.adapter_archive(job_id), "application/gzip",
                    f"{job_id}-adapter.tar.gz")
        if export_format == "merged":
            return (self.archive(job_id, "merged", MERGED_ARCHIVE, "w"), "application/x-tar",
                    f"{job_id}-merged.tar")
        if export_format == "gguf":
            return (self.download(job_id, "adapter.gguf"), "application/octet-stream",
                    f"{job_id}-adapter.gguf")
        raise ValueError(f"unknown export format {export_format!r}")

    def loss_plot(self, job_id: str) -> bytes:
        """The job's loss.png (written at every checkpoint and at the end), read whole (tens
        of KB). FileNotFoundError before the first checkpoint."""
        download = self.download(job_id, "loss.png")
        if download.path is not None:
            return download.path.read_bytes()
        return b"".join(download.chunks or ())

    def check(self) -> None:
        """Raise ArtifactStoreError when the store cannot be used (called at start-up)."""


def build_archive(job_dir: Path, folder: str, name: str, mode: str) -> Path:
    """Tar ``job_dir/folder`` into ``job_dir/name``, atomically; returns the archive."""
    archive = job_dir / name
    source = job_dir / folder
    if not source.is_dir():
        raise FileNotFoundError(f"{job_dir.name} has no {folder} folder")
    fd, tmp_name = tempfile.mkstemp(dir=job_dir, suffix=".part")
    os.close(fd)
    try:
        with tarfile.open(tmp_name, mode) as tar:
            tar.add(source, arcname=folder)
        Path(tmp_name).replace(archive)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return archive


# -- a local folder ----------------------------------------------------------------------


class LocalArtifactStore(ArtifactStore):
    """Paths and atomic writes under one root directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.location = str(self.root)
        (self.root / "files").mkdir(parents=True, exist_ok=True)
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)

    def file_path(self, file_id: str) -> Path:
        return self.root / "files" / f"{file_id}.jsonl"

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def _staging_dir(self) -> Path:
        return self.root / "files"  # same filesystem: the final rename is atomic

    def _keep_upload(self, file_id: str, validated: Path) -> None:
        validated.replace(self.file_path(file_id))

    def upload_path(self, file_id: str, scratch: Path) -> Path:
        path = self.file_path(file_id)
        if not path.is_file():
            raise FileNotFoundError(f"no upload {file_id}")
        return path

    def workspace(self, job_id: str, scratch: Path) -> Workspace:
        return _LocalWorkspace(self.job_dir(job_id))

    def has_checkpoint(self, job_id: str) -> bool:
        return (self.job_dir(job_id) / "state" / CHECKPOINT).is_file()

    def download(self, job_id: str, name: str) -> Download:
        path = self.job_dir(job_id) / name
        if not path.is_file():
            raise FileNotFoundError(f"job {job_id} has no {name}")
        return Download(size=path.stat().st_size, path=path)

    def archive(self, job_id: str, folder: str, name: str, mode: str) -> Download:
        path = self.job_dir(job_id) / name
        if not path.is_file():
            path = build_archive(self.job_dir(job_id), folder, name, mode)
        return Download(size=path.stat().st_size, path=path)


class _LocalWorkspace(Workspace):
    def __init__(self, job_dir: Path):
        self.dir = job_dir


# -- S3-compatible object storage -----------------------------------------------------------


class ObjectArtifactStore(ArtifactStore):
    """``s3://bucket/prefix`` through boto3. One client per process (boto3 clients are
    thread-safe); the endpoint, region and credentials come from boto3's usual sources
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ...)."""

    def __init__(self, url: str, client: Any | None = None):
        if not url.startswith("s3://"):
            raise ArtifactStoreError(f"QPA_ARTIFACT_URL {url!r}: only s3:// URLs are remote")
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise ArtifactStoreError(f"QPA_ARTIFACT_URL {url!r} names no bucket")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.location = url
        self.client = client or _s3_client()

    # keys
    def key(self, *parts: str) -> str:
        return "/".join(part.strip("/") for part in (self.prefix, *parts) if part)

    def _job_key(self, job_id: str, name: str = "") -> str:
        return self.key("jobs", job_id, name)

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "?")
            raise ArtifactStoreError(
                f"artifact store {self.location}: bucket {self.bucket!r} answered {code} "
                "(does it exist, and do AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY grant "
                "access?)") from None
        except BotoCoreError as error:
            raise ArtifactStoreError(f"artifact store {self.location}: {error} (is "
                                     "AWS_ENDPOINT_URL right?)") from None

    # uploads
    def _staging_dir(self) -> None:
        return None  # the system's temporary folder

    def _keep_upload(self, file_id: str, validated: Path) -> None:
        self.client.upload_file(str(validated), self.bucket, self.key("files", f"{file_id}.jsonl"))

    def upload_path(self, file_id: str, scratch: Path) -> Path:
        target = scratch / f"{file_id}.jsonl"
        if not target.is_file():
            scratch.mkdir(parents=True, exist_ok=True)
            self._get(self.key("files", f"{file_id}.jsonl"), target)
        return target

    # jobs
    def workspace(self, job_id: str, scratch: Path) -> Workspace:
        return _ObjectWorkspace(self, job_id, scratch / "jobs" / job_id)

    def has_checkpoint(self, job_id: str) -> bool:
        return self._exists(self._job_key(job_id, f"state/{CHECKPOINT}"))

    def download(self, job_id: str, name: str) -> Download:
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._job_key(job_id, name))
        except ClientError as error:
            if _missing(error):
                raise FileNotFoundError(f"job {job_id} has no {name}") from None
            raise
        body = response["Body"]
        return Download(size=int(response["ContentLength"]), chunks=_close_after(body))

    def archive(self, job_id: str, folder: str, name: str, mode: str) -> Download:
        try:
            return self.download(job_id, name)
        except FileNotFoundError:
            pass
        keys = self.list_keys(self._job_key(job_id, folder) + "/")
        if not keys:
            raise FileNotFoundError(f"job {job_id} has no {folder} folder")
        with tempfile.TemporaryDirectory(prefix="qpa-archive-") as scratch:
            job_dir = Path(scratch)
            base = self._job_key(job_id) + "/"
            for key in keys:
                self._get(key, job_dir / key.removeprefix(base))
            archive = build_archive(job_dir, folder, name, mode)
            self.client.upload_file(str(archive), self.bucket, self._job_key(job_id, name))
        return self.download(job_id, name)

    # primitives
    def list_keys(self, prefix: str) -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        return [item["Key"] for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix)
                for item in page.get("Contents", ())]

    def _exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as error:
            if _missing(error):
                return False
            raise
        return True

    def _get(self, key: str, target: Path) -> None:
        """Download ``key`` to ``target`` atomically (FileNotFoundError if absent)."""
        from botocore.exceptions import ClientError

        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.part")
        try:
            self.client.download_file(self.bucket, key, str(partial))
        except ClientError as error:
            if _missing(error):
                raise FileNotFoundError(f"{self.location}: no object {key}") from None
            raise
        partial.replace(target)

    def put(self, path: Path, key: str) -> None:
        self.client.upload_file(str(path), self.bucket, key)


# Pulled by a worker that takes a job over: everything but the large exports, which only
# a finished job has and which the API streams from the store itself.
_NOT_PULLED = ("merged/", MERGED_ARCHIVE, ADAPTER_ARCHIVE)


class _ObjectWorkspace(Workspace):
    """A job's folder on this host, mirrored to and from the object store."""

    def __init__(self, store: ObjectArtifactStore, job_id: str, directory: Path):
        self.store = store
        self.job_id = job_id
        self.dir = directory
        self._pushed: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def pull(self) -> None:
        # Whatever this host kept from an earlier attempt may be older than what another
        # host stored since: start from the store's copy only.
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        base = self.store._job_key(self.job_id) + "/"
        for key in self.store.list_keys(base):
            name = key.removeprefix(base)
            if name.startswith(_NOT_PULLED):
                continue
            target = self.dir / name
            self.store._get(key, target)
            self._pushed[name] = _signature(target)

    def push(self) -> None:
        with self._lock:  # the trainer's thread and the runner may both push
            changed = []
            for path in sorted(self.dir.rglob("*")):
                if not path.is_file() or path.name.startswith(".") or path.suffix == ".part":
                    continue
                name = path.relative_to(self.dir).as_posix()
                signature = _signature(path)
                if self._pushed.get(name) != signature:
                    changed.append((name, path, signature))
            # The checkpoint goes last: a worker that resumes from it finds the logs and
            # the config it belongs with already stored.
            changed.sort(key=lambda item: item[0] == f"state/{CHECKPOINT}")
            for name, path, signature in changed:
                self.store.put(path, self.store._job_key(self.job_id, name))
                self._pushed[name] = signature

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _signature(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _missing(error: Any) -> bool:
    code = str(error.response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


def _close_after(body: Any) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(CHUNK)
    finally:
        body.close()


def _s3_client() -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError as error:  # pragma: no cover - the service extra installs it
        raise ArtifactStoreError(f"s3:// artifacts need boto3 ({error}); pip install "
                                 "'qpa[service]'") from None
    # "standard" retries: throttling and transient 5xx are retried with backoff.
    config = Config(retries={"mode": "standard", "max_attempts": 5})
    return boto3.session.Session().client("s3", config=config)


def open_artifacts(url: str) -> ArtifactStore:
    """The artifact store for ``Settings.resolved_artifact_url``."""
    if url.startswith("s3://"):
        return ObjectArtifactStore(url)
    if "://" in url:
        raise ArtifactStoreError(f"QPA_ARTIFACT_URL {url!r}: use s3://bucket/prefix or a "
                                 "local folder")
    return LocalArtifactStore(url)
