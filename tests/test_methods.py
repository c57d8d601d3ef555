"""The method registry: every registered method gets a config section, a trainer class and a
model card without any other file naming it; VeRA (added as a folder) proves it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import tiny_config

from qpa.config import METHOD_NAMES, JobConfig, parse_config
from qpa.errors import ConfigError
from qpa.methods import method_class, method_spec, methods
from qpa.models import load_base_model, matched_modules, resolve_target_modules
from qpa.training import finetune


def test_the_config_schema_comes_from_the_registry():
    assert tuple(methods()) == METHOD_NAMES
    schema = JobConfig.model_json_schema()
    assert schema["properties"]["method"]["enum"] == list(methods())
    for name, spec in methods().items():
        assert name in JobConfig.model_fields, f"no `{name}:` section"
        config = parse_config({"train_file": "x.jsonl", "method": name})
        assert isinstance(config.method_options, spec.options)
        assert config.train.lr == config.method_options.learning_rate
        assert method_class(name).name == name


def test_unknown_method_names_the_field_and_the_choices():
    with pytest.raises(ConfigError) as error:
        parse_config({"train_file": "x.jsonl", "method": "dora"})
    assert error.value.field == "method"
    assert all(name in error.value.reason for name in methods())
    with pytest.raises(KeyError, match="registered: lora, qpa, compound, vera"):
        method_spec("dora")


@pytest.mark.parametrize(("options", "field"), [
    ({"r": 0}, "vera.r"), ({"d_initial": 0}, "vera.d_initial"), ({"dropout": 1}, "vera.dropout"),
    ({"rank": 4}, "vera.rank"),
])
def test_vera_options_are_validated(options, field):
    with pytest.raises(ConfigError) as error:
        parse_config({"train_file": "x.jsonl", "method": "vera", "vera": options})
    assert error.value.field == field


def test_validating_a_job_imports_no_training_or_quantum_library():
    # The API process validates every submitted job: the registry must load only the
    # methods' options (pydantic), not their implementations.
    script = ("import sys; from qpa.config import parse_config\n"
              "for m in ('lora', 'qpa', 'compound', 'vera'):\n"
              "    parse_config({'train_file': 'x', 'method': m})\n"
              "print([n for n in ('torch', 'peft', 'transformers', 'qiskit') if n in sys.modules])")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True)
    assert json.loads(result.stdout.replace("'", '"')) == []


def test_vera_trains_only_its_scaling_vectors(tiny_llama_dir, data_files, tmp_path):
    config = tiny_config(tiny_llama_dir, data_files, method="vera", steps=4,
                         vera={"r": 8}, train={"lr": 3e-2})
    metrics = finetune(config, tmp_path / "run")
    base, _, _ = load_base_model(str(tiny_llama_dir))
    targets = matched_modules(base, resolve_target_modules(base, None))
    # lambda_b (out_features) and lambda_d (r) per adapted module, nothing else.
    assert metrics["trainable_params"] == sum(8 + m.out_features for m in targets.values())
    assert metrics["export"]["peft_type"] == "VERA"
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    card = (tmp_path / "run" / "adapter" / "README.md").read_text()
    assert "# VERA adapter" in card
    assert f"| ratio to LoRA | {metrics['ratio_to_lora']:.2%} |" in card
    saved = torch.load(tmp_path / "run" / "state" / "checkpoint.pt", weights_only=False)
    assert saved["method_state"], "the checkpoint holds VeRA's trained vectors"
