"""Exact statevector simulation in torch, compiled from the Qiskit circuit.

Every gate our ansaetze use (RY, CX, X, Z, H, CRY, RBS) is real, so the state is a real
vector: half the memory and arithmetic of a complex simulator. Runs of CX gates are
fused into one precomputed index permutation (a CNOT chain is a permutation of basis
states), and rotations act on a (batch, high, 2, low) view, so a layer costs n small
broadcast ops plus one gather. Autograd gives exact gradients; works on CPU and CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from qiskit.circuit import Parameter, ParameterExpression, QuantumCircuit

from qpa.backends.base import QuantumBackend

_FIXED_REAL_GATES = {"x", "z", "h", "id", "barrier"}


@dataclass
class _Op:
    kind: str  # "ry" | "rbs" | "cry" | "perm" | "fixed"
    qubits: tuple[int, ...]
    param: int | None = None  # index into theta
    scale: float = 1.0  # angle = scale * theta[param]
    perm: torch.Tensor | None = None
    matrix: np.ndarray | None = None


def _parameter_index(circuit: QuantumCircuit, value) -> tuple[int, float]:
    index = {parameter: position for position, parameter in enumerate(circuit.parameters)}
    if isinstance(value, Parameter):
        return index[value], 1.0
    if isinstance(value, ParameterExpression) and len(value.parameters) == 1:
        (parameter,) = value.parameters
        scale = float(value.gradient(parameter))
        if abs(float(value.bind({parameter: 0.0}))) > 0:
            raise ValueError(f"only linear gate angles are supported, got {value}")
        return index[parameter], scale
    raise ValueError(f"unsupported gate angle {value!r}")


def _permutation_of_cx_run(num_qubits: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    """Gather indices: new_state[i] = old_state[perm[i]] after applying the CX gates in order."""
    indices = np.arange(2**num_qubits)
    # Track where each output basis state reads from: apply gates in reverse to the index.
    source = indices.copy()
    for control, target in reversed(pairs):
        flip = (source >> control) & 1
        source = source ^ (flip << target)
    return source


def compile_circuit(circuit: QuantumCircuit) -> list[_Op]:
    """Turn a Qiskit circuit into a list of fused real-valued ops."""
    ops: list[_Op] = []
    cx_run: list[tuple[int, int]] = []
    qubit_index = {qubit: position for position, qubit in enumerate(circuit.qubits)}

    def flush() -> None:
        if cx_run:
            perm = _permutation_of_cx_run(circuit.num_qubits, cx_run)
            ops.append(_Op("perm", (), perm=torch.as_tensor(perm)))
            cx_run.clear()

    for instruction in circuit.data:
        operation = instruction.operation
        qubits = tuple(qubit_index[q] for q in instruction.qubits)
        name = operation.name
        if name == "cx":
            cx_run.append(qubits)
            continue
        flush()
        if name in ("ry", "rbs", "cry"):
            param, scale = _parameter_index(circuit, operation.params[0])
            ops.append(_Op(name, qubits, param=param, scale=scale))
        elif name in _FIXED_REAL_GATES:
            if name in ("barrier", "id"):
                continue
            matrix = np.real_if_close(operation.to_matrix())
            ops.append(_Op("fixed", qubits, matrix=np.asarray(matrix, dtype=np.float64)))
        elif name == "measure":
            continue
        else:
            raise ValueError(
                f"the statevector backend simulates real gates only; {name!r} is not supported"
            )
    flush()
    return ops


def _rotate(state: torch.Tensor, qubit: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply [[c, -s], [s, c]] on ``qubit`` to a (B, 2^n) state; cos/sin have shape (B,)."""
    batch, size = state.shape
    low = 1 << qubit
    view = state.view(batch, size // (2 * low), 2, low)
    zero, one = view[:, :, 0, :], view[:, :, 1, :]
    cos = cos.view(batch, 1, 1)
    sin = sin.view(batch, 1, 1)
    return torch.stack((cos * zero - sin * one, sin * zero + cos * one), dim=2).reshape(batch, size)


def _two_qubit_subspace(state: torch.Tensor, a: int, b: int):
    """Views of the amplitudes with (q_a, q_b) = 00, 01, 10, 11 (bit of a listed first)."""
    batch, size = state.shape
    num_qubits = int(math.log2(size))
    shaped = state.view(batch, *([2] * num_qubits))
    axis_a, axis_b = 1 + num_qubits - 1 - a, 1 + num_qubits - 1 - b
    return shaped, axis_a, axis_b


class StatevectorBackend(QuantumBackend):
    """Exact, autograd-native simulation of real circuits in torch."""

    autograd_native = True

    def __init__(self, circuit: QuantumCircuit, *, precision: str = "float64",
                 device: str | torch.device = "cpu"):
        super().__init__(circuit)
        self.dtype = torch.float64 if precision == "float64" else torch.float32
        self.device = torch.device(device)
        self.ops = compile_circuit(circuit)
        for op in self.ops:
            if op.perm is not None:
                op.perm = op.perm.to(self.device)

    @property
    def name(self) -> str:
        return "statevector"

    def amplitudes(self, theta: torch.Tensor) -> torch.Tensor:
        """Real amplitudes for a (P,) or (B, P) batch of angles; returns (B, 2^n)."""
        theta = theta.to(device=self.device, dtype=self.dtype)
        if theta.dim() == 1:
            theta = theta.unsqueeze(0)
        batch = theta.shape[0]
        state = torch.zeros(batch, 2**self.num_qubits, dtype=self.dtype, device=self.device)
        state[:, 0] = 1.0
        for op in self.ops:
            if op.kind == "perm":
                state = state.index_select(1, op.perm)
            elif op.kind == "ry":
                half = 0.5 * op.scale * theta[:, op.param]
                state = _rotate(state, op.qubits[0], torch.cos(half), torch.sin(half))
            elif op.kind == "rbs":
                state = self._rbs(state, op.qubits, op.scale * theta[:, op.param])
            elif op.kind == "cry":
                state = self._cry(state, op.qubits, 0.5 * op.scale * theta[:, op.param])
            else:
                state = self._fixed(state, op)
        return state

    def probabilities(self, theta: torch.Tensor) -> torch.Tensor:
        start = _now()
        probs = self.amplitudes(theta).square()
        squeeze = theta.dim() == 1
        self.usage.record(circuits=1 if squeeze else theta.shape[0], shots=0,
                          seconds=_now() - start)
        return probs[0] if squeeze else probs

    def evaluate(self, bindings: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            probs = self.probabilities(torch.as_tensor(bindings))
        return probs.reshape(len(bindings), -1).double().cpu().numpy()

    # -- gates on a (B, 2^n) state ------------------------------------------------
    def _rbs(self, state: torch.Tensor, qubits: tuple[int, int], angle: torch.Tensor):
        shaped, axis_a, axis_b = _two_qubit_subspace(state, *qubits)
        amp_01 = shaped.select(axis_b, 0).select(axis_a - (axis_a > axis_b), 1)  # a=1, b=0
        amp_10 = shaped.select(axis_b, 1).select(axis_a - (axis_a > axis_b), 0)  # a=0, b=1
        shape = (-1,) + (1,) * (amp_01.dim() - 1)
        cos, sin = torch.cos(angle).view(shape), torch.sin(angle).view(shape)
        new_01 = cos * amp_01 - sin * amp_10
        new_10 = sin * amp_01 + cos * amp_10
        out = shaped.clone()
        out.select(axis_b, 0).select(axis_a - (axis_a > axis_b), 1).copy_(new_01)
        out.select(axis_b, 1).select(axis_a - (axis_a > axis_b), 0).copy_(new_10)
        return out.reshape(state.shape)

    def _cry(self, state: torch.Tensor, qubits: tuple[int, int], half: torch.Tensor):
        control, target = qubits
        shaped, axis_c, axis_t = _two_qubit_subspace(state, control, target)
        on = shaped.select(axis_c, 1)
        axis = axis_t - (axis_t > axis_c)
        zero, one = on.select(axis, 0), on.select(axis, 1)
        shape = (-1,) + (1,) * (zero.dim() - 1)
        cos, sin = torch.cos(half).view(shape), torch.sin(half).view(shape)
        out = shaped.clone()
        target_view = out.select(axis_c, 1)
        target_view.select(axis, 0).copy_(cos * zero - sin * one)
        target_view.select(axis, 1).copy_(sin * zero + cos * one)
        return out.reshape(state.shape)

    def _fixed(self, state: torch.Tensor, op: _Op) -> torch.Tensor:
        matrix = torch.tensor(op.matrix, dtype=self.dtype, device=self.device)
        if len(op.qubits) != 1:
            raise ValueError("fixed multi-qubit gates other than CX are not supported")
        batch, size = state.shape
        low = 1 << op.qubits[0]
        view = state.view(batch, size // (2 * low), 2, low)
        return torch.einsum("ij,bhjl->bhil", matrix, view).reshape(batch, size)


def _now() -> float:
    import time

    return time.perf_counter()
