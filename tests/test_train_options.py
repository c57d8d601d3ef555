"""train.gradient_checkpointing and train.mixed_precision on every method (tiny Llama, CPU)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config

from qpa.training import Trainer, resolve_mixed_precision

METHODS = ["qpa", "lora", "compound"]


def _one_step(config, watch: str):
    """Loss, gradients, how often module ``watch`` ran and its output dtypes, for one
    training step (forward and backward)."""
    trainer = Trainer(config, "/nonexistent-unused")
    trainer._prepare()
    module = next(m for name, m in trainer.model.named_modules() if name.endswith(watch))
    runs: list[None] = []
    dtypes: list[torch.dtype] = []
    # A pre-hook sees every run: a checkpoint's recompute stops right after the last tensor
    # backward needs, before the module's forward hooks would fire.
    hooks = [module.register_forward_pre_hook(lambda *_: runs.append(None)),
             module.register_forward_hook(lambda _m, _i, output: dtypes.append(output.dtype))]
    try:
        trainer.model.train()
        trainer.method.before_forward(0)
        loss = trainer._step_loss(0)
        loss.backward()
        grads = [p.grad.clone() for p in trainer.method.trainable_parameters()
                 if p.grad is not None]
    finally:
        for hook in hooks:
            hook.remove()
        trainer.method.close()
    return loss.item(), grads, len(runs), dtypes


@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_recomputes_and_changes_nothing(tiny_llama_dir, data_files,
                                                               method):
    results = {}
    for enabled in (False, True):
        config = tiny_config(tiny_llama_dir, data_files, method=method,
                             compound={"blocks": 2}, train={"gradient_checkpointing": enabled})
        results[enabled] = _one_step(config, "layers.0.mlp")
    (loss_off, grads_off, runs_off, _), (loss_on, grads_on, runs_on, _) = \
        results[False], results[True]
    # The MLP inside the checkpointed decoder layer runs again in backward: the option is on.
    assert runs_off == 1 and runs_on == 2
    assert loss_on == loss_off
    assert len(grads_on) == len(grads_off) > 0
    for off, on in zip(grads_off, grads_on, strict=True):
        assert torch.allclose(off, on, rtol=0, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_runs_the_model_in_bfloat16(tiny_llama_dir, data_files, method):
    losses = {}
    for precision in ("no", "bf16"):
        config = tiny_config(tiny_llama_dir, data_files, method=method,
                             compound={"blocks": 2}, train={"mixed_precision": precision})
        loss, grads, _, dtypes = _one_step(config, "layers.0.mlp.down_proj")
        assert dtypes == [torch.bfloat16 if precision == "bf16" else torch.float32]
        # Trainable weights and their gradients stay fp32 (fp64 for the circuit angles).
        assert all(g.dtype in (torch.float32, torch.float64) for g in grads)
        losses[precision] = loss
    assert losses["bf16"] != losses["no"]
    assert losses["bf16"] == pytest.approx(losses["no"], abs=1e-2)


def test_mixed_precision_auto_is_bf16_on_gpus_only(monkeypatch):
    assert resolve_mixed_precision("auto", torch.device("cpu")) == "no"
    assert resolve_mixed_precision("bf16", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_mixed_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_mixed_precision("no", torch.device("cuda")) == "no"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_mixed_precision("auto", torch.device("cuda")) == "no"


def test_training_records_the_options(tiny_llama_dir, data_files, tmp_path):
    from qpa.training import finetune

    config = tiny_config(tiny_llama_dir, data_files, method="lora", steps=1,
                         train={"mixed_precision": "bf16", "gradient_checkpointing": True})
    metrics = finetune(config, tmp_path / "run")
    assert metrics["mixed_precision"] == "bf16"
    assert metrics["gradient_checkpointing"] is True
    assert metrics["world_size"] == 1
