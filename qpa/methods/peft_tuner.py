"""Methods that are one of PEFT's own tuners (``lora``, ``vera``): PEFT builds the layers,
initialises, saves and merges them; the method only says which ``PeftConfig`` to use."""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Any

from peft import PeftConfig, PeftModel, get_peft_model
from torch import nn

from qpa.methods.base import AdapterMethod
from qpa.models import layer_shape, matched_modules


def stores_transposed(model: nn.Module) -> bool:
    """GPT-2's Conv1D stores weights as (in, out): PEFT's ``fan_in_fan_out``."""
    return getattr(getattr(model, "config", None), "model_type", "") == "gpt2"


def lora_parameter_count(model: nn.Module, target_modules: list[str], rank: int) -> int:
    """Exact parameter count of plain LoRA of ``rank`` on these targets: r (in + out) each."""
    return sum(rank * sum(layer_shape(m)) for m in matched_modules(model, target_modules).values())


class PeftTunerMethod(AdapterMethod):
    """A PEFT tuner trained as PEFT trains it; its export is PEFT's ``save_pretrained``."""

    @abstractmethod
    def peft_config(self, base_model: nn.Module) -> PeftConfig:
        """The PEFT config of this job's adapter on ``base_model``."""

    def attach(self, base_model: nn.Module) -> nn.Module:
        self.lora_params_total = lora_parameter_count(
            base_model, self.target_modules, self.config.lora.r
        )
        self.model = get_peft_model(base_model, self.peft_config(base_model))
        return self.model

    def trainable_modules(self) -> dict[str, nn.Module | nn.Parameter]:
        return {
            name: param for name, param in self.model.named_parameters() if param.requires_grad
        }

    def export_adapter(self, directory: Path) -> dict[str, Any]:
        assert isinstance(self.model, PeftModel)
        self.model.save_pretrained(directory)
        return {"peft_type": str(self.model.peft_config["default"].peft_type.value),
                "exact": True}

    def parameter_report(self) -> dict[str, Any]:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        return {
            "trainable_params": trainable,
            "lora_equivalent_params": self.lora_params_total,
            "ratio_to_lora": trainable / self.lora_params_total,
        }
