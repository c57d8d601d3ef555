"""One quantum backend for all ranks of a data-parallel job: rank 0 runs, the others receive.

Every rank calls the backend at the same point of the same step (the ``update_every``
windows are step-indexed, hence aligned), so the call itself is the synchronisation:
rank 0 evaluates with the real backend and broadcasts the result, its usage counters and
any error; the other ranks return what they received. Consequences:

* one primitive job per evaluation whatever the world size (only rank 0 ever built a
  Runtime session or an Aer simulator), and every rank's ``usage`` equals rank 0's, so
  ``quantum.max_seconds`` stops every rank at the same step and metrics count jobs once;
* for the parameter-shift backends each rank rebuilds the Jacobian from the broadcast
  values with the same numpy code, so all ranks pull the (already summed) dL/dp back into
  identical angle gradients;
* for the autograd-native statevector backend only rank 0 holds the circuit's graph: the
  pull-back runs there and the angle gradient is broadcast (``_SharedProbabilities``).

A statevector run could evaluate on every rank instead, but CPU threading can change the
last bits of a simulation, so the ranks' angles would drift apart; broadcasting p keeps
them provably identical.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from qiskit.circuit import QuantumCircuit

from qpa.backends.base import QuantumBackend

if TYPE_CHECKING:
    from qpa.distributed import DataParallel


class SharedBackend(QuantumBackend):
    """``inner`` on rank 0 (None elsewhere), shared with every rank of ``data_parallel``."""

    def __init__(self, circuit: QuantumCircuit, spec: str, inner: QuantumBackend | None,
                 data_parallel: DataParallel):
        super().__init__(circuit)
        from qpa.backends.factory import is_autograd_native

        self.spec = spec
        self.inner = inner
        self.data_parallel = data_parallel
        self.autograd_native = is_autograd_native(spec)
        if inner is not None:
            self.usage = inner.usage  # rank 0's counters are the job's counters

    @property
    def name(self) -> str:
        return self.inner.name if self.inner is not None else self.spec

    def set_job_listener(self, listener) -> None:
        # Only rank 0's real backend submits jobs (and only rank 0 emits events).
        if self.inner is not None:
            self.inner.set_job_listener(listener)

    @property
    def shots_per_circuit(self) -> int:
        return self.inner.shots_per_circuit if self.inner is not None else 0

    @property
    def executed_circuit(self):
        return self.inner.executed_circuit if self.inner is not None else None

    def seconds_per_shot(self) -> float | None:
        return self.inner.seconds_per_shot() if self.inner is not None else None

    def _from_main(self, produce: Any) -> Any:
        """Rank 0's ``produce()`` on every rank, with rank 0's usage mirrored."""
        def run() -> tuple[Any, dict]:
            return produce(), self.inner.usage.as_dict()

        value, usage = self.data_parallel.from_main(run)
        if self.inner is None:
            self.usage.load(usage)
        return value

    def evaluate(self, bindings: np.ndarray) -> np.ndarray:
        return self._from_main(lambda: self.inner.evaluate(bindings))

    def probabilities(self, theta: torch.Tensor) -> torch.Tensor:
        if not self.autograd_native:
            return super().probabilities(theta)  # parameter shift through evaluate()
        if theta.requires_grad and torch.is_grad_enabled():
            return _SharedProbabilities.apply(theta, self)
        values = self._from_main(lambda: self.inner.probabilities(theta).detach().cpu())
        return values.to(theta.device)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()


class _SharedProbabilities(torch.autograd.Function):
    """p(theta) from rank 0's autograd backend; backward pulls back on rank 0 and
    broadcasts dL/dtheta (every rank calls backward with the same summed dL/dp)."""

    @staticmethod
    def forward(ctx, theta: torch.Tensor, shared: SharedBackend) -> torch.Tensor:
        ctx.shared = shared
        ctx.graph = None

        def evaluate() -> torch.Tensor:
            with torch.enable_grad():
                held = theta.detach().requires_grad_()
                probs = shared.inner.probabilities(held)
            ctx.graph = (held, probs)
            return probs.detach().cpu()

        return shared._from_main(evaluate).to(theta.device)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        def pull_back() -> torch.Tensor:
            held, probs = ctx.graph
            (grad,) = torch.autograd.grad(probs, held, grad_output.to(probs.device, probs.dtype))
            return grad.detach().cpu()

        grad = ctx.shared.data_parallel.from_main(pull_back)
        ctx.graph = None
        return grad.to(grad_output.device), None
