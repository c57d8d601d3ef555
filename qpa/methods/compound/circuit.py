"""A trained U as a Hamming-weight-preserving circuit of RBS gates whose weight-k block is C_k(U).

Conventions (the test in ``tests/test_compound.py`` checks them on Aer's statevector):

* Mode i is qubit i. A k-subset I of modes is the basis state with exactly the qubits in I
  set to 1, i.e. Qiskit basis index ``sum(2**i for i in I)`` (little-endian).
* Weight-k basis order: k-subsets in lexicographic order, the row/column order of
  ``compound_matrix`` (see ``weight_basis_indices``).
* Claim: preparing |J> and running ``compound_circuit(U)`` gives the amplitude
  ``C_k(U)[I, J] = det U[I, J]`` on |I>; in particular on weight 1 the circuit acts as U.
  No extra signs appear because every RBS acts on *neighbouring* modes (p, p+1): a Givens
  rotation G on adjacent modes has C_k(G) equal to the RBS action on weight k (no mode of a
  subset lies between p and p+1 to reorder), and C_k is multiplicative, C_k(AB) = C_k(A)C_k(B).

Decomposition (column-by-column elimination with adjacent Givens rotations): for columns
j = 0..n-2 and rows i = n-1 down to j+1, ``G(i-1, a) = [[cos a, sin a], [-sin a, cos a]]``
on rows (i-1, i) with ``a = atan2(U[i, j], U[i-1, j])`` zeroes U[i, j] and keeps U[i-1, j] >= 0.
Then ``G_m ... G_1 U = D = diag(1, ..., 1, det U)``, so ``U = G_1^T ... G_m^T D``. The RBS of
``qpa.circuits.rbs_gate`` acts on weight 1 of qubits (p, p+1) as exactly
``[[cos a, sin a], [-sin a, cos a]]``, so G^T = RBS(-a). There are n(n-1)/2 gates.

Sign fix for det U = -1 (a reflection; never produced by the Cayley map, possible for an
arbitrary orthogonal U): D = diag(1, ..., 1, -1) is a reflection of mode n-1, which is a
Z gate on qubit n-1. Z multiplies every basis state containing mode n-1 by -1, which is
exactly C_k(D) on every weight k. It is applied first (D is the rightmost factor).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from qiskit.circuit import QuantumCircuit

from qpa.circuits import rbs_gate
from qpa.methods.compound.minors import subset_index

ORTHOGONALITY_TOLERANCE = 1e-5


def givens_decomposition(u: np.ndarray | torch.Tensor) -> tuple[list[tuple[int, float]], int]:
    """RBS gates ``[(qubit p, angle)]`` in application order, and det U (+1 or -1).

    Applying Z on qubit n-1 when det U = -1, then RBS(angle) on (p, p+1) for each gate in
    order, acts on the weight-1 subspace as U.
    """
    work = np.array(u.detach().cpu().numpy() if isinstance(u, torch.Tensor) else u,
                    dtype=np.float64)
    n = work.shape[0]
    if work.shape != (n, n):
        raise ValueError(f"U must be square, got shape {work.shape}")
    drift = np.abs(work.T @ work - np.eye(n)).max()
    if drift > ORTHOGONALITY_TOLERANCE:
        raise ValueError(f"U is not orthogonal (max |U^T U - I| = {drift:.1e}): only an "
                         "orthogonal U (orthogonal=True, reduction=det) is a circuit")
    eliminations: list[tuple[int, float]] = []
    for column in range(n - 1):
        for row in range(n - 1, column, -1):
            above, below = work[row - 1, column], work[row, column]
            angle = math.atan2(below, above)
            cos, sin = math.cos(angle), math.sin(angle)
            upper, lower = work[row - 1].copy(), work[row].copy()
            work[row - 1] = cos * upper + sin * lower
            work[row] = -sin * upper + cos * lower
            eliminations.append((row - 1, angle))
    det_sign = 1 if work[n - 1, n - 1] > 0 else -1
    # U = G_1^T ... G_m^T D: D acts first, then G_m^T = RBS(-a_m), ..., G_1^T last.
    gates = [(qubit, -angle) for qubit, angle in reversed(eliminations)]
    return gates, det_sign


def compound_circuit(u: np.ndarray | torch.Tensor, name: str = "compound") -> QuantumCircuit:
    """The n-qubit RBS circuit whose weight-k block is C_k(U) for every k (see module doc)."""
    gates, det_sign = givens_decomposition(u)
    n = int(u.shape[0])
    circuit = QuantumCircuit(n, name=name)
    if det_sign < 0:
        circuit.z(n - 1)
    for qubit, angle in gates:
        circuit.append(rbs_gate(angle), [qubit, qubit + 1])
    return circuit


def weight_basis_indices(n: int, k: int) -> list[int]:
    """Qiskit basis indices of the weight-k states, in the lexicographic k-subset order."""
    # Same enumeration as compound_matrix's rows, so the two orders cannot drift apart.
    return (2 ** subset_index(n, k)).sum(dim=-1).tolist()
