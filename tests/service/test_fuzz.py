"""Property-based API test: schemathesis generates requests for every operation in the
OpenAPI document, valid and invalid, and sends them over HTTP with a valid key to the real
app (uvicorn, SQLite, Redis). Any 5xx, or any answer the document does not describe
(status, content type, headers, body schema), fails the test.

Bounded: ``FUZZ_EXAMPLES`` generated cases per operation (plus schemathesis's explicit
and coverage cases), no shrinking, no example database: about a minute on two cores.
Real ids are mixed into the generated ones, so requests reach past the 404 (an ended
job, so its event stream closes; an uploaded file; throwaway keys for DELETE /v1/keys).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from api.main import create_app
from services import store
from services.settings import Settings

from .helpers import FUZZ_OPERATIONS, FUZZ_STATS, ServiceStack

FUZZ_EXAMPLES = 100
# The key every request carries (schemathesis leaves it out, or spoils it, in the cases
# that test authentication); its row is written by the `fuzz_key` fixture.
FUZZ_KEY = store.KEY_PREFIX + secrets.token_urlsafe(32)
# Where the schema cannot say everything, "valid" data may still be refused with 422:
# an upload's lines must be training records, and a job's backend must be one this
# server allows and can reach. Those operations (and the estimate of a job body) accept
# 422 for schema-valid data.
CONTENT_RULES = ["2xx", "401", "404", "409", "422"]
# The document the app serves (checked against the served one below), built in-process
# so that pytest can collect one test per operation before any server runs.
OPENAPI = create_app(Settings(_env_file=None)).openapi()
schema = schemathesis.openapi.from_dict(OPENAPI, config=schemathesis.Config.from_dict({
    "auth": {"openapi": {"HTTPBearer": {"bearer": FUZZ_KEY}}},
    "generation": {"mode": "all", "max-examples": FUZZ_EXAMPLES, "no-shrink": True,
                   "database": "none"},
    "operations": [
        *({"include-method": "POST", "include-path": path,
           "checks": {"positive_data_acceptance": {"expected-statuses": CONTENT_RULES}}}
          for path in ("/v1/files", "/v1/jobs", "/v1/estimates")),
        # Undeclared query parameters are ignored by design (SERVICE.md), so an extra one
        # is not invalid input. (Only GETs take query parameters; bodies keep the check:
        # a job body with an unknown key must be refused.)
        {"include-method": "GET", "generation": {"allow-extra-parameters": False}},
    ],
}))
REAL: dict[str, str] = {}


@pytest.fixture(scope="module")
def fuzz_stack(redis_server: str, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[ServiceStack]:
    """API only, no worker: a job the fuzzer manages to create just stays queued."""
    service = ServiceStack(tmp_path_factory.mktemp("fuzz"), redis_server, 2)
    try:
        service.start_api()
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def fuzz_key(fuzz_stack: ServiceStack, data_files: tuple[Path, Path]) -> str:
    db = store.Store(fuzz_stack.database_url)
    with db.session() as session:
        session.add(store.ApiKey(id=store.new_id("key"), name="fuzz", prefix=FUZZ_KEY[:8],
                                 key_hash=store.hash_key(FUZZ_KEY)))
    db.dispose()
    with fuzz_stack.client(FUZZ_KEY) as client:
        REAL["file_id"] = client.upload_file(data_files[0])["id"]
        job = client.create_job({"train_file": REAL["file_id"], "steps": 1})
        REAL["job_id"] = client.cancel_job(job["id"])["id"]  # ended: its stream closes
    return FUZZ_KEY


def _unrevoke(stack: ServiceStack, key: str) -> None:
    db = store.Store(stack.database_url)
    with db.session() as session:
        store.find_api_key(session, key).revoked_at = None
    db.dispose()


def test_served_document_is_the_fuzzed_one(fuzz_stack: ServiceStack) -> None:
    served = httpx.get(f"{fuzz_stack.url}/openapi.json").json()
    assert json.dumps(served, sort_keys=True) == json.dumps(OPENAPI, sort_keys=True)


@schema.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any]) -> Any:
    variants = [path_parameters]
    for name in ("job_id", "file_id"):
        if name in (path_parameters or {}):
            variants.append({**path_parameters, name: REAL[name]})
    return st.sampled_from(variants)


@schema.hook
def flatmap_body(context: Any, body: Any) -> Any:
    if isinstance(body, dict) and "train_file" in body:
        return st.sampled_from([body, {**body, "train_file": REAL["file_id"]}])
    return st.just(body)


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_api_answers_as_documented(case: schemathesis.Case, fuzz_stack: ServiceStack,
                                   fuzz_key: str) -> None:
    response = case.call(base_url=fuzz_stack.url, timeout=60)
    FUZZ_OPERATIONS.add(case.operation.label)
    FUZZ_STATS["requests"] += 1
    FUZZ_STATS[f"{response.status_code // 100}xx"] += 1
    if case.operation.label == "DELETE /v1/keys" and response.status_code == 200:
        _unrevoke(fuzz_stack, fuzz_key)  # the fuzzer revoked its own key: undo, go on
    try:
        case.validate_response(response)
    except Exception:
        FUZZ_STATS["failures"] += 1
        raise
