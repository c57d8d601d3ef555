"""Every bad input yields a ConfigError naming the field, before any training step."""

from __future__ import annotations

import pytest
from helpers import tiny_config

from qpa.config import parse_config
from qpa.errors import ConfigError
from qpa.training import finetune


def _run_expecting(config, tmp_path, field: str, fragment: str) -> ConfigError:
    events: list[dict] = []
    with pytest.raises(ConfigError) as caught:
        finetune(config, tmp_path / "out", on_event=events.append)
    assert caught.value.field == field
    assert fragment in caught.value.reason
    assert not any(event["type"] == "step" for event in events)
    assert not (tmp_path / "out" / "state").exists()
    return caught.value


def test_unknown_backend_is_rejected_by_the_schema(data_files):
    with pytest.raises(ConfigError) as caught:
        parse_config({"train_file": str(data_files[0]), "backend": "quantum-magic"})
    assert caught.value.field == "backend"
    assert "unknown backend" in caught.value.reason


def test_unknown_fake_backend_is_refused_when_the_job_is_prepared(data_files, tmp_path):
    # The config's syntax is checked without qiskit; whether the device exists is checked
    # once the job is prepared, before the base model or the data are loaded.
    config = parse_config({"train_file": str(data_files[0]), "backend": "ibm-fake:FakeNowhere"})
    with pytest.raises(ConfigError) as caught:
        finetune(config, tmp_path / "run")
    assert caught.value.field == "backend" and "FakeNowhere" in caught.value.reason
    with pytest.raises(ConfigError) as caught:  # the fake's name has the wrong shape
        parse_config({"train_file": str(data_files[0]), "backend": "ibm-fake:Manila"})
    assert caught.value.field == "backend"


@pytest.mark.parametrize(
    ("data", "field", "fragment"),
    [
        ({"train_file": "x", "steps": 0}, "steps", "greater than or equal to 1"),
        ({"train_file": "x", "lora": {"r": "four"}}, "lora.r", "integer"),
        ({"train_file": "x", "method": "dora"}, "method", "'lora', 'qpa', 'compound' or 'vera'"),
        ({"train_file": "x", "qpa": {"chunk_sise": 8}}, "qpa.chunk_sise", "not a known"),
        ({}, "train_file", "required"),
        ([1, 2], "config", "mapping"),
    ],
)
def test_schema_errors_name_the_field(data, field, fragment):
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert caught.value.field == field
    assert fragment in caught.value.reason


def test_more_qubits_than_the_backend_has(tiny_llama_dir, data_files, tmp_path):
    config = tiny_config(tiny_llama_dir, data_files, backend="ibm-fake:FakeManilaV2",
                         qpa={"chunk_size": 4})  # 896 values / 4 = 224 chunks -> 8 qubits
    error = _run_expecting(config, tmp_path, "backend", "has 5 qubits")
    assert "needs 8" in error.reason


def test_max_qubits_setting(tiny_llama_dir, data_files, tmp_path):
    config = tiny_config(tiny_llama_dir, data_files, quantum={"max_qubits": 3})
    _run_expecting(config, tmp_path, "quantum.max_qubits", "at most 3")


def test_missing_ibm_credentials(tiny_llama_dir, data_files, tmp_path, monkeypatch):
    for name in ("QISKIT_IBM_TOKEN", "QISKIT_IBM_CHANNEL", "QISKIT_IBM_INSTANCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = tiny_config(tiny_llama_dir, data_files, backend="ibm:ibm_torino")
    _run_expecting(config, tmp_path, "backend", "credentials")


def test_target_modules_not_found(tiny_llama_dir, data_files, tmp_path):
    config = tiny_config(tiny_llama_dir, data_files, lora={"target_modules": ["query_key"]})
    error = _run_expecting(config, tmp_path, "lora.target_modules", "query_key")
    assert "q_proj" in error.reason  # tells the user what exists


def test_empty_data_file(tiny_llama_dir, data_files, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    config = tiny_config(tiny_llama_dir, (empty, data_files[1]))
    _run_expecting(config, tmp_path, "train_file", "no records")


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('{"text": "fine"}\n{"text": \n', "line 2: invalid JSON"),
        ('{"text": "fine"}\n["a list"]\n', "line 2: each line must be a JSON object"),
        ('{"prompt": "p"}\n', "line 1: 'completion' must be a string"),
        ('{"messages": [{"role": "user"}]}\n', "line 1: messages[0]"),
        ('{"label": 3}\n', "line 1: expected a 'text'"),
    ],
)
def test_malformed_data_file(tiny_llama_dir, data_files, tmp_path, line, fragment):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(line)
    config = tiny_config(tiny_llama_dir, (data_files[0], bad))
    _run_expecting(config, tmp_path, "eval_file", fragment)


def test_missing_data_file(tiny_llama_dir, data_files, tmp_path):
    config = tiny_config(tiny_llama_dir, (tmp_path / "nope.jsonl", data_files[1]))
    _run_expecting(config, tmp_path, "train_file", "does not exist")


def test_unknown_base_model(data_files, tmp_path):
    config = tiny_config(tmp_path / "no-such-model", data_files)
    _run_expecting(config, tmp_path, "base_model", "unknown base model")
