"""Quantum backends behind one interface, chosen by the job config's ``backend`` string.

``statevector`` exact torch simulation (autograd) | ``aer`` qiskit-aer primitives |
``ibm:<name>`` Qiskit Runtime on IBM hardware | ``ibm-fake:<FakeX>`` the same Runtime code
path in local testing mode against a fake backend shipped by qiskit-ibm-runtime.
"""

from __future__ import annotations

from qiskit.circuit import QuantumCircuit

from qpa.backends.base import QuantumBackend, QuantumUsage
from qpa.config import QuantumOptions
from qpa.errors import ConfigError


def backend_qubit_limit(spec: str) -> int | None:
    """How many qubits the named backend offers (None: limited only by memory)."""
    if spec == "statevector":
        return 30
    if spec == "aer":
        return 30
    from qpa.backends.ibm import target_backend_qubits

    return target_backend_qubits(spec)


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
    return spec == "statevector"


def make_backend(spec: str, circuit: QuantumCircuit, options: QuantumOptions,
                 device: str = "cpu") -> QuantumBackend:
    """Build the backend named by ``spec`` for ``circuit`` (transpiled once, here)."""
    if spec == "statevector":
        from qpa.backends.statevector import StatevectorBackend

        return StatevectorBackend(circuit, precision=options.precision, device=device)
    if spec == "aer":
        from qpa.backends.aer import AerBackend

        return AerBackend(circuit, options)
    if spec.startswith(("ibm:", "ibm-fake:")):
        from qpa.backends.ibm import RuntimeBackend

        return RuntimeBackend(circuit, spec, options)
    raise ConfigError("backend", f"unknown backend {spec!r}")


__all__ = ["QuantumBackend", "QuantumUsage", "check_width", "is_autograd_native", "make_backend"]
