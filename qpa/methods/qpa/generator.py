"""The QPA parameter generator: circuits' output distributions -> mapping MLP -> LoRA values.

For M values split into chunks of ``chunk_size``, each of G sub-generators owns an equal
share of the chunks and a circuit of n = ceil(log2(chunks per sub-generator)) qubits.
Chunk j of a sub-generator is tied to basis state j (a fixed, deterministic assignment;
the authors' code re-draws it at random on every call). The mapping MLP reads
(bits of basis state j as +-1, the post-processed p_j of each of ``features`` circuits)
and writes the chunk's values. Without the bits (``read_bits=False``, config
``qpa.basis_bits``) only the circuits' probabilities tell the chunks apart: the design in
which training the circuit pays.

Ablations replace the circuit's p by a fixed distribution (``fix_distribution``): its value
at the initial angles (angles frozen), the uniform one (the MLP sees the bits only) or an
untrained Porter-Thomas draw (what a Haar-random state's probabilities look like).

Amortised quantum calls: the circuit and its gradient are evaluated once per window of
``update_every`` steps. In between, p is held fixed as a leaf tensor so the MLP trains
every step while dL/dp accumulates on that leaf; at the window's end the accumulated
gradient is pulled back through the circuit into the angles (autograd for the
statevector backend, the parameter-shift Jacobian from the same job for the others).
With ``update_every=1`` this is exactly joint training. The final window's angle
gradient is dropped: the MLP could not follow a change of p after its last step.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from qpa.backends.base import (
    QuantumBackend,
    shift_rule_for,
    shifted_binding_count,
)
from qpa.circuits import basis_bits, build_ansatz, support_size
from qpa.errors import QuantumBudgetExceeded


def hamming_weight_states(num_qubits: int, weight: int) -> np.ndarray:
    """Basis indices of the given Hamming weight, ascending."""
    indices = np.arange(2**num_qubits)
    counts = np.array([bin(int(i)).count("1") for i in indices])
    return indices[counts == weight]


def plan_qubits(
    num_values: int, chunk_size: int, sub_generators: int, ansatz: str
) -> tuple[int, int]:
    """(chunks per sub-generator, qubits per circuit) for a generator of ``num_values``."""
    chunks = math.ceil(num_values / chunk_size)
    per_sub = math.ceil(chunks / sub_generators)
    num_qubits = max(1, math.ceil(math.log2(max(per_sub, 1))))
    if ansatz == "rbs":
        num_qubits = max(num_qubits, 2)
        while support_size("rbs", num_qubits) < per_sub:
            num_qubits += 1
    return per_sub, num_qubits


def fit_sub_generators(num_values: int, chunk_size: int, ansatz: str, width: int,
                       most: int = 1024) -> int | None:
    """Fewest sub-generators whose circuits fit in ``width`` qubits (None: no count up to
    ``most`` does). Fewer sub-generators mean fewer mapping MLPs and circuit rows."""
    for count in range(1, most + 1):
        if plan_qubits(num_values, chunk_size, count, ansatz)[1] <= width:
            return count
    return None


class MappingMLP(nn.Module):
    """(n bits as +-1, post-processed p_j per feature circuit) -> chunk values. The last
    layer starts at zero so the generated values, and hence the LoRA update, are zero at
    step 0."""

    def __init__(self, num_inputs: int, hidden: list[int], chunk_size: int):
        super().__init__()
        widths = [num_inputs, *hidden]
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(fan_in, fan_out), nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], chunk_size)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(features))


POSTPROCESS = ("standardize", "scaled", "paper")


def postprocess(probs: torch.Tensor, num_qubits: int, kind: str) -> torch.Tensor:
    """p (rows, chunks) -> the per-chunk input the mapping MLP reads. All three send the
    uniform distribution to 0.

    ``standardize``: (p - mean) / std per row; p_j ~ 2^-n otherwise shrinks with n.
    ``scaled``: 2^n p - 1, no data-dependent normalisation (Porter-Thomas: mean 0, std ~1).
    ``paper``: the QPA authors' (0.6 tanh(0.1 2^(n-1) p))^0.15, minus its row mean.
    """
    if kind == "standardize":
        mean = probs.mean(dim=1, keepdim=True)
        std = probs.std(dim=1, keepdim=True, correction=0).clamp_min(1e-12)
        return (probs - mean) / std
    if kind == "scaled":
        return probs * 2**num_qubits - 1.0
    if kind == "paper":
        # clamp: d/dx x^0.15 is infinite at 0, and a basis state can have p = 0 exactly.
        x = (0.6 * torch.tanh(0.1 * 2 ** (num_qubits - 1) * probs)).clamp_min(1e-12) ** 0.15
        return x - x.mean(dim=1, keepdim=True)
    raise ValueError(f"unknown post-processing {kind!r}")


class QPAGenerator(nn.Module):
    """Generates ``num_values`` numbers from G (circuits, MLP) sub-generators."""

    def __init__(self, num_values: int, *, chunk_size: int, depth: int, ansatz: str,
                 mlp_hidden: list[int], sub_generators: int, features: int = 1,
                 read_bits: bool = True, postprocess: str = "standardize", seed: int = 0):
        super().__init__()
        self.num_values = num_values
        self.chunk_size = chunk_size
        self.features = features
        self.read_bits = read_bits
        self.postprocess = postprocess
        self.chunks_per_sub, self.num_qubits = plan_qubits(
            num_values, chunk_size, sub_generators, ansatz
        )
        self.num_subs = sub_generators
        self.circuit = build_ansatz(ansatz, self.num_qubits, depth)
        generator = torch.Generator().manual_seed(seed)
        # One row of angles per circuit: ``features`` circuits for each sub-generator.
        # Uniform in [0, 2pi): a spread-out p, so every chunk gets a distinct input.
        self.theta = nn.Parameter(
            torch.rand(sub_generators * features, self.circuit.num_parameters,
                       generator=generator, dtype=torch.float64) * 2 * math.pi
        )
        self.mlps = nn.ModuleList(
            MappingMLP((self.num_qubits if read_bits else 0) + features, mlp_hidden,
                       chunk_size)
            for _ in range(sub_generators)
        )
        if ansatz == "rbs":
            states = hamming_weight_states(self.num_qubits, self.num_qubits // 2)
        else:
            states = np.arange(2**self.num_qubits)
        states = states[: self.chunks_per_sub]
        self.register_buffer("state_index", torch.as_tensor(states, dtype=torch.long))
        self.register_buffer("state_bits", torch.as_tensor(basis_bits(self.num_qubits)[states]))
        self.backend: QuantumBackend | None = None
        self.max_seconds: float | None = None
        self.fixed_p: torch.Tensor | None = None
        self._p_leaf: torch.Tensor | None = None
        self._p_graph: torch.Tensor | None = None
        self._jacobian: torch.Tensor | None = None
        self._fresh = False

    # -- accounting ------------------------------------------------------------------
    @property
    def angle_count(self) -> int:
        """Trained circuit angles (none while p is held fixed by an ablation)."""
        return self.theta.numel() if self.fixed_p is None else 0

    @property
    def mlp_count(self) -> int:
        return sum(p.numel() for p in self.mlps.parameters())

    # -- quantum side ----------------------------------------------------------------
    def attach_backend(self, backend: QuantumBackend, max_seconds: float | None = None) -> None:
        self.backend = backend
        self.max_seconds = max_seconds

    @property
    def is_current(self) -> bool:
        """True when p was evaluated at the present angles (no job needed to use it)."""
        return self._fresh

    def mark_stale(self) -> None:
        """The angles were changed from outside (a restored checkpoint): re-evaluate p
        before it is used."""
        self._fresh = False

    @property
    def held_distribution(self) -> torch.Tensor | None:
        """p as the MLP reads it over the current window; dL/dp accumulates on it."""
        return self._p_leaf

    @property
    def has_window(self) -> bool:
        """True when p is current for theta and can carry gradient back to the angles."""
        return self._fresh and (self._p_graph is not None or self._jacobian is not None
                                or self.fixed_p is not None)

    def fix_distribution(self, kind: str, seed: int = 0) -> None:
        """Hold p fixed for the whole run (an ablation): the angles are no longer trained.

        ``initial``: p at the initial angles (one backend call); ``uniform``: every p_j =
        2^-n, so the post-processed input is 0 and the MLP sees the bits only; ``random``:
        an untrained Porter-Thomas draw, normalised Exp(1) samples per row.
        """
        rows, size = self.theta.shape[0], 2**self.num_qubits
        if kind == "initial":
            self.refresh(with_gradient=False)
            fixed = self._p_leaf.detach()
        elif kind == "uniform":
            fixed = torch.full((rows, size), 1.0 / size, dtype=torch.float64)
        elif kind == "random":
            draw = torch.empty(rows, size, dtype=torch.float64)
            draw.exponential_(generator=torch.Generator().manual_seed(seed + 7919))
            fixed = draw / draw.sum(dim=1, keepdim=True)
        else:
            raise ValueError(f"unknown fixed distribution {kind!r}")
        self.theta.requires_grad_(False)
        self.fixed_p = fixed.to(self.theta.device)
        self._p_graph = self._jacobian = None
        self._p_leaf, self._fresh = self.fixed_p, True

    def job_circuits(self, with_gradient: bool) -> int:
        """Circuits (bindings) of the one job a ``refresh`` submits: every circuit row at
        theta, and for a parameter-shift backend with the gradient every shifted binding."""
        rows = self.theta.shape[0]
        if with_gradient and not self.backend.autograd_native:
            return rows * shifted_binding_count(self.theta.shape[1], shift_rule_for(self.circuit))
        return rows

    def refresh(self, with_gradient: bool) -> None:
        """Evaluate p(theta) for every sub-generator in one backend call.

        With a planning backend (``qpa.methods.qpa.estimate``) the job is counted, not run: p is a
        placeholder of one column and the Jacobian zero, so that every later decision
        (windows, evaluations) is taken by this same code on the same state.
        """
        if self.fixed_p is not None:
            self._p_leaf, self._fresh = self.fixed_p, True
            return
        if self.backend is None:
            raise RuntimeError("attach a backend before generating")
        carried = self._p_leaf.grad if self._p_leaf is not None else None
        self._p_graph = self._jacobian = None
        if getattr(self.backend, "plans_only", False):
            self.backend.count(self.job_circuits(with_gradient))
            rows, where = self.theta.shape[0], {"dtype": torch.float64, "device": self.theta.device}
            probs = torch.zeros(rows, 1, **where)
            if with_gradient:
                self._jacobian = torch.zeros(rows, 1, self.theta.shape[1], **where)
        elif self.backend.autograd_native:
            with torch.set_grad_enabled(with_gradient):
                probs = self.backend.probabilities(self.theta)
            if with_gradient:
                self._p_graph = probs
        else:
            thetas = self.theta.detach().cpu().numpy()
            if with_gradient:
                values, jacobians = self.backend.probabilities_and_jacobian(thetas)
                probs = torch.as_tensor(values, dtype=torch.float64)
                self._jacobian = torch.as_tensor(jacobians, dtype=torch.float64)
            else:
                probs = torch.as_tensor(self.backend.evaluate(thetas), dtype=torch.float64)
        self._p_leaf = probs.detach().to(self.theta.device).requires_grad_(with_gradient)
        if carried is not None and with_gradient:
            self._p_leaf.grad = carried.to(self._p_leaf.device)
        self._fresh = True
        if self.max_seconds is not None and self.backend.usage.seconds > self.max_seconds:
            raise QuantumBudgetExceeded(
                f"quantum time {self.backend.usage.seconds:.1f}s exceeds quantum.max_seconds="
                f"{self.max_seconds}"
            )

    def push_angle_gradient(self) -> bool:
        """Pull the dL/dp accumulated over the window back into theta.grad.

        Returns True when the angles received a gradient (they will change at the next
        optimizer step, so p must be re-evaluated before it is used again).
        """
        if self._p_leaf is None or self._p_leaf.grad is None:
            return False
        grad_p = self._p_leaf.grad
        if self._p_graph is not None:
            (grad_theta,) = torch.autograd.grad(self._p_graph, self.theta, grad_p)
        elif self._jacobian is not None:
            grad_theta = torch.einsum("gsp,gs->gp", self._jacobian.to(grad_p.device), grad_p)
        else:
            return False
        self.theta.grad = grad_theta if self.theta.grad is None else self.theta.grad + grad_theta
        self._p_leaf.grad = None
        self._p_graph = self._jacobian = None
        self._fresh = False
        return True

    def discard_accumulated_gradient(self) -> None:
        if self._p_leaf is not None:
            self._p_leaf.grad = None

    def accumulated_gradient(self) -> torch.Tensor | None:
        """dL/dp gathered so far in the current window (checkpointed mid-window)."""
        return None if self._p_leaf is None else self._p_leaf.grad

    def restore_accumulated_gradient(self, grad: torch.Tensor) -> None:
        """After a resume: p was re-evaluated at the same theta; put the window's dL/dp back."""
        if self._p_leaf is None or not self._p_leaf.requires_grad:
            raise RuntimeError("refresh(with_gradient=True) before restoring a window")
        self._p_leaf.grad = grad.to(self._p_leaf.device, self._p_leaf.dtype)

    # -- classical side ----------------------------------------------------------------
    def forward(self) -> torch.Tensor:
        """All generated values, shape (num_values,). Uses the held p."""
        if self._p_leaf is None:
            raise RuntimeError("call refresh() before generating")
        probs = self._p_leaf[:, self.state_index].to(self.state_bits.dtype)
        inputs = postprocess(probs, self.num_qubits, self.postprocess)
        inputs = inputs.view(self.num_subs, self.features, -1)
        outputs = []
        for sub, mlp in enumerate(self.mlps):
            bits = [self.state_bits] if self.read_bits else []
            features = torch.cat([*bits, inputs[sub].T], dim=1)
            outputs.append(mlp(features).reshape(-1))
        return torch.cat(outputs)[: self.num_values]
