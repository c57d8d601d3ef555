"""Plain LoRA through PEFT: the baseline every other method is compared with."""

from __future__ import annotations

from peft import LoraConfig
from torch import nn

from qpa.methods.peft_tuner import PeftTunerMethod, stores_transposed


def lora_config(config, target_modules: list[str], model: nn.Module) -> LoraConfig:
    """The PEFT LoRA config shared by ``lora`` and ``qpa`` (QPA exports plain LoRA)."""
    return LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=target_modules,
        fan_in_fan_out=stores_transposed(model),
        bias="none",
        task_type="CAUSAL_LM",
    )


class LoraMethod(PeftTunerMethod):
    """LoRA A and B trained directly (PEFT's own layers and initialisation)."""

    name = "lora"

    def peft_config(self, base_model: nn.Module) -> LoraConfig:
        return lora_config(self.config, self.target_modules, base_model)
