"""Plain LoRA through PEFT: the baseline every other method is compared with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from qpa.methods.base import AdapterMethod
from qpa.models import layer_shape, matched_modules


def lora_config(config, target_modules: list[str], model: nn.Module) -> LoraConfig:
    """The PEFT LoRA config shared by ``lora`` and ``qpa`` (QPA exports plain LoRA)."""
    is_gpt2 = getattr(getattr(model, "config", None), "model_type", "") == "gpt2"
    return LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=target_modules,
        fan_in_fan_out=is_gpt2,  # GPT-2's Conv1D stores weights transposed
        bias="none",
        task_type="CAUSAL_LM",
    )


def lora_parameter_count(model: nn.Module, target_modules: list[str], rank: int) -> int:
    """Exact parameter count of plain LoRA of ``rank`` on these targets: r (in + out) each."""
    return sum(rank * sum(layer_shape(m)) for m in matched_modules(model, target_modules).values())


class LoraMethod(AdapterMethod):
    """LoRA A and B trained directly (PEFT's own layers and initialisation)."""

    name = "lora"

    def attach(self, base_model: nn.Module) -> nn.Module:
        self.lora_params_total = lora_parameter_count(
            base_model, self.target_modules, self.config.lora.r
        )
        self.model = get_peft_model(
            base_model, lora_config(self.config, self.target_modules, base_model)
        )
        return self.model

    def trainable_modules(self) -> dict[str, nn.Module | nn.Parameter]:
        return {
            name: param for name, param in self.model.named_parameters() if param.requires_grad
        }

    def state_dict(self) -> dict[str, Any]:
        return {name: param.detach().clone() for name, param in self.trainable_modules().items()}

    def export_adapter(self, directory: Path) -> dict[str, Any]:
        assert isinstance(self.model, PeftModel)
        self.model.save_pretrained(directory)
        return {"peft_type": "LORA", "exact": True}

    def parameter_report(self) -> dict[str, Any]:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        return {
            "trainable_params": trainable,
            "lora_equivalent_params": self.lora_params_total,
            "ratio_to_lora": trainable / self.lora_params_total,
        }
