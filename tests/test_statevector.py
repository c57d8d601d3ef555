"""The torch statevector backend against Qiskit's reference simulator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from qiskit.quantum_info import Statevector

from qpa.backends.statevector import StatevectorBackend
from qpa.circuits import qpa_ansatz, rbs_ansatz
from qpa.methods.qpa.generator import hamming_weight_states


@pytest.mark.parametrize("circuit", [qpa_ansatz(1, 1), qpa_ansatz(6, 4), rbs_ansatz(6, 3),
                                     rbs_ansatz(5, 4)], ids=lambda c: f"{c.name}-{c.num_qubits}")
def test_probabilities_match_qiskit(circuit):
    rng = np.random.default_rng(3)
    backend = StatevectorBackend(circuit)
    thetas = rng.uniform(0, 2 * np.pi, (3, circuit.num_parameters))
    batch = backend.probabilities(torch.as_tensor(thetas))
    for row, theta in zip(batch, thetas, strict=True):
        reference = Statevector(circuit.assign_parameters(theta)).probabilities()
        assert np.abs(row.numpy() - reference).max() <= 1e-12


def test_rbs_ansatz_preserves_hamming_weight():
    circuit = rbs_ansatz(6, 4)
    theta = torch.rand(circuit.num_parameters, dtype=torch.float64) * 6
    probs = StatevectorBackend(circuit).probabilities(theta)
    support = hamming_weight_states(6, 3)
    assert probs[support].sum().item() == pytest.approx(1.0, abs=1e-12)


def test_float32_precision_is_close():
    circuit = qpa_ansatz(8, 3)
    theta = torch.rand(circuit.num_parameters, dtype=torch.float64) * 6
    exact = StatevectorBackend(circuit).probabilities(theta)
    single = StatevectorBackend(circuit, precision="float32").probabilities(theta)
    assert single.dtype == torch.float32
    assert (single.double() - exact).abs().max() <= 1e-6


def test_autograd_matches_finite_differences():
    circuit = qpa_ansatz(4, 2)
    backend = StatevectorBackend(circuit)
    weights = torch.linspace(-1, 1, 16, dtype=torch.float64)
    theta = torch.rand(circuit.num_parameters, dtype=torch.float64, requires_grad=True)
    (backend.probabilities(theta) @ weights).backward()
    eps = 1e-6
    numeric = []
    for index in range(circuit.num_parameters):
        shift = torch.zeros_like(theta)
        shift[index] = eps
        with torch.no_grad():
            plus = backend.probabilities(theta + shift) @ weights
            minus = backend.probabilities(theta - shift) @ weights
        numeric.append(float(plus - minus) / (2 * eps))
    assert np.allclose(theta.grad.numpy(), numeric, atol=1e-8)
