"""One simulator under test, driven over stdin/stdout by ``bench_qnn_speed`` (a process per
contestant, so it can be killed past the time cap). TorchQuantum's worker runs under
``bench/.venv-tq`` (qiskit < 1.0): only the standard library, numpy and torch at the top.

Protocol, one JSON object per line each way (errors: ``{"ok": false, "error": ...}``):
``setup`` {n, depth, seed} -> {setup_s, first_call_s}; ``probs`` -> p in Qiskit order (qubit 0
= least significant bit); ``grad`` -> {grad, loss}; ``time`` {reps} -> {seconds} of forward +
backward; ``info`` -> {versions}; ``rss`` -> {max_rss_mib}. The workload: p(theta) of the QPA
ansatz (depth x [RY on every qubit, CNOT chain q -> q+1]), loss = sum_i w_i p_i; theta and w
come from numpy's default_rng(seed), so every worker sees the same numbers.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
import warnings

import numpy as np
import torch


def to_big_endian(vector: np.ndarray, num_qubits: int) -> np.ndarray:
    """Reorder a basis-indexed vector between qubit-0-LSB (Qiskit) and qubit-0-MSB order."""
    return vector.reshape([2] * num_qubits).transpose(list(range(num_qubits))[::-1]).reshape(-1)


class Contestant:
    """Builds the circuit once (``setup``); ``probs`` is p in Qiskit order (not timed) and
    ``step`` one timed forward + backward returning (loss, grad)."""

    big_endian = False  # the simulator's p has qubit 0 as the most significant bit
    dtype = torch.float64

    def setup(self, num_qubits: int, depth: int, theta: np.ndarray, weights: np.ndarray) -> None:
        self.num_qubits, self.depth = num_qubits, depth
        self.theta = torch.tensor(theta, dtype=self.dtype, requires_grad=True)
        order = to_big_endian(weights, num_qubits) if self.big_endian else weights
        self.weights = torch.as_tensor(order, dtype=self.dtype)  # the same functional

    def _probs(self) -> torch.Tensor:
        raise NotImplementedError

    def probs(self) -> np.ndarray:
        with torch.no_grad():
            p = self._probs().double().numpy()
        return to_big_endian(p, self.num_qubits) if self.big_endian else p  # self-inverse

    def step(self) -> tuple[float, torch.Tensor]:
        self.theta.grad = None
        loss = (self._probs() * self.weights).sum()
        loss.backward()
        return float(loss), self.theta.grad

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__, "numpy": np.__version__}


class Ours(Contestant):
    def __init__(self, precision: str):
        self.precision = precision
        self.dtype = torch.float64 if precision == "float64" else torch.float32

    def setup(self, num_qubits, depth, theta, weights):
        from qpa.backends.statevector import StatevectorBackend
        from qpa.circuits import qpa_ansatz

        super().setup(num_qubits, depth, theta, weights)
        self.backend = StatevectorBackend(qpa_ansatz(num_qubits, depth), precision=self.precision)

    def _probs(self):
        return self.backend.probabilities(self.theta)

    def versions(self):
        import qiskit

        import qpa

        return {**super().versions(), "qpa": getattr(qpa, "__version__", "dev"),
                "qiskit": qiskit.__version__}


class PennyLane(Contestant):
    big_endian = True

    def setup(self, num_qubits, depth, theta, weights):
        import pennylane as qml

        super().setup(num_qubits, depth, theta, weights)

        @qml.qnode(qml.device("default.qubit", wires=num_qubits), interface="torch",
                   diff_method="backprop")
        def circuit(angles):
            for layer in range(depth):
                for qubit in range(num_qubits):
                    qml.RY(angles[layer * num_qubits + qubit], wires=qubit)
                for qubit in range(num_qubits - 1):
                    qml.CNOT(wires=[qubit, qubit + 1])
            return qml.probs()

        self.circuit = circuit

    def _probs(self):
        return self.circuit(self.theta)

    def versions(self):
        import pennylane as qml

        return {**super().versions(), "pennylane": qml.__version__}


class QiskitML(Contestant):
    """Qiskit Machine Learning SamplerQNN (exact sampler) + TorchConnector; its backward is
    ParamShiftSamplerGradient, 2P + 1 circuits."""

    dtype = torch.float32  # TorchConnector hands back float32 tensors

    def setup(self, num_qubits, depth, theta, weights):
        warnings.filterwarnings("ignore")
        from qiskit_machine_learning.connectors import TorchConnector
        from qiskit_machine_learning.neural_networks import SamplerQNN

        from qpa.circuits import qpa_ansatz

        super().setup(num_qubits, depth, theta, weights)
        circuit = qpa_ansatz(num_qubits, depth)
        qnn = SamplerQNN(circuit=circuit, input_params=[], weight_params=list(circuit.parameters))
        self.model = TorchConnector(qnn, initial_weights=theta)
        self.theta = self.model.weight

    def _probs(self):
        return self.model()

    def versions(self):
        import qiskit
        import qiskit_machine_learning

        return {**super().versions(), "qiskit": qiskit.__version__,
                "qiskit-machine-learning": qiskit_machine_learning.__version__}


class TorchQuantum(Contestant):
    """Functional gates on a QuantumDevice (complex64 state)."""

    big_endian = True
    dtype = torch.float32

    def setup(self, num_qubits, depth, theta, weights):
        warnings.filterwarnings("ignore")
        import torchquantum as tq
        import torchquantum.functional as tqf

        super().setup(num_qubits, depth, theta, weights)
        self.tq, self.tqf = tq, tqf

    def _probs(self):
        n = self.num_qubits
        device = self.tq.QuantumDevice(n_wires=n, bsz=1, device="cpu")
        for layer in range(self.depth):
            for qubit in range(n):
                index = layer * n + qubit
                self.tqf.ry(device, wires=qubit, params=self.theta[index : index + 1])
            for qubit in range(n - 1):
                self.tqf.cnot(device, wires=[qubit, qubit + 1])
        return device.get_states_1d()[0].abs().square()

    def versions(self):
        import qiskit
        import torchquantum

        return {**super().versions(), "torchquantum": torchquantum.__version__,
                "qiskit (tq venv)": qiskit.__version__}


CONTESTANTS = {"qpa-float64": lambda: Ours("float64"), "qpa-float32": lambda: Ours("float32"),
               "pennylane": PennyLane, "qiskit-ml": QiskitML, "torchquantum": TorchQuantum}


def handle(contestant: Contestant, request: dict) -> dict:
    command = request["cmd"]
    if command == "info":
        return {"versions": contestant.versions(), "threads": torch.get_num_threads()}
    if command == "rss":  # ru_maxrss is in KiB on Linux
        return {"max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if command == "setup":
        rng = np.random.default_rng(request["seed"])
        theta = rng.uniform(0.0, 2.0 * np.pi, request["n"] * request["depth"])
        weights = rng.standard_normal(2 ** request["n"])
        start = time.perf_counter()
        contestant.setup(request["n"], request["depth"], theta, weights)
        setup_s, start = time.perf_counter() - start, time.perf_counter()
        contestant.step()  # warm-up: imports, caches, lazy compilation
        return {"setup_s": setup_s, "first_call_s": time.perf_counter() - start}
    if command == "probs":
        return {"probs": contestant.probs().tolist()}
    if command == "grad":
        loss, grad = contestant.step()
        return {"loss": loss, "grad": grad.double().tolist()}
    if command == "time":
        seconds = []
        for _ in range(request.get("reps", 1)):
            start = time.perf_counter()
            contestant.step()
            seconds.append(time.perf_counter() - start)
        return {"seconds": seconds}
    raise ValueError(f"unknown command {command!r}")


def serve(name: str, threads: int) -> None:
    torch.set_num_threads(threads)
    contestant = CONTESTANTS[name]()
    for line in sys.stdin:
        try:
            reply = {"ok": True, **handle(contestant, json.loads(line))}
        except Exception as error:  # report and keep serving: the coordinator decides
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}",
                     "traceback": traceback.format_exc(limit=5)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
