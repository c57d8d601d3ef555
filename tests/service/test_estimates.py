"""POST /v1/estimates and the QPU-seconds check at job submission (issue 15).

Over real HTTP on the shared stack (ibm-fake backends allowed): the estimate of a job body,
and a job refused with 422 naming ``quantum.max_seconds`` when its estimate exceeds it.
The server's cap (QPA_MAX_QUANTUM_SECONDS) is checked in-process on an app of its own.
"""

from __future__ import annotations

from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from api.main import create_app
from services import store
from services.settings import Settings

from .helpers import job_config


def test_estimate_of_a_job_body(http: httpx.Client, train_id: str, tiny_llama_dir: Path
                                ) -> None:
    body = job_config(tiny_llama_dir, train_id, backend="ibm-fake:FakeManilaV2",
                      quantum={"shots": 128})
    before = len(http.get("/v1/jobs", params={"limit": 100}).json()["data"])
    response = http.post("/v1/estimates", json=body)
    assert response.status_code == 200, response.text
    estimate = response.json()
    # 448 values in chunks of 64: 3 qubits, depth 1: 3 angles, 1 + 2 x 3 bindings per job;
    # one gradient job per step (update_every 1) for 6 steps.
    assert estimate["object"] == "estimate" and estimate["num_qubits"] == 3
    assert (estimate["jobs"], estimate["circuits"], estimate["shots"]) == (6, 42, 42 * 128)
    assert estimate["qpu_seconds"] > 0 and estimate["over_budget"] is False
    assert estimate["isa_depth"] >= estimate["logical_depth"]
    # Nothing was created: the estimate is not a job.
    assert len(http.get("/v1/jobs", params={"limit": 100}).json()["data"]) == before


def test_estimate_errors_name_the_field(http: httpx.Client, train_id: str,
                                        tiny_llama_dir: Path) -> None:
    body = job_config(tiny_llama_dir, train_id)
    for bad, field in (({"method": "lora"}, "method"), ({"train_file": "file-nope"},
                                                        "train_file"),
                       ({"backend": "aer"}, "backend")):  # aer: not allowed on this server
        response = http.post("/v1/estimates", json={**body, **bad})
        assert response.status_code in (404, 422), response.text
        assert response.json()["field"] == field, response.json()


def test_job_over_its_max_seconds_is_refused_at_submission(http: httpx.Client, train_id: str,
                                                           tiny_llama_dir: Path) -> None:
    body = job_config(tiny_llama_dir, train_id, backend="ibm-fake:FakeManilaV2")
    estimate = http.post("/v1/estimates", json=body).json()
    body["quantum"] = {"max_seconds": estimate["qpu_seconds"] / 2}
    before = len(http.get("/v1/jobs", params={"limit": 100}).json()["data"])
    response = http.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["field"] == "quantum.max_seconds"
    assert "QPU seconds" in error["detail"] and "6 jobs" in error["detail"]
    assert len(http.get("/v1/jobs", params={"limit": 100}).json()["data"]) == before
    body["quantum"] = {"max_seconds": estimate["qpu_seconds"] * 2}
    assert http.post("/v1/estimates", json=body).json()["over_budget"] is False


def test_server_cap_applies_to_the_estimate(tmp_path: Path, data_files, tiny_llama_dir: Path
                                            ) -> None:
    settings = Settings(_env_file=None, home=tmp_path, max_quantum_seconds=0.5,
                        broker_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings)) as api:
        db = api.app.state.store
        with db.session() as session:
            _, key = store.create_api_key(session, "cap")
        headers = {"Authorization": f"Bearer {key}"}
        with data_files[0].open("rb") as handle:
            train = api.post("/v1/files", files={"file": ("t.jsonl", handle)}, headers=headers)
        body = job_config(tiny_llama_dir, train.json()["id"], backend="ibm-fake:FakeManilaV2")
        estimate = api.post("/v1/estimates", json=body, headers=headers).json()
        assert estimate["max_seconds"] == 0.5 and estimate["over_budget"] is True
        refused = api.post("/v1/jobs", json=body, headers=headers)
        assert refused.status_code == 422
        assert refused.json()["field"] == "quantum.max_seconds"
        assert "QPA_MAX_QUANTUM_SECONDS" in refused.json()["detail"]


def test_quantum_jobs_reach_the_event_stream(client, train_id: str, tiny_llama_dir: Path
                                             ) -> None:
    """The worker stores every quantum_job event; SSE delivers a job's `submitted` (with
    its size and Runtime job id) before its `done`, and before the step it serves."""
    body = job_config(tiny_llama_dir, train_id, backend="ibm-fake:FakeManilaV2", steps=2,
                      quantum={"shots": 64, "seed": 0})
    job = client.create_job(body)
    events = list(client.stream_events(job["id"]))  # until the job ends
    kinds = [(event["type"], event["data"].get("phase")) for event in events]
    assert ("quantum_job", "submitted") in kinds, kinds
    first = kinds.index(("quantum_job", "submitted"))
    assert first < kinds.index(("quantum_job", "done")) < kinds.index(("step", None))
    submitted = events[first]["data"]
    assert submitted["circuits"] == 7 and submitted["shots"] == 7 * 64
    assert submitted["runtime_job_id"] and submitted["planned_jobs"] == 2
    assert client.get_job(job["id"])["status"] == "succeeded"
