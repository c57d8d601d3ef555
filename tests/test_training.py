"""The trainer with QPA and LoRA on tiny Llama and GPT-2 models: zero change at init,
exact joint training at update_every=1, job accounting, resume, and the QPU path."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import PROBE_IDS, LogitTrainer, tiny_config

from qpa.errors import JobCancelled
from qpa.methods import method_class, methods
from qpa.models import load_base_model, resolve_target_modules
from qpa.training import Trainer, finetune


@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
@pytest.mark.parametrize("method", list(methods()))  # every registered method
def test_step_zero_equals_base_model(request, model_fixture, method, data_files):
    model_dir = request.getfixturevalue(model_fixture)
    config = tiny_config(model_dir, data_files, method=method, compound={"blocks": 2})
    base, _, _ = load_base_model(str(model_dir))
    with torch.no_grad():
        base_logits = base(input_ids=PROBE_IDS).logits.clone()
    adapter = method_class(method)(config, resolve_target_modules(base, None))
    model = adapter.attach(base)
    adapter.before_eval()
    with torch.no_grad():
        adapted = model(input_ids=PROBE_IDS).logits
    adapter.close()
    assert (adapted - base_logits).abs().max().item() <= 1e-6


def test_qpa_default_targets_per_architecture(tiny_llama_dir, tiny_gpt2_dir):
    llama, _, _ = load_base_model(str(tiny_llama_dir))
    gpt2, _, _ = load_base_model(str(tiny_gpt2_dir))
    assert resolve_target_modules(llama, None) == ["q_proj", "v_proj"]
    assert resolve_target_modules(gpt2, None) == ["c_attn"]


def test_a_preset_picks_its_module_set_and_a_listed_one_wins(tiny_llama_dir, tiny_gpt2_dir,
                                                            data_files):
    """compound's compact preset adapts attention and the MLP's input projections when the
    job lists no targets, compound's and QPA's balanced every projection (the frontier's
    choices), the others q/v; a job's own ``lora.target_modules`` always wins."""
    expected = {tiny_llama_dir: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"],
                tiny_gpt2_dir: ["c_attn", "attn.c_proj", "c_fc"]}
    for model_dir, targets in expected.items():
        trainer = Trainer(tiny_config(model_dir, data_files, method="compound",
                                      compound={"preset": "compact", "blocks": 2},
                                      lora={"target_modules": None}),
                          "/nonexistent-unused")
        trainer._prepare()
        assert trainer.target_modules == targets
        adapted = {name.rsplit(".compound", 1)[0] for name, _ in
                   trainer.model.named_parameters() if name.endswith("compound.weight")}
        # GPT-2's mlp.c_proj ends in c_proj too; only the attention's is in the set.
        assert len(adapted) == 2 * len(targets)
        assert not any(name.endswith("mlp.c_proj") for name in adapted)
        trainer.method.close()
    for method, preset, target_set in (("compound", "paper", "attention_qv"),
                                       ("qpa", "compact", "attention_qv"),
                                       ("qpa", "balanced", "all_linear")):
        config = tiny_config(tiny_llama_dir, data_files, method=method,
                             **{method: {"preset": preset}})
        assert config.method_options.target_set == target_set
    listed = tiny_config(tiny_llama_dir, data_files, method="compound",
                         compound={"blocks": 2}, lora={"target_modules": ["v_proj"]})
    trainer = Trainer(listed, "/nonexistent-unused")
    trainer._prepare()
    assert trainer.target_modules == ["v_proj"]
    trainer.method.close()


def test_update_every_one_is_exact_joint_training(tiny_llama_dir, data_files):
    """The windowed angle gradient equals autograd straight through the circuit."""
    config = tiny_config(tiny_llama_dir, data_files)
    trainer = Trainer(config, "/nonexistent-unused")
    trainer._prepare()
    method, model = trainer.method, trainer.model
    # Step 0 moves the zero-initialised MLP head; only then can dL/dtheta be non-zero.
    for step in (0, 1):
        trainer.optimizer.zero_grad(set_to_none=True)
        batch = trainer.batches(step)
        method.before_forward(step)
        model(**batch).loss.backward()
        method.before_optimizer_step(step, last_step=False)
        windowed = method.generator.theta.grad.clone()
        if step == 0:
            trainer.optimizer.step()

    # Reference: one graph from theta through p, the MLP and the model.
    generator = method.generator
    generator.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    probs = generator.backend.probabilities(generator.theta)
    generator._p_leaf = probs  # feed the live graph instead of the held copy
    method._set_current(generator())
    model(**batch).loss.backward()
    assert torch.allclose(windowed, generator.theta.grad, atol=1e-10, rtol=1e-7)
    assert windowed.abs().max() > 0


@pytest.mark.parametrize(("update_every", "steps"), [(1, 4), (2, 5), (3, 6)])
def test_job_count_follows_update_every(tiny_llama_dir, data_files, tmp_path, update_every, steps):
    config = tiny_config(tiny_llama_dir, data_files, backend="aer", steps=steps,
                         qpa={"update_every": update_every})
    metrics = finetune(config, tmp_path / "run")
    quantum = metrics["quantum"]
    # One job (forward + every shifted binding) per window; the export reuses the last p.
    windows = math.ceil(steps / update_every)
    assert quantum["jobs"] == windows
    params = metrics["circuit_angles"]
    assert quantum["circuits"] == windows * (1 + 2 * params)


def test_aer_and_statevector_train_identically(tiny_llama_dir, data_files, tmp_path):
    results = {}
    for backend in ("statevector", "aer"):
        config = tiny_config(tiny_llama_dir, data_files, backend=backend, steps=4)
        results[backend] = finetune(config, tmp_path / backend)["eval_loss_after"]
    assert abs(results["statevector"] - results["aer"]) <= 1e-6


def test_training_on_ibm_fake_backend_lowers_loss(tiny_llama_dir, memorise_files, tmp_path):
    """The Runtime session path, in local testing mode with a noisy fake backend."""
    config = tiny_config(tiny_llama_dir, memorise_files, backend="ibm-fake:FakeManilaV2", steps=6,
                         qpa={"update_every": 3}, quantum={"shots": 2048, "seed": 7})
    trainer = LogitTrainer(config, tmp_path / "ibm")
    metrics = trainer.run()
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert metrics["quantum"]["jobs"] == 2
    assert metrics["quantum"]["shots"] >= 2048 * metrics["quantum"]["circuits"]
    assert metrics["num_qubits"] <= 5
    assert trainer.method.backend.session is not None
    assert not trainer.method.backend.session._active  # closed on the way out


def test_cancel_then_resume_matches_uninterrupted_run(tiny_llama_dir, data_files, tmp_path):
    """Cancel mid-window (update_every=2, stop before step 3), resume, finish: same result."""
    config = tiny_config(tiny_llama_dir, data_files, steps=6, qpa={"update_every": 2},
                         train={"checkpoint_every": 100})
    reference = finetune(config, tmp_path / "straight")

    calls = {"n": 0}

    def stop_at_step_three() -> bool:
        calls["n"] += 1
        return calls["n"] == 4

    with pytest.raises(JobCancelled) as cancelled:
        finetune(config, tmp_path / "resumed", should_stop=stop_at_step_three)
    assert cancelled.value.step == 3
    assert (tmp_path / "resumed" / "state" / "checkpoint.pt").is_file()
    events = []
    resumed = finetune(config, tmp_path / "resumed", on_event=events.append)
    first_step = next(e["step"] for e in events if e["type"] == "step")
    assert first_step == 4
    assert resumed["eval_loss_after"] == pytest.approx(reference["eval_loss_after"], abs=1e-6)
    # A finished folder is returned as is: a redelivered task does no work twice.
    again = finetune(config, tmp_path / "resumed", on_event=events.append)
    assert again == resumed


def test_sub_generators_trade_qubits_for_parameters(tiny_llama_dir, data_files, tmp_path):
    one = finetune(tiny_config(tiny_llama_dir, data_files, steps=2,
                               qpa={"chunk_size": 8}), tmp_path / "one")
    four = finetune(tiny_config(tiny_llama_dir, data_files, steps=2,
                                qpa={"chunk_size": 8, "sub_generators": 4}), tmp_path / "four")
    assert four["num_qubits"] == one["num_qubits"] - 2
    assert four["mapping_mlp_params"] == 4 * one["mapping_mlp_params"] - 4 * 16 * 2
    assert four["quantum"]["jobs"] == one["quantum"]["jobs"]  # all circuits share each call


def test_qpa_on_smollm2_uses_fewer_parameters_than_lora(data_files):
    """Acceptance: SmolLM2-135M, r=4 on q_proj/v_proj: QPA trains fewer params than LoRA."""
    from qpa.config import parse_config

    config = parse_config({"train_file": str(data_files[0]), "method": "qpa",
                           "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}})
    base, _, _ = load_base_model("smollm2-135m")
    method = method_class("qpa")(config, ["q_proj", "v_proj"])
    method.attach(base)
    report = method.parameter_report()
    method.close()
    # 30 layers x r=4 x ((576+576) + (576+192)) LoRA values
    assert report["lora_equivalent_params"] == 30 * 4 * (1152 + 768)
    assert report["trainable_params"] < report["lora_equivalent_params"]
    generator = method.generator
    expected = generator.angle_count + sum(p.numel() for p in generator.mlps.parameters())
    assert report["trainable_params"] == expected


def test_rbs_ansatz_trains_identically_on_statevector_and_aer(tiny_llama_dir, data_files,
                                                               tmp_path):
    """The Hamming-weight-preserving ansatz (4-term shift rule on Aer) end to end."""
    results = {}
    for backend in ("statevector", "aer"):
        config = tiny_config(tiny_llama_dir, data_files, backend=backend, steps=3,
                             qpa={"ansatz": "rbs", "depth": 2})
        results[backend] = finetune(config, tmp_path / backend)
    assert results["aer"]["num_qubits"] == results["statevector"]["num_qubits"]
    loss_sv, loss_aer = (results[b]["eval_loss_after"] for b in ("statevector", "aer"))
    assert loss_sv != results["statevector"]["eval_loss_before"]
    assert abs(loss_sv - loss_aer) <= 1e-6
