"""Jobs end to end over HTTP with a real worker: upload -> submit -> watch (SSE) ->
succeeded -> download -> the adapter loads with stock PEFT in a process that cannot
import qpa or qiskit. And cancel: within seconds, checkpoint kept."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from services.client import APIError, QPAClient

from .helpers import ServiceStack, job_config, wait_for, wait_for_status

ADAPTERS: dict[str, Path] = {}

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


@pytest.mark.parametrize(("backend", "steps"), [("statevector", 6),
                                                ("ibm-fake:FakeManilaV2", 3)])
def test_job_round_trip(client: QPAClient, stack: ServiceStack, file_ids: tuple[str, str],
                        tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory,
                        backend: str, steps: int) -> None:
    config = job_config(tiny_llama_dir, *file_ids, steps=steps, backend=backend)
    job = client.create_job(config)
    assert job["status"] == "queued" and job["id"].startswith("job-")
    assert job["config"]["train_file"] == file_ids[0]  # ids, not server paths

    events = list(client.stream_events(job["id"]))  # SSE until the job ends
    ids = [event["id"] for event in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    kinds = [event["type"] for event in events]
    assert kinds.count("step") == steps and "checkpoint" in kinds and "eval" in kinds
    assert events[-1]["data"]["status"] == "succeeded", events[-3:]

    done = client.get_job(job["id"])
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
    listed = client.events(job["id"], limit=1000)["data"]
    assert [event["id"] for event in listed][-len(ids):] == ids

    adapter = client.download_adapter(job["id"], tmp_path_factory.mktemp("download"))
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    ADAPTERS[backend] = adapter


def test_adapters_load_with_stock_peft_without_qpa(tiny_llama_dir: Path,
                                                   tmp_path: Path) -> None:
    if len(ADAPTERS) < 2:
        pytest.skip("the round-trip tests did not produce adapters")
    result = subprocess.run(
        [sys.executable, "-I", "-c", LOAD_WITHOUT_QPA, str(tiny_llama_dir),
         *map(str, ADAPTERS.values())],
        capture_output=True, text=True, cwd=tmp_path, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("loaded") == len(ADAPTERS)


def test_cancel_running_job_keeps_checkpoint(client: QPAClient, stack: ServiceStack,
                                             file_ids: tuple[str, str],
                                             tiny_llama_dir: Path) -> None:
    job = client.create_job(job_config(tiny_llama_dir, *file_ids, steps=200))

    def checkpointed() -> dict[str, Any] | None:
        current = client.get_job(job["id"])
        return current if current["progress"]["checkpoint_step"] else None

    wait_for(checkpointed, 120, "a first checkpoint")
    asked = time.monotonic()
    assert client.cancel_job(job["id"])["cancel_requested"]
    cancelled = wait_for_status(client, job["id"], ("cancelled", "failed", "succeeded"), 30)
    took = time.monotonic() - asked
    assert cancelled["status"] == "cancelled", cancelled
    assert took < 10, f"cancel took {took:.1f}s"
    assert cancelled["progress"]["step"] < 200
    state = stack.artifact_dir / "jobs" / job["id"] / "state"
    assert state.is_dir() and any(state.iterdir()), "checkpoint was not kept"
    assert "cancelled at step" in client.events(job["id"], limit=1000)["data"][-1]["data"][
        "message"]
    with pytest.raises(APIError) as conflict:
        client.download_adapter(job["id"])
    assert conflict.value.status_code == 409
    # Cancelling again is harmless.
    assert client.cancel_job(job["id"])["status"] == "cancelled"


def test_metrics_after_jobs(stack: ServiceStack, api_key: str) -> None:
    import httpx

    text = httpx.get(f"{stack.url}/metrics", headers={"Authorization": f"Bearer {api_key}"}).text
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples['qpa_jobs{status="succeeded"}'] >= 2
    assert samples["qpa_step_seconds_count"] >= 9 and samples["qpa_step_seconds_sum"] > 0
    assert samples['qpa_quantum_seconds_total{backend="ibm-fake:FakeManilaV2"}'] > 0
    assert samples["qpa_job_queue_wait_seconds_count"] >= 2
