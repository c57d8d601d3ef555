"""Injection of compound adapters into a model, and the ``compound`` method the trainer uses.

Target modules are matched by PEFT's own check (``qpa.models.matches_target``), so the
exported adapter's ``target_modules`` select exactly the modules trained here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from qpa.config import JobConfig
from qpa.errors import ConfigError
from qpa.exports.lora import LoraForm
from qpa.methods.base import AdapterMethod
from qpa.methods.compound.layer import SUPPORTED_LAYERS, CompoundLinear, layer_widths
from qpa.methods.compound.minors import plan_layout
from qpa.methods.compound.options import CompoundOptions
from qpa.models import matches_target


def inject_compound_adapters(model: nn.Module, target_modules: list[str],
                             options: CompoundOptions) -> dict[str, CompoundLinear]:
    """Replace every targeted Linear/Conv1D of ``model`` (in place) by a ``CompoundLinear``.

    Raises ConfigError naming ``lora.target_modules`` when nothing matches or a match has an
    unsupported type, and ``compound.blocks`` when the blocks do not fit a module's width.
    """
    found: list[tuple[str, nn.Module]] = [
        (name, module) for name, module in model.named_modules()
        if name and matches_target(name, target_modules) and not isinstance(module, CompoundLinear)
    ]
    if not found:
        raise ConfigError(
            "lora.target_modules",
            f"no module of the model matches {target_modules}",
        )
    layers: dict[str, CompoundLinear] = {}
    for name, module in found:
        if not isinstance(module, SUPPORTED_LAYERS):
            raise ConfigError(
                "lora.target_modules",
                f"{name} is a {type(module).__name__}; compound adapters support nn.Linear "
                "and GPT-2's Conv1D",
            )
        in_features, _ = layer_widths(module)
        try:
            layout = plan_layout(in_features, options.blocks, tuple(options.orders))
        except ValueError as error:
            raise ConfigError("compound.blocks", f"{name}: {error}") from None
        wrapped = CompoundLinear(module, layout, options)
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, wrapped)
        layers[name] = wrapped
    return layers


class CompoundMethod(AdapterMethod):
    """Quantum-inspired compound adapters (Coyle & Raj 2025) as ``method: compound``."""

    name = "compound"

    def __init__(self, config: JobConfig, target_modules: list[str]):
        super().__init__(config, target_modules)
        self.options = config.compound
        self.layers: dict[str, CompoundLinear] = {}

    def attach(self, base_model: nn.Module) -> nn.Module:
        for param in base_model.parameters():
            param.requires_grad_(False)
        self.layers = inject_compound_adapters(base_model, self.target_modules, self.options)
        self.model = base_model
        return base_model

    def trainable_modules(self) -> dict[str, nn.Module | nn.Parameter]:
        return {name: layer.compound for name, layer in self.layers.items()}

    def export_adapter(self, directory: Path) -> dict[str, Any]:
        from qpa.methods.compound.export import export_compound_adapter

        if self.model is None:
            raise RuntimeError("attach() the method to a model before exporting")
        return export_compound_adapter(self.model, self.layers, Path(directory))

    def merged_weights(self) -> dict[str, torch.Tensor]:
        """W R^T (Conv1D: R W) per module, from the trained parameters in float64."""
        return {name: layer.effective_weight(torch.float64) for name, layer in self.layers.items()}

    def lora_form(self, adapter_dir: Path) -> LoraForm:
        """The exact weight change W (R^T - I) of every module as a LoRA (llama.cpp has no
        OFT): rank up to the active block coordinates, lora_alpha = rank (scaling 1)."""
        from qpa.methods.compound.export import exact_lora

        factors, rank, error = exact_lora(self.layers)
        notes = (f"llama.cpp has no orthogonal adapters, so adapter.gguf carries the compound "
                 f"adapter's exact weight change W (R^T - I) of every module as a LoRA of rank "
                 f"{rank} (largest weight deviation {error:.1e}); it is much larger than the "
                 "trained adapter.")
        return LoraForm(factors, alpha=float(rank), rank=rank, notes=notes)

    def parameter_report(self) -> dict[str, Any]:
        return compound_parameter_report(self.layers, self.config.lora.r)

    def card_rows(self, metrics: dict[str, Any]) -> list[tuple[str, str]]:
        oft = metrics["oft_equivalent_params"]
        return [("PEFT OFT (same block size) parameters", f"{oft:,}"),
                ("ratio to OFT", f"{metrics['trainable_params'] / oft:.2%}")]

    def unitaries(self, module_name: str) -> torch.Tensor:
        """The trained U matrices of one module: (num_adapters, num_unitaries, n, n)."""
        with torch.no_grad():
            return self.layers[module_name].compound.unitaries().detach().clone()

    def circuit(self, module_name: str, block: int = 0, adapter: int = 0):
        """The RBS circuit of one trained U (see ``circuit.py`` for its conventions).

        Its weight-k block is C_k(U), so it reproduces the adapter's compound segments of that
        block; only meaningful for ``orthogonal=True`` with ``reduction="det"``.
        """
        from qpa.methods.compound.circuit import compound_circuit

        unitary = self.unitaries(module_name)[adapter, block].to(torch.float64)
        return compound_circuit(unitary, name=f"{module_name}.U[{adapter},{block}]")


def compound_parameter_report(layers: dict[str, CompoundLinear], lora_rank: int) -> dict[str, Any]:
    """Trainable parameters against plain LoRA (same targets, ``lora_rank``) and PEFT OFT.

    The OFT equivalent is PEFT's OFT with the same block size and block sharing: r blocks of
    b(b-1)/2 skew-symmetric coordinates (one block's worth under ``block_share``), which is
    what ``peft`` reports as trainable for ``OFTConfig(r=blocks, block_share=...)``.
    """
    trainable = lora_equivalent = oft_equivalent = 0
    block_sizes: set[int] = set()
    ns: set[int] = set()
    for layer in layers.values():
        adapter = layer.compound
        layout = adapter.layout
        in_features, out_features = layer_widths(layer.base_layer)
        trainable += adapter.weight.numel()
        lora_equivalent += lora_rank * (in_features + out_features)
        oft_equivalent += adapter.num_unitaries * layout.block_size * (layout.block_size - 1) // 2
        block_sizes.add(layout.block_size)
        ns.add(layout.n)
    return {
        "trainable_params": trainable,
        "lora_equivalent_params": lora_equivalent,
        "lora_rank": lora_rank,
        "oft_equivalent_params": oft_equivalent,
        "ratio_to_lora": trainable / lora_equivalent if lora_equivalent else None,
        "ratio_to_oft": trainable / oft_equivalent if oft_equivalent else None,
        "lora_compression": lora_equivalent / trainable if trainable else None,
        "oft_compression": oft_equivalent / trainable if trainable else None,
        "adapted_modules": len(layers),
        "block_sizes": sorted(block_sizes),
        "n": sorted(ns),
    }
