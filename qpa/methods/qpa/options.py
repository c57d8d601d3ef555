"""The ``qpa`` section: the generator's circuit, mapping network and presets."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from qpa.options import PresetSection


class QpaOptions(PresetSection):
    """Quantum Parameter Adaptation: a circuit plus a mapping MLP generate the LoRA weights."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # compact: eight circuits and no basis-state bits, so p alone tells chunks apart
        # and the trained circuit measurably matters (research runs, BENCHMARKS.md).
        "compact": {"chunk_size": 64, "mlp_hidden": [32, 32], "features": 8,
                    "basis_bits": False},
        "balanced": {"chunk_size": 512, "mlp_hidden": [32, 32]},
        "paper": {"chunk_size": 1024, "mlp_hidden": [32, 30]},
    }
    # The generator's size barely grows with the modules it writes (more chunks: one more
    # qubit, a few more angles, per doubling), so generating LoRA for every projection is
    # nearly free: at 60 steps balanced reached 80.5 % of LoRA r=4's gain there against
    # 72.5 % on q/v, paper 92.6 % against 81.5 % (research runs, docs/BENCHMARKS.md
    # section 4). compact stays on q/v although the frontier measured it on every projection
    # at 150 steps (60.0 % against 56.3 % at 1.92 % against 1.83 %, the trained circuit
    # still ahead of frozen angles): the QPU measurements behind quantum.preset and the QPU
    # estimates were made on compact q/v, and more modules need more qubits.
    TARGET_SETS: ClassVar[dict[str, str]] = {"balanced": "all_linear", "paper": "all_linear"}
    # The frontier's sweep chose 1e-2 for all three (60 steps at 1e-3, 3e-3, 1e-2, 3e-2:
    # balanced on every projection 2.874, 2.818, 2.778, 2.850; paper on every projection
    # 2.833, 2.758, 2.716, 2.824; on q/v 2.874, 2.798, 2.773, 2.850).
    LEARNING_RATES: ClassVar[dict[str, float]] = {
        "compact": 1e-2, "balanced": 1e-2, "paper": 1e-2,
    }

    MEASURED: ClassVar[dict[str, str]] = {
        "compact": "Quality frontier (SmolLM2-135M q/v, 150 steps, seeds 0-2): 56.3 % of "
        "LoRA r=4's held-out loss gain with 1.8 % of its parameters; with the circuit's "
        "angles frozen 48.7 %.",
        "balanced": "Quality frontier (SmolLM2-135M, LoRA generated for every projection, 150 "
        "steps, seeds 0-2): 80.1 % of LoRA r=4's held-out loss gain with 8.0 % of its "
        "parameters (loss 2.678 +- 0.015 vs 2.552 +- 0.008, base 3.187; q/v only: 71.6 %).",
        "paper": "Quality frontier (SmolLM2-135M, LoRA generated for every projection, 150 "
        "steps, seeds 0-2): 86.5 % of LoRA r=4's held-out "
        "loss gain with 14.4 % of its parameters (loss 2.638 +- 0.014 vs 2.552 +- 0.008, base "
        "3.187; q/v only: 77.7 %).",
    }

    preset: Literal["compact", "balanced", "paper"] = Field(
        default="balanced",
        description="Named operating point (docs/BENCHMARKS.md, quality frontier): compact "
        "(~1.8 % of LoRA r=4's parameters on SmolLM2 q/v), balanced (~8 %) and paper (~14 %, "
        "the QPA paper's Gemma-2 ratio), both generating LoRA for every projection. It fills every "
        "option left out, train.lr, and lora.target_modules when the job lists none.",
    )

    chunk_size: Annotated[
        int, Field(ge=1, le=65536, description="Values per generated chunk.")
    ] = 64
    depth: Annotated[int, Field(ge=1, le=200, description="Ansatz layers (RY + entangler).")] = 8
    ansatz: Literal["ry_cnot", "rbs"] = Field(
        default="ry_cnot",
        description="ry_cnot: the paper's RY layer + CNOT chain; rbs: Hamming-weight-preserving "
        "RBS brick ansatz on a half-filled register.",
    )
    mlp_hidden: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [32, 32], description="Hidden widths of the mapping MLP."
    )
    sub_generators: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        default=1,
        description="Independent circuit+MLP pairs; each covers an equal share of the "
        "chunks, so each needs fewer qubits. auto: the fewest whose circuits fit the "
        "backend's width and quantum.max_qubits (e.g. 5 qubits on FakeManilaV2).",
    )
    update_every: Annotated[
        int,
        Field(ge=1, description="Evaluate the circuit and its gradient once per this many "
              "optimiser steps (1 = exact joint training)."),
    ] = 1
    angle_lr: float | None = Field(
        default=None, gt=0, description="Learning rate of the circuit angles (default: train.lr)."
    )
    generate_a: bool = Field(
        default=True,
        description="Generate LoRA's A as well as B. False: A keeps PEFT's random "
        "initialisation, frozen (as in LoRA-FA), and the generator writes B only.",
    )
    features: Annotated[int, Field(ge=1, le=64, description=(
        "Circuits per sub-generator; the mapping MLP reads one post-processed probability "
        "of each per chunk."))] = 1
    basis_bits: bool = Field(
        default=True,
        description="Feed chunk j's basis-state bits to the mapping MLP next to p_j. False: "
        "the MLP reads only the post-processed p_j of the `features` circuits, so the "
        "circuits alone tell the chunks apart and training them measurably helps "
        "(docs/BENCHMARKS.md section 4); use with features >= 4.",
    )
    postprocess: Literal["standardize", "scaled", "paper"] = Field(
        default="standardize",
        description="How p_j becomes the MLP's input: standardize = (p - mean) / std; "
        "scaled = 2^n p - 1; paper = the QPA authors' (0.6 tanh(0.1 2^(n-1) p))^0.15 - mean.",
    )
    ablation: Literal["none", "frozen_angles", "constant_p", "random_p"] = Field(
        default="none",
        description="For measuring what the circuit contributes: frozen_angles holds p at the "
        "initial angles; constant_p feeds the uniform p (the MLP sees the bits only); "
        "random_p feeds an untrained Porter-Thomas draw. None of them trains angles. "
        "frozen_angles is also quantum.preset qpu-economy's choice: one primitive job per run, "
        "and on shot-based backends it beat trained angles (docs/BENCHMARKS.md, QPU settings).",
    )
