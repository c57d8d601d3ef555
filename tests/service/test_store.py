"""The job store's lease rules, events and one-query reads on SQLite and on a real
PostgreSQL server; the upload validator on a local folder and on a real S3 server;
settings parsing."""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from qpa.errors import ConfigError
from services import store
from services.artifacts import (
    ArtifactStore,
    LocalArtifactStore,
    ObjectArtifactStore,
    UploadTooLarge,
)
from services.runner import _json_safe
from services.settings import Settings

_DATABASES = itertools.count()
_BUCKETS = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[store.Store]:
    """A migrated, empty store: a SQLite file, or a new database on the test PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'qpa.db'}"
    else:
        url = request.getfixturevalue("postgres_server").database(
            f"store_{next(_DATABASES)}")
    database = store.Store(url)
    yield database
    database.dispose()


@pytest.fixture(params=["local", "s3"])
def artifacts(request: pytest.FixtureRequest,
              tmp_path: Path) -> tuple[ArtifactStore, Callable[[], list[str]]]:
    """An artifact store (a folder, or a new bucket on the test S3 server) and a function
    listing the uploads it holds."""
    if request.param == "local":
        local = LocalArtifactStore(tmp_path)
        return local, lambda: sorted(path.name for path in (tmp_path / "files").iterdir())
    server = request.getfixturevalue("s3_server")
    url = server.bucket(f"store-{next(_BUCKETS)}") + "/prefix"
    remote = ObjectArtifactStore(url, client=server.client())
    return remote, lambda: sorted(key.rsplit("/", 1)[1]
                                  for key in remote.list_keys(remote.key("files") + "/"))


def _job(db: store.Store) -> tuple[str, str]:
    with db.session() as session:
        key, _ = store.create_api_key(session, "t")
        job = store.create_job(session, owner_id=key.id, config={
            "method": "qpa", "backend": "statevector", "base_model": "m", "steps": 5})
        return key.id, job.id


def test_keys_are_stored_hashed(db: store.Store) -> None:
    with db.session() as session:
        row, plaintext = store.create_api_key(session, "alice")
    assert plaintext.startswith("qpa_") and len(plaintext) > 40
    assert row.key_hash != plaintext and plaintext not in row.key_hash
    with db.session() as session:
        assert store.find_api_key(session, plaintext).id == row.id
        assert store.find_api_key(session, plaintext + "x") is None


def test_only_one_worker_gets_the_lease(db: store.Store) -> None:
    _, job_id = _job(db)
    with db.session() as session:
        assert store.acquire_lease(session, job_id, "a", lease_seconds=60) is not None
    with db.session() as session:
        # A redelivered duplicate while the holder (this live process) heartbeats: skipped.
        assert store.acquire_lease(session, job_id, "b", lease_seconds=60) is None
        assert store.renew_lease(session, job_id, "a")
        assert not store.renew_lease(session, job_id, "b")
        assert store.requeue_dead_jobs(session, lease_seconds=60) == []


def test_stale_heartbeat_requeues_and_lets_another_worker_take_over(db: store.Store) -> None:
    _, job_id = _job(db)
    with db.session() as session:
        store.acquire_lease(session, job_id, "a", lease_seconds=60)
        job = store.get_job(session, job_id)
        job.heartbeat_at = store.utcnow() - timedelta(seconds=120)
        job.lease_host = "another-machine"
        job.checkpoint_step = 4
    with db.session() as session:
        assert store.requeue_dead_jobs(session, lease_seconds=60) == [(job_id, "cpu")]
        # A second reaper racing the first finds nothing to do.
        assert store.requeue_dead_jobs(session, lease_seconds=60) == []
        job = store.get_job(session, job_id)
        assert job.status == "queued" and job.lease_owner is None
        events, _ = store.list_events(session, job_id)
        assert "resumes from the checkpoint at step 4" in events[-1].data["message"]
    with db.session() as session:
        job = store.acquire_lease(session, job_id, "b", lease_seconds=60)
        assert job is not None and job.attempts == 2 and job.status == "running"
    with db.session() as session:
        # The old holder, back from a pause, can no longer write.
        assert not store.update_leased_job(session, job_id, "a", step=1)
        assert store.update_leased_job(session, job_id, "b", step=5)


def test_lease_of_a_dead_process_on_this_host_is_dead_at_once(db: store.Store) -> None:
    _, job_id = _job(db)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    with db.session() as session:
        store.acquire_lease(session, job_id, "a", lease_seconds=60)
        job = store.get_job(session, job_id)
        job.lease_pid = int(finished.stdout)  # fresh heartbeat, but the process is gone
    with db.session() as session:
        assert store.requeue_dead_jobs(session, lease_seconds=60) == [(job_id, "cpu")]


def test_cancel_of_queued_job_is_immediate(db: store.Store) -> None:
    owner, job_id = _job(db)
    with db.session() as session:
        job = store.request_cancel(session, store.get_job(session, job_id, owner))
        assert job.status == "cancelled" and job.cancel_requested
    with db.session() as session:
        assert store.acquire_lease(session, job_id, "a", lease_seconds=60) is None


def test_jobs_are_private_and_paginated(db: store.Store) -> None:
    owner, first = _job(db)
    with db.session() as session:
        other, _ = store.create_api_key(session, "other")
        ids = [store.create_job(session, owner_id=owner, config={
            "method": "qpa", "backend": "statevector", "base_model": "m", "steps": 1}).id
            for _ in range(3)]
    with db.session() as session:
        assert store.get_job(session, first, other.id) is None
        page, more = store.list_jobs(session, owner, limit=2)
        assert [job.id for job in page] == [ids[2], ids[1]] and more
        page, more = store.list_jobs(session, owner, limit=2, after=ids[1])
        assert [job.id for job in page] == [ids[0], first] and not more
        assert store.list_jobs(session, other.id, limit=2, after=ids[1]) is None


@pytest.mark.parametrize(("content", "message"), [
    (b'{"text": "a"}\n{"text": "b"\n', "line 2"),
    (b'{"text": "a"}\n\n[1, 2]\n', "line 3"),
    (b'{"prompt": "a"}\n', "line 1"),
    (b'\xff\xfe\n', "line 1"),
    (b"", "no records"),
    (b'{"text": "a"}\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n", "line 2: JSON nested"),
])
def test_upload_validation_names_the_line(
        artifacts: tuple[ArtifactStore, Callable[[], list[str]]], tmp_path: Path,
        content: bytes, message: str) -> None:
    kept, uploads = artifacts
    with pytest.raises(ConfigError) as caught:
        kept.save_upload("file-x", io.BytesIO(content), max_bytes=1_000_000)
    assert caught.value.field == "file" and message in caught.value.reason
    assert str(tmp_path) not in caught.value.reason and ".part" not in caught.value.reason
    assert uploads() == []


def test_upload_size_limit_and_success(
        artifacts: tuple[ArtifactStore, Callable[[], list[str]]], tmp_path: Path) -> None:
    kept, uploads = artifacts
    lines = b"".join(json.dumps({"text": f"record {i}"}).encode() + b"\n" for i in range(50))
    with pytest.raises(UploadTooLarge):
        kept.save_upload("file-big", io.BytesIO(lines), max_bytes=100)
    assert uploads() == []
    size, records = kept.save_upload("file-ok", io.BytesIO(lines), max_bytes=10_000)
    assert (size, records) == (len(lines), 50)
    assert uploads() == ["file-ok.jsonl"]
    # What a worker reads: the same bytes, in its own scratch folder when remote.
    assert kept.upload_path("file-ok", tmp_path / "scratch").read_bytes() == lines
    with pytest.raises(FileNotFoundError):
        kept.upload_path("file-gone", tmp_path / "scratch")


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QPA_HOME", str(tmp_path))
    monkeypatch.setenv("QPA_ALLOWED_BACKENDS", "statevector, ibm-fake:*")
    monkeypatch.setenv("QPA_MAX_QUBITS", "7")
    settings = Settings(_env_file=None)
    assert settings.allowed_backends == ["statevector", "ibm-fake:*"]
    assert settings.backend_allowed("ibm-fake:FakeManilaV2")
    assert not settings.backend_allowed("aer")
    assert settings.max_qubits == 7
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'qpa.db'}"
    assert settings.resolved_artifact_url == str(tmp_path / "artifacts")
    monkeypatch.setenv("QPA_ARTIFACT_URL", "s3://bucket/some/prefix")
    monkeypatch.setenv("QPA_WORKER_RESOURCES", "gpu, cpu")
    settings = Settings(_env_file=None)
    assert settings.resolved_artifact_url == "s3://bucket/some/prefix"
    assert settings.worker_queues == [settings.gpu_queue, settings.queue]
    monkeypatch.setenv("QPA_WORKER_RESOURCES", "tpu")
    with pytest.raises(ValueError, match="worker_resources"):
        Settings(_env_file=None)


def test_events_are_made_json_safe() -> None:
    import numpy as np

    event = {"loss": float("nan"), "step": np.int64(3), "lr": np.float32(0.5),
             "nested": [{"x": float("inf")}]}
    assert _json_safe(event) == {"loss": None, "step": 3, "lr": 0.5, "nested": [{"x": None}]}
    json.dumps(_json_safe(event), allow_nan=False)


def test_a_database_from_before_migrations_is_upgraded(tmp_path: Path) -> None:
    """A database made by create_all before Alembic (no version table, no key lifecycle
    columns) is stamped and upgraded; its keys keep working and can now be revoked."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, inspect, text

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    config = Config()
    config.set_main_option("script_location", str(store.MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, store.FIRST_REVISION)
        connection.execute(text("DROP TABLE alembic_version"))
        connection.execute(text(
            "INSERT INTO api_keys (id, name, key_hash, prefix, created_at) VALUES "
            "('key-0123456789abcdef01234567', 'old', :hash, 'qpa_old', '2026-01-01')"),
            {"hash": store.hash_key("qpa_old-key")})
    assert "revoked_at" not in {column["name"] for column in inspect(engine).get_columns(
        "api_keys")}
    engine.dispose()

    db = store.Store(url)
    with db.session() as session:
        key = store.find_api_key(session, "qpa_old-key")
        assert key is not None and key.state(store.utcnow()) == "active"
        store.revoke_api_key(session, key)
    with db.session() as session:
        assert store.find_api_key(session, "qpa_old-key").state(store.utcnow()) == "revoked"
        version = session.execute(text("SELECT version_num FROM alembic_version")).scalar()
    db.dispose()
    assert version == store.head_revision()
    store.Store(url).dispose()  # at head: nothing to do, no error


def test_ids_are_checked_before_the_database_sees_them(db: store.Store) -> None:
    owner, job_id = _job(db)
    assert store.is_id(job_id, "job") and not store.is_id(job_id, "file")
    with db.session() as session:
        for bad in ("job-nope", job_id + "\x00", job_id.upper(), "job-" + "0" * 10_000, ""):
            assert store.get_job(session, bad, owner) is None
            assert store.get_file(session, bad.replace("job", "file"), owner) is None
        assert store.list_jobs(session, owner, limit=1, after=job_id + "\x00") is None


def test_pid_alive() -> None:
    assert store.pid_alive(os.getpid())


def test_migrations_build_exactly_the_models_schema(db: store.Store) -> None:
    """Every column the models declare comes from a revision (none is missing or extra)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with db.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), store.Base.metadata) == []


def test_events_notify_after_commit_and_read_in_order(tmp_path: Path, db: store.Store) -> None:
    """The notify hook fires once per commit that added events (never for a rollback),
    and the streams' reads see the events in id order after any cursor."""
    notified: list[set[str]] = []
    with db.session() as session:
        key, _ = store.create_api_key(session, "t")
    watched = store.Store(db.url, notify=notified.append)
    try:
        with watched.session() as session:
            job = store.create_job(session, owner_id=key.id, config={
                "method": "qpa", "backend": "statevector", "base_model": "m", "steps": 5})
        assert notified == []  # nobody can watch a job whose id was not answered yet
        with watched.session() as session:
            for step in (1, 2, 3):
                store.add_event(session, job.id, {"type": "step", "step": step})
        assert notified == [{job.id}]
        with pytest.raises(RuntimeError), watched.session() as session:
            store.add_event(session, job.id, {"type": "step", "step": 99})
            raise RuntimeError("rolled back")
        with watched.session() as session:
            store.add_event(session, job.id, {"type": "step", "step": 4})
        assert notified == [{job.id}, {job.id}]
        with watched.reader() as connection:
            rows = store.events_after(connection, job.id, 0, 100)
            assert [row.data.get("step") for row in rows] == [None, 1, 2, 3, 4]
            assert [row.seq for row in rows] == sorted(row.seq for row in rows)
            assert store.last_event_id(connection, job.id) == rows[-1].seq
            later = store.events_after(connection, job.id, rows[1].seq, 2)
            assert [row.data["step"] for row in later] == [2, 3]
            assert store.job_status(connection, job.id) == "queued"
            assert store.last_event_id(connection, "job-" + "0" * 24) == 0
    finally:
        watched.dispose()


def test_status_read_checks_key_and_owner_in_one_query(db: store.Store) -> None:
    owner, job_id = _job(db)
    with db.session() as session:
        other, other_plain = store.create_api_key(session, "other")
        mine = session.get(store.ApiKey, owner)
        mine.key_hash = store.hash_key("qpa_mine")  # a plaintext this test knows
    with db.reader() as connection:
        row = store.read_job_as(connection, "qpa_mine", job_id)
        assert (row.key_id, row.id, row.status, row.resource_class) == (
            owner, job_id, "queued", "cpu")
        assert store.read_job_as(connection, "qpa_unknown", job_id) is None
        # Another key's job reads as absent (id None), its key still checked.
        row = store.read_job_as(connection, other_plain, job_id)
        assert (row.key_id, row.id) == (other.id, None)
        assert store.read_job_as(connection, "qpa_mine", "job-nope").id is None
    with db.session() as session:
        store.revoke_api_key(session, session.get(store.ApiKey, owner))
    with db.reader() as connection:
        row = store.read_job_as(connection, "qpa_mine", job_id)
        assert "was revoked" in store.key_problem(row.key_id, row.key_revoked_at,
                                                  row.key_expires_at, store.utcnow())


def test_an_unusable_default_backend_refuses_quantum_jobs_only(db: store.Store,
                                                                tmp_path: Path) -> None:
    """The server's default backend matters to quantum methods only; a backend a job names
    itself is checked whatever the method."""
    from qpa.config import parse_config
    from services.jobs import prepare_config

    settings = Settings(home=tmp_path, default_backend="aer", allowed_backends=["statevector"])
    with db.session() as session:
        key, _ = store.create_api_key(session, "t")
        file_id = store.new_id("file")
        store.create_file(session, file_id=file_id, owner_id=key.id, filename="t.jsonl",
                          size=10, records=1)

        def prepare(**fields: str) -> dict:
            return prepare_config(session, settings, key.id,
                                  parse_config({"train_file": file_id, **fields}))

        assert prepare(method="lora")["backend"] == "aer"  # recorded, never used
        for fields in ({"method": "qpa"}, {"method": "lora", "backend": "aer"}):
            with pytest.raises(ConfigError) as caught:
                prepare(**fields)
            assert caught.value.field == "backend" and "not allowed" in caught.value.reason
        assert prepare(method="qpa", backend="statevector")["backend"] == "statevector"
