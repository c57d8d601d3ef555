"""What a QPA job will cost on its backend, known before any training: ``qpa estimate``.

The counts are not a formula. ``plan_jobs`` builds the job's generator with the method's
own ``setup_generator`` and drives the method's own training hooks (``before_forward``,
``before_optimizer_step``, ``before_eval``) in the trainer's order against a
``PlanningBackend``: the generator's ``refresh`` counts the job it would submit (its
``job_circuits``, which its real bindings are checked against) with the shots
``shots_per_circuit`` gives, and nothing runs. So jobs, circuits and shots are what the
same code submits in a real run (a test checks them against metrics.json for aer and two
fake IBM devices).

QPU seconds are estimated only where the backend publishes timing (IBM devices and their
fake twins): every shot of every circuit costs the ISA circuit's duration (its longest
path under the target's gate and readout durations, ``QuantumCircuit.estimate_duration``)
plus the device's ``default_rep_delay``, the wait IBM inserts between shots. That is the
execution IBM bills in job and batch mode; it leaves out the per-job overhead (loading
and compiling, seconds per job) and, in session mode, the classical time between jobs,
which a session bills as wall-clock.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from qpa.backends.base import QuantumBackend, shots_per_circuit
from qpa.backends.factory import backend_qubit_limit, is_autograd_native, make_backend
from qpa.backends.spec import parse_backend
from qpa.circuits import build_ansatz
from qpa.config import JobConfig
from qpa.errors import ConfigError
from qpa.generator import fit_sub_generators, plan_qubits

#: How the QPU-seconds figure is computed, shown beside it (CLI, REST, docs).
QPU_SECONDS_METHOD = (
    "circuits x shots x (ISA circuit duration from the target's gate and readout durations "
    "+ the device's default_rep_delay); excludes per-job overhead and, in session mode, "
    "the classical time between jobs"
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
    from qpa.methods.qpa.method import QPAMethod, runs_circuit

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


@dataclass
class QuantumEstimate:
    """What ``qpa estimate`` prints and ``POST /v1/estimates`` returns."""

    backend: str
    num_qubits: int
    sub_generators: int
    circuits_per_job_row: int  # circuits evaluated per sub-generator feature (1 + 2RP)
    circuit_parameters: int
    logical_depth: int
    device_qubits: int | None
    isa_depth: int | None
    isa_two_qubit_gates: int | None
    jobs: int
    circuits: int
    shots: int
    shots_per_circuit: int
    largest_job_circuits: int
    seconds_per_shot: float | None
    qpu_seconds: float | None
    qpu_seconds_method: str | None
    max_seconds: float | None
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def over_budget(self) -> bool:
        return (self.max_seconds is not None and self.qpu_seconds is not None
                and self.qpu_seconds > self.max_seconds)


def generated_value_count(config: JobConfig) -> int:
    """How many values the generator writes for ``config``'s model, without loading weights.

    The model is built on the meta device from its config alone and wrapped by PEFT
    exactly as ``QPAMethod.attach`` wraps it, so the LoRA shapes are PEFT's own.
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from qpa.methods.lora.method import lora_config
    from qpa.methods.qpa.method import generated_layers
    from qpa.models import base_model_config, resolve_target_modules

    model_config = base_model_config(config.base_model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    targets = resolve_target_modules(model, config.lora.target_modules)
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
    if not config.uses_quantum:
        raise ConfigError("method", f"{config.method} runs no circuits; only qpa has a "
                          "quantum cost to estimate")
    if num_values is None:
        num_values = generated_value_count(config)
    from qpa.methods.qpa.method import resolve_sub_generators

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


def has_device_timing(config: JobConfig) -> bool:
    """Whether the estimate can give QPU seconds for ``config`` (IBM devices, real or fake);
    callers skip the estimate's cost (a model's shapes, a transpilation) otherwise."""
    return config.uses_quantum and parse_backend(config.backend).kind.device


def check_budget(estimate: QuantumEstimate, limit_note: str = "") -> None:
    """Refuse a job whose estimated QPU seconds exceed its ``quantum.max_seconds``
    (``limit_note`` says where the limit came from when it is not the job's own)."""
    if estimate.over_budget:
        raise ConfigError(
            "quantum.max_seconds",
            f"the job needs an estimated {estimate.qpu_seconds:.0f} QPU seconds "
            f"({estimate.jobs} jobs, {estimate.circuits:,} circuits, {estimate.shots:,} shots "
            f"on {estimate.backend}) but at most {estimate.max_seconds:g} are allowed"
            f"{limit_note}; lower quantum.shots, raise qpa.update_every or reduce steps",
        )


def describe_quantum_job(event: dict[str, Any]) -> str:
    """One line for a ``quantum_job`` event (``qpa finetune`` and ``qpa jobs watch``)."""
    number = f"{event.get('job')}"
    if event.get("planned_jobs"):
        number += f"/{event['planned_jobs']}"
    if event.get("phase") == "submitted":
        shots = event.get("shots_per_circuit") or 0
        size = f"{event.get('circuits', 0):,} circuits" + (f" x {shots:,} shots" if shots
                                                           else " (exact)")
        job_id = f", id {event['runtime_job_id']}" if event.get("runtime_job_id") else ""
        return f"quantum job {number} submitted: {size} on {event.get('backend')}{job_id}"
    return f"quantum job {number} done in {format_seconds(event.get('seconds'))}"


def describe_estimate(estimate: dict[str, Any]) -> list[str]:
    """Lines summarising an estimate (``QuantumEstimate.as_dict()``) for people."""
    depth = (f"depth {estimate['logical_depth']} (ISA {estimate['isa_depth']}, "
             f"{estimate['isa_two_qubit_gates']} two-qubit gates)"
             if estimate.get("isa_depth") is not None else f"depth {estimate['logical_depth']}")
    shots = (f"{estimate['shots']:,} shots ({estimate['shots_per_circuit']:,} per circuit)"
             if estimate["shots_per_circuit"] else "exact probabilities (no shots)")
    lines = [
        f"{estimate['num_qubits']} qubits x {estimate['sub_generators']} sub-generator(s), "
        f"{estimate['circuit_parameters']} angles, {depth} on {estimate['backend']}",
        f"{estimate['jobs']:,} primitive jobs, {estimate['circuits']:,} circuits (largest job "
        f"{estimate['largest_job_circuits']:,}), {shots}",
    ]
    if estimate.get("qpu_seconds") is not None:
        lines.append(f"QPU time about {format_seconds(estimate['qpu_seconds'])} "
                     f"({estimate['seconds_per_shot'] * 1e6:.1f} us per shot: "
                     f"{estimate['qpu_seconds_method']})")
    elif estimate.get("device_qubits") and estimate["num_qubits"] > estimate["device_qubits"]:
        lines.append("QPU time: n/a (the circuit does not fit the device; see the warning)")
    else:
        lines.append("QPU time: n/a (no device timing for this backend)")
    return lines


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


__all__ = ["JobPlan", "PlanningBackend", "QuantumEstimate", "check_budget", "describe_estimate",
           "describe_quantum_job", "estimate_job", "has_device_timing",
           "plan_jobs"]
