"""Export trained compound adapters as a stock PEFT adapter (no qpa, no qiskit to load it).

Preferred form: PEFT OFT. Our adapter rotates each module's input by the block-diagonal R
exactly as PEFT's OFT does (same side, same r blocks of in_features / r), so each block
B_i (direct sum of compounds + identity padding, multiplied over ``num_adapters``) is
converted to OFT's stored parameter by the inverse Cayley transform

    S_i = (I + B_i)^-1 (I - B_i),   stored: S_i[triu(1)]   (PEFT: B = (I - S)(I + S)^-1)

and written with ``OFTConfig(r=blocks, oft_block_size=0, use_cayley_neumann=False)``. The
round trip is checked in float32 with PEFT's own formula before anything is written.

Where that is impossible for some module, *no* OFT adapter is written (PEFT cannot mix
adapter types in one directory, and shipping the rest as OFT would silently drop those
modules). Instead the whole adapter is written as a stock PEFT LoRA whose product B·A is
the exact merged weight change of every module, ``W (R^T - I)``: since R - I vanishes outside
the active coordinates S of each block, ``W (R^T - I) = W[:, S] (R^T - I)[S, :]``, a LoRA of
rank min(|S|, out_features) with ``lora_alpha = r`` (scaling 1). This happens when

* a block has an eigenvalue at (or numerically near) -1: no finite Cayley parameter;
* R is not orthogonal (``orthogonal=False``, or the ``max``/``avg`` reductions);
* the module is GPT-2's ``Conv1D``, which stock PEFT's OFT does not support.

Either way the result is verified against the trained merged weights and the facts returned
for the model card say which form was written and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, OFTConfig
from safetensors.torch import save_file
from torch import nn

from qpa.methods.compound.layer import CompoundLinear, layer_widths
from qpa.methods.compound.minors import cayley, inverse_cayley, skew_from_vector, triu_index

# Largest entry-wise deviation of a rebuilt fp32 OFT block from the trained block that we
# still call exact: fp32 Cayley round-off is ~1e-7; an eigenvalue near -1 blows far past it.
OFT_BLOCK_TOLERANCE = 1e-5
# Deviation of B^T B from I above which a block is "not orthogonal" (fp64 Cayley: ~1e-15).
ORTHOGONALITY_TOLERANCE = 1e-6
# Largest deviation of the exported merged weights from the trained ones we accept at all.
WEIGHT_TOLERANCE = 1e-4

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class OftConversion:
    """OFT parameters of one module, or why there are none."""

    vector: torch.Tensor | None  # (num_unitaries, b(b-1)/2) float32
    reason: str | None  # for this module, with numbers
    max_error: float  # largest entry-wise deviation of a rebuilt block
    kind: str | None = None  # the reason's category, shared by modules (for the model card)
    weight_error: float = float("nan")  # largest deviation of the merged weight it implies


REASON_SUMMARIES = {
    "conv1d": "stock PEFT's OFT does not support transformers' Conv1D (GPT-2) layers",
    "not_orthogonal": "the rotation is not orthogonal (orthogonal=False or reduction max/avg)",
    "minus_one": "a rotation block has an eigenvalue at (or near) -1, which no finite "
                 "Cayley parameter reaches",
}


def convert_to_oft(layer: CompoundLinear) -> OftConversion:
    """Inverse-Cayley every block of ``layer`` and check PEFT's float32 rebuild of it."""
    adapter = layer.compound
    if layer.is_conv1d:
        return OftConversion(None, REASON_SUMMARIES["conv1d"], float("nan"), "conv1d")
    with torch.no_grad():
        blocks = adapter.rotation_blocks(torch.float64)
        size = blocks.shape[-1]
        eye = torch.eye(size, dtype=blocks.dtype, device=blocks.device)
        drift = (blocks.transpose(-2, -1) @ blocks - eye).abs().max().item()
        if drift > ORTHOGONALITY_TOLERANCE:
            why = ("orthogonal=False" if not adapter.orthogonal
                   else f"reduction={adapter.reduction}")
            return OftConversion(None, f"the rotation is not orthogonal ({why}; "
                                       f"max |B^T B - I| = {drift:.1e})", drift,
                                 "not_orthogonal")
        try:
            skew = inverse_cayley(blocks)
        except torch.linalg.LinAlgError:  # I + B exactly singular
            skew = torch.full_like(blocks, float("inf"))
        rows, cols = triu_index(size, skew.device)
        vector = skew[..., rows, cols].to(torch.float32).contiguous()
        if not torch.isfinite(vector).all():
            return OftConversion(None, "a rotation block has an eigenvalue at -1, which no "
                                       "Cayley parameter reaches", float("inf"), "minus_one")
        deviation = cayley(skew_from_vector(vector, size)).to(torch.float64) - blocks
        error = deviation.abs().max().item()
        if not error <= OFT_BLOCK_TOLERANCE:
            return OftConversion(None, "a rotation block has an eigenvalue at (or near) -1, so "
                                       "its Cayley parameter is ill-conditioned (float32 "
                                       f"rebuild error {error:.1e})", error, "minus_one")
        if adapter.num_unitaries == 1:
            deviation = deviation.expand(adapter.layout.blocks, -1, -1)
        weight = layer.linear_weight().to(torch.float64)
        weight_error = (weight @ torch.block_diag(*deviation.unbind(0)).T).abs().max().item()
    return OftConversion(vector.cpu(), None, error, weight_error=weight_error)


def lora_factors(layer: CompoundLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) in float64 with B @ A = W (R^T - I), W as (out, in); rank min(|S|, out)."""
    adapter = layer.compound
    layout = adapter.layout
    with torch.no_grad():
        weight = layer.linear_weight().to(torch.float64)
        rotation = adapter.full_rotation(torch.float64)
        change = rotation.T - torch.eye(layout.in_features, dtype=torch.float64,
                                        device=rotation.device)
        offsets = torch.arange(layout.blocks, device=weight.device) * layout.block_size
        active = (offsets[:, None] + torch.arange(layout.active_size, device=weight.device))
        active = active.reshape(-1)
        out_features = weight.shape[0]
        if out_features < active.numel():
            return torch.eye(out_features, dtype=torch.float64), (weight @ change).cpu()
        return weight[:, active].cpu(), change[active, :].cpu()


def _base_model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
    return str(name) if name else None


def _merged_error(layer: CompoundLinear, delta: torch.Tensor) -> float:
    with torch.no_grad():
        weight = layer.linear_weight().to(torch.float64)
        rotation = layer.compound.full_rotation(torch.float64)
        target = weight @ rotation.T
        return (weight + delta.to(weight.device) - target).abs().max().item()


def _write_oft(layers: dict[str, CompoundLinear], conversions: dict[str, OftConversion],
               directory: Path, base_name: str | None) -> float:
    first = next(iter(layers.values())).compound
    state = {f"base_model.model.{name}.oft_R.weight": conversion.vector
             for name, conversion in conversions.items()}
    config = OFTConfig(
        r=first.layout.blocks,
        oft_block_size=0,
        target_modules=sorted(layers),
        use_cayley_neumann=False,
        block_share=first.num_unitaries == 1,
        module_dropout=0.0,
        bias="none",
        init_weights=True,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_name,
    )
    save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config.save_pretrained(str(directory))
    return max(conversion.weight_error for conversion in conversions.values())


def exact_lora(layers: dict[str, CompoundLinear]
               ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int, float]:
    """Per module fp32 (A, B) with B @ A = W (R^T - I), zero-padded to one rank; the rank;
    and the largest deviation of the merged weight it implies from the trained one.

    Raises RuntimeError past ``WEIGHT_TOLERANCE``: never ship a wrong adapter.
    """
    factors = {name: lora_factors(layer) for name, layer in layers.items()}
    # One rank for all modules (zero-padded): robust, needs no per-module rank_pattern keys.
    rank = max(up.shape[1] for up, _ in factors.values())
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    worst = 0.0
    for name, (up, down) in factors.items():
        in_features, out_features = layer_widths(layers[name].base_layer)
        lora_a = torch.zeros(rank, in_features, dtype=torch.float32)
        lora_b = torch.zeros(out_features, rank, dtype=torch.float32)
        lora_a[: down.shape[0]] = down.to(torch.float32)
        lora_b[:, : up.shape[1]] = up.to(torch.float32)
        worst = max(worst, _merged_error(layers[name], lora_b.double() @ lora_a.double()))
        out[name] = (lora_a.contiguous(), lora_b.contiguous())
    if not worst <= WEIGHT_TOLERANCE:
        raise RuntimeError(f"merged-weight export deviates by {worst:.1e}; refusing to ship it")
    return out, rank, worst


def _write_lora(layers: dict[str, CompoundLinear], directory: Path,
                base_name: str | None) -> tuple[int, float]:
    # Checked before anything is written (exact_lora raises on a deviation).
    factors, rank, worst = exact_lora(layers)
    state: dict[str, torch.Tensor] = {}
    for name, (lora_a, lora_b) in factors.items():
        state[f"base_model.model.{name}.lora_A.weight"] = lora_a
        state[f"base_model.model.{name}.lora_B.weight"] = lora_b
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(layers),
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=all(layer.is_conv1d for layer in layers.values()),
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_name,
    )
    save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config.save_pretrained(str(directory))
    return rank, worst


def export_compound_adapter(model: nn.Module, layers: dict[str, CompoundLinear],
                            directory: Path) -> dict[str, Any]:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors``; return model-card facts.

    Facts: ``peft_type`` ("OFT" or "LORA"), ``exact`` (True when every module was written in
    OFT form, i.e. the compact orthogonal adapter itself), ``modules_merged`` (modules shipped
    as exact merged-weight deltas), ``inexact_modules`` (module -> why OFT was impossible),
    ``max_weight_error``, and ``notes`` for the model card.
    """
    if not layers:
        raise ValueError("no compound layers to export")
    directory.mkdir(parents=True, exist_ok=True)
    base_name = _base_model_name(model)
    conversions = {name: convert_to_oft(layer) for name, layer in layers.items()}
    inexact = {name: c.reason for name, c in conversions.items() if c.vector is None}
    kinds = sorted({c.kind for c in conversions.values() if c.kind is not None})
    first = next(iter(layers.values())).compound
    if not inexact:
        error = _write_oft(layers, conversions, directory, base_name)
        block_error = max(conversion.max_error for conversion in conversions.values())
        notes = [
            "Exported as a stock PEFT OFT adapter (use_cayley_neumann=False, "
            f"r={first.layout.blocks} blocks per module, block_share="
            f"{first.num_unitaries == 1}). Each block's orthogonal matrix (direct sum of "
            "compound matrices C_k(U) plus identity padding) was converted to OFT's "
            "skew-symmetric parameter by the inverse Cayley transform; largest deviation of "
            f"a rebuilt block entry: {block_error:.1e}, of a merged weight: {error:.1e}.",
        ]
        return {
            "peft_type": "OFT",
            "exact": True,
            "modules_merged": [],
            "inexact_modules": {},
            "max_weight_error": error,
            "notes": notes,
            "files": [ADAPTER_CONFIG, ADAPTER_WEIGHTS],
        }
    rank, error = _write_lora(layers, directory, base_name)
    notes = [
        f"{len(inexact)} of {len(layers)} adapted modules cannot be written as PEFT OFT: "
        + "; ".join(REASON_SUMMARIES[kind] for kind in kinds) + ".",
        "The adapter is therefore exported as a stock PEFT LoRA whose product B·A is each "
        f"module's exact merged weight change W·(R^T - I) (rank {rank}, lora_alpha = r so the "
        "scaling is 1). It loads with PeftModel.from_pretrained like any LoRA and reproduces "
        f"the trained model (largest weight deviation {error:.1e}), but it is much larger "
        "than the trained compound adapter.",
    ]
    return {
        "peft_type": "LORA",
        "exact": False,
        "modules_merged": sorted(layers),
        "inexact_modules": inexact,
        "max_weight_error": error,
        "lora_rank": rank,
        "notes": notes,
        "files": [ADAPTER_CONFIG, ADAPTER_WEIGHTS],
    }
