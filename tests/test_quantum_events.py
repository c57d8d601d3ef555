"""Progress during quantum work: every primitive job is announced when it is submitted
(size, Runtime job id) and again when its result is in (duration), so a long job on a
device never looks like a hang. Order of events only; no clocks."""

from __future__ import annotations

import json
from typing import Any

import pytest

from qpa.estimate import describe_quantum_job
from qpa.training import Trainer
from tests.helpers import tiny_config


@pytest.mark.parametrize("backend", ["ibm-fake:FakeManilaV2", "aer"])
def test_job_submitted_event_precedes_its_result(backend: str, tiny_llama_dir, data_files,
                                                 tmp_path) -> None:
    seen: list[dict[str, Any]] = []
    usage_at_event: list[int] = []

    def sink(event: dict[str, Any]) -> None:
        seen.append(event)
        if event["type"] == "quantum_job":
            # How many results the backend had taken in when the event was sent.
            usage_at_event.append(trainer.method.backend.usage.jobs)

    quantum = {"shots": 32, "seed": 1} if backend != "aer" else {"shots": 32}
    config = tiny_config(tiny_llama_dir, data_files, backend=backend, steps=3,
                         qpa={"chunk_size": 64, "update_every": 2}, quantum=quantum)
    trainer = Trainer(config, tmp_path, on_event=sink)
    metrics = trainer.run()

    jobs = [(event, usage) for event, usage in
            zip([e for e in seen if e["type"] == "quantum_job"], usage_at_event, strict=True)]
    submitted = [event for event, _ in jobs if event["phase"] == "submitted"]
    assert len(submitted) == metrics["quantum"]["jobs"] == 2
    plan = next(e for e in seen if e["type"] == "quantum_plan")
    for number, (event, usage) in enumerate(jobs):
        job = number // 2 + 1
        assert event["job"] == job and event["planned_jobs"] == plan["jobs"] == 2
        if number % 2 == 0:
            # Announced before the result: the backend has not yet recorded this job.
            assert event["phase"] == "submitted" and usage == job - 1
            assert event["circuits"] > 0 and event["shots"] == event["circuits"] * 32
            assert event["shots_per_circuit"] == 32 and event["backend"] == backend
            if backend.startswith("ibm-fake:"):
                assert event["runtime_job_id"]  # local testing mode's job id
            else:
                assert event["runtime_job_id"] is None  # Aer has no Runtime job
        else:
            assert event["phase"] == "done" and usage == job and "seconds" in event
    assert sum(e["circuits"] for e in submitted) == metrics["quantum"]["circuits"]
    # What `qpa finetune` and `qpa jobs watch` print for them.
    assert describe_quantum_job(submitted[0]).startswith(
        f"quantum job 1/2 submitted: {submitted[0]['circuits']} circuits x 32 shots on "
        f"{backend}")
    assert describe_quantum_job(jobs[1][0]).startswith("quantum job 1/2 done in ")
    # The first job runs before training starts; it is announced, not hidden behind
    # the "loading base model" status.
    kinds = [e["type"] for e in seen]
    assert kinds.index("quantum_plan") < kinds.index("quantum_job") < kinds.index("step")
    # The same events are in the job's events.jsonl (what the service stores and streams).
    logged = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e for e in logged if e["type"] == "quantum_job"] == [e for e, _ in jobs]


def test_statevector_runs_announce_no_primitive_jobs(tiny_llama_dir, data_files,
                                                     tmp_path) -> None:
    seen: list[dict[str, Any]] = []
    config = tiny_config(tiny_llama_dir, data_files, steps=2)
    metrics = Trainer(config, tmp_path, on_event=seen.append).run()
    assert metrics["quantum"]["jobs"] >= 1  # torch evaluations are counted ...
    assert not [e for e in seen if e["type"] == "quantum_job"]  # ... but are not jobs
    plan = next(e for e in seen if e["type"] == "quantum_plan")
    assert plan["jobs"] == metrics["quantum"]["jobs"] and plan["qpu_seconds"] is None
