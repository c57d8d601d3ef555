"""One simulator under test, driven over stdin/stdout by ``bench_qnn_speed``.

Each implementation runs in its own process so that the coordinator can interleave
measurements, give every contestant the same thread count, and kill one that exceeds the
time cap. TorchQuantum needs qiskit < 1.0, so its worker runs under ``bench/.venv-tq``'s
Python: this file therefore imports only the standard library, numpy and torch at the top,
never ``qpa`` or ``bench`` (the implementation's own imports happen lazily).

Protocol: one JSON object per line in each direction.
  {"cmd": "setup", "n": 12, "depth": 8, "seed": 0} -> {"ok": true, "setup_s": ...}
  {"cmd": "probs"}   -> {"ok": true, "probs": [...]}       (Qiskit order: qubit 0 = LSB)
  {"cmd": "grad"}    -> {"ok": true, "grad": [...], "loss": x}
  {"cmd": "time", "reps": 1} -> {"ok": true, "seconds": [...]}   (forward + backward)
  {"cmd": "info"}    -> {"ok": true, "versions": {...}}
  {"cmd": "rss"}     -> {"ok": true, "max_rss_mib": ...}  (peak resident memory so far)
Errors come back as {"ok": false, "error": "..."}.

The workload: p(theta) of the QPA ansatz (``depth`` x [RY on every qubit, CNOT chain
q -> q+1]), loss = sum_i w_i p_i with fixed random w, backward to theta. theta and w are
drawn from numpy's default_rng(seed) in every worker, so all see the same numbers.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable

import numpy as np
import torch


def problem(num_qubits: int, depth: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """theta (n*depth,) in [0, 2pi) and w (2^n,) standard normal, Qiskit basis order."""
    rng = np.random.default_rng(seed)
    theta = rng.uniform(0.0, 2.0 * np.pi, num_qubits * depth)
    weights = rng.standard_normal(2**num_qubits)
    return theta, weights


def to_big_endian(vector: np.ndarray, num_qubits: int) -> np.ndarray:
    """Reorder a basis-indexed vector from qubit-0-LSB (Qiskit) to qubit-0-MSB order."""
    return vector.reshape([2] * num_qubits).transpose(list(range(num_qubits))[::-1]).reshape(-1)


class Contestant:
    """Builds the circuit once (setup) and runs forward + backward (step)."""

    dtype = torch.float64

    def setup(self, num_qubits: int, depth: int, theta: np.ndarray, weights: np.ndarray) -> None:
        raise NotImplementedError

    def forward(self) -> torch.Tensor:
        """p in Qiskit order (for verification only; not timed)."""
        raise NotImplementedError

    def step(self) -> tuple[float, np.ndarray]:
        """One timed forward + backward; returns (loss, grad)."""
        raise NotImplementedError

    @staticmethod
    def versions() -> dict[str, str]:
        return {"torch": torch.__version__, "numpy": np.__version__}


class Ours(Contestant):
    """qpa.backends.statevector.StatevectorBackend (float64 or float32)."""

    def __init__(self, precision: str):
        self.precision = precision
        self.dtype = torch.float64 if precision == "float64" else torch.float32

    def setup(self, num_qubits, depth, theta, weights):
        from qpa.backends.statevector import StatevectorBackend
        from qpa.circuits import qpa_ansatz

        self.backend = StatevectorBackend(qpa_ansatz(num_qubits, depth), precision=self.precision)
        self.theta = torch.tensor(theta, dtype=self.dtype, requires_grad=True)
        self.weights = torch.as_tensor(weights, dtype=self.dtype)

    def forward(self):
        with torch.no_grad():
            return self.backend.probabilities(self.theta)

    def step(self):
        self.theta.grad = None
        loss = (self.backend.probabilities(self.theta) * self.weights).sum()
        loss.backward()
        return float(loss), self.theta.grad

    @staticmethod
    def versions():
        import qiskit

        import qpa

        return {**Contestant.versions(), "qpa": getattr(qpa, "__version__", "dev"),
                "qiskit": qiskit.__version__}


class PennyLane(Contestant):
    """PennyLane default.qubit, torch interface, diff_method="backprop"."""

    def setup(self, num_qubits, depth, theta, weights):
        import pennylane as qml

        device = qml.device("default.qubit", wires=num_qubits)

        @qml.qnode(device, interface="torch", diff_method="backprop")
        def circuit(angles):
            for layer in range(depth):
                for qubit in range(num_qubits):
                    qml.RY(angles[layer * num_qubits + qubit], wires=qubit)
                for qubit in range(num_qubits - 1):
                    qml.CNOT(wires=[qubit, qubit + 1])
            return qml.probs()  # wire 0 is the most significant bit

        self.num_qubits = num_qubits
        self.circuit = circuit
        self.theta = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
        # The loss is the same functional in PennyLane's own basis order.
        self.weights = torch.as_tensor(to_big_endian(weights, num_qubits))

    def forward(self):
        with torch.no_grad():
            probs = self.circuit(self.theta).numpy()
        return torch.as_tensor(to_big_endian(probs, self.num_qubits))  # self-inverse reorder

    def step(self):
        self.theta.grad = None
        loss = (self.circuit(self.theta) * self.weights).sum()
        loss.backward()
        return float(loss), self.theta.grad

    @staticmethod
    def versions():
        import pennylane as qml

        return {**Contestant.versions(), "pennylane": qml.__version__}


class QiskitML(Contestant):
    """Qiskit Machine Learning SamplerQNN (exact QMLSampler) + TorchConnector.

    Its default gradient is ParamShiftSamplerGradient: 2P + 1 circuits per backward.
    """

    dtype = torch.float32  # TorchConnector hands torch float32 tensors back

    def setup(self, num_qubits, depth, theta, weights):
        import warnings

        warnings.filterwarnings("ignore")
        from qiskit_machine_learning.connectors import TorchConnector
        from qiskit_machine_learning.neural_networks import SamplerQNN

        from qpa.circuits import qpa_ansatz

        circuit = qpa_ansatz(num_qubits, depth)
        qnn = SamplerQNN(circuit=circuit, input_params=[], weight_params=list(circuit.parameters))
        self.model = TorchConnector(qnn, initial_weights=theta)
        self.weights = torch.as_tensor(weights, dtype=torch.float32)

    def forward(self):
        with torch.no_grad():
            return self.model().double()

    def step(self):
        self.model.zero_grad(set_to_none=True)
        loss = (self.model() * self.weights).sum()
        loss.backward()
        return float(loss), self.model.weight.grad

    @staticmethod
    def versions():
        import qiskit
        import qiskit_machine_learning

        return {**Contestant.versions(), "qiskit": qiskit.__version__,
                "qiskit-machine-learning": qiskit_machine_learning.__version__}


class TorchQuantum(Contestant):
    """TorchQuantum 0.1.8 functional gates on a QuantumDevice (complex64 state)."""

    dtype = torch.float32

    def setup(self, num_qubits, depth, theta, weights):
        import warnings

        warnings.filterwarnings("ignore")
        import torchquantum as tq
        import torchquantum.functional as tqf

        self.tq, self.tqf = tq, tqf
        self.num_qubits, self.depth = num_qubits, depth
        self.theta = torch.tensor(theta, dtype=torch.float32, requires_grad=True)
        self.weights = torch.as_tensor(to_big_endian(weights, num_qubits), dtype=torch.float32)

    def _probs(self) -> torch.Tensor:
        num_qubits = self.num_qubits
        device = self.tq.QuantumDevice(n_wires=num_qubits, bsz=1, device="cpu")
        for layer in range(self.depth):
            for qubit in range(num_qubits):
                index = layer * num_qubits + qubit
                self.tqf.ry(device, wires=qubit, params=self.theta[index : index + 1])
            for qubit in range(num_qubits - 1):
                self.tqf.cnot(device, wires=[qubit, qubit + 1])
        return device.get_states_1d()[0].abs().square()  # wire 0 = most significant bit

    def forward(self):
        with torch.no_grad():
            probs = self._probs().double().numpy()
        return torch.as_tensor(to_big_endian(probs, self.num_qubits))

    def step(self):
        self.theta.grad = None
        loss = (self._probs() * self.weights).sum()
        loss.backward()
        return float(loss), self.theta.grad

    @staticmethod
    def versions():
        import qiskit
        import torchquantum

        return {**Contestant.versions(), "torchquantum": torchquantum.__version__,
                "qiskit (tq venv)": qiskit.__version__}


CONTESTANTS: dict[str, Callable[[], Contestant]] = {
    "qpa-float64": lambda: Ours("float64"),
    "qpa-float32": lambda: Ours("float32"),
    "pennylane": PennyLane,
    "qiskit-ml": QiskitML,
    "torchquantum": TorchQuantum,
}


def serve(name: str, threads: int) -> None:
    torch.set_num_threads(threads)
    contestant = CONTESTANTS[name]()
    out = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = handle(contestant, request)
        except Exception as error:  # report, keep serving: the coordinator decides
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}",
                     "traceback": traceback.format_exc(limit=5)}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def handle(contestant: Contestant, request: dict) -> dict:
    command = request["cmd"]
    if command == "info":
        return {"ok": True, "versions": contestant.versions(), "threads": torch.get_num_threads()}
    if command == "rss":
        import resource

        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return {"ok": True, "max_rss_mib": peak_kib / 1024}
    if command == "setup":
        theta, weights = problem(request["n"], request["depth"], request["seed"])
        start = time.perf_counter()
        contestant.setup(request["n"], request["depth"], theta, weights)
        setup_s = time.perf_counter() - start
        start = time.perf_counter()
        contestant.step()  # first call: warm-up (imports, caches, lazy compilation)
        return {"ok": True, "setup_s": setup_s, "first_call_s": time.perf_counter() - start}
    if command == "probs":
        return {"ok": True, "probs": contestant.forward().double().tolist()}
    if command == "grad":
        loss, grad = contestant.step()
        return {"ok": True, "loss": loss, "grad": grad.double().tolist()}
    if command == "time":
        seconds = []
        for _ in range(request.get("reps", 1)):
            start = time.perf_counter()
            contestant.step()
            seconds.append(time.perf_counter() - start)
        return {"ok": True, "seconds": seconds}
    raise ValueError(f"unknown command {command!r}")


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
