"""Qiskit-based backends against the exact torch statevector simulator.

``aer`` must reproduce the statevector probabilities and, through the parameter-shift rule
in ``base.py``, its autograd Jacobian; with shots it must agree within a binomial bound.
``ibm-fake:`` runs qiskit-ibm-runtime's local testing mode with one of its own fake backends
(noise model included); nothing here imitates IBM by hand.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from qiskit.circuit import QuantumCircuit

from qpa.backends.aer import AerBackend, bit_array_probabilities
from qpa.backends.base import counts_to_probabilities, shift_rule_for
from qpa.backends.ibm import (
    RuntimeBackend,
    fake_backend_names,
    ibm_status,
    target_backend_qubits,
)
from qpa.backends.statevector import StatevectorBackend
from qpa.circuits import qpa_ansatz, rbs_ansatz
from qpa.config import QuantumOptions
from qpa.errors import ConfigError

CIRCUITS = {
    "ry_cnot-3x2": lambda: qpa_ansatz(3, 2),
    "ry_cnot-5x3": lambda: qpa_ansatz(5, 3),
    "rbs-4x3": lambda: rbs_ansatz(4, 3),
    "rbs-5x2": lambda: rbs_ansatz(5, 2),
}


def _angles(circuit: QuantumCircuit, rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-np.pi, np.pi, size=(rows, circuit.num_parameters))


def _autograd_jacobian(circuit: QuantumCircuit, theta: np.ndarray) -> np.ndarray:
    exact = StatevectorBackend(circuit)
    jacobian = torch.autograd.functional.jacobian(
        exact.probabilities, torch.as_tensor(theta, dtype=torch.float64)
    )
    return jacobian.numpy()


@pytest.fixture(autouse=True)
def _deprecations_are_errors():
    # The backends must use only current qiskit / qiskit-ibm-runtime / qiskit-aer APIs.
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", PendingDeprecationWarning)
        yield


# --- aer, exact -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CIRCUITS))
def test_aer_exact_matches_statevector(name: str) -> None:
    circuit = CIRCUITS[name]()
    bindings = _angles(circuit, rows=6)
    aer = AerBackend(circuit, QuantumOptions())
    probs = aer.evaluate(bindings)
    assert probs.shape == (6, 2**circuit.num_qubits)
    np.testing.assert_allclose(probs, StatevectorBackend(circuit).evaluate(bindings), atol=1e-6)
    assert aer.name == "aer"
    assert aer.usage.jobs == 1 and aer.usage.circuits == 6 and aer.usage.shots == 0


@pytest.mark.parametrize("name", sorted(CIRCUITS))
def test_aer_parameter_shift_jacobian_matches_autograd(name: str) -> None:
    circuit = CIRCUITS[name]()
    theta = _angles(circuit, rows=1, seed=1)[0]
    aer = AerBackend(circuit, QuantumOptions())
    probs, jacobian = aer.probabilities_and_jacobian(theta)
    np.testing.assert_allclose(probs, StatevectorBackend(circuit).evaluate(theta[None])[0],
                               atol=1e-6)
    np.testing.assert_allclose(jacobian, _autograd_jacobian(circuit, theta), atol=1e-6)
    # One primitive job carries the forward pass and every shifted binding: 1 + 2RP circuits,
    # R = 2 shift pairs for the RBS gate (two frequencies), 1 for RY.
    rule = shift_rule_for(circuit)
    assert rule.frequencies == (2 if name.startswith("rbs") else 1)
    assert aer.usage.jobs == 1
    assert aer.usage.circuits == 1 + 2 * rule.frequencies * circuit.num_parameters


def test_aer_torch_autograd_bridge_is_one_job_per_forward() -> None:
    circuit = rbs_ansatz(4, 2)
    theta0 = _angles(circuit, rows=1, seed=2)[0]
    aer = AerBackend(circuit, QuantumOptions())
    theta = torch.tensor(theta0, requires_grad=True)
    weights = torch.linspace(-1.0, 1.0, 2**circuit.num_qubits, dtype=torch.float64)
    (aer.probabilities(theta) * weights).sum().backward()
    expected = _autograd_jacobian(circuit, theta0).T @ weights.numpy()
    np.testing.assert_allclose(theta.grad.numpy(), expected, atol=1e-6)
    assert aer.usage.jobs == 1


def test_aer_bit_order_qubit0_is_least_significant() -> None:
    # RY(pi) on qubit 1 then the CNOT chain 0->1, 1->2 leaves qubits 1 and 2 set: |110> = 6.
    circuit = qpa_ansatz(3, 1)
    theta = np.array([[0.0, np.pi, 0.0]])
    for options in (QuantumOptions(), QuantumOptions(shots=64, seed=0)):
        probs = AerBackend(circuit, options).evaluate(theta)[0]
        assert probs[6] == pytest.approx(1.0, abs=1e-9)


# --- aer, shots -----------------------------------------------------------------------


def _binomial_sigma(exact: np.ndarray, shots: int) -> np.ndarray:
    return np.sqrt(exact * (1 - exact) / shots)


@pytest.mark.parametrize("name", ["ry_cnot-3x2", "rbs-4x3"])
def test_aer_shots_jacobian_within_five_sigma(name: str) -> None:
    circuit = CIRCUITS[name]()
    theta = _angles(circuit, rows=1, seed=3)[0]
    shots = 4000
    aer = AerBackend(circuit, QuantumOptions(shots=shots, seed=11))
    probs, jacobian = aer.probabilities_and_jacobian(theta)

    # Each evaluated distribution is a multinomial sample, so every entry p_hat is binomial
    # with variance p(1-p)/S, independent across the shifted bindings. The shift rule
    # J = sum_mu c_mu (p(x + s_mu) - p(x - s_mu)) therefore has variance
    # sum_mu c_mu^2 (var(p+) + var(p-)); the exact p come from the statevector simulator.
    rule = shift_rule_for(circuit)
    num_params = circuit.num_parameters
    exact_backend = StatevectorBackend(circuit)
    from qpa.backends.base import shifted_bindings

    exact_values = exact_backend.evaluate(shifted_bindings(theta, rule))
    variance = np.zeros_like(jacobian)
    for index, coefficient in enumerate(rule.coefficients):
        start = 1 + 2 * index * num_params
        plus = exact_values[start : start + num_params]
        minus = exact_values[start + num_params : start + 2 * num_params]
        variance += coefficient**2 * (
            _binomial_sigma(plus, shots) ** 2 + _binomial_sigma(minus, shots) ** 2
        ).T
    sigma_j = np.sqrt(variance)
    sigma_p = _binomial_sigma(exact_values[0], shots)
    # 5 sigma per entry: with ~10^2 entries a false failure has probability ~1e-4 (the
    # seed is fixed, so the test is deterministic); zero-probability states must be exact.
    assert np.all(np.abs(probs - exact_values[0]) <= 5 * sigma_p + 1e-12)
    exact_jacobian = _autograd_jacobian(circuit, theta)
    assert np.all(np.abs(jacobian - exact_jacobian) <= 5 * sigma_j + 1e-12)
    # And the bound is not vacuous: shot noise is visible but small.
    assert 0 < np.abs(jacobian - exact_jacobian).max() < 0.2
    assert aer.usage.jobs == 1
    circuits = 1 + 2 * rule.frequencies * num_params
    assert aer.usage.circuits == circuits and aer.usage.shots == circuits * shots


def test_aer_shots_reproducible_from_seed_but_not_repeated() -> None:
    circuit = qpa_ansatz(3, 2)
    bindings = _angles(circuit, rows=2)
    first = AerBackend(circuit, QuantumOptions(shots=500, seed=5))
    second = AerBackend(circuit, QuantumOptions(shots=500, seed=5))
    a1, a2 = first.evaluate(bindings), first.evaluate(bindings)
    np.testing.assert_array_equal(a1, second.evaluate(bindings))
    assert not np.array_equal(a1, a2)  # successive jobs draw fresh shot noise
    np.testing.assert_allclose(a1.sum(axis=1), 1.0)


def test_bit_array_probabilities_agrees_with_counts() -> None:
    circuit = qpa_ansatz(4, 2)
    circuit.measure_all()
    from qiskit_aer.primitives import SamplerV2

    bindings = _angles(circuit, rows=3, seed=4)
    bits = SamplerV2(default_shots=300, seed=1).run([(circuit, bindings)]).result()[0].data.meas
    fast = bit_array_probabilities(bits, 4)
    for row in range(3):
        np.testing.assert_allclose(fast[row], counts_to_probabilities(bits.get_counts(row), 4))


# --- ibm-fake: qiskit-ibm-runtime local testing mode ----------------------------------


def _union_bound(backend: RuntimeBackend) -> float:
    """An upper bound on the total variation distance that device noise can cause.

    Every noisy instruction is its ideal action with probability >= 1 - k*e, e the
    error the backend's target reports (average gate infidelity, or average readout
    error); by the union bound TVD <= sum of k*e over the instructions of the ISA circuit.
    k = 2 covers the gap between average infidelity and error probability (<= (d+1)/d)
    and asymmetric readout errors.
    """
    target = backend.backend.target
    layout = backend.isa_circuit
    total = 0.0
    for instruction in layout.data:
        name = instruction.operation.name
        if name == "barrier" or name not in target.operation_names:
            continue
        qargs = tuple(layout.find_bit(q).index for q in instruction.qubits)
        properties = target[name].get(qargs)
        if properties is not None and properties.error is not None:
            total += 2 * properties.error
    return total


def test_ibm_fake_local_mode_session_and_usage() -> None:
    circuit = qpa_ansatz(3, 1)
    bindings = np.vstack([_angles(circuit, rows=3, seed=6), [0.0, np.pi, 0.0]])
    shots = 4000
    backend = RuntimeBackend(circuit, "ibm-fake:FakeManilaV2",
                             QuantumOptions(shots=shots, seed=3))
    assert backend.name == "ibm-fake:FakeManilaV2"
    assert backend.session is None  # opened lazily, on the first job
    probs = backend.evaluate(bindings)
    session = backend.session
    from qiskit_ibm_runtime import Session

    assert isinstance(session, Session) and session._active

    assert probs.shape == (4, 8)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    exact = StatevectorBackend(circuit).evaluate(bindings)
    tvd = 0.5 * np.abs(probs - exact).sum(axis=1)
    # Device noise (union bound from the fake backend's own calibration data) plus shot
    # noise: E[TVD(empirical, true)] <= 0.5 * sqrt(2^n / S); 3x that as margin.
    bound = _union_bound(backend) + 1.5 * np.sqrt(8 / shots)
    assert bound < 0.6, "the bound must stay informative for a shallow circuit"
    assert np.all(tvd <= bound), (tvd, bound)
    # Bit order survives layout and measurement: RY(pi) on qubit 1 + CNOT chain -> |110>.
    assert probs[-1].argmax() == 6

    backend.evaluate(bindings[:2])
    assert backend.session is session  # one session for the whole run
    assert backend.usage.jobs == 2
    assert backend.usage.circuits == 6
    assert backend.usage.shots == 6 * shots
    assert backend.usage.seconds > 0

    backend.close()
    assert backend.session is session and not session._active
    backend.close()  # idempotent
    assert not session._active
    with pytest.raises(RuntimeError, match="closed"):
        backend.evaluate(bindings)


def test_ibm_fake_batch_mode_with_runtime_options_and_jacobian() -> None:
    circuit = rbs_ansatz(3, 2)
    options = QuantumOptions(shots=256, seed=1, execution_mode="batch", twirling=True,
                             dynamical_decoupling=True)
    with warnings.catch_warnings():
        # Local mode must not spam logs with warnings about the Runtime options.
        warnings.simplefilter("error")
        with RuntimeBackend(circuit, "ibm-fake:FakeManilaV2", options) as backend:
            theta = _angles(circuit, rows=1, seed=7)[0]
            probs, jacobian = backend.probabilities_and_jacobian(theta)
            from qiskit_ibm_runtime import Batch

            session = backend.session
            assert isinstance(session, Batch) and session._active
    assert not session._active
    assert probs.shape == (8,) and jacobian.shape == (8, circuit.num_parameters)
    np.testing.assert_allclose(probs.sum(), 1.0)
    assert backend.usage.jobs == 1
    assert backend.usage.circuits == 1 + 2 * 2 * circuit.num_parameters
    # Twirling rounds the shots up to randomizations x shots per randomization.
    assert backend.usage.shots >= backend.usage.circuits * 256


def test_fake_backend_names_include_v2_classes_without_suffix() -> None:
    names = fake_backend_names()
    assert {"FakeManilaV2", "FakeBrisbane", "FakeSherbrooke"} <= names
    assert "FakeProviderForBackendV2" not in names


def test_target_backend_qubits_fake() -> None:
    assert target_backend_qubits("ibm-fake:FakeManilaV2") == 5
    with pytest.raises(ConfigError) as info:
        target_backend_qubits("ibm-fake:FakeManila")
    assert info.value.field == "backend" and "FakeManilaV2" in info.value.reason


@pytest.fixture
def no_ibm_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for variable in ("QISKIT_IBM_TOKEN", "QISKIT_IBM_CHANNEL", "QISKIT_IBM_INSTANCE",
                     "QISKIT_IBM_URL"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))


@pytest.mark.disable_socket  # fails fast: any network attempt would raise instead
def test_ibm_without_credentials_fails_fast(no_ibm_credentials, tmp_path) -> None:
    with pytest.raises(ConfigError) as info:
        target_backend_qubits("ibm:ibm_foo")
    assert info.value.field == "backend"
    assert "QISKIT_IBM_TOKEN" in info.value.reason and "save" in info.value.reason
    with pytest.raises(ConfigError):
        RuntimeBackend(qpa_ansatz(2, 1), "ibm:ibm_foo", QuantumOptions())
    usable, reason = ibm_status("ibm:ibm_foo")
    assert not usable and "no IBM Quantum credentials" in reason
    # Looking for a saved account must not create one as a side effect.
    assert not (tmp_path / ".qiskit").exists()


def test_ibm_status_fake_and_bad_spec() -> None:
    assert ibm_status("ibm-fake:FakeManilaV2")[0]
    usable, reason = ibm_status("ibm-fake:NoSuchBackend")
    assert not usable and "NoSuchBackend" in reason
    assert not ibm_status("ibm:")[0]
