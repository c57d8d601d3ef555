"""The ``vera`` section: rank of the shared projections and the scaling vectors' start."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field

from qpa.options import Section


class VeraOptions(Section):
    """PEFT's ``VeraConfig`` options a job may set (targets come from ``lora.target_modules``)."""

    # VeRA's scaling vectors need a large rate: the frontier's sweeps of PEFT VeRA
    # (docs/BENCHMARKS.md section 4) chose 1e-1 after extending past the grid's 3e-2 top,
    # at the default r=256 (60 steps: 2.779 at 3e-2, 2.706 at 1e-1, 2.991 at 3e-1; 150
    # steps: 90.5 % of LoRA r=4's gain with 16.7 % of its parameters) and at r=16.
    LEARNING_RATE: ClassVar[float] = 1e-1

    r: Annotated[int, Field(ge=1, le=8192, description=(
        "Rank of the shared random projections. The trainable count is r + out_features per "
        "module, so a large r costs little (PEFT's default 256)."))] = 256
    d_initial: Annotated[float, Field(gt=0, le=10, description=(
        "Initial value of the per-rank scaling vector lambda_d (the paper recommends <= 0.1)."
    ))] = 0.1
    dropout: Annotated[float, Field(ge=0, lt=1, description="Dropout on the VeRA input.")] = 0.0
    projection_seed: Annotated[int, Field(ge=0, description=(
        "Seed of the shared random projections (PEFT's projection_prng_key). The exported "
        "adapter stores the projections, so loading never depends on it."))] = 0
