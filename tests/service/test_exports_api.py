"""Export formats through the service: a job asks for merged + gguf, the API serves each
format (`GET /v1/jobs/{id}/adapter?format=`), the CLI downloads one (`qpa jobs download
--format`), and `GET /v1/jobs/{id}/plot` serves the loss curve. Real worker, real HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from qpa.exports.gguf import read_gguf
from services.client import APIError, QPAClient

from .helpers import HANG_GUARD, ServiceStack, job_config, wait_for_status

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SCRIPT = Path(sys.executable).with_name("qpa")


@pytest.fixture(scope="module")
def uploaded(client: QPAClient, data_files: tuple[Path, Path]) -> tuple[str, str]:
    train, evaluation = data_files
    return client.upload_file(train)["id"], client.upload_file(evaluation)["id"]


def test_formats_plot_and_cli_download(client: QPAClient, stack: ServiceStack, api_key: str,
                                       uploaded: tuple[str, str], tiny_llama_dir: Path,
                                       tmp_path: Path) -> None:
    job = client.create_job(job_config(tiny_llama_dir, *uploaded, steps=4, method="lora",
                                       export={"formats": ["peft", "merged", "gguf"]}))
    assert job["config"]["export"]["formats"] == ["peft", "merged", "gguf"]
    done = wait_for_status(client, job["id"])
    assert done["status"] == "succeeded", done["error"]
    assert set(done["metrics"]["exports"]) == {"peft", "merged", "gguf"}

    png = client.loss_plot(job["id"])
    assert png.startswith(PNG_SIGNATURE) and len(png) > 5000

    adapter = client.download(job["id"], tmp_path / "peft", "peft")
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "loss.png").read_bytes() == png  # the model card's picture

    gguf_file = client.download(job["id"], tmp_path / "gguf", "gguf")
    metadata, tensors = read_gguf(gguf_file)
    assert metadata["general.type"] == "adapter" and metadata["adapter.type"] == "lora"
    assert tensors and all(name.endswith((".lora_a", ".lora_b")) for name in tensors)

    # The CLI, as a user runs it: the real console script against the real API.
    env = {**os.environ, "QPA_API_URL": stack.url, "QPA_API_KEY": api_key}
    result = subprocess.run(
        [str(_SCRIPT), "jobs", "download", job["id"], "--format", "merged",
         "-o", str(tmp_path / "merged")],
        capture_output=True, text=True, env=env, timeout=HANG_GUARD,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    merged_dir = Path(result.stdout.strip())
    assert merged_dir == tmp_path / "merged" / job["id"] / "merged"
    assert "AutoModelForCausalLM.from_pretrained" in result.stderr
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        peft = PeftModel.from_pretrained(base, adapter)(input_ids=ids).logits
    assert (merged - peft).abs().max().item() <= 1e-4

    with pytest.raises(APIError) as bad:
        client.download(job["id"], tmp_path / "bad", "onnx")
    assert bad.value.status_code == 422 and "format" in bad.value.detail
    assert not (tmp_path / "bad").exists()  # a failed download leaves nothing behind


def _error(response: httpx.Response, status: int, field: str | None, *words: str) -> None:
    """The service's one error shape: JSON ``{"detail": str, "field": ...}``."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json", response.headers
    body = response.json()
    assert isinstance(body["detail"], str) and body["field"] == field, body
    for word in words:
        assert word in body["detail"], (word, body["detail"])


def test_formats_a_job_did_not_export_are_404(client: QPAClient, stack: ServiceStack,
                                              api_key: str, uploaded: tuple[str, str],
                                              tiny_llama_dir: Path, tmp_path: Path) -> None:
    job = client.create_job(job_config(tiny_llama_dir, *uploaded, steps=2, method="lora"))
    assert job["config"]["export"]["formats"] == ["peft"]
    with pytest.raises(APIError) as early:
        client.download(job["id"], tmp_path, "gguf")
    assert early.value.status_code == 409  # not succeeded yet comes first
    assert wait_for_status(client, job["id"])["status"] == "succeeded"
    for export_format in ("merged", "gguf"):
        with pytest.raises(APIError) as missing:
            client.download(job["id"], tmp_path, export_format)
        assert missing.value.status_code == 404
        assert "export.formats" in missing.value.detail
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=stack.url, headers=headers, timeout=30) as http:
        path = f"/v1/jobs/{job['id']}"
        _error(http.get(f"{path}/adapter", params={"format": "gguf"}), 404, "format",
               "export.formats")
        _error(http.get(f"{path}/adapter", params={"format": "onnx"}), 422, "format")
        _error(http.get("/v1/jobs/job-nope/plot"), 404, None, "job-nope")
        plot = http.get(f"{path}/plot")
        assert plot.headers["content-type"] == "image/png"
        assert plot.content.startswith(PNG_SIGNATURE)
    with pytest.raises(APIError) as foreign:
        QPAClient(client.base_url, "qpa-not-a-key").loss_plot(job["id"])
    assert foreign.value.status_code == 401
