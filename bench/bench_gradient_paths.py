"""Gradient through Aer and the Runtime path: time and primitive jobs per angle update, ours
against Qiskit ML's SamplerQNN + TorchConnector on the same samplers. docs/BENCHMARKS.md,
section 2.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Any

import numpy as np
import torch

from bench import common
from bench.common import QF, format_ratio, format_seconds, median

NAME = "gradient_paths"
SECTION = "gradient-paths"
FAKE = "FakeManilaV2"  # 5 qubits
NUM_QUBITS = 5
CAP_SECONDS = 60.0  # a contestant slower than this per update gets no further repeats
LABELS = {"ours-aer": "ours `aer`", "ours-ibm-fake": f"ours `ibm-fake:{FAKE}`",
          "qml-aer": "Qiskit ML SamplerQNN, Aer SamplerV2",
          "qml-runtime": f"Qiskit ML SamplerQNN, Runtime Sampler ({FAKE} local)"}
OPTIONS = {"--updates": {"type": int, "default": QF(3, 5), "help": "timed updates per path"},
           "--threads": {"type": int, "default": 1, "help": "threads for every contestant"}}


class Contestant:
    """Builds its QNN once; ``update`` is one forward + backward returning the gradient, and
    ``counters`` the (jobs, circuits) its sampler has run so far."""

    def __init__(self, name: str, circuit: Any, theta: np.ndarray, weights: np.ndarray,
                 shots: int):
        self.name, self.shots, self.jobs, self.circuits = name, shots, 0, 0
        self.weights = torch.as_tensor(weights)
        self.setup_s = common.timed(lambda: self.build(circuit, theta))

    def build(self, circuit: Any, theta: np.ndarray) -> None:
        if self.name.startswith("ours"):
            from qpa.backends.factory import make_backend
            from qpa.config import QuantumOptions

            spec = "aer" if self.name == "ours-aer" else f"ibm-fake:{FAKE}"
            self.backend = make_backend(spec, circuit, QuantumOptions(shots=self.shots, seed=1))
            self.theta = torch.tensor(theta, requires_grad=True)
            return
        from qiskit_machine_learning.connectors import TorchConnector
        from qiskit_machine_learning.neural_networks import SamplerQNN

        pass_manager, self.session = None, None
        if self.name == "qml-aer":
            from qiskit_aer.primitives import SamplerV2

            sampler = SamplerV2(default_shots=self.shots, seed=1)
        else:  # Runtime's Sampler in local mode, with the pass manager Runtime requires
            from qiskit.transpiler import generate_preset_pass_manager
            from qiskit_ibm_runtime import Session
            from qiskit_ibm_runtime.executor_sampler import Sampler

            from qpa.backends.ibm import fake_backend

            backend = fake_backend(FAKE)
            self.session = Session(backend=backend)
            sampler = Sampler(mode=self.session)
            sampler.options.default_shots = self.shots
            pass_manager = generate_preset_pass_manager(backend=backend, optimization_level=1)
        run = sampler.run

        def counting_run(pubs: Any, *args: Any, **kwargs: Any) -> Any:
            pubs = list(pubs)
            self.jobs += 1
            for pub in pubs:
                values = np.asarray(pub[1]) if isinstance(pub, tuple) and len(pub) > 1 else None
                self.circuits += 1 if values is None or values.ndim < 2 else values.shape[0]
            return run(pubs, *args, **kwargs)

        sampler.run = counting_run  # an instance attribute shadows the bound method
        qnn = SamplerQNN(circuit=circuit, input_params=[], weight_params=list(circuit.parameters),
                         sampler=sampler, pass_manager=pass_manager)
        self.model = TorchConnector(qnn, initial_weights=theta)
        self.theta = self.model.weight

    def update(self) -> np.ndarray:
        self.theta.grad = None
        p = (self.backend.probabilities(self.theta) if self.name.startswith("ours")
             else self.model())
        (p * self.weights.to(p.dtype)).sum().backward()
        return self.theta.grad.double().numpy().copy()

    def counters(self) -> tuple[int, int]:
        if self.name.startswith("ours"):
            return self.backend.usage.jobs, self.backend.usage.circuits
        return self.jobs, self.circuits

    def close(self) -> None:
        if self.name.startswith("ours"):
            self.backend.close()
        elif self.session is not None:
            self.session.close()


def measure_case(depth: int, shots: int, updates: int) -> dict[str, Any]:
    from qpa.backends.statevector import StatevectorBackend
    from qpa.circuits import qpa_ansatz

    circuit = qpa_ansatz(NUM_QUBITS, depth)
    rng = np.random.default_rng(depth * 1000 + shots)
    theta = rng.uniform(0, 2 * np.pi, circuit.num_parameters)
    weights = rng.standard_normal(2**NUM_QUBITS)
    exact = torch.tensor(theta, requires_grad=True)
    (StatevectorBackend(circuit).probabilities(exact) * torch.as_tensor(weights)).sum().backward()
    reference = exact.grad.numpy()
    contestants = {name: Contestant(name, circuit, theta, weights, shots) for name in LABELS}
    entries = {name: {"setup_s": c.setup_s, "seconds": [], "jobs": [], "circuits": [],
                      "grad_error": []} for name, c in contestants.items()}
    try:
        for turn, order in common.rounds(list(contestants), updates + 1):  # 0: a warm-up
            for name in order:
                contestant, entry = contestants[name], entries[name]
                if entry["seconds"] and max(entry["seconds"]) > CAP_SECONDS:
                    continue
                jobs0, circuits0 = contestant.counters()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    start = time.perf_counter()
                    grad = contestant.update()
                    seconds = time.perf_counter() - start
                jobs1, circuits1 = contestant.counters()
                if turn == 0:
                    entry["first_update_s"] = seconds
                    continue
                entry["seconds"].append(seconds)
                entry["jobs"].append(jobs1 - jobs0)
                entry["circuits"].append(circuits1 - circuits0)
                entry["grad_error"].append(float(np.abs(grad - reference).max()))
    finally:
        for contestant in contestants.values():
            contestant.close()
    for entry in entries.values():
        entry.update(median_s=median(entry["seconds"]), jobs_per_update=median(entry["jobs"]),
                     circuits_per_update=median(entry["circuits"]),
                     median_grad_error=median(entry["grad_error"]))
    return {"num_qubits": NUM_QUBITS, "depth": depth, "parameters": circuit.num_parameters,
            "shots": shots, "gradient_scale": float(np.abs(reference).max()),
            "contestants": entries}


def run(args: Any) -> dict[str, Any]:
    if os.environ.get("QPA_BENCH_THREADS") != str(args.threads):
        # On the 2-core reference VM Aer's default (all cores) made every path ~8x slower;
        # Aer sizes its thread pool on import, so the pinning needs a fresh process.
        os.execve(sys.executable, [sys.executable, "-m", "bench.bench_gradient_paths",
                                   *sys.argv[1:]],
                  {**common.thread_env(args.threads), "QPA_BENCH_THREADS": str(args.threads)})
    import qiskit_ibm_runtime

    torch.set_num_threads(args.threads)
    depths, shots_list = ([2, 4], [1024]) if args.quick else ([2, 4, 8], [1024, 4096])
    cases, started = [], time.perf_counter()
    for depth in depths:
        for shots in shots_list:
            print(f"depth {depth}, {shots} shots ...", flush=True)
            cases.append(measure_case(depth, shots, args.updates))
    return {"settings": {"num_qubits": NUM_QUBITS, "depths": depths, "shots": shots_list,
                         "updates": args.updates, "threads": args.threads, "fake_backend": FAKE,
                         "qiskit_ibm_runtime": qiskit_ibm_runtime.__version__},
            "cases": cases, "wall_s": time.perf_counter() - started}


def render_markdown(results: dict[str, Any]) -> str:
    rows = []
    for case in results["cases"]:
        entries = case["contestants"]
        for name, entry in entries.items():
            ours = entries["ours-aer" if name == "qml-aer" else "ours-ibm-fake"]["median_s"]
            rows.append([f"{case['depth']} ({case['parameters']})", case["shots"], LABELS[name],
                         format_seconds(entry["median_s"]), f"{entry['jobs_per_update']:g}",
                         f"{entry['circuits_per_update']:g}",
                         f"{entry['median_grad_error']:.3f} ({case['gradient_scale']:.2f})",
                         "" if name.startswith("ours") else
                         format_ratio(entry["median_s"] / ours)])
    s = results["settings"]
    return common.markdown(
        common.measured(results, f"qiskit-ibm-runtime {s['qiskit_ibm_runtime']}, "
                        f"{s['num_qubits']} qubits, median of {s['updates']} interleaved "
                        f"updates after a warm-up, {s['threads']} thread."),
        (["depth (angles)", "shots", "path", "time / update", "primitive jobs / update",
          "circuits / update", "max grad error (exact max abs grad)", "ours faster by"], rows))


if __name__ == "__main__":
    raise SystemExit(common.main(sys.modules[__name__]))
