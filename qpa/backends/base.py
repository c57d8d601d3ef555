"""The one interface every quantum backend implements.

A backend owns one parametrised circuit for a whole training run. Its unit of work is
a batch of parameter bindings evaluated in a single primitive call (a Qiskit PUB), so a
gradient by parameter shift costs one job, not 2P.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from qiskit.circuit import QuantumCircuit

from qpa.backends.spec import parse_backend
from qpa.config import QuantumOptions

#: Shots per circuit on Runtime backends when ``quantum.shots`` is unset (no exact mode there).
DEFAULT_SHOTS = 4096


def shots_per_circuit(spec: str, options: QuantumOptions) -> int:
    """Shots every circuit of a job gets on backend ``spec`` (0: exact probabilities).

    The one place this is decided: the backends record usage with it and the pre-run
    estimate counts with it, also when the backend cannot be built (too narrow a device).
    """
    kind = parse_backend(spec).kind
    if kind.device:
        return options.shots or DEFAULT_SHOTS
    if kind.name == "aer":
        return options.shots or 0
    return 0  # the torch statevector is exact


@dataclass
class QuantumUsage:
    """What a run spent on quantum execution (simulated or real)."""

    jobs: int = 0
    circuits: int = 0
    shots: int = 0
    seconds: float = 0.0

    def record(self, circuits: int, shots: int, seconds: float) -> None:
        self.jobs += 1
        self.circuits += circuits
        self.shots += shots
        self.seconds += seconds

    def as_dict(self) -> dict:
        return asdict(self)

    def load(self, data: dict) -> None:
        """Restore counters from a dict that holds them (extra keys, e.g. a report's, ignored)."""
        for name in self.as_dict():
            if name in data:
                setattr(self, name, type(getattr(self, name))(data[name]))


@dataclass(frozen=True)
class ShiftRule:
    """A parameter-shift rule for gates whose generator has equidistant frequencies 1..R.

    df/dx = sum_mu c_mu [f(x + s_mu) - f(x - s_mu)], s_mu = (2mu-1) pi / (2R),
    c_mu = (-1)^(mu-1) / (4 R sin^2(s_mu / 2)) (Wierichs et al. 2022). R=1 is the familiar
    +-pi/2 rule of RY; an RBS gate (a Givens rotation) has R=2.
    """

    frequencies: int

    @property
    def shifts(self) -> np.ndarray:
        mu = np.arange(1, self.frequencies + 1)
        return (2 * mu - 1) * np.pi / (2 * self.frequencies)

    @property
    def coefficients(self) -> np.ndarray:
        mu = np.arange(1, self.frequencies + 1)
        return (-1.0) ** (mu - 1) / (4 * self.frequencies * np.sin(self.shifts / 2) ** 2)


def shift_rule_for(circuit: QuantumCircuit) -> ShiftRule:
    names = {
        instruction.operation.name for instruction in circuit.data
        if instruction.operation.params
    }
    return ShiftRule(2 if "rbs" in names else 1)


def shifted_binding_count(num_params: int, rule: ShiftRule) -> int:
    """Rows of ``shifted_bindings``: the circuits one forward plus full Jacobian costs."""
    return 1 + 2 * rule.frequencies * num_params


def shifted_bindings(theta: np.ndarray, rule: ShiftRule) -> np.ndarray:
    """Bindings [theta, theta +- s_mu e_i ...] for one forward + full Jacobian, shape (1+2RP, P)."""
    num_params = theta.shape[0]
    rows = [theta[None, :]]
    eye = np.eye(num_params)
    for shift in rule.shifts:
        rows.append(theta[None, :] + shift * eye)
        rows.append(theta[None, :] - shift * eye)
    bindings = np.concatenate(rows, axis=0)
    assert len(bindings) == shifted_binding_count(num_params, rule)
    return bindings


def jacobian_from_shifts(values: np.ndarray, rule: ShiftRule) -> np.ndarray:
    """Combine evaluations laid out by ``shifted_bindings`` into J[state, param]."""
    num_params = (values.shape[0] - 1) // (2 * rule.frequencies)
    jacobian = np.zeros((values.shape[1], num_params))
    for index, coefficient in enumerate(rule.coefficients):
        start = 1 + 2 * index * num_params
        plus = values[start : start + num_params]
        minus = values[start + num_params : start + 2 * num_params]
        jacobian += coefficient * (plus - minus).T
    return jacobian


#: Receives one dict when a primitive job is submitted and one when its result is in.
JobListener = Callable[[dict[str, Any]], None]


class QuantumBackend(ABC):
    """Evaluates the output distribution p(theta) of one circuit, with gradients."""

    #: True when ``probabilities`` is differentiable by torch autograd directly.
    autograd_native: bool = False

    def __init__(self, circuit: QuantumCircuit):
        self.circuit = circuit
        self.num_qubits = circuit.num_qubits
        self.num_parameters = circuit.num_parameters
        self.usage = QuantumUsage()
        #: Told about every primitive job (see ``_job_submitted``); set by the method.
        self.on_job: JobListener | None = None

    @property
    @abstractmethod
    def name(self) -> str: ...

    @property
    def shots_per_circuit(self) -> int:
        """Shots each circuit of a job gets (0: exact probabilities, no sampling). The one
        place both the usage counters and the pre-run estimate (``qpa.estimate``) read."""
        return 0

    def set_job_listener(self, listener: JobListener | None) -> None:
        """Send this backend's primitive-job announcements to ``listener``."""
        self.on_job = listener

    @property
    def executed_circuit(self) -> QuantumCircuit | None:
        """The circuit as it is sent to the primitive (transpiled; ISA on a device), or None
        when the backend executes no Qiskit circuit (the torch statevector)."""
        return None

    def seconds_per_shot(self) -> float | None:
        """QPU time one shot of the executed circuit takes, from the device's published
        timing (None: a simulator, or a device that publishes none)."""
        return None

    def _job_submitted(self, circuits: int, runtime_job_id: str | None = None) -> None:
        """Announce a primitive job before waiting for its result: on a QPU the wait is
        queue time plus minutes of execution, and a silent wait looks like a hang."""
        if self.on_job is not None:
            self.on_job({"phase": "submitted", "job": self.usage.jobs + 1,
                         "backend": self.name, "circuits": circuits,
                         "shots": circuits * self.shots_per_circuit,
                         "shots_per_circuit": self.shots_per_circuit,
                         "runtime_job_id": runtime_job_id})

    def _job_done(self, seconds: float, runtime_job_id: str | None = None) -> None:
        """Announce the job ``usage`` has just recorded (call after ``usage.record``)."""
        if self.on_job is not None:
            self.on_job({"phase": "done", "job": self.usage.jobs, "backend": self.name,
                         "seconds": seconds, "runtime_job_id": runtime_job_id})

    @abstractmethod
    def evaluate(self, bindings: np.ndarray) -> np.ndarray:
        """p for every row of ``bindings`` (B, P) in one primitive call; returns (B, 2^n)."""

    def probabilities(self, theta: torch.Tensor) -> torch.Tensor:
        """p(theta) as a torch tensor; differentiable when ``theta`` requires grad."""
        if theta.requires_grad and torch.is_grad_enabled():
            return _ShiftRuleProbabilities.apply(theta, self)
        values = self.evaluate(theta.detach().cpu().double().numpy()[None, :])
        return torch.as_tensor(values[0], dtype=theta.dtype, device=theta.device)

    def probabilities_and_jacobian(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """p(theta) and dp/dtheta from one call carrying every shifted binding.

        ``theta`` is one angle vector (P,) or one per circuit row (G, P), e.g. the
        generator's sub-generators and features, all in the same job; the results are
        (S,) and (S, P), or (G, S) and (G, S, P). The one parameter-shift path: the
        generator trains with it, and so does ``probabilities`` under autograd.
        """
        rows = np.atleast_2d(theta)
        rule = shift_rule_for(self.circuit)
        values = self.evaluate(np.concatenate([shifted_bindings(row, rule) for row in rows]))
        values = values.reshape(len(rows), -1, values.shape[-1])
        probs = values[:, 0]
        jacobians = np.stack([jacobian_from_shifts(row, rule) for row in values])
        return (probs, jacobians) if theta.ndim == 2 else (probs[0], jacobians[0])

    def close(self) -> None:
        """Release sessions or devices. Safe to call more than once."""

    def __enter__(self) -> QuantumBackend:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _timed(self) -> _Timer:
        return _Timer()


class _Timer:
    def __enter__(self) -> _Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc_info) -> None:
        self.seconds = time.perf_counter() - self.start


class _ShiftRuleProbabilities(torch.autograd.Function):
    """Bridges a non-autograd backend into torch: forward runs p and J in one job."""

    @staticmethod
    def forward(ctx, theta: torch.Tensor, backend: QuantumBackend) -> torch.Tensor:
        probs, jacobian = backend.probabilities_and_jacobian(theta.detach().cpu().double().numpy())
        ctx.save_for_backward(torch.as_tensor(jacobian, dtype=theta.dtype, device=theta.device))
        return torch.as_tensor(probs, dtype=theta.dtype, device=theta.device)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (jacobian,) = ctx.saved_tensors
        return jacobian.T @ grad_output, None


def counts_to_probabilities(counts: dict[str, int], num_qubits: int) -> np.ndarray:
    """Bitstring counts (Qiskit's big-endian strings) to a probability vector."""
    probs = np.zeros(2**num_qubits)
    total = sum(counts.values())
    for bitstring, count in counts.items():
        probs[int(bitstring, 2)] += count
    return probs / max(total, 1)

