"""The ``compound`` section: orders, blocks and presets of compound adapters."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator

from qpa.options import PresetSection


class CompoundOptions(PresetSection):
    """Quantum-inspired compound adapters (Coyle & Raj 2025): orthogonal, multiplicative."""

    # Block counts are powers of two so that they divide common widths (576, 896, 1536...).
    # Research runs (docs/BENCHMARKS.md section 4) found small shared blocks spread over many
    # modules beat larger blocks on q/v alone at the same size, with 16 blocks the best count
    # (32 were worse). On SmolLM2 (576-wide inputs, 1536 for down): compact 16 shared blocks
    # of 36 -> one 8x8 U (28 angles) per module on q, k, v, o, gate and up (6 x 30 modules:
    # 5,040 parameters, 2.2 % of LoRA r=4 on q/v); balanced the same on every projection,
    # down's 96-wide blocks with a 13x13 U (78) (7,380, 3.2 %); paper 4 unshared blocks on
    # q/v -> four 16x16 (480 per module: 28,800, 12.5 %; the default before presets existed).
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "compact": {"orders": [1, 2], "blocks": 16, "block_share": True},
        "balanced": {"orders": [1, 2], "blocks": 16, "block_share": True},
        "paper": {"orders": [1, 2], "blocks": 4, "block_share": False},
    }
    TARGET_SETS: ClassVar[dict[str, str]] = {"compact": "attention_mlp_in",
                                             "balanced": "all_linear"}
    # The frontier's sweeps (60 steps at 1e-3, 3e-3, 1e-2, 3e-2): compact 2.872, 2.808,
    # 2.926, 3.769; balanced 2.811, 2.783, 2.998, 4.570; paper 2.776, 2.715, 2.846, 4.118.
    LEARNING_RATES: ClassVar[dict[str, float]] = {
        "compact": 3e-3, "balanced": 3e-3, "paper": 3e-3,
    }

    MEASURED: ClassVar[dict[str, str]] = {
        "compact": "Quality frontier (SmolLM2-135M, q k v o gate up, 150 steps, seeds 0-2): "
        "67.9 % of LoRA r=4's held-out loss gain with 2.2 % of its parameters (loss 2.756 "
        "+- 0.008 vs 2.552 +- 0.008, base 3.187; 8 blocks on q/v at 1.4 %: 59.9 %).",
        "balanced": "Quality frontier (SmolLM2-135M, every projection, 150 steps, seeds 0-2): "
        "75.5 % of LoRA r=4's held-out loss gain with 3.2 % of its parameters (loss 2.708 "
        "+- 0.011 vs 2.552 +- 0.008, base 3.187).",
        "paper": "Quality frontier (SmolLM2-135M q/v, 150 steps, seeds 0-2): 90.5 % of LoRA "
        "r=4's held-out loss gain with 12.5 % of its parameters (loss 2.612 +- 0.014 vs "
        "2.552 +- 0.008, base 3.187).",
    }

    preset: Literal["compact", "balanced", "paper"] = Field(
        default="compact",
        description="Named operating point (docs/BENCHMARKS.md, quality frontier): compact "
        "(16 shared blocks on attention and the MLP's input projections, ~2.2 % of LoRA r=4's "
        "parameters on SmolLM2 q/v), balanced (the same on every projection, ~3.2 %), paper "
        "(4 unshared blocks on q/v, ~12.5 %). It fills every option left out, train.lr, and "
        "lora.target_modules when the job lists none.",
    )

    orders: list[Literal[1, 2, 3]] = Field(
        default_factory=lambda: [1, 2], description="Hamming-weight orders k of C_k(U) per block."
    )
    blocks: Annotated[int, Field(ge=1, description="Blocks r per adapted module.")] = 4
    block_share: bool = Field(default=False, description="One U shared by all blocks of a module.")
    num_adapters: Annotated[int, Field(ge=1, le=8, description="Adapters multiplied together.")] = 1
    orthogonal: bool = Field(default=True, description="Cayley-parametrised U (False: free U).")
    reduction: Literal["det", "max", "avg"] = Field(
        default="det", description="det = true compound minors; max/avg = the paper's ablations."
    )

    @field_validator("orders")
    @classmethod
    def _unique_orders(cls, value: list[int]) -> list[int]:
        if not value or len(set(value)) != len(value):
            raise ValueError("must list distinct orders from {1, 2, 3}")
        return sorted(value)
