"""Check the backend a job names when the job is prepared, and build it.

Existence, width and credentials are found out here, once per job: ``check_backend`` before
anything else is loaded, the width against the generator's circuit in ``check_width``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qpa.backends.spec import parse_backend
from qpa.errors import ConfigError

if TYPE_CHECKING:
    from qiskit.circuit import QuantumCircuit

    from qpa.backends.base import QuantumBackend
    from qpa.config import QuantumOptions


def backend_qubit_limit(spec: str) -> int | None:
    """How many qubits the named backend offers: a simulator's memory bound, or the width of
    the device (which must exist: ConfigError otherwise)."""
    kind = parse_backend(spec).kind
    if not kind.device:
        return kind.max_qubits
    from qpa.backends.ibm import target_backend_qubits

    return target_backend_qubits(spec)


def check_backend(spec: str) -> None:
    """ConfigError (field ``backend``) unless the named backend can be used now: the fake
    device exists, or the IBM account is configured, reachable and has the device."""
    backend_qubit_limit(spec)


def check_width(spec: str, num_qubits: int, options: QuantumOptions) -> None:
    """Raise ConfigError before training when the circuit cannot run where it is sent."""
    if options.max_qubits is not None and num_qubits > options.max_qubits:
        raise ConfigError(
            "quantum.max_qubits",
            f"the generator needs {num_qubits} qubits but at most {options.max_qubits} are "
            "allowed; raise qpa.chunk_size or qpa.sub_generators",
        )
    limit = backend_qubit_limit(spec)
    if limit is not None and num_qubits > limit:
        raise ConfigError(
            "backend",
            f"{spec} has {limit} qubits but the generator needs {num_qubits}; raise "
            "qpa.chunk_size or qpa.sub_generators to use fewer",
        )


def is_autograd_native(spec: str) -> bool:
    """Whether the backend named by ``spec`` differentiates p(theta) with torch autograd."""
    return parse_backend(spec).kind.autograd


def make_backend(spec: str, circuit: QuantumCircuit, options: QuantumOptions,
                 device: str = "cpu") -> QuantumBackend:
    """Build the backend named by ``spec`` for ``circuit`` (transpiled once, here)."""
    kind = parse_backend(spec).kind
    if kind.name == "statevector":
        from qpa.backends.statevector import StatevectorBackend

        return StatevectorBackend(circuit, precision=options.precision, device=device)
    if kind.name == "aer":
        from qpa.backends.aer import AerBackend

        return AerBackend(circuit, options)
    from qpa.backends.ibm import RuntimeBackend

    return RuntimeBackend(circuit, spec, options)
