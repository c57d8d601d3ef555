"""An adapter as plain LoRA factors: what the GGUF export writes, whatever the method.

``LoraForm`` holds, for every adapted module, A (rank, in_features) and B (out_features,
rank) in ``nn.Linear`` orientation, so that the module's weight change is
``alpha / rank * B @ A`` with the weight as (out_features, in_features), also for GPT-2's
transposed ``Conv1D``. Methods whose stock PEFT export is a LoRA (``qpa``, ``lora``) are
read back from the adapter folder they wrote; others convert themselves
(``AdapterMethod.lora_form``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

PEFT_PREFIX = "base_model.model."


@dataclass
class LoraForm:
    """Per module (PEFT's qualified name, without ``base_model.model.``): (A, B)."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    alpha: float
    rank: int
    notes: str | None = None  # for the model card: how this form relates to the trained adapter

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, module: str) -> torch.Tensor:
        """The module's weight change, (out_features, in_features), in float64."""
        lora_a, lora_b = self.factors[module]
        return self.scale * (lora_b.double() @ lora_a.double())


class NotLoraError(ValueError):
    """The adapter folder holds no plain LoRA that a LoRA-only format could carry."""


def read_peft_lora(adapter_dir: Path) -> LoraForm:
    """Read a stock PEFT LoRA adapter folder (one rank and alpha for all modules).

    Raises NotLoraError for other PEFT types and for LoRA variants whose weight change is
    not ``alpha / r * B @ A`` (rsLoRA, DoRA, per-module rank or alpha patterns).
    """
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise NotLoraError(f"the adapter is PEFT {peft_type}, not LoRA")
    for key in ("use_rslora", "use_dora"):
        if config.get(key):
            raise NotLoraError(f"the adapter uses {key}, which llama.cpp's LoRA cannot express")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise NotLoraError(f"the adapter has a per-module {key}")
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if key.endswith(suffix):
                module = key.removeprefix(PEFT_PREFIX).removesuffix(suffix)
                pairs.setdefault(module, {})[part] = tensor
                break
        else:
            raise NotLoraError(f"unexpected tensor {key!r} in the adapter (not lora_A/lora_B)")
    factors = {}
    for module, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise NotLoraError(f"{module} lacks lora_A or lora_B")
        factors[module] = (pair["lora_A"], pair["lora_B"])
    return LoraForm(factors, float(config["lora_alpha"]), int(config["r"]))
