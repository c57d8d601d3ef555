"""The artifact store on a real S3-compatible server (``rclone serve s3``, started by the
suite): a job's workspace goes up at checkpoints and comes back on another host, archives
are built from the stored objects, and a store that cannot be used says why at start-up."""

from __future__ import annotations

import itertools
import tarfile
from pathlib import Path

import pytest

from qpa.paths import CHECKPOINT
from services.artifacts import (
    ArtifactStoreError,
    LocalArtifactStore,
    ObjectArtifactStore,
    open_artifacts,
)

from .servers import S3Server

_BUCKETS = itertools.count()


@pytest.fixture
def remote(s3_server: S3Server) -> ObjectArtifactStore:
    url = s3_server.bucket(f"objects-{next(_BUCKETS)}") + "/deploy/a"
    return ObjectArtifactStore(url, client=s3_server.client())


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_workspace_goes_up_at_push_and_comes_back_on_another_host(
        remote: ObjectArtifactStore, tmp_path: Path) -> None:
    host_a, host_b = tmp_path / "host-a", tmp_path / "host-b"
    first = remote.workspace("job-1", host_a)
    first.pull()  # nothing stored yet: an empty folder
    assert first.dir.is_dir() and list(first.dir.iterdir()) == []
    assert not remote.has_checkpoint("job-1")
    _write(first.dir / "events.jsonl", b'{"step": 2}\n')
    _write(first.dir / "state" / CHECKPOINT, b"weights at step 2")
    first.push()
    assert remote.has_checkpoint("job-1")
    stored = set(remote.list_keys(remote.key("jobs", "job-1") + "/"))
    assert stored == {"deploy/a/jobs/job-1/events.jsonl",
                      f"deploy/a/jobs/job-1/state/{CHECKPOINT}"}

    # Host A dies; host B has never seen the job and starts from the store's copy only.
    _write(host_b / "jobs" / "job-1" / "stale.txt", b"left by an older attempt on B")
    second = remote.workspace("job-1", host_b)
    second.pull()
    assert (second.dir / "state" / CHECKPOINT).read_bytes() == b"weights at step 2"
    assert (second.dir / "events.jsonl").read_bytes() == b'{"step": 2}\n'
    assert not (second.dir / "stale.txt").exists()

    # Only what changed goes up again; what did not change keeps its stored copy.
    _write(second.dir / "state" / CHECKPOINT, b"weights at step 4")
    _write(second.dir / "adapter" / "adapter_config.json", b"{}")
    second.push()
    third = remote.workspace("job-1", tmp_path / "host-c")
    third.pull()
    assert (third.dir / "state" / CHECKPOINT).read_bytes() == b"weights at step 4"
    assert (third.dir / "adapter" / "adapter_config.json").read_bytes() == b"{}"
    second.close()
    assert not second.dir.exists()  # a host keeps no copy after the job


def test_archives_and_downloads_stream_from_the_store(remote: ObjectArtifactStore,
                                                      tmp_path: Path) -> None:
    workspace = remote.workspace("job-2", tmp_path / "host")
    workspace.pull()
    _write(workspace.dir / "adapter" / "adapter_config.json", b'{"r": 2}')
    _write(workspace.dir / "adapter" / "adapter_model.safetensors", b"\0" * 70_000)
    _write(workspace.dir / "loss.png", b"\x89PNG fake")
    workspace.push()
    workspace.close()

    with pytest.raises(FileNotFoundError):
        remote.export_download("job-2", "merged")  # the job did not export it
    with pytest.raises(FileNotFoundError):
        remote.export_download("job-2", "gguf")
    download, media_type, filename = remote.export_download("job-2", "peft")
    assert (media_type, filename) == ("application/gzip", "job-2-adapter.tar.gz")
    assert download.path is None  # streamed from the store, not from a local disk
    archive = tmp_path / "adapter.tar.gz"
    archive.write_bytes(b"".join(download.chunks))
    assert archive.stat().st_size == download.size
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["adapter", "adapter/adapter_config.json",
                                          "adapter/adapter_model.safetensors"]
    # Built once, then kept in the store beside the job's files.
    assert remote.key("jobs", "job-2", "adapter.tar.gz") in remote.list_keys(
        remote.key("jobs", "job-2") + "/")
    assert remote.loss_plot("job-2") == b"\x89PNG fake"
    with pytest.raises(FileNotFoundError):
        remote.loss_plot("job-none")


def test_a_store_that_cannot_be_used_says_why(s3_server: S3Server, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ArtifactStoreError, match="'nobucket'.*does it exist"):
        ObjectArtifactStore("s3://nobucket/x", client=s3_server.client()).check()
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    bucket = s3_server.bucket(f"objects-{next(_BUCKETS)}")
    open_artifacts(bucket).check()  # credentials and endpoint from the AWS_* variables
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-key-at-all")
    with pytest.raises(ArtifactStoreError, match="AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"):
        open_artifacts(bucket).check()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ArtifactStoreError, match="AWS_ENDPOINT_URL"):
        open_artifacts(bucket).check()
    with pytest.raises(ArtifactStoreError, match="use s3://bucket/prefix"):
        open_artifacts("gs://bucket")
    with pytest.raises(ArtifactStoreError, match="names no bucket"):
        open_artifacts("s3:///prefix")
    assert isinstance(open_artifacts(str(tmp_path)), LocalArtifactStore)
