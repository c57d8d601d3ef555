"""QPA's generator options, ablations and presets; the learning-rate schedule and defaults.

Every option keeps the two promises of the method: the adapted model equals the base model
at step 0, and the export is an exact stock PEFT LoRA adapter.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import BLOCKED_IMPORTS_PRELUDE, PROBE_IDS, LogitTrainer, tiny_config

from qpa.config import parse_config
from qpa.errors import ConfigError
from qpa.methods import method_class
from qpa.methods.lora.options import LoraOptions
from qpa.methods.qpa.options import QpaOptions
from qpa.models import load_base_model, resolve_target_modules
from qpa.training import lr_schedule

VARIANTS = [
    {"postprocess": "standardize"},
    {"postprocess": "scaled"},
    {"postprocess": "paper"},
    {"generate_a": False},
    {"features": 3},
    {"features": 4, "basis_bits": False},
    {"ablation": "frozen_angles"},
    {"ablation": "constant_p"},
    {"ablation": "random_p"},
]


def _adapted_and_base_logits(config):
    base, _, _ = load_base_model(config.base_model)
    with torch.no_grad():
        reference = base(input_ids=PROBE_IDS).logits.clone()
    method = method_class("qpa")(config, resolve_target_modules(base, None))
    model = method.attach(base)
    method.before_eval()
    with torch.no_grad():
        adapted = model(input_ids=PROBE_IDS).logits
    method.close()
    return adapted, reference


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: "-".join(map(str, o.values())))
def test_step_zero_equals_base_model(tiny_llama_dir, data_files, options):
    adapted, reference = _adapted_and_base_logits(
        tiny_config(tiny_llama_dir, data_files, qpa=options))
    assert (adapted - reference).abs().max().item() <= 1e-6


def test_postprocessing_sends_uniform_p_to_zero_and_spreads_random_p():
    from qpa.methods.qpa.generator import POSTPROCESS, postprocess

    uniform = torch.full((1, 16), 1 / 16, dtype=torch.float64)
    draw = torch.distributions.Exponential(1.0).sample((1, 16)).double()
    for kind in POSTPROCESS:
        assert postprocess(uniform, 4, kind).abs().max() < 1e-9, kind
        assert postprocess(draw / draw.sum(), 4, kind).std() > 1e-3, kind


def _train(config, tmp_path):
    trainer = LogitTrainer(config, tmp_path / "run")
    metrics = trainer.run()
    return trainer, metrics


def _stock_peft_logits(model_dir, adapter_dir):
    """Logits of the adapter loaded by stock PEFT in a process that cannot import qpa."""
    script = BLOCKED_IMPORTS_PRELUDE + (
        "import json, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "from peft import PeftModel\n"
        f"base = AutoModelForCausalLM.from_pretrained({str(model_dir)!r})\n"
        f"model = PeftModel.from_pretrained(base, {str(adapter_dir)!r}).eval()\n"
        f"ids = torch.tensor({PROBE_IDS.tolist()})\n"
        "with torch.no_grad():\n"
        "    print(json.dumps(model(input_ids=ids).logits.tolist()))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)
    return torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("preset", ["compact", "balanced", "paper"])
def test_each_preset_exports_an_exact_stock_peft_lora(tiny_llama_dir, data_files, tmp_path,
                                                       preset):
    config = tiny_config(tiny_llama_dir, data_files, steps=3, lora={"target_modules": None})
    # The preset alone, not tiny_config's chunk and MLP, decides the generator and (the
    # job listing none) the modules here.
    config = parse_config({**config.model_dump(mode="json"), "qpa": {"preset": preset}})
    assert config.qpa.chunk_size == QpaOptions.PRESETS[preset]["chunk_size"]
    trainer, metrics = _train(config, tmp_path)
    card = (tmp_path / "run" / "adapter" / "README.md").read_text()
    assert f"| preset | {preset} |" in card  # untouched: the measured numbers apply
    assert QpaOptions.MEASURED[preset] in card
    assert metrics["eval_loss_after"] != metrics["eval_loss_before"]
    stock = _stock_peft_logits(tiny_llama_dir, tmp_path / "run" / "adapter")
    assert (stock - trainer.trained_logits).abs().max().item() <= 1e-5
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA"


def _freshly_attached(config):
    """The QPA method attached as the trainer attaches it (same seed, same order)."""
    from qpa.training import seed_everything

    base, _, _ = load_base_model(config.base_model)
    seed_everything(config.train.seed)
    method = method_class("qpa")(config, resolve_target_modules(base, None))
    model = method.attach(base)
    method.close()
    return method, model


def test_ablations_train_no_angles_and_report_it(tiny_llama_dir, data_files, tmp_path):
    jobs = {}
    for ablation in ("none", "frozen_angles", "constant_p", "random_p"):
        config = tiny_config(tiny_llama_dir, data_files, steps=3, qpa={"ablation": ablation})
        trainer, metrics = _train(config, tmp_path / ablation)
        jobs[ablation] = metrics["quantum"]["jobs"]
        initial = _freshly_attached(config)[0].generator.theta
        moved = not torch.equal(trainer.method.generator.theta.detach(), initial.detach())
        assert moved == (ablation == "none")
        card = (tmp_path / ablation / "run" / "adapter" / "README.md").read_text()
        assert "| preset | balanced (options changed; modules listed by the job) |" in card
        assert "Measured quality of this preset" not in card
        if ablation != "none":
            assert metrics["circuit_angles"] == 0
            assert metrics["trainable_params"] == metrics["mapping_mlp_params"]
            assert metrics["quantum"]["ablation"] == ablation
    # Trained: one window per step (the last step's p also serves the final evaluation).
    assert jobs == {"none": 3, "frozen_angles": 1, "constant_p": 0, "random_p": 0}


def test_generate_a_false_keeps_a_at_its_initialisation(tiny_llama_dir, data_files, tmp_path):
    from safetensors.torch import load_file

    config = tiny_config(tiny_llama_dir, data_files, steps=3, qpa={"generate_a": False})
    _, metrics = _train(config, tmp_path)
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    b_values = sum(w.numel() for key, w in weights.items() if ".lora_B." in key)
    assert metrics["generated_values"] == b_values < metrics["lora_equivalent_params"]  # B only
    _, fresh = _freshly_attached(config)
    checked = 0
    for name, module in fresh.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            assert torch.equal(weights[f"{name}.lora_A.weight"], module.lora_A["default"].weight)
            assert weights[f"{name}.lora_B.weight"].abs().sum() > 0
            checked += 1
    assert checked == 4  # q_proj and v_proj of two layers


@pytest.mark.parametrize(("field", "value", "message"), [
    ("postprocess", "softmax", "standardize"),
    ("features", 0, "greater than or equal to 1"),
    ("ablation", "frozen", "frozen_angles"),
    ("preset", "huge", "compact"),
    ("generate_a", "sometimes", "boolean"),
    ("basis_bits", "maybe", "boolean"),
])
def test_bad_options_name_the_field(tmp_path, field, value, message):
    with pytest.raises(ConfigError) as caught:
        parse_config({"train_file": "x.jsonl", "qpa": {field: value}})
    assert caught.value.field == f"qpa.{field}"
    assert message in str(caught.value)


def test_presets_fill_what_the_job_leaves_out():
    compact = parse_config({"train_file": "x.jsonl", "qpa": {"preset": "compact"}})
    assert compact.qpa.chunk_size == QpaOptions.PRESETS["compact"]["chunk_size"]
    assert compact.train.lr == QpaOptions.LEARNING_RATES["compact"]
    mine = parse_config({"train_file": "x.jsonl", "train": {"lr": 0.5},
                         "qpa": {"preset": "paper", "chunk_size": 100}})
    assert mine.qpa.chunk_size == 100  # the job's option wins over the preset's
    assert mine.qpa.mlp_hidden == QpaOptions.PRESETS["paper"]["mlp_hidden"]
    assert mine.train.lr == 0.5
    default = parse_config({"train_file": "x.jsonl"})  # names nothing: the default preset
    assert default.qpa.preset == QpaOptions.model_fields["preset"].default
    assert default.train.lr == QpaOptions.LEARNING_RATES[default.qpa.preset]
    # A stored (dumped) config parses to itself: the service validates it twice.
    assert parse_config(default.model_dump(mode="json")) == default


def test_compound_presets_and_train_options_validate_and_fill():
    from qpa.methods.compound.options import CompoundOptions

    for name, options in CompoundOptions.PRESETS.items():
        config = parse_config({"train_file": "x.jsonl", "method": "compound",
                               "compound": {"preset": name}})
        assert config.compound.blocks == options["blocks"]
        assert config.train.lr == CompoundOptions.LEARNING_RATES[name]
        assert config.compound.matches_preset()
    changed = parse_config({"train_file": "x.jsonl", "method": "compound",
                            "compound": {"blocks": 2}})
    assert changed.compound.blocks == 2 and not changed.compound.matches_preset()
    lora = parse_config({"train_file": "x.jsonl", "method": "lora"})
    assert lora.train.lr == LoraOptions.LEARNING_RATE
    for section, field, value in [("compound", "preset", "tiny"), ("train", "schedule", "step"),
                                  ("train", "warmup_steps", -1), ("train", "lr", 0)]:
        with pytest.raises(ConfigError) as caught:
            parse_config({"train_file": "x.jsonl", "method": "compound", section: {field: value}})
        assert caught.value.field == f"{section}.{field}"


def test_frontier_rows_train_each_presets_own_module_set():
    """What the frontier measured for a preset is what a job naming only that preset adapts
    (other rows may ablate the module set)."""
    from bench.bench_frontier import ROWS
    from qpa.methods import methods
    from qpa.models import TARGET_SETS

    for method, spec in methods().items():
        for preset in getattr(spec.options, "PRESETS", {}):
            config = {"method": method, method: {"preset": preset}}
            rows = [row for row in ROWS.values() if row.config == config]
            assert rows, f"no frontier row for {method} {preset}"
            target_set = parse_config({"train_file": "x.jsonl", **config}).method_options.target_set
            assert TARGET_SETS[target_set]["llama"] in [list(row.targets) for row in rows]


def test_frontier_measures_every_method_through_the_trainer():
    """Each registered method has a frontier row that trains it with qpa.training (not only a
    PEFT loop beside it)."""
    from bench.bench_frontier import ROWS
    from qpa.methods import methods

    measured = {row.config.get("method") for row in ROWS.values() if row.peft is None}
    assert set(methods()) <= measured


def test_frontier_counts_only_runs_of_each_rows_current_definition():
    """A row whose config changed keeps its old runs in frontier.json; they must not mix
    into its sweep or summary. An ablation row takes its parent's rate even when the
    parent is not among the rows asked for."""
    import argparse

    from bench import bench_frontier as bf

    s = bf.settings_for(argparse.Namespace(quick=False, steps=None, sweep_steps=None,
                                           eval_chunks=48))
    paths = {"train": "", "eval": ""}

    def run(row: str, spec: dict, loss: float) -> tuple[str, dict]:
        return bf._key(spec), {"row": row, "lr": spec["lr"], "seed": 0, "steps": spec["steps"],
                               "loop": False, "eval_loss": loss}

    current = bf._spec("compound_compact", 3e-3, 0, 60, s, paths)
    stale = {**current, "config": {**current["config"],
                                   "compound": {"preset": "compact", "blocks": 8}}}
    parent = bf._spec("qpa_balanced_qv", 1e-2, 0, 60, s, paths)
    results = {"settings": s, "runs": dict([run("compound_compact", current, 2.8),
                                            run("compound_compact", stale, 2.9),
                                            run("qpa_balanced_qv", parent, 2.7)])}
    assert [r["eval_loss"] for r in bf.current_runs(results)] == [2.8, 2.7]
    rates = bf.chosen_rates(results, ["compound_compact", "qpa_balanced_qv_frozen"])
    assert rates["compound_compact"]["losses"] == {"0.003": 2.8}
    assert rates["qpa_balanced_qv_frozen"] == {"lr": 1e-2, "from": "qpa_balanced_qv"}


def test_lr_schedule_warms_up_then_decays():
    config = parse_config({"train_file": "x.jsonl", "method": "lora", "steps": 100,
                           "train": {"lr": 1.0}})
    assert config.train.warmup_steps == 6 and config.train.schedule == "cosine"
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    schedule = lr_schedule(optimizer, config)
    rates = []
    for _ in range(config.steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx(1 / 6) and rates[5] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[5:], rates[6:], strict=False))
    assert 0 < rates[-1] < 0.01
    constant = parse_config({"train_file": "x.jsonl", "method": "lora", "steps": 10,
                             "train": {"lr": 1.0, "schedule": "constant", "warmup_steps": 0}})
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    schedule = lr_schedule(optimizer, constant)
    for _ in range(10):
        assert optimizer.param_groups[0]["lr"] == 1.0
        optimizer.step()
        schedule.step()
