"""Exact statevector simulation in torch, compiled from the Qiskit circuit.

Every gate our ansaetze use (RY, CX, X, Z, H, CRY, RBS) is real, so the state is a real
vector: half the memory and arithmetic of a complex simulator. The circuit is compiled
once into a short program, and the program runs inside one ``torch.autograd.Function``:

* Runs of single-qubit gates (a QPA layer of RY on every qubit) are applied as a few
  small dense matrices: the register is tiled into groups of ``GROUP_QUBITS`` adjacent
  qubits, and each group's Kronecker product K (d x d, d = 2^k) is applied with one GEMM.
  The GEMM reads the group from the lowest bits and writes it to the highest
  (``out = K @ X^T`` with X viewed as (2^n / d, d)), the GEMM shape MKL ran fastest of
  those we measured; after every group of a full tiling the bits are back where they
  started. One pass per group instead of one pass per qubit: 5 passes for 20 qubits.
* Runs of CX gates are one precomputed permutation (a CNOT chain permutes basis states).
* Gradients use the adjoint method with reversibility instead of a stored tape: backward
  runs the program in reverse with transposed (= inverse) matrices, carrying the state
  and the cotangent side by side in one buffer, so both share every GEMM and gather.
  Memory is a handful of state vectors whatever the depth, and nothing state-sized is
  allocated per gate (an autograd tape allocates and zero-fills several per gate).
  For a group, d<phi, K psi>/d theta_q = <phi_out, (Y'_q / 2) psi_out> with
  Y' = [[0, -1], [1, 0]], because d RY(t)/dt = Y'/2 RY(t) and Y'_q commutes with the
  other factors of K: one small GEMM per group gives every angle of the group.

The results equal ``qiskit.quantum_info.Statevector`` to rounding (1e-12 in float64).
Only device-agnostic torch ops are used (CPU and CUDA); the tuning constants were measured
on CPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from qiskit.circuit import Parameter, ParameterExpression, QuantumCircuit

from qpa.backends.base import QuantumBackend

_FIXED_REAL_GATES = {"x", "z", "h", "id", "barrier"}

#: Qubits per dense group. 4 (16 x 16 matrices) measured fastest on AVX-512 CPUs in
#: float32 and float64 for n = 12..20; 3 is within 10 %; 6 and up lose to wasted flops.
GROUP_QUBITS = 4
#: Up to this many qubits one group covers the register (one small GEMM per layer).
SINGLE_GROUP_MAX_QUBITS = 6

_Y_PRIME = np.array([[0.0, -1.0], [1.0, 0.0]])  # d RY(t)/dt = (Y'/2) RY(t)


# -- compiling the circuit ---------------------------------------------------------


@dataclass
class _Op:
    """One gate (or fused CX run) of the circuit, before planning."""

    kind: str  # "ry" | "rbs" | "cry" | "perm" | "fixed"
    qubits: tuple[int, ...]
    param: int | None = None  # index into theta
    scale: float = 1.0  # angle = scale * theta[param]
    perm: np.ndarray | None = None  # gather indices (standard layout)
    matrix: np.ndarray | None = None


def _parameter_index(index: dict, value) -> tuple[int, float]:
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
    # Track where each output basis state reads from: apply the gates in reverse to the index.
    source = np.arange(2**num_qubits, dtype=np.int64)
    for control, target in reversed(pairs):
        flip = (source >> control) & 1
        source = source ^ (flip << target)
    return source


def compile_circuit(circuit: QuantumCircuit) -> list[_Op]:
    """Turn a Qiskit circuit into a list of real-valued ops (CX runs fused into permutations)."""
    ops: list[_Op] = []
    cx_run: list[tuple[int, int]] = []
    qubit_index = {qubit: position for position, qubit in enumerate(circuit.qubits)}
    parameter_index = {parameter: position for position, parameter in enumerate(circuit.parameters)}

    def flush() -> None:
        if cx_run:
            ops.append(_Op("perm", (), perm=_permutation_of_cx_run(circuit.num_qubits, cx_run)))
            cx_run.clear()

    for instruction in circuit.data:
        operation = instruction.operation
        qubits = tuple(qubit_index[q] for q in instruction.qubits)
        name = operation.name
        if name == "cx":
            cx_run.append(qubits)
            continue
        if name in ("barrier", "id", "measure"):
            continue
        flush()
        if name in ("ry", "rbs", "cry"):
            param, scale = _parameter_index(parameter_index, operation.params[0])
            ops.append(_Op(name, qubits, param=param, scale=scale))
        elif name in _FIXED_REAL_GATES:
            matrix = np.real_if_close(operation.to_matrix())
            if np.iscomplexobj(matrix) or len(qubits) != 1:
                raise ValueError(f"gate {name!r} is not a real single-qubit gate")
            ops.append(_Op("fixed", qubits, matrix=np.array(matrix, dtype=np.float64)))
        else:
            raise ValueError(
                f"the statevector backend simulates real gates only; {name!r} is not supported"
            )
    flush()
    return ops


# -- planning: runs of single-qubit gates become dense groups ------------------------


@dataclass
class _Group:
    """Adjacent qubits ``qubits`` (lowest first) whose single-qubit gates form one K."""

    qubits: tuple[int, ...]
    #: per qubit (lowest first): ("ry", param, scale) | ("fixed", matrix) | ("id",)
    factors: list[tuple] = field(default_factory=list)
    bucket: int = 0  # groups of equal size share a bucket; their matrices are built together
    slot: int = 0  # index within the bucket


class _Permutation:
    """new[:, i] = old[:, source[i]] on a (rows, 2^n) state, written into a given buffer.

    torch's CPU index_select is vectorised for 4-byte elements but not for 8-byte ones,
    where scattering with the inverse permutation (index_copy_) measured 2x faster at
    n = 18..20; so float64 on CPU scatters, everything else gathers. Only the index used
    is kept (8 bytes per amplitude).
    """

    def __init__(self, source: np.ndarray, dtype: torch.dtype, device: torch.device):
        self.scatter = dtype.itemsize == 8 and device.type == "cpu"
        if self.scatter:
            target = np.empty_like(source)
            target[source] = np.arange(source.size)
            self.index = torch.as_tensor(target, device=device)
        else:
            self.index = torch.as_tensor(source, device=device)

    def apply(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        if self.scatter:
            dst.index_copy_(1, self.index, src)
        else:
            torch.index_select(src, 1, self.index, out=dst)


@dataclass
class _Step:
    kind: str  # "groups" | "perm" | "rbs" | "cry"
    groups: list[_Group] = field(default_factory=list)
    perm_forward: _Permutation | None = None  # standard layout
    perm_backward: _Permutation | None = None  # inverse permutation in the backward layout
    qubits: tuple[int, ...] = ()
    param: int | None = None
    scale: float = 1.0


@dataclass
class _Bucket:
    """All groups of one size k: their matrices are built, and their gradients reduced, in a
    handful of batched ops rather than a few ops per gate (which dominates at small n)."""

    size: int
    count: int = 0
    units: torch.Tensor | None = None  # (count, k, 2, 2) constant factors, zeros at RY slots
    ry_group: torch.Tensor | None = None  # (R,) group slot of each RY
    ry_position: torch.Tensor | None = None  # (R,) position of the RY within its group
    ry_param: torch.Tensor | None = None  # (R,) index into theta
    ry_half_scale: torch.Tensor | None = None  # (R,) angle / 2 = this * theta[param]
    generators: torch.Tensor | None = None  # (k, d, d) Y' on each position


def _tiling(num_qubits: int) -> list[tuple[int, ...]]:
    """Adjacent-qubit groups covering the register, as even as possible."""
    if num_qubits <= SINGLE_GROUP_MAX_QUBITS:
        return [tuple(range(num_qubits))]
    count = math.ceil(num_qubits / GROUP_QUBITS)
    sizes = [num_qubits // count + (1 if i < num_qubits % count else 0) for i in range(count)]
    groups, start = [], 0
    for size in sizes:
        groups.append(tuple(range(start, start + size)))
        start += size
    return groups


class _Program:
    """The planned circuit: steps, plus the qubit layouts the forward and backward use.

    Forward works in the standard layout (qubit q = bit q). A full tiling of group GEMMs
    leaves the layout unchanged only if the groups are applied lowest first; backward
    applies their inverses in the opposite order, so it needs the groups stacked the other
    way round (last group in the lowest bits). That relabelling is folded into the
    backward gathers, so it costs nothing for circuits that end in a CX run.
    """

    def __init__(self, circuit: QuantumCircuit, dtype: torch.dtype, device: torch.device):
        self.num_qubits = circuit.num_qubits
        self.num_parameters = circuit.num_parameters
        self.dtype, self.device = dtype, device
        self.tiling = _tiling(self.num_qubits)
        # backward layout: bit position of each qubit (groups in reverse order, each kept
        # in its own lowest-first order)
        position, cursor = [0] * self.num_qubits, 0
        for group in reversed(self.tiling):
            for qubit in group:
                position[qubit] = cursor
                cursor += 1
        self.backward_position = tuple(position)
        size = 2**self.num_qubits
        logical = np.arange(size, dtype=np.int64)
        # to_backward[i] = backward-layout index of logical basis state i, and its inverse
        self.to_backward = _relabel(logical, position)
        self.from_backward = np.empty_like(self.to_backward)
        self.from_backward[self.to_backward] = logical
        self.buckets: list[_Bucket] = []
        self.steps = self._plan(compile_circuit(circuit))
        self._build_buckets()
        # Entering backward: standard -> backward layout, fused into a leading gather.
        self.enter_backward = None
        if not self.steps or self.steps[-1].kind != "perm":
            self.enter_backward = _Permutation(self.from_backward, dtype, device)

    def _plan(self, ops: list[_Op]) -> list[_Step]:
        steps: list[_Step] = []
        cache: dict[bytes, tuple[_Permutation, _Permutation]] = {}
        run: dict[int, _Op] = {}

        def flush_run() -> None:
            if run:
                steps.append(_Step("groups", groups=self._groups(run)))
                run.clear()

        for op in ops:
            if op.kind in ("ry", "fixed"):
                if op.qubits[0] in run:  # one gate per qubit per run keeps d/dtheta simple
                    flush_run()
                run[op.qubits[0]] = op
                continue
            flush_run()
            if op.kind == "perm":
                key = op.perm.tobytes()
                if key not in cache:
                    cache[key] = self._perm_tensors(op.perm)
                forward, backward = cache[key]
                steps.append(_Step("perm", perm_forward=forward, perm_backward=backward))
            else:
                steps.append(_Step(op.kind, qubits=op.qubits, param=op.param, scale=op.scale))
        flush_run()
        # The final perm's backward gather also converts standard -> backward layout.
        if steps and steps[-1].kind == "perm":
            last_perm = next(op for op in reversed(ops) if op.kind == "perm").perm
            inverse = np.empty_like(last_perm)
            inverse[last_perm] = np.arange(last_perm.size)
            steps[-1] = _Step(
                "perm",
                perm_forward=steps[-1].perm_forward,
                perm_backward=_Permutation(inverse[self.from_backward], self.dtype, self.device),
            )
        return steps

    def _perm_tensors(self, perm: np.ndarray) -> tuple[_Permutation, _Permutation]:
        # backward, in backward layout: old[j] = new[to_b(perm^-1(from_b(j)))]
        inverse = np.empty_like(perm)
        inverse[perm] = np.arange(perm.size)
        backward = self.to_backward[inverse[self.from_backward]]
        return (_Permutation(perm, self.dtype, self.device),
                _Permutation(backward, self.dtype, self.device))

    def _groups(self, run: dict[int, _Op]) -> list[_Group]:
        groups = []
        for qubits in self.tiling:
            group = _Group(qubits)
            for qubit in qubits:
                op = run.get(qubit)
                if op is None:
                    group.factors.append(("id",))
                elif op.kind == "ry":
                    group.factors.append(("ry", op.param, op.scale))
                else:
                    group.factors.append(("fixed", op.matrix))
            groups.append(group)
        return groups

    def _build_buckets(self) -> None:
        by_size: dict[int, _Bucket] = {}
        units: dict[int, list[np.ndarray]] = {}
        rotations: dict[int, list[tuple[int, int, int, float]]] = {}
        for step in self.steps:
            for group in step.groups:
                k = len(group.qubits)
                if k not in by_size:
                    by_size[k] = _Bucket(k)
                    units[k], rotations[k] = [], []
                    self.buckets.append(by_size[k])
                bucket = by_size[k]
                group.bucket, group.slot = self.buckets.index(bucket), bucket.count
                bucket.count += 1
                factors = np.zeros((k, 2, 2))
                for position, factor in enumerate(group.factors):
                    if factor[0] == "ry":
                        rotations[k].append((group.slot, position, factor[1], factor[2]))
                    else:
                        factors[position] = factor[1] if factor[0] == "fixed" else np.eye(2)
                units[k].append(factors)
        options = {"device": self.device}
        for bucket in self.buckets:
            k = bucket.size
            bucket.units = torch.as_tensor(np.stack(units[k]), dtype=self.dtype, **options)
            table = np.array(rotations[k], dtype=np.float64).reshape(-1, 4)
            bucket.ry_group = torch.as_tensor(table[:, 0].astype(np.int64), **options)
            bucket.ry_position = torch.as_tensor(table[:, 1].astype(np.int64), **options)
            bucket.ry_param = torch.as_tensor(table[:, 2].astype(np.int64), **options)
            bucket.ry_half_scale = torch.as_tensor(0.5 * table[:, 3], dtype=self.dtype, **options)
            bucket.generators = _generator_matrices(k, self.dtype, self.device)

    def group_matrices(self, theta: torch.Tensor) -> list[torch.Tensor]:
        """K of every group, per bucket (B, count, d, d): K = U_top x ... x U_lowest."""
        batch = theta.shape[0]
        matrices = []
        for bucket in self.buckets:
            units = bucket.units.expand(batch, *bucket.units.shape).clone()
            if bucket.ry_param.numel():
                half = theta[:, bucket.ry_param] * bucket.ry_half_scale
                cos, sin = torch.cos(half), torch.sin(half)
                rotation = torch.stack((torch.stack((cos, -sin), -1),
                                        torch.stack((sin, cos), -1)), -2)
                units[:, bucket.ry_group, bucket.ry_position] = rotation
            kron = units[:, :, -1]  # most significant qubit first
            for position in range(bucket.size - 2, -1, -1):
                unit = units[:, :, position]
                size = kron.shape[-1] * 2
                outer = kron[..., :, None, :, None] * unit[..., None, :, None, :]
                kron = outer.reshape(batch, bucket.count, size, size)
            matrices.append(kron)
        return matrices


def _relabel(indices: np.ndarray, position: list[int]) -> np.ndarray:
    """Move bit q of every index to bit ``position[q]``."""
    out = np.zeros_like(indices)
    for qubit, bit in enumerate(position):
        out |= ((indices >> qubit) & 1) << bit
    return out


# -- running the program ---------------------------------------------------------------


def _apply_group(kron: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst = K applied to the lowest k bits of src, those bits moved to the top of dst."""
    rows, size = src.shape
    d = kron.shape[-1]
    torch.matmul(kron, src.view(rows, size // d, d).mT, out=dst.view(rows, d, size // d))


def _generator_matrices(k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(k, d, d): Y' on bit j of a k-qubit group, identity elsewhere."""
    eye = np.eye(2)
    mats = []
    for position in range(k):
        mat = np.ones((1, 1))
        for bit in range(k - 1, -1, -1):
            mat = np.kron(mat, _Y_PRIME if bit == position else eye)
        mats.append(mat)
    return torch.as_tensor(np.stack(mats), dtype=dtype, device=device)


def _pair_views(state: torch.Tensor, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of amplitudes with (bit a, bit b) = (1, 0) and (0, 1) of a (R, 2^n) state."""
    rows, size = state.shape
    num_qubits = int(math.log2(size))
    shaped = state.view(rows, *([2] * num_qubits))
    axis_a, axis_b = 1 + num_qubits - 1 - a, 1 + num_qubits - 1 - b
    inner = axis_a - (axis_a > axis_b)
    one_zero = shaped.select(axis_b, 0).select(inner, 1)
    zero_one = shaped.select(axis_b, 1).select(inner, 0)
    return one_zero, zero_one


def _controlled_views(state: torch.Tensor, control: int, target: int):
    """Views of amplitudes with control = 1 and target = 0 / 1."""
    rows, size = state.shape
    num_qubits = int(math.log2(size))
    shaped = state.view(rows, *([2] * num_qubits))
    axis_c, axis_t = 1 + num_qubits - 1 - control, 1 + num_qubits - 1 - target
    on = shaped.select(axis_c, 1)
    axis = axis_t - (axis_t > axis_c)
    return on.select(axis, 0), on.select(axis, 1)


def _rotate_pair(src: torch.Tensor, dst: torch.Tensor, views, cos: torch.Tensor,
                 sin: torch.Tensor) -> None:
    """dst = src with the pair (u, v) = views(.) rotated: u' = c u - s v, v' = s u + c v."""
    dst.copy_(src)
    u, v = views(src)
    u_out, v_out = views(dst)
    shape = (-1,) + (1,) * (u.dim() - 1)
    cos, sin = cos.view(shape), sin.view(shape)
    torch.sub(cos * u, sin * v, out=u_out)
    torch.add(sin * u, cos * v, out=v_out)


def _pair_gradient(phi: torch.Tensor, psi: torch.Tensor, views) -> torch.Tensor:
    """<phi, G psi> per row for G = [[0, -1], [1, 0]] on the pair given by ``views``."""
    phi_u, phi_v = views(phi)
    psi_u, psi_v = views(psi)
    rows = phi.shape[0]
    return (phi_v * psi_u - phi_u * psi_v).reshape(rows, -1).sum(1)


class _CircuitAmplitudes(torch.autograd.Function):
    """theta (B, P) -> amplitudes (B, 2^n), with an adjoint (reversible) backward."""

    @staticmethod
    def forward(ctx, theta: torch.Tensor, program: _Program) -> torch.Tensor:
        batch = theta.shape[0]
        size = 2**program.num_qubits
        src = theta.new_zeros(batch, size)
        src[:, 0] = 1.0
        dst = torch.empty_like(src)
        matrices = program.group_matrices(theta)
        for step in program.steps:
            if step.kind == "groups":
                for group in step.groups:
                    _apply_group(matrices[group.bucket][:, group.slot], src, dst)
                    src, dst = dst, src
                continue
            if step.kind == "perm":
                step.perm_forward.apply(src, dst)
            elif step.kind == "rbs":
                angle = step.scale * theta[:, step.param]
                a, b = step.qubits
                _rotate_pair(src, dst, lambda s, a=a, b=b: _pair_views(s, a, b),
                             torch.cos(angle), torch.sin(angle))
            elif step.kind == "cry":
                half = 0.5 * step.scale * theta[:, step.param]
                c, t = step.qubits
                _rotate_pair(src, dst, lambda s, c=c, t=t: _controlled_views(s, c, t),
                             torch.cos(half), torch.sin(half))
            src, dst = dst, src
        del dst
        ctx.program = program
        ctx.matrices = matrices
        ctx.save_for_backward(theta, src)
        return src

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        theta, output = ctx.saved_tensors
        program: _Program = ctx.program
        batch, size = output.shape
        grad_theta = torch.zeros_like(theta)
        # Rows [0, B) carry the state psi, rows [B, 2B) the cotangent phi, through the
        # inverse program; each inverse GEMM or gather moves both at once.
        work = torch.empty(2 * batch, size, dtype=output.dtype, device=output.device)
        spare = torch.empty_like(work)
        if program.enter_backward is not None:
            program.enter_backward.apply(output, work[:batch])
            program.enter_backward.apply(grad_output.to(output.dtype).contiguous(),
                                         work[batch:])
        else:
            work[:batch].copy_(output)
            work[batch:].copy_(grad_output)
        # Transposed (= inverse) matrices, duplicated for the psi and phi rows.
        inverses = [torch.cat((kron.mT, kron.mT)) for kron in ctx.matrices]
        # gram[b][slot] = sum over the other qubits of phi (x) psi at the group's input
        grams = [output.new_empty(bucket.count, batch, 1 << bucket.size, 1 << bucket.size)
                 for bucket in program.buckets]
        position = program.backward_position
        for step in reversed(program.steps):
            if step.kind == "groups":
                for group in reversed(step.groups):
                    _apply_group(inverses[group.bucket][:, group.slot], work, spare)
                    work, spare = spare, work
                    # Evaluated at the group's input, where the group sits in the top bits:
                    # d/dtheta = <phi_in, (Y'/2) psi_in> (K^T carries the generator through).
                    d = 1 << len(group.qubits)
                    rows = work.view(2 * batch, d, size // d)
                    torch.matmul(rows[batch:], rows[:batch].mT, out=grams[group.bucket][group.slot])
                continue
            if step.kind == "perm":
                step.perm_backward.apply(work, spare)
            elif step.kind == "rbs":
                a, b = position[step.qubits[0]], position[step.qubits[1]]
                views = lambda s, a=a, b=b: _pair_views(s, a, b)  # noqa: E731
                grad_theta[:, step.param] += step.scale * _pair_gradient(
                    work[batch:], work[:batch], views)
                angle = -step.scale * theta[:, step.param]
                _rotate_pair(work, spare, views, torch.cos(angle).repeat(2),
                             torch.sin(angle).repeat(2))
            elif step.kind == "cry":
                c, t = position[step.qubits[0]], position[step.qubits[1]]
                views = lambda s, c=c, t=t: _controlled_views(s, c, t)  # noqa: E731
                grad_theta[:, step.param] += 0.5 * step.scale * _pair_gradient(
                    work[batch:], work[:batch], views)
                half = -0.5 * step.scale * theta[:, step.param]
                _rotate_pair(work, spare, views, torch.cos(half).repeat(2),
                             torch.sin(half).repeat(2))
            work, spare = spare, work
        for bucket, gram in zip(program.buckets, grams, strict=True):
            if bucket.ry_param.numel():
                # <phi, Y'_j psi> = sum_ac Y'_j[a, c] gram[a, c] for every group and position
                per_qubit = torch.einsum("gbac,jac->bgj", gram, bucket.generators)
                values = per_qubit[:, bucket.ry_group, bucket.ry_position] * bucket.ry_half_scale
                grad_theta.index_add_(1, bucket.ry_param, values)
        return grad_theta, None


class StatevectorBackend(QuantumBackend):
    """Exact, autograd-native simulation of real circuits in torch."""

    autograd_native = True

    def __init__(self, circuit: QuantumCircuit, *, precision: str = "float64",
                 device: str | torch.device = "cpu"):
        super().__init__(circuit)
        self.dtype = torch.float64 if precision == "float64" else torch.float32
        self.device = torch.device(device)
        self.program = _Program(circuit, self.dtype, self.device)

    @property
    def name(self) -> str:
        return "statevector"

    def amplitudes(self, theta: torch.Tensor) -> torch.Tensor:
        """Real amplitudes for a (P,) or (B, P) batch of angles; returns (B, 2^n)."""
        theta = theta.to(device=self.device, dtype=self.dtype)
        if theta.dim() == 1:
            theta = theta.unsqueeze(0)
        return _CircuitAmplitudes.apply(theta, self.program)

    def probabilities(self, theta: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        probs = self.amplitudes(theta).square()
        squeeze = theta.dim() == 1
        self.usage.record(circuits=1 if squeeze else theta.shape[0], shots=0,
                          seconds=time.perf_counter() - start)
        return probs[0] if squeeze else probs

    def evaluate(self, bindings: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            probs = self.probabilities(torch.as_tensor(bindings))
        return probs.reshape(len(bindings), -1).double().cpu().numpy()
