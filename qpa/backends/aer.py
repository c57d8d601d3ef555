"""qiskit-aer backend: exact probabilities or shot sampling, one primitive call per batch.

With ``quantum.shots`` unset the circuit runs on ``AerSimulator(method="statevector")``
with a ``save_probabilities`` instruction, every binding of the batch passed through
``parameter_binds`` of a single ``run`` call. With shots it runs through
``qiskit_aer.primitives.SamplerV2`` with one PUB carrying the whole (B, P) binding array,
the same primitive interface the Runtime path uses. Either way the circuit is transpiled
once, here, and every evaluate only binds parameters.
"""

from __future__ import annotations

import numpy as np
from qiskit.circuit import Parameter, QuantumCircuit
from qiskit.primitives import BitArray
from qiskit.transpiler import generate_preset_pass_manager
from qiskit_aer import AerSimulator
from qiskit_aer.library import SaveProbabilities
from qiskit_aer.primitives import SamplerV2

from qpa.backends.base import QuantumBackend, shots_per_circuit
from qpa.config import QuantumOptions

#: Gates the transpiled circuit may use; see the note in ``AerBackend.__init__``.
AER_BASIS = ["cx", "rx", "ry", "rz", "x", "y", "z", "h", "s", "sdg", "sx", "sxdg"]


class AerBackend(QuantumBackend):
    """Runs the QPA circuit on qiskit-aer; exact when ``options.shots`` is None."""

    def __init__(self, circuit: QuantumCircuit, options: QuantumOptions):
        super().__init__(circuit)
        self.options = options
        self.shots = options.shots
        # Aer's default (every core, for experiments and shots) was about 8x slower per
        # angle update on a busy 2-core machine (bench/results/gradient_paths.json); below
        # Aer's own statevector-parallel threshold of 14 qubits one thread is the faster.
        threads = 1 if circuit.num_qubits < 14 else 0  # 0 = Aer's choice
        backend_options = {"max_parallel_threads": threads}
        self._simulator = AerSimulator(method="statevector", **backend_options)
        # Transpiled once, never per call, to a basis of uncontrolled rotations plus CX:
        # that unrolls the custom "rbs" gate (opaque to Aer) and, on purpose, also the CRY
        # inside it. qiskit-aer 0.18.2 silently ignores ``parameter_binds`` for controlled
        # rotations (cry/crx/crz/cp stay at angle 0 and a batch collapses to one result),
        # and its SamplerV2 binds through the same path, so Aer's own target (which lists
        # cry) would give wrong numbers.
        pass_manager = generate_preset_pass_manager(
            optimization_level=options.optimization_level, basis_gates=AER_BASIS
        )
        if self.shots is None:
            compiled = pass_manager.run(circuit)
            # Appended after transpilation: the save instruction must see the final qubits
            # in their original order so that index i keeps qubit 0 as least-significant bit.
            compiled.append(SaveProbabilities(circuit.num_qubits), compiled.qubits)
            self._sampler = None
        else:
            measured = circuit.copy()
            measured.measure_all()
            compiled = pass_manager.run(measured)
            # No fixed sampler seed: each job gets its own seed drawn from options.seed, so
            # runs are reproducible but successive jobs do not repeat one random stream.
            self._sampler = SamplerV2(
                default_shots=self.shots, options={"backend_options": backend_options}
            )
            self._seeds = np.random.default_rng(options.seed)
        self.compiled = compiled
        self._columns = parameter_columns(circuit, compiled)

    @property
    def name(self) -> str:
        return "aer"

    def evaluate(self, bindings: np.ndarray) -> np.ndarray:
        bindings = np.atleast_2d(np.asarray(bindings, dtype=np.float64))
        batch = bindings.shape[0]
        with self._timed() as timer:
            if self._sampler is None:
                probs = self._run_exact(bindings)
            else:
                probs = self._run_sampler(bindings)
        self.usage.record(circuits=batch, shots=batch * self.shots_per_circuit,
                          seconds=timer.seconds)
        self._job_done(timer.seconds)
        return probs

    @property
    def shots_per_circuit(self) -> int:
        return shots_per_circuit("aer", self.options)

    @property
    def executed_circuit(self) -> QuantumCircuit:
        return self.compiled

    def _run_exact(self, bindings: np.ndarray) -> np.ndarray:
        params = self.compiled.parameters
        pairs = zip(params, self._columns, strict=True)
        binds = [{param: bindings[:, column] for param, column in pairs}]
        job = self._simulator.run(self.compiled, parameter_binds=binds if len(params) else None)
        self._job_submitted(len(bindings))
        result = job.result()
        if not result.success:
            raise RuntimeError(f"Aer simulation failed: {result.status}")
        # Without parameters Aer runs a single experiment; broadcast it to the batch.
        count = len(bindings) if len(params) else 1
        if len(result.results) != count:
            # The symptom of Aer dropping bindings (see __init__): fail loudly, never
            # return the wrong row for a parameter-shifted binding.
            raise RuntimeError(
                f"Aer returned {len(result.results)} results for {count} parameter bindings"
            )
        rows = [np.asarray(result.data(i)["probabilities"]) for i in range(count)]
        probs = np.stack(rows)
        return np.broadcast_to(probs, (len(bindings), probs.shape[1])).copy()

    def _run_sampler(self, bindings: np.ndarray) -> np.ndarray:
        self._sampler.options.run_options["seed_simulator"] = int(self._seeds.integers(2**31))
        values = bindings[:, self._columns]
        pub = (self.compiled, values) if self.compiled.num_parameters else (self.compiled,)
        job = self._sampler.run([pub])
        self._job_submitted(len(bindings))
        result = job.result()
        probs = bit_array_probabilities(result[0].data.meas, self.num_qubits)
        return np.broadcast_to(probs, (len(bindings), probs.shape[-1])).copy()


def parameter_columns(original: QuantumCircuit, compiled: QuantumCircuit) -> list[int]:
    """Column of the (B, P) binding array for each parameter of ``compiled``, in its order.

    Bindings follow ``original.parameters``; a transpiled circuit may order its parameters
    the same way but is not obliged to keep all of them (a gate folded away), so match by
    parameter, never by position.
    """
    position: dict[Parameter, int] = {p: i for i, p in enumerate(original.parameters)}
    return [position[parameter] for parameter in compiled.parameters]


def bit_array_probabilities(bits: BitArray, num_qubits: int) -> np.ndarray:
    """Empirical distributions from a ``BitArray`` of shape (B,) or (): returns (B, 2^n).

    The packed bytes are big-endian with classical bit 0 (= qubit 0 after ``measure_all``)
    as the lowest bit, so the integer value is the basis index in Qiskit's ordering. Done
    with one bincount instead of B ``get_counts`` dictionaries of bitstrings.
    """
    packed = np.asarray(bits.array, dtype=np.int64)
    packed = packed.reshape(-1, bits.num_shots, packed.shape[-1])
    weights = 256 ** np.arange(packed.shape[-1] - 1, -1, -1, dtype=np.int64)
    indices = (packed * weights).sum(axis=-1) & ((1 << num_qubits) - 1)
    batch, size = indices.shape[0], 1 << num_qubits
    offsets = (np.arange(batch) * size)[:, None]
    counts = np.bincount((indices + offsets).ravel(), minlength=batch * size)
    return counts.reshape(batch, size) / bits.num_shots
