"""``qpa estimate``: the counts a run will submit, known before it runs, and the checks
made with them (device width, quantum.max_seconds).

The acceptance test runs the estimate on the shipped quickstart config (tiny model, a
generator narrow enough for FakeManilaV2's 5 qubits, few shots) and then really trains
it: jobs, circuits and shots must equal what metrics.json reports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from qpa.cli import app
from qpa.config import parse_config
from qpa.errors import ConfigError
from qpa.estimate import estimate_job
from qpa.methods.qpa.estimate import _dry_run, plan_jobs
from qpa.training import Trainer

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"


def shipped_config(model_dir: Path, data: tuple[Path, Path], backend: str,
                   **qpa: Any) -> dict[str, Any]:
    """examples/quickstart.yaml as shipped, on the tiny model: 4 steps, a circuit
    evaluation every 2 (qpa.update_every) and an evaluation at step 2 (its own job)."""
    config = yaml.safe_load(QUICKSTART.read_text())
    config.update(base_model=str(model_dir), train_file=str(data[0]), eval_file=str(data[1]),
                  backend=backend, steps=4, output_dir=None)
    # chunk_size 32 on q/v: the tiny model's 896 LoRA values make 28 chunks, 5 qubits
    # (Manila's).
    config["lora"] = {"target_modules": ["q_proj", "v_proj"]}
    config["qpa"] = {**config["qpa"], "chunk_size": 32, "update_every": 2, **qpa}
    config["train"] = {**config["train"], "max_length": 48, "eval_batches": 1,
                       "eval_every": 2, "sample_tokens": 0}
    if backend.startswith("ibm-fake:"):
        config["quantum"] = {"shots": 64, "seed": 3}  # noisy simulation: keep it cheap
    return config


def _write(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("backend", ["aer", "ibm-fake:FakeManilaV2", "ibm-fake:FakeFez"])
def test_estimate_equals_what_the_run_reports(backend: str, tiny_llama_dir, data_files,
                                              tmp_path) -> None:
    config = shipped_config(tiny_llama_dir, data_files, backend)
    result = CliRunner().invoke(app, ["estimate", str(_write(tmp_path, config)), "--json"])
    assert result.exit_code == 0, result.output
    estimate = json.loads(result.output)
    assert estimate["num_qubits"] == 5 and estimate["circuit_parameters"] == 40

    # The real run, as a user starts it: `qpa finetune`, then its metrics.json.
    config["output_dir"] = str(tmp_path / "run")
    run = CliRunner().invoke(app, ["finetune", str(_write(tmp_path, config))])
    assert run.exit_code == 0, run.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    quantum = metrics["quantum"]
    shown = " ".join(run.output.split())  # the plan, printed before the first job runs
    assert f"{estimate['jobs']} primitive jobs, {estimate['circuits']} circuits" in shown
    assert f"quantum: {quantum['jobs']} jobs, {quantum['circuits']} circuits" in shown
    assert (estimate["jobs"], estimate["circuits"], estimate["shots"]) == (
        quantum["jobs"], quantum["circuits"], quantum["shots"])
    # Gradient jobs of 1 + 2 x 40 shifted bindings, and the evaluation at step 2 (1 circuit).
    assert (quantum["jobs"], quantum["circuits"]) == (3, 81 + 1 + 81)
    assert estimate["shots"] == estimate["circuits"] * (64 if "fake" in backend else 0)
    if backend == "aer":
        assert estimate["qpu_seconds"] is None and estimate["isa_depth"] is not None
    else:
        # The device publishes timing: each shot costs at least the rep delay (250 us).
        assert estimate["seconds_per_shot"] > 2.5e-4
        assert estimate["qpu_seconds"] == pytest.approx(estimate["shots"]
                                                        * estimate["seconds_per_shot"])
        # Routing on a real coupling map makes the ISA circuit deeper than the logical one.
        assert estimate["isa_depth"] > estimate["logical_depth"]


def test_plan_follows_update_every_and_evaluations(tiny_llama_dir, data_files) -> None:
    def jobs(**changes: Any) -> int:
        config = shipped_config(tiny_llama_dir, data_files, "aer")
        config.update(steps=12)
        config["qpa"].update(changes.pop("qpa", {}))
        config["train"].update(changes.pop("train", {}))
        return plan_jobs(parse_config(config), 896).jobs

    # update_every 1: one gradient job per step, the last step's too (no eval jobs: p is
    # fresh right after each refresh); every 4: steps 0, 4, 8 plus the evaluations that
    # fall right after an angle update (steps 4 and 8 with eval_every 2) ...
    assert jobs(qpa={"update_every": 1}, train={"eval_every": None}) == 12
    assert jobs(qpa={"update_every": 4}, train={"eval_every": None}) == 3
    assert jobs(qpa={"update_every": 4}, train={"eval_every": 4}) == 5
    # ... and frozen angles need one job in all (p at the initial angles).
    assert jobs(qpa={"ablation": "frozen_angles"}) == 1


@pytest.mark.parametrize(("steps", "update_every", "eval_every"), [
    (100, 1, None), (101, 4, None), (157, 4, 6), (200, 16, 10), (95, 7, 3), (64, 64, 5)])
def test_long_runs_extrapolate_the_dry_run_exactly(tiny_llama_dir, data_files, steps,
                                                   update_every, eval_every) -> None:
    config = shipped_config(tiny_llama_dir, data_files, "aer")
    config.update(steps=steps)
    config["qpa"]["update_every"] = update_every
    config["train"]["eval_every"] = eval_every
    parsed = parse_config(config)
    planned, full = plan_jobs(parsed, 896), _dry_run(parsed, 896, steps)
    assert planned.sizes == full.sizes and planned.jobs > 0


def test_too_wide_for_the_device_suggests_sub_generators(tiny_llama_dir, data_files) -> None:
    # chunk_size 8: 112 chunks need 7 qubits; FakeManilaV2 has 5.
    config = shipped_config(tiny_llama_dir, data_files, "ibm-fake:FakeManilaV2", chunk_size=8)
    estimate = estimate_job(parse_config(config))
    assert estimate.num_qubits == 7 and estimate.isa_depth is None
    (warning,) = [w for w in estimate.warnings if "qubits on" in w]
    assert "use qpa.sub_generators >= 4" in warning
    config["qpa"]["sub_generators"] = 4
    fitted = estimate_job(parse_config(config))
    assert fitted.num_qubits == 5 and not [w for w in fitted.warnings if "qubits on" in w]
    config["qpa"]["sub_generators"] = 3  # one fewer does not fit
    assert estimate_job(parse_config(config)).num_qubits == 6
    # auto: sized for the device by the same count.
    config["qpa"]["sub_generators"] = "auto"
    auto = estimate_job(parse_config(config))
    assert (auto.sub_generators, auto.num_qubits) == (4, 5)
    config["quantum"]["max_qubits"] = 4  # the narrower of device and max_qubits wins
    assert estimate_job(parse_config(config)).num_qubits <= 4
    with pytest.raises(ConfigError) as wrong:
        parse_config({**config, "qpa": {**config["qpa"], "sub_generators": "many"}})
    assert wrong.value.field.startswith("qpa.sub_generators")


def test_max_seconds_is_checked_against_the_estimate(tiny_llama_dir, data_files,
                                                     tmp_path) -> None:
    config = shipped_config(tiny_llama_dir, data_files, "ibm-fake:FakeFez")
    estimate = estimate_job(parse_config(config))
    config["quantum"]["max_seconds"] = estimate.qpu_seconds / 2
    path = _write(tmp_path, config)
    result = CliRunner().invoke(app, ["estimate", str(path)])
    assert result.exit_code == 3 and "exceed quantum.max_seconds" in result.output
    # The run is refused before its first step, naming the field.
    trainer = Trainer(parse_config(config), tmp_path / "run")
    with pytest.raises(ConfigError) as refused:
        trainer.run()
    assert refused.value.field == "quantum.max_seconds"
    assert "QPU seconds" in refused.value.reason
    events = [json.loads(line)["type"] for line in
              (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert "quantum_job" not in events and "step" not in events


def test_estimate_rejects_classical_methods(tiny_llama_dir, data_files, tmp_path) -> None:
    config = shipped_config(tiny_llama_dir, data_files, "aer")
    config["method"] = "lora"
    result = CliRunner().invoke(app, ["estimate", str(_write(tmp_path, config))])
    assert result.exit_code == 2 and "method" in result.output
