"""QPA's quantum cost before any training: the estimator ``qpa estimate`` dispatches to
(``qpa.estimate``; registered as this method's ``MethodSpec.estimator``).

The counts are not a formula. ``plan_jobs`` builds the job's generator with the method's
own ``setup_generator`` and drives the method's own training hooks (``before_forward``,
``before_optimizer_step``, ``before_eval``) in the trainer's order against a
``PlanningBackend``: the generator's ``refresh`` counts the job it would submit (its
``job_circuits``, which its real bindings are checked against) with the shots
``shots_per_circuit`` gives, and nothing runs. So jobs, circuits and shots are what the
same code submits in a real run (a test checks them against metrics.json for aer and two
fake IBM devices). How QPU seconds follow from them is ``qpa.estimate``'s docstring.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qpa.backends.base import QuantumBackend, shots_per_circuit
from qpa.backends.factory import backend_qubit_limit, is_autograd_native, make_backend
from qpa.backends.spec import parse_backend
from qpa.circuits import build_ansatz
from qpa.config import JobConfig
from qpa.errors import ConfigError
from qpa.estimate import QPU_SECONDS_METHOD, QuantumEstimate
from qpa.methods.lora.method import lora_config
from qpa.methods.qpa.generator import fit_sub_generators, plan_qubits
from qpa.methods.qpa.method import (
    QPAMethod,
    generated_layers,
    resolve_sub_generators,
    runs_circuit,
)


class PlanningBackend(QuantumBackend):
    """Counts the jobs a real backend would run, with its shots; evaluates nothing.

    ``QPAGenerator.refresh`` sees ``plans_only`` and calls ``count`` with the circuits of
    the job it would submit (``QPAGenerator.job_circuits``, the count its real bindings are
    checked against). ``sizes`` lists every job's circuits in submission order.
    """

    plans_only = True

    def __init__(self, circuit: Any, name: str, shots: int, autograd_native: bool):
        super().__init__(circuit)
        self._name = name
        self._shots = shots
        self.autograd_native = autograd_native
        self.sizes: list[int] = []

    @property
    def name(self) -> str:
        return self._name

    @property
    def shots_per_circuit(self) -> int:
        return self._shots

    def count(self, circuits: int) -> None:
        self.sizes.append(circuits)
        self.usage.record(circuits=circuits, shots=circuits * self._shots, seconds=0.0)

    def evaluate(self, bindings: np.ndarray) -> np.ndarray:
        raise RuntimeError("a planning backend counts jobs; it evaluates nothing")


@dataclass
class JobPlan:
    """Every primitive job of a fresh run: how many jobs of each size (circuits)."""

    sizes: Counter[int]
    shots_per_circuit: int

    @property
    def jobs(self) -> int:
        return sum(self.sizes.values())

    @property
    def circuits(self) -> int:
        return sum(size * count for size, count in self.sizes.items())

    @property
    def shots(self) -> int:
        return self.circuits * self.shots_per_circuit


def _dry_run(config: JobConfig, num_values: int, steps: int) -> JobPlan:
    """Drive ``QPAMethod``'s hooks for ``steps`` steps in ``Trainer``'s order against a
    planning backend: the generator at step 0 and the evaluation before training; per step
    forward, backward (dL/dp lands on the held p), optimizer step and any ``eval_every``
    evaluation; then the final evaluation and the export."""
    if not runs_circuit(config.qpa.ablation):  # p is a fixed distribution: no job at all
        return JobPlan(Counter(), 0)
    spec = config.backend
    method = QPAMethod(config, target_modules=[])
    planner: list[PlanningBackend] = []

    def backend_for(circuit: Any) -> PlanningBackend:
        planner.append(PlanningBackend(circuit, spec, shots_per_circuit(spec, config.quantum),
                                       is_autograd_native(spec)))
        return planner[0]

    # On the meta device: the plan needs the generator's shapes and decisions, never its
    # numbers, so a request for huge MLPs costs no memory.
    with torch.device("meta"):
        method.setup_generator(num_values, "meta", backend_for, check=False)
    # The generated values do not decide when jobs happen; skip the mapping MLPs.
    zeros = torch.zeros(num_values, device="meta")
    method.generator.forward = lambda: zeros
    method.sizes = [num_values]
    eval_every = config.train.eval_every
    method.before_forward(0)
    method.before_eval()
    for step in range(steps):
        method.before_forward(step)
        for leaf in method.gradient_leaves():  # what backward leaves on the held p
            leaf.grad = torch.zeros_like(leaf) if leaf.grad is None else leaf.grad
        method.before_optimizer_step(step, last_step=step == steps - 1)
        completed = step + 1
        if eval_every and completed % eval_every == 0 and completed < steps:
            method.before_eval()
    method.before_eval()  # the final evaluation
    method.before_eval()  # the export
    return JobPlan(Counter(planner[0].sizes), planner[0].shots_per_circuit)


def plan_jobs(config: JobConfig, num_values: int) -> JobPlan:
    """The primitive jobs a fresh run of ``config`` submits, for ``num_values`` values.

    Hooks, not a formula, decide when a job happens (``_dry_run``). A long run is not
    driven step by step: the hooks' state repeats every L = lcm(update_every, eval_every)
    steps (after each angle update the window restarts), so the jobs of ``steps`` are those
    of a dry run of s0 = 2L + steps mod L steps plus (steps - s0) / L times the jobs that
    one more period adds (s0 + L minus s0). A test checks this against full dry runs.
    """
    steps = config.steps
    update_every = min(config.qpa.update_every, steps)
    eval_every = config.train.eval_every
    eval_every = eval_every if eval_every and eval_every < steps else 1
    period = math.lcm(update_every, eval_every)
    short = 2 * period + steps % period
    if steps <= short + period:
        return _dry_run(config, num_values, steps)
    base = _dry_run(config, num_values, short)
    longer = _dry_run(config, num_values, short + period)
    repeats = (steps - short) // period
    sizes = Counter(base.sizes)
    for size, count in (longer.sizes - base.sizes).items():
        sizes[size] += count * repeats
    return JobPlan(sizes, base.shots_per_circuit)


def generated_value_count(config: JobConfig) -> int:
    """How many values the generator writes for ``config``'s model, without loading weights.

    The model is built on the meta device from its config alone and wrapped by PEFT
    exactly as ``QPAMethod.attach`` wraps it, so the LoRA shapes are PEFT's own.
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from qpa.models import base_model_config, resolve_target_modules

    model_config = base_model_config(config.base_model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    targets = resolve_target_modules(model, config.lora.target_modules,
                                     config.qpa.target_set)
    with warnings.catch_warnings():
        # peft 0.21 calls a transformers method renamed in 5.x; nothing a user can act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        peft_model = get_peft_model(model, lora_config(config, targets, model))
    return sum(layer.weight.numel() for _, layer in
               generated_layers(peft_model, config.qpa.generate_a))


def estimate_job(config: JobConfig, num_values: int | None = None,
                 backend: QuantumBackend | None = None) -> QuantumEstimate:
    """The quantum cost of ``config`` before it runs. Raises ConfigError for bad input;
    a circuit too wide for the device is a warning (with the sub_generators that fit).

    The trainer passes its own ``num_values`` and built ``backend`` (nothing is rebuilt);
    otherwise the model's shapes come from its config and the backend is built here.
    """
    if num_values is None:
        num_values = generated_value_count(config)
    options, spec = config.qpa, config.backend
    kind = parse_backend(spec).kind.name
    sub_generators = resolve_sub_generators(config, num_values)
    _, num_qubits = plan_qubits(num_values, options.chunk_size, sub_generators,
                                options.ansatz)
    advice: list[str] = []
    # A real IBM backend's width needs the service: it is checked when it is built below.
    device_qubits = None if kind == "ibm" else backend_qubit_limit(spec)
    logical = build_ansatz(options.ansatz, num_qubits, options.depth)
    fits = True
    for width, what in ((device_qubits, f"{spec}'s"),
                        (config.quantum.max_qubits, "quantum.max_qubits =")):
        if width is not None and num_qubits > width:
            fits = False
            need = fit_sub_generators(num_values, options.chunk_size, options.ansatz, width)
            hint = (f"use qpa.sub_generators >= {need} (or auto)" if need else
                    "no sub_generators count fits; raise qpa.chunk_size")
            advice.append(f"{num_qubits} qubits on {what} {width}: {hint}")
    owned = backend is None
    # The torch statevector runs no Qiskit circuit: nothing to transpile or time.
    if fits and owned and kind != "statevector":
        try:
            backend = make_backend(spec, logical, config.quantum)
        except ConfigError as error:
            if kind != "ibm":
                raise
            advice.append(f"{error.reason}: depth after transpilation and QPU seconds "
                          "unknown")
    plan = plan_jobs(config, num_values)
    estimate = QuantumEstimate(
        backend=spec, num_qubits=num_qubits, sub_generators=sub_generators,
        circuits_per_job_row=0, circuit_parameters=0, logical_depth=0,
        device_qubits=device_qubits, isa_depth=None, isa_two_qubit_gates=None,
        jobs=plan.jobs, circuits=plan.circuits, shots=plan.shots,
        shots_per_circuit=plan.shots_per_circuit,
        largest_job_circuits=max(plan.sizes, default=0),
        seconds_per_shot=None, qpu_seconds=None, qpu_seconds_method=None,
        max_seconds=config.quantum.max_seconds, warnings=advice,
    )
    estimate.circuit_parameters = logical.num_parameters
    estimate.logical_depth = logical.depth()
    rows = sub_generators * options.features
    estimate.circuits_per_job_row = estimate.largest_job_circuits // max(rows, 1)
    if backend is not None:
        try:
            executed = backend.executed_circuit
            if executed is not None:
                estimate.isa_depth = executed.depth()
                estimate.isa_two_qubit_gates = sum(
                    1 for instruction in executed.data
                    if instruction.operation.num_qubits == 2 and instruction.operation.name
                    not in ("barrier", "measure"))
            per_shot = backend.seconds_per_shot()
            if per_shot is not None:
                estimate.seconds_per_shot = per_shot
                estimate.qpu_seconds = plan.shots * per_shot
                estimate.qpu_seconds_method = QPU_SECONDS_METHOD
        finally:
            if owned:
                backend.close()
    _advise(config, estimate)
    return estimate


def _advise(config: JobConfig, estimate: QuantumEstimate) -> None:
    """Warnings a user needs before sending the job to a device."""
    quantum, kind = config.quantum, parse_backend(config.backend).kind
    if estimate.over_budget:
        estimate.warnings.append(
            f"estimated {estimate.qpu_seconds:.0f} QPU seconds exceed quantum.max_seconds = "
            f"{quantum.max_seconds:g}; the job would be refused")
    if kind.name == "ibm" and quantum.execution_mode == "session":
        estimate.warnings.append(
            "session mode bills the session's wall-clock time, classical training between "
            "jobs included; quantum.execution_mode: batch bills only the jobs' QPU time")
    if kind.device and quantum.twirling:
        estimate.warnings.append("twirling rounds shots up to randomizations x shots per "
                                 "randomization; the shots counted here are a lower bound")
    if kind.name == "ibm-fake" and estimate.shots:
        estimate.warnings.append(
            f"local testing mode simulates {estimate.shots:,} noisy shots on this machine; "
            "see docs/QPU.md for what runs locally in reasonable time")
    if estimate.jobs and config.qpa.update_every == 1 and config.steps >= 16 \
            and kind.name == "ibm":
        estimate.warnings.append(
            f"{estimate.jobs} primitive jobs, one per step: qpa.update_every > 1 amortises "
            "each circuit evaluation over several steps")


