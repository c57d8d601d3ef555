"""The Python client (what `qpa jobs ...` uses) when the server goes away (finding 7):
a dropped event stream is reopened from the last event with backoff, and after a bounded
number of attempts the client gives up with a message that says what to do."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.client import APIError, QPAClient

from .helpers import ServiceStack, job_config


@pytest.fixture
def lone_api(redis_server: str, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[ServiceStack]:
    """An API with no worker: a submitted job stays queued, so its stream stays open."""
    service = ServiceStack(tmp_path_factory.mktemp("client"), redis_server, 3)
    try:
        service.start_api()
        yield service
    finally:
        service.stop()


def _queued_job(client: QPAClient, data_file: Path, model_dir: Path) -> str:
    train_id = client.upload_file(data_file)["id"]
    return client.create_job(job_config(model_dir, train_id))["id"]


def test_stream_gives_up_with_backoff_when_the_server_dies(
        lone_api: ServiceStack, data_files: tuple[Path, Path], tiny_llama_dir: Path) -> None:
    notes: list[str] = []
    with QPAClient(lone_api.url, lone_api.new_key(), retries=3, backoff=0.05,
                   max_backoff=0.2, on_retry=notes.append) as client:
        job_id = _queued_job(client, data_files[0], tiny_llama_dir)
        events = client.stream_events(job_id)
        assert next(events)["data"]["status"] == "queued"
        lone_api.kill_api()  # mid-stream, and nothing listens any more
        with pytest.raises(APIError) as gave_up:
            next(events)
    assert gave_up.value.status_code == 0
    assert "in 4 attempts" in gave_up.value.detail
    assert f"qpa jobs watch {job_id}" in gave_up.value.detail
    # One note per wait, the waits doubling up to the cap.
    waits = [float(re.search(r"retrying in ([0-9.]+)s", note).group(1)) for note in notes]
    assert waits == [0.05, 0.1, 0.2], notes
    assert [re.search(r"attempt (\d) of 4", note).group(1) for note in notes] == ["2", "3", "4"]


def test_stream_resumes_where_it_dropped(lone_api: ServiceStack, data_files: tuple[Path, Path],
                                         tiny_llama_dir: Path) -> None:
    key = lone_api.new_key()
    notes: list[str] = []

    def server_comes_back(note: str) -> None:
        # Called while the client waits to reconnect: bring the API back and end the job,
        # which adds one event the client has not seen.
        notes.append(note)
        lone_api.start_api()
        with httpx.Client(base_url=lone_api.url,
                          headers={"Authorization": f"Bearer {key}"}) as http:
            assert http.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"

    with QPAClient(lone_api.url, key, retries=3, backoff=0.05,
                   on_retry=server_comes_back) as client:
        job_id = _queued_job(client, data_files[0], tiny_llama_dir)
        events = client.stream_events(job_id)
        first = next(events)
        lone_api.kill_api()
        rest = list(events)  # ends at the server's `event: end`
    assert len(notes) == 1
    assert [event["data"]["status"] for event in [first, *rest]] == ["queued", "cancelled"]
    assert rest[0]["id"] > first["id"]


def test_requests_to_a_server_that_is_not_there_give_up() -> None:
    from services.supervisor import free_port

    notes: list[str] = []
    client = QPAClient(f"http://127.0.0.1:{free_port()}", "qpa_x", retries=2, backoff=0.01,
                       on_retry=notes.append)
    with client, pytest.raises(APIError) as gave_up:
        client.list_jobs()
    assert gave_up.value.status_code == 0 and "after 3 attempts" in gave_up.value.detail
    assert "qpa serve" in gave_up.value.detail and len(notes) == 2
