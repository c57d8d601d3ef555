"""`qpa finetune` from a YAML file: progress, outputs, and config errors with exit code 2."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

from qpa.cli import app


def _write(tmp_path, data) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_finetune_command_end_to_end(tiny_llama_dir, data_files, tmp_path):
    config = _write(tmp_path, {
        "base_model": str(tiny_llama_dir), "method": "qpa", "backend": "statevector",
        "train_file": str(data_files[0]), "eval_file": str(data_files[1]), "steps": 3,
        "output_dir": str(tmp_path / "run"),
        "qpa": {"chunk_size": 32, "depth": 2},
        "train": {"max_length": 32, "eval_batches": 1, "sample_tokens": 4},
    })
    result = CliRunner().invoke(app, ["finetune", config])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "adapter written to" in output
    assert "PeftModel.from_pretrained" in output
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_finetune_command_reports_config_errors(tmp_path):
    config = _write(tmp_path, {"train_file": "x.jsonl", "backend": "ibm-fake:FakeNowhere"})
    result = CliRunner().invoke(app, ["finetune", config])
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    assert "backend" in output and "FakeNowhere" in output


def test_finetune_command_missing_file(tmp_path):
    result = CliRunner().invoke(app, ["finetune", str(tmp_path / "absent.yaml")])
    assert result.exit_code == 2
    assert "does not exist" in " ".join(result.output.split())  # rich wraps long lines


def test_finetune_nproc_errors_name_the_field(tiny_llama_dir, data_files, tmp_path):
    config = _write(tmp_path, {
        "base_model": str(tiny_llama_dir), "train_file": str(data_files[0]),
        "train": {"batch_size": 4},
    })
    result = CliRunner().invoke(app, ["finetune", config, "--nproc", "0"])
    assert result.exit_code == 2
    assert "in nproc: must be a whole number of processes >= 1" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["finetune", config, "--nproc", "3"])
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    assert "train.batch_size" in output and "not divisible by the 3 processes" in output
