"""Jobs end to end over HTTP with a real worker: upload -> submit -> watch (SSE) ->
succeeded -> download -> the adapter loads with stock PEFT in a process that cannot
import qpa or qiskit. And cancel: within seconds, checkpoint kept."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from services.client import APIError, QPAClient

from .helpers import ServiceStack, job_config

LOAD_WITHOUT_QPA = r"""
import importlib.abc, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"qpa", "qiskit", "qiskit_aer", "qiskit_ibm_runtime",
                                  "services", "api", "worker"}:
            raise ImportError(f"{name} is blocked in this process")
        return None

sys.meta_path.insert(0, Blocked())
try:
    import qpa  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("qpa is importable; the test would prove nothing")

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

base_dir = sys.argv[1]
for adapter in sys.argv[2:]:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
    logits = model(input_ids=torch.tensor([[3, 4, 5, 6, 7]])).logits
    assert torch.isfinite(logits).all()
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and any(float(p.abs().sum()) > 0 for p in lora_b), "adapter is all zeros"
    print("loaded", adapter)
"""


@pytest.fixture(scope="module")
def file_ids(client: QPAClient, data_files: tuple[Path, Path]) -> tuple[str, str]:
    train, evaluation = data_files
    return client.upload_file(train)["id"], client.upload_file(evaluation)["id"]


@dataclass
class RoundTrip:
    created: dict[str, Any]
    streamed: list[dict[str, Any]]
    done: dict[str, Any]
    listed: list[dict[str, Any]]
    adapter: Path | None


ROUND_TRIPS = {"statevector": 6, "ibm-fake:FakeManilaV2": 3}


@pytest.fixture(scope="module")
def round_trips(client: QPAClient, file_ids: tuple[str, str], tiny_llama_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, RoundTrip]:
    """One job per backend, submitted, followed over SSE until it ends, read back and
    downloaded: what the tests below check (each can run alone)."""
    trips = {}
    for backend, steps in ROUND_TRIPS.items():
        created = client.create_job(job_config(tiny_llama_dir, *file_ids, steps=steps,
                                               backend=backend))
        streamed = list(client.stream_events(created["id"]))  # SSE until the job ends
        done = client.get_job(created["id"])
        listed = client.events(created["id"], limit=1000)["data"]
        adapter = (client.download_adapter(created["id"], tmp_path_factory.mktemp("download"))
                   if done["status"] == "succeeded" else None)
        trips[backend] = RoundTrip(created, streamed, done, listed, adapter)
    return trips


@pytest.mark.parametrize("backend", list(ROUND_TRIPS))
def test_job_round_trip(round_trips: dict[str, RoundTrip], file_ids: tuple[str, str],
                        backend: str) -> None:
    trip, steps = round_trips[backend], ROUND_TRIPS[backend]
    job = trip.created
    assert job["status"] == "queued" and job["id"].startswith("job-")
    assert job["config"]["train_file"] == file_ids[0]  # ids, not server paths

    events = trip.streamed
    ids = [event["id"] for event in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    kinds = [event["type"] for event in events]
    assert kinds.count("step") == steps and "checkpoint" in kinds and "eval" in kinds
    assert events[-1]["data"]["status"] == "succeeded", events[-3:]

    done = trip.done
    assert done["status"] == "succeeded" and done["error"] is None
    progress = done["progress"]
    assert progress["step"] == progress["total_steps"] == steps
    assert progress["loss"] is not None and progress["eval_loss"] is not None
    assert done["quantum"]["circuits"] > 0 and done["quantum"]["jobs"] > 0
    if backend.startswith("ibm-fake"):
        assert done["quantum"]["shots"] > 0
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    assert done["metrics"]["method"] == "qpa" and done["attempts"] == 1

    # The paginated list replays the same events the stream carried.
    assert [event["id"] for event in trip.listed][-len(ids):] == ids

    assert trip.adapter is not None
    assert (trip.adapter / "adapter_config.json").is_file()
    assert (trip.adapter / "adapter_model.safetensors").is_file()


def test_adapters_load_with_stock_peft_without_qpa(round_trips: dict[str, RoundTrip],
                                                   tiny_llama_dir: Path,
                                                   tmp_path: Path) -> None:
    adapters = [trip.adapter for trip in round_trips.values()]
    assert all(adapters), "a round-trip job produced no adapter"
    result = subprocess.run(
        [sys.executable, "-I", "-c", LOAD_WITHOUT_QPA, str(tiny_llama_dir), *map(str, adapters)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("loaded") == len(adapters)


def test_cancel_running_job_keeps_checkpoint(client: QPAClient, stack: ServiceStack,
                                             file_ids: tuple[str, str],
                                             tiny_llama_dir: Path, tmp_path: Path) -> None:
    job = client.create_job(job_config(tiny_llama_dir, *file_ids, steps=200))
    # Follow the job's own events until its first checkpoint (no clock involved).
    first_checkpoint = next(event for event in client.stream_events(job["id"])
                            if event["type"] == "checkpoint")
    assert client.cancel_job(job["id"])["cancel_requested"]
    ended = list(client.stream_events(job["id"], after=first_checkpoint["id"]))
    cancelled = client.get_job(job["id"])
    assert cancelled["status"] == "cancelled", cancelled
    assert cancelled["progress"]["step"] < 200
    # "Within one step": the worker reads the flag before every step, so at most the step
    # already under way when the cancel was stored is reported after it.
    events = client.events(job["id"], limit=1000)["data"]
    asked = next(event["id"] for event in events
                 if "cancel requested" in str(event["data"].get("message")))
    assert len([event for event in events if event["type"] == "step" and event["id"] > asked]
               ) <= 1, [(event["id"], event["type"]) for event in events if event["id"] > asked]
    assert "cancelled at step" in ended[-1]["data"]["message"]
    state = stack.artifact_dir / "jobs" / job["id"] / "state"
    assert state.is_dir() and any(state.iterdir()), "checkpoint was not kept"
    with pytest.raises(APIError) as conflict:
        client.download_adapter(job["id"], tmp_path)
    assert conflict.value.status_code == 409
    assert list(tmp_path.iterdir()) == []  # a refused download leaves no folder behind
    # Cancelling again is harmless.
    assert client.cancel_job(job["id"])["status"] == "cancelled"


def test_metrics_after_jobs(stack: ServiceStack, api_key: str,
                            round_trips: dict[str, RoundTrip]) -> None:
    import httpx

    assert all(trip.done["status"] == "succeeded" for trip in round_trips.values())
    text = httpx.get(f"{stack.url}/metrics", headers={"Authorization": f"Bearer {api_key}"}).text
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples['qpa_jobs{status="succeeded"}'] >= len(round_trips)
    assert samples["qpa_step_seconds_count"] >= sum(ROUND_TRIPS.values())
    assert samples["qpa_step_seconds_sum"] > 0
    assert samples['qpa_quantum_seconds_total{backend="ibm-fake:FakeManilaV2"}'] > 0
    assert samples["qpa_job_queue_wait_seconds_count"] >= len(round_trips)
