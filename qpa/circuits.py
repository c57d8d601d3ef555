"""Parametrised circuits, defined once in Qiskit; every backend runs these same objects.

Basis ordering follows Qiskit: qubit 0 is the least significant bit of a basis index.
"""

from __future__ import annotations

import numpy as np
from qiskit.circuit import Gate, ParameterVector, QuantumCircuit


def qpa_ansatz(num_qubits: int, depth: int, name: str = "qpa") -> QuantumCircuit:
    """The QPA paper's ansatz: ``depth`` x (RY on every qubit, then a CNOT chain).

    Parameters are ordered layer by layer, qubit by qubit (``theta[layer*n + qubit]``).
    Every gate is real, so the state stays real: the statevector backend exploits that.
    """
    if num_qubits < 1 or depth < 1:
        raise ValueError("num_qubits and depth must be positive")
    theta = ParameterVector("theta", num_qubits * depth)
    circuit = QuantumCircuit(num_qubits, name=name)
    for layer in range(depth):
        for qubit in range(num_qubits):
            circuit.ry(theta[layer * num_qubits + qubit], qubit)
        for qubit in range(num_qubits - 1):
            circuit.cx(qubit, qubit + 1)
    return circuit


def rbs_gate(angle) -> Gate:
    """Reconfigurable beam splitter: a Givens rotation on the |01>, |10> subspace.

    RBS(a) maps |01> -> cos a |01> - sin a |10> and |10> -> sin a |01> + cos a |10>
    (Qiskit's little-endian labels), leaving |00> and |11> alone. It preserves Hamming
    weight. Built from an RY-based decomposition so that every backend (Aer, Runtime
    transpilation) understands it without a custom definition.
    """
    sub = QuantumCircuit(2, name="rbs")
    # XX+YY-type rotation: CX(1,0) . CRY(2a) on target 1 controlled by 0 . CX(1,0)
    sub.cx(1, 0)
    sub.cry(-2 * angle, 0, 1)
    sub.cx(1, 0)
    return sub.to_gate(label="RBS")


def rbs_ansatz(num_qubits: int, depth: int, name: str = "qpa_rbs") -> QuantumCircuit:
    """A Hamming-weight-preserving brick ansatz: X on the first half, then RBS bricks.

    The register starts at Hamming weight ``num_qubits // 2`` and every gate keeps it,
    so the output distribution lives on C(n, n/2) basis states.
    """
    if num_qubits < 2 or depth < 1:
        raise ValueError("the RBS ansatz needs at least 2 qubits and depth >= 1")
    pairs_per_layer = [
        [(q, q + 1) for q in range(start, num_qubits - 1, 2)] for start in (0, 1)
    ]
    count = sum(len(pairs_per_layer[layer % 2]) for layer in range(depth))
    theta = ParameterVector("theta", count)
    circuit = QuantumCircuit(num_qubits, name=name)
    for qubit in range(num_qubits // 2):
        circuit.x(qubit)
    index = 0
    for layer in range(depth):
        for a, b in pairs_per_layer[layer % 2]:
            circuit.append(rbs_gate(theta[index]), [a, b])
            index += 1
    return circuit


def build_ansatz(kind: str, num_qubits: int, depth: int) -> QuantumCircuit:
    """The circuit named by ``qpa.ansatz``."""
    if kind == "ry_cnot":
        return qpa_ansatz(num_qubits, depth)
    if kind == "rbs":
        return rbs_ansatz(num_qubits, depth)
    raise ValueError(f"unknown ansatz {kind!r}")


def support_size(kind: str, num_qubits: int) -> int:
    """How many basis states the ansatz can populate (all 2^n for ry_cnot)."""
    if kind == "rbs":
        from math import comb

        return comb(num_qubits, num_qubits // 2)
    return 2**num_qubits


def basis_bits(num_qubits: int) -> np.ndarray:
    """Row i = bits of basis index i as +-1 (qubit 0 first), shape (2^n, n)."""
    indices = np.arange(2**num_qubits)[:, None]
    bits = (indices >> np.arange(num_qubits)[None, :]) & 1
    return (1 - 2 * bits).astype(np.float32)


__all__ = ["basis_bits", "build_ansatz", "qpa_ansatz", "rbs_ansatz", "support_size"]
