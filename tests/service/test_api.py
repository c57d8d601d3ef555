"""The REST contract over real HTTP: auth, 4xx errors with a detail naming the problem
(never 5xx), cross-key isolation, backends, health, metrics, docs."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from .helpers import HANG_GUARD, TERMINAL, ServiceStack, job_config, wait_until


def _error(response: httpx.Response, status: int, *words: str, field: str | None = None
           ) -> str:
    """Assert the one error shape: JSON ``{"detail": str, "field": str | None}``."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json", response.headers
    body = response.json()
    detail = body["detail"]
    assert isinstance(detail, str) and "field" in body, body
    for word in words:
        assert word in detail, (word, detail)
    if field is not None:
        assert body["field"] == field, body
    return detail


@pytest.fixture(scope="module")
def finished_job(http: httpx.Client, train_id: str, tiny_llama_dir: Path) -> str:
    """A job of this key that has ended and has events: cancelled while queued, or, when an
    idle worker took it first, cancelled at its next step (or finished: 1 step)."""
    job = http.post("/v1/jobs", json=job_config(tiny_llama_dir, train_id, steps=1)).json()
    cancel = http.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancel.status_code in (200, 409), cancel.text  # 409: it already succeeded

    def ended() -> str | None:
        status = http.get(f"/v1/jobs/{job['id']}").json()["status"]
        return status if status in TERMINAL else None

    wait_until(ended, HANG_GUARD, f"job {job['id']} to end")
    return job["id"]


def test_health_and_docs_need_no_key(stack: ServiceStack) -> None:
    health = httpx.get(f"{stack.url}/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "database": "ok", "broker": "ok"}
    assert httpx.get(f"{stack.url}/docs").status_code == 200
    paths = httpx.get(f"{stack.url}/openapi.json").json()["paths"]
    for path in ("/v1/files", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events",
                 "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/adapter",
                 "/v1/jobs/{job_id}/plot", "/v1/backends",
                 "/v1/keys"):
        assert path in paths


def test_openapi_is_the_contract(stack: ServiceStack) -> None:
    """Finding 5: the job body was an untyped dict, 401/400 were undocumented, and 422
    was declared as FastAPI's default (`detail` an array) while the service answers
    `{"detail": str, "field": ...}`. (The fuzz test checks the answers against it.)"""
    document = httpx.get(f"{stack.url}/openapi.json").json()
    body = document["paths"]["/v1/jobs"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"].endswith("/JobConfig")
    job_config_schema = document["components"]["schemas"]["JobConfig"]
    assert "train_file" in job_config_schema["required"]
    assert job_config_schema["additionalProperties"] is False
    error_ref = "#/components/schemas/ErrorResponse"
    authenticated = 0
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            for code, response in responses.items():
                if code.startswith("4"):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": error_ref}, (method, path, code, schema)
            if path in ("/healthz",):
                continue
            authenticated += 1
            assert "401" in responses, (method, path)
            assert operation["security"] == [{"HTTPBearer": []}], (method, path)
    assert authenticated >= 13
    for path, code in [("/v1/files", "400"), ("/v1/files", "413"), ("/v1/jobs", "400"),
                       ("/v1/jobs", "413"), ("/v1/jobs", "422")]:
        assert code in document["paths"][path]["post"]["responses"], (path, code)
    assert "HTTPValidationError" not in document["components"]["schemas"]
    events = document["paths"]["/v1/jobs/{job_id}/events"]["get"]
    cursor = {parameter["name"]: parameter["schema"] for parameter in events["parameters"]}
    assert cursor["after"]["maximum"] == cursor["Last-Event-ID"]["maximum"] == 2**63 - 1
    assert cursor["Last-Event-ID"]["type"] == "integer"  # not integer-or-null


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer qpa_not-a-key"},
                                     {"Authorization": "Basic abc"}])
def test_calls_need_a_valid_key(stack: ServiceStack, headers: dict[str, str]) -> None:
    for method, path in [("GET", "/v1/jobs"), ("GET", "/v1/backends"), ("GET", "/metrics"),
                         ("POST", "/v1/jobs"), ("GET", "/v1/jobs/job-x"), ("GET", "/v1/keys"),
                         ("DELETE", "/v1/keys")]:
        response = httpx.request(method, f"{stack.url}{path}", headers=headers)
        _error(response, 401, "key")
        assert response.headers["www-authenticate"] == "Bearer"


def test_framework_errors_have_the_same_shape(http: httpx.Client) -> None:
    _error(http.get("/v1/nothing-here"), 404)
    method_not_allowed = http.put("/v1/jobs")
    _error(method_not_allowed, 405)
    assert method_not_allowed.headers["allow"] == "GET, POST"


def test_upload_errors(http: httpx.Client) -> None:
    bad = b'{"text": "fine"}\n{"text": 3}\n'
    _error(http.post("/v1/files", files={"file": ("bad.jsonl", bad)}), 422, "line 2")
    garbage = b'{"text": "fine"}\nnot json at all\n'
    _error(http.post("/v1/files", files={"file": ("g.jsonl", garbage)}), 422, "line 2", "JSON")
    _error(http.post("/v1/files", files={"data": ("x.jsonl", b'{"text": "a"}\n')}), 422, "file")
    big = (json.dumps({"text": "x" * 1000}) + "\n").encode() * 300  # 300 kB > 200 kB limit
    _error(http.post("/v1/files", files={"file": ("big.jsonl", big)}), 413, "limit",
           field="file")
    _error(http.post("/v1/files", files={"file": ("empty.jsonl", b"")}), 422, "no records",
           field="file")


def test_upload_over_the_request_limit_is_a_json_413(http: httpx.Client) -> None:
    """Finding 3: the framework's own 413 (whole request over the limit) was plain text."""
    huge = (json.dumps({"text": "x" * 1000}) + "\n").encode() * 1500  # 1.5 MB
    _error(http.post("/v1/files", files={"file": ("huge.jsonl", huge)}), 413, "limit",
           field="body")

    def chunks():  # no Content-Length: the limit trips while the body streams in
        yield (b'--x\r\nContent-Disposition: form-data; name="file"; filename="s.jsonl"'
               b"\r\n\r\n")
        for _ in range(20):
            yield huge[:100_000]
        yield b"\r\n--x--\r\n"

    _error(http.post("/v1/files", content=chunks(),
                     headers={"Content-Type": "multipart/form-data; boundary=x"}),
           413, "limit", field="body")
    # A JSON body has its own, smaller limit.
    _error(http.post("/v1/jobs", content=b"[" + b"0," * 600_000 + b"0]",
                     headers={"Content-Type": "application/json"}), 413, field="body")


def test_deeply_nested_jsonl_line_is_a_422(http: httpx.Client) -> None:
    """Finding 2: a line of 100,000 '[' then 100,000 ']' was a RecursionError (500).
    (50,000 of each here: the stack's upload limit is 200 kB.)"""
    deep = b'{"text": "fine"}\n' + b"[" * 50_000 + b"]" * 50_000 + b"\n"
    _error(http.post("/v1/files", files={"file": ("deep.jsonl", deep)}), 422, "line 2",
           "nested", field="file")


def test_deeply_nested_job_body_names_the_field(http: httpx.Client, train_id: str,
                                                tiny_llama_dir: Path) -> None:
    """Finding 4: a body nested 5,000 deep inside `lora` was a bare 400 naming nothing."""
    good = json.dumps(job_config(tiny_llama_dir, train_id))
    deep = good[:-1] + ', "lora": {"r": ' + "[" * 5000 + "]" * 5000 + "}}"
    response = http.post("/v1/jobs", content=deep, headers={"Content-Type": "application/json"})
    _error(response, 422, "lora.r", "nested", field="lora.r")
    multipart_garbage = http.post("/v1/files", content=b"--x\r\nnonsense",
                                  headers={"Content-Type": "multipart/form-data"})
    _error(multipart_garbage, 400, field="body")
    not_utf8 = http.post("/v1/jobs", content=b'{"base_model": "\xff"}',
                         headers={"Content-Type": "application/json"})
    _error(not_utf8, 422, "UTF-8", field="body")


@pytest.mark.parametrize("huge", [2**63, 2**64, 10**30])
def test_event_cursors_are_bounded(http: httpx.Client, finished_job: str, huge: int) -> None:
    """Finding 1: `after` above 2^63 was a 500 (SQLite OverflowError); as Last-Event-ID or
    with stream=true the response started 200 and dropped mid-stream."""
    events = f"/v1/jobs/{finished_job}/events"
    _error(http.get(events, params={"after": huge}), 422, "after", field="after")
    _error(http.get(events, params={"after": huge, "stream": "true"}), 422, field="after")
    _error(http.get(events, params={"stream": "true"}, headers={"Last-Event-ID": str(huge)}),
           422, field="Last-Event-ID")
    _error(http.get(events, params={"stream": "true"}, headers={"Last-Event-ID": "null"}),
           422, field="Last-Event-ID")
    # The largest allowed cursor is a valid (empty) page and an immediately ending stream.
    top = 2**63 - 1
    assert http.get(events, params={"after": top}).json()["data"] == []
    streamed = http.get(events, params={"stream": "true"}, headers={"Last-Event-ID": str(top)})
    assert streamed.status_code == 200 and streamed.text.startswith("event: end")


def test_job_body_errors(http: httpx.Client, train_id: str, tiny_llama_dir: Path) -> None:
    good = job_config(tiny_llama_dir, train_id)
    malformed = http.post("/v1/jobs", content=b'{"method": "qpa",',
                          headers={"Content-Type": "application/json"})
    _error(malformed, 422, "JSON", field="body")
    _error(http.post("/v1/jobs", json=[1, 2]), 422)
    _error(http.post("/v1/jobs", json={}), 422, "train_file: is required", field="train_file")
    _error(http.post("/v1/jobs", json={**good, "steps": "many"}), 422, "steps", field="steps")
    _error(http.post("/v1/jobs", json={**good, "stepz": 3}), 422,
           "stepz: is not a known config key", field="stepz")
    _error(http.post("/v1/jobs", json={**good, "train": {"lr": -1}}), 422, "train.lr",
           field="train.lr")
    _error(http.post("/v1/jobs", json={**good, "base_model": "m" * 501}), 422,
           field="base_model")
    _error(http.post("/v1/jobs", json={**good, "backend": "quantum-magic"}), 422, "backend")
    _error(http.post("/v1/jobs", json={**good, "backend": "ibm-fake:FakeNothing"}), 422,
           "backend")
    # Valid names this server does not allow (QPA_ALLOWED_BACKENDS).
    _error(http.post("/v1/jobs", json={**good, "backend": "aer"}), 422, "not allowed")
    _error(http.post("/v1/jobs", json={**good, "backend": "ibm:ibm_fez"}), 422, "backend")
    without_file = {key: value for key, value in good.items() if key != "train_file"}
    _error(http.post("/v1/jobs", json=without_file), 422, "train_file")
    _error(http.post("/v1/jobs", json={**good, "train_file": "file-nope"}), 404, "train_file")
    _error(http.post("/v1/jobs", json={**good, "eval_file": "file-nope"}), 404, "eval_file")


def test_unknown_ids_are_404(http: httpx.Client) -> None:
    for method, path in [("GET", "/v1/jobs/job-nope"), ("POST", "/v1/jobs/job-nope/cancel"),
                         ("GET", "/v1/jobs/job-nope/events"),
                         ("GET", "/v1/jobs/job-nope/events?stream=true"),
                         ("GET", "/v1/jobs/job-nope/adapter"), ("GET", "/v1/files/file-nope"),
                         ("GET", "/v1/jobs?after=job-nope"),
                         ("GET", "/v1/jobs/job-nope%00"), ("GET", "/v1/files/file-nope%00")]:
        _error(http.request(method, path), 404, "nope")
    _error(http.get("/v1/jobs/" + "job-" + "0" * 10_000), 404)
    _error(http.get("/v1/jobs", params={"limit": 0}), 422, "limit")
    _error(http.get("/v1/jobs", params={"status": "sleeping"}), 422, "status")
    _error(http.get("/v1/jobs/job-nope/events", params={"after": "x"}), 422, "after")


def test_another_key_sees_nothing(stack: ServiceStack, http: httpx.Client, train_id: str,
                                  tiny_llama_dir: Path) -> None:
    created = http.post("/v1/jobs", json=job_config(tiny_llama_dir, train_id, steps=1))
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    mallory = {"Authorization": f"Bearer {stack.new_key('mallory')}"}
    with httpx.Client(base_url=stack.url, headers=mallory, timeout=30) as other:
        for method, path in [("GET", f"/v1/jobs/{job_id}"), ("POST", f"/v1/jobs/{job_id}/cancel"),
                             ("GET", f"/v1/jobs/{job_id}/events"),
                             ("GET", f"/v1/jobs/{job_id}/adapter"),
                             ("GET", f"/v1/files/{train_id}")]:
            _error(other.request(method, path), 404)
        # Using someone else's upload is as if it did not exist.
        _error(other.post("/v1/jobs", json=job_config(tiny_llama_dir, train_id)), 404,
               "train_file")
        assert other.get("/v1/jobs").json()["data"] == []
        assert other.get("/v1/files").json()["data"] == []
    assert http.get(f"/v1/jobs/{job_id}").json()["status"] in (
        "queued", "running", "succeeded")
    assert any(item["id"] == train_id for item in http.get("/v1/files").json()["data"])


def test_job_list_pages(http: httpx.Client, train_id: str, tiny_llama_dir: Path) -> None:
    # Queued jobs are cancelled at once, so these never occupy the worker.
    ids = []
    for _ in range(3):
        job = http.post("/v1/jobs", json=job_config(tiny_llama_dir, train_id, steps=1)).json()
        http.post(f"/v1/jobs/{job['id']}/cancel")
        ids.append(job["id"])
    first = http.get("/v1/jobs", params={"limit": 2}).json()
    assert [job["id"] for job in first["data"]] == ids[::-1][:2] and first["has_more"]
    second = http.get("/v1/jobs", params={"limit": 2, "after": first["last_id"]}).json()
    assert second["data"][0]["id"] == ids[0]
    cancelled = http.get("/v1/jobs", params={"status": "cancelled", "limit": 100}).json()
    assert set(ids) <= {job["id"] for job in cancelled["data"]}
    events = http.get(f"/v1/jobs/{ids[0]}/events").json()
    assert [event["data"]["status"] for event in events["data"]] == ["queued", "cancelled"]
    page = http.get(f"/v1/jobs/{ids[0]}/events", params={"limit": 1}).json()
    assert page["has_more"] and page["last_id"] == events["data"][0]["id"]
    # The adapter of a job that did not succeed is a conflict, not a server error.
    _error(http.get(f"/v1/jobs/{ids[0]}/adapter"), 409, "cancelled")


def test_backends(http: httpx.Client) -> None:
    listing = http.get("/v1/backends").json()
    by_name = {item["name"]: item for item in listing["data"]}
    assert listing["default"] == "statevector"
    assert by_name["statevector"]["available"] and by_name["statevector"]["allowed"]
    assert by_name["ibm-fake:FakeManilaV2"]["available"]
    assert not by_name["aer"]["allowed"]
    ibm = by_name["ibm:ibm_fez"]
    assert ibm["kind"] == "ibm" and not ibm["available"] and ibm["reason"]


def test_metrics(http: httpx.Client) -> None:
    assert http.get("/v1/backends").status_code == 200
    assert http.get("/v1/jobs/does-not-exist").status_code == 404
    response = http.get("/metrics")
    assert response.status_code == 200
    text = response.text
    for name in ("qpa_jobs{status=\"queued\"}", "qpa_job_queue_wait_seconds_bucket",
                 "qpa_step_seconds_count", "qpa_http_requests_total"):
        assert name in text, name
    # Requests are counted by route template (not raw path) and by status.
    assert 'method="GET",route="/v1/backends",status="200"' in text
    assert 'method="GET",route="/v1/jobs/{job_id}",status="404"' in text
