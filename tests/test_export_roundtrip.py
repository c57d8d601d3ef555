"""Acceptance: the exported adapter loads with stock PEFT where qpa and qiskit cannot be
imported, and reproduces the trained model's logits (fp32, max abs diff <= 1e-5)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import (
    BLOCKED_IMPORTS_PRELUDE,
    PROBE_IDS,
    LogitTrainer,
    tiny_config,
    trained_job,
)


def _load_in_clean_process(model_dir, adapter_dir, tmp_path) -> torch.Tensor:
    out = tmp_path / "logits.pt"
    script = BLOCKED_IMPORTS_PRELUDE + textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        base = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, {str(adapter_dir)!r}).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor({PROBE_IDS.tolist()})).logits
        torch.save(logits, {str(out)!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
@pytest.mark.parametrize("method", ["qpa", "lora", "compound", "vera"])
def test_adapter_loads_without_qpa_and_matches_logits(request, model_fixture, method,
                                                      tmp_path):
    # Shared with tests/test_exports.py: one training per (model, method).
    trainer, metrics, out, model_dir = trained_job(request, model_fixture, method)
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    card = (adapter / "README.md").read_text()
    assert method.upper() in card and "trainable parameters" in card
    peft_config = json.loads((adapter / "adapter_config.json").read_text())
    # Compound ships as OFT, except on GPT-2 whose Conv1D stock OFT cannot load (exact LoRA).
    expected = {"compound": "OFT" if model_fixture == "tiny_llama_dir" else "LORA",
                "vera": "VERA"}.get(method, "LORA")
    assert peft_config["peft_type"] == expected
    assert metrics["export"]["peft_type"] == expected
    # Training changed the model, so matching logits is not trivially the base model's.
    assert metrics["eval_loss_after"] != metrics["eval_loss_before"]
    reloaded = _load_in_clean_process(model_dir, adapter, tmp_path)
    tolerance = 1e-4 if method == "compound" else 1e-5  # the issues' bounds
    assert (reloaded - trainer.trained_logits).abs().max().item() <= tolerance


def test_output_folder_layout(tiny_llama_dir, data_files, tmp_path):
    config = tiny_config(tiny_llama_dir, data_files, steps=3)
    metrics = LogitTrainer(config, tmp_path / "run").run()
    folder = tmp_path / "run"
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["trainable_params"] == metrics["trainable_params"]
    for key in ("eval_loss_before", "eval_loss_after", "trainable_params",
                "lora_equivalent_params", "quantum", "wall_seconds"):
        assert saved[key] is not None, key
    assert set(saved["quantum"]) >= {"jobs", "circuits", "shots", "seconds"}
    assert (folder / "state" / "checkpoint.pt").is_file()
    assert (folder / "events.jsonl").is_file()
