"""VeRA through PEFT: its layers, initialisation, export and merge, unchanged."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import VeraConfig
from peft.tuners.vera import VeraLayer
from torch import nn

from qpa.exports.lora import PEFT_PREFIX, LoraForm
from qpa.methods.peft_tuner import PeftTunerMethod, stores_transposed

ADAPTER = "default"


class VeraMethod(PeftTunerMethod):
    """Frozen shared random projections; per-module scaling vectors lambda_b, lambda_d trained."""

    name = "vera"

    def peft_config(self, base_model: nn.Module) -> VeraConfig:
        options = self.config.vera
        return VeraConfig(
            r=options.r,
            target_modules=self.target_modules,
            projection_prng_key=options.projection_seed,
            # The projections travel with the adapter: stock PEFT loads it on any machine
            # without regenerating them from the seed.
            save_projection=True,
            vera_dropout=options.dropout,
            d_initial=options.d_initial,
            fan_in_fan_out=stores_transposed(base_model),
            bias="none",
            task_type="CAUSAL_LM",
        )

    def lora_form(self, adapter_dir: Path) -> LoraForm:
        """VeRA's weight change diag(lambda_b) B diag(lambda_d) A is a LoRA of rank r with
        B' = lambda_b * B and A' = lambda_d * A (scaling 1), so llama.cpp can carry it."""
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            for name, layer in self.model.named_modules():
                if not isinstance(layer, VeraLayer):
                    continue
                sliced_a = layer.vera_A[ADAPTER][:, : layer.in_features]
                sliced_b = layer.vera_B[ADAPTER][: layer.out_features, :]
                lora_a = layer.vera_lambda_d[ADAPTER].unsqueeze(-1) * sliced_a
                lora_b = layer.vera_lambda_b[ADAPTER].unsqueeze(-1) * sliced_b
                factors[name.removeprefix(PEFT_PREFIX)] = (lora_a.float().clone(),
                                                          lora_b.float().clone())
        rank = self.config.vera.r
        return LoraForm(factors, alpha=float(rank), rank=rank,
                        notes=f"adapter.gguf carries VeRA's exact weight change as a LoRA of "
                        f"rank {rank} (the shared projections scaled per module).")
