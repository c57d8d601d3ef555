"""A worker set to QPA_WORKER_NPROC=2 runs a stored job on two processes (real gloo group,
real job runner and SQLite store), and the job object reports the world size."""

from __future__ import annotations

import math

import pydantic
import pytest

from api.schemas import JobObject
from services import store
from services.runner import open_artifacts, run_job
from services.settings import Settings

from .helpers import job_config


def test_worker_runs_a_job_on_two_processes(tmp_path, tiny_llama_dir, data_files):
    settings = Settings(_env_file=None, home=tmp_path,
                        database_url=f"sqlite:///{tmp_path / 'qpa.db'}",
                        artifact_dir=tmp_path / "artifacts", worker_nproc=2)
    db = store.get_store(settings.resolved_database_url)
    artifacts = open_artifacts(settings)
    with db.session() as session:
        key, _ = store.create_api_key(session, "dp")
        file_ids = []
        for path in data_files:
            file_id = store.new_id("file")
            with path.open("rb") as source:
                size, records = artifacts.save_upload(file_id, source, 10**8)
            store.create_file(session, file_id=file_id, owner_id=key.id, filename=path.name,
                              size=size, records=records)
            file_ids.append(file_id)
        config = job_config(tiny_llama_dir, *file_ids, steps=3, backend="aer",
                            qpa={"chunk_size": 64, "depth": 1, "mlp_hidden": [8],
                                 "update_every": 2})
        job_id = store.create_job(session, owner_id=key.id, config=config).id

    assert run_job(job_id, settings) == "succeeded"

    with db.session() as session:
        job = JobObject.of(store.get_job(session, job_id))
        events, _ = store.list_events(session, job_id, limit=1000)
    assert job.world_size == 2
    assert job.metrics["world_size"] == 2
    assert job.quantum.jobs == job.metrics["quantum"]["jobs"] == math.ceil(3 / 2)
    assert any("with 2 processes" in (e.data.get("message") or "") for e in events)
    # Rank 0 alone reported progress: one step event per step.
    assert [e.data["step"] for e in events if e.type == "step"] == [1, 2, 3]


def test_worker_setting_must_be_positive():
    with pytest.raises(pydantic.ValidationError, match="worker_nproc"):
        Settings(_env_file=None, worker_nproc=0)
