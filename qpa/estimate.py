"""What a quantum job will cost on its backend, known before any training: ``qpa estimate``.

A method that runs circuits registers an estimator (``MethodSpec.estimator``, e.g.
``qpa.methods.qpa.estimate``) that counts the jobs, circuits and shots its own training
hooks would submit and, where the backend publishes timing, the QPU seconds. This module is
what every caller sees: the one ``QuantumEstimate`` shape, the dispatch to the job's method,
the budget check and the lines people read. It names no method.

QPU seconds are estimated only where the backend publishes timing (IBM devices and their
fake twins): every shot of every circuit costs the ISA circuit's duration (its longest
path under the target's gate and readout durations, ``QuantumCircuit.estimate_duration``)
plus the device's ``default_rep_delay``, the wait IBM inserts between shots. That is the
execution IBM bills in job and batch mode; it leaves out the per-job overhead (loading
and compiling, seconds per job) and, in session mode, the classical time between jobs,
which a session bills as wall-clock.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from qpa.backends.spec import parse_backend
from qpa.config import JobConfig
from qpa.errors import ConfigError
from qpa.methods.registry import method_spec

if TYPE_CHECKING:
    from qpa.backends.base import QuantumBackend

#: How the QPU-seconds figure is computed, shown beside it (CLI, REST, docs).
QPU_SECONDS_METHOD = (
    "circuits x shots x (ISA circuit duration from the target's gate and readout durations "
    "+ the device's default_rep_delay); excludes per-job overhead and, in session mode, "
    "the classical time between jobs"
)


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


def estimate_job(config: JobConfig, num_values: int | None = None,
                 backend: QuantumBackend | None = None) -> QuantumEstimate:
    """The quantum cost of ``config`` before it runs, from its method's estimator. Raises
    ConfigError for bad input, and for a method that runs no circuits.

    The trainer passes its method's ``generated_values`` and built ``backend`` (nothing is
    rebuilt); otherwise the estimator derives them from the config.
    """
    estimator = method_spec(config.method).load_estimator()
    if estimator is None:
        raise ConfigError("method", f"{config.method} runs no circuits; it has no quantum "
                          "cost to estimate")
    return estimator(config, num_values=num_values, backend=backend)


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
