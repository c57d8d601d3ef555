"""Gradient through Aer and the Runtime path: time and primitive jobs per angle update.

One "angle update" is what the trainer does each time it refreshes the circuit: p(theta)
and its full gradient for loss = sum(w * p), i.e. a forward and a backward through torch.
Contestants, all on the same QPA circuit, shots and seed-free noise:

* ours ``aer``: ``qpa.backends.make_backend("aer", ...)`` with shots; its autograd bridge
  puts p and every parameter-shifted binding in ONE primitive call (one PUB, 2P+1 rows);
* ours ``ibm-fake:FakeManilaV2``: the Qiskit Runtime code path (Session + Runtime Sampler)
  in local testing mode with the fake device's noise model, same single-job bridge;
* Qiskit Machine Learning ``SamplerQNN`` + ``TorchConnector`` with its default
  ``ParamShiftSamplerGradient``, once on qiskit-aer's ``SamplerV2`` and once on the same
  Runtime Sampler in local mode against FakeManilaV2 (with the transpiler pass manager that
  Runtime needs, as Qiskit ML documents for hardware).

Jobs are counted at the primitive: our backends' usage counters, and for Qiskit ML a
wrapper around the sampler's ``run``. Gradient error is against the exact statevector
gradient (shot noise, and device noise for the fake backend, are expected).

    python -m bench.bench_gradient_paths [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bench.common import (
    REPO_ROOT,
    format_ratio,
    format_seconds,
    machine_facts,
    machine_line,
    markdown_table,
    median,
    print_table,
    thread_env,
    write_json,
)
from qpa.backends.factory import make_backend
from qpa.backends.statevector import StatevectorBackend
from qpa.circuits import qpa_ansatz
from qpa.config import QuantumOptions

NAME = "gradient_paths"
SECTION = "gradient-paths"
FAKE = "FakeManilaV2"  # 5 qubits
NUM_QUBITS = 5
CAP_SECONDS = 60.0  # a contestant slower than this per update gets no further repeats
LABELS = {
    "ours-aer": "ours `aer`",
    "ours-ibm-fake": f"ours `ibm-fake:{FAKE}`",
    "qml-aer": "Qiskit ML SamplerQNN, Aer SamplerV2",
    "qml-runtime": f"Qiskit ML SamplerQNN, Runtime Sampler ({FAKE} local)",
}


class JobCounter:
    """Counts primitive jobs, PUBs and parameter bindings passing through a sampler."""

    def __init__(self, sampler: Any):
        self.jobs = self.pubs = self.circuits = 0
        run = sampler.run

        def counting_run(pubs, *args, **kwargs):
            pubs = list(pubs)
            self.jobs += 1
            self.pubs += len(pubs)
            for pub in pubs:
                values = np.asarray(pub[1]) if isinstance(pub, tuple) and len(pub) > 1 else None
                self.circuits += 1 if values is None or values.ndim < 2 else values.shape[0]
            return run(pubs, *args, **kwargs)

        sampler.run = counting_run  # an instance attribute shadows the bound method

    def snapshot(self) -> tuple[int, int]:
        return self.jobs, self.circuits


class Contestant:
    """Builds its QNN once; ``update`` runs one forward + backward and returns the gradient."""

    def __init__(self, name: str, circuit, theta: np.ndarray, weights: np.ndarray, shots: int):
        self.name = name
        self.shots = shots
        self.weights64 = torch.as_tensor(weights)
        start = time.perf_counter()
        self._build(circuit, theta)
        self.setup_s = time.perf_counter() - start

    def _build(self, circuit, theta) -> None:
        raise NotImplementedError

    def update(self) -> np.ndarray:
        raise NotImplementedError

    def counters(self) -> tuple[int, int]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Ours(Contestant):
    def _build(self, circuit, theta):
        spec = "aer" if self.name == "ours-aer" else f"ibm-fake:{FAKE}"
        self.backend = make_backend(spec, circuit, QuantumOptions(shots=self.shots, seed=1))
        self.theta = torch.tensor(theta, requires_grad=True)

    def update(self):
        self.theta.grad = None
        (self.backend.probabilities(self.theta) * self.weights64).sum().backward()
        return self.theta.grad.numpy().copy()

    def counters(self):
        return self.backend.usage.jobs, self.backend.usage.circuits

    def close(self):
        self.backend.close()


class QiskitML(Contestant):
    def _build(self, circuit, theta):
        from qiskit_machine_learning.connectors import TorchConnector
        from qiskit_machine_learning.neural_networks import SamplerQNN

        pass_manager = None
        if self.name == "qml-aer":
            from qiskit_aer.primitives import SamplerV2

            sampler = SamplerV2(default_shots=self.shots, seed=1)
        else:
            from qiskit.transpiler import generate_preset_pass_manager
            from qiskit_ibm_runtime import Session
            from qiskit_ibm_runtime.executor_sampler import Sampler

            from qpa.backends.ibm import fake_backend

            backend = fake_backend(FAKE)
            self.session = Session(backend=backend)
            sampler = Sampler(mode=self.session)
            sampler.options.default_shots = self.shots
            pass_manager = generate_preset_pass_manager(backend=backend, optimization_level=1)
        self.counter = JobCounter(sampler)
        qnn = SamplerQNN(circuit=circuit, input_params=[], weight_params=list(circuit.parameters),
                         sampler=sampler, pass_manager=pass_manager)
        self.model = TorchConnector(qnn, initial_weights=theta)
        self.weights32 = self.weights64.float()

    def update(self):
        self.model.zero_grad(set_to_none=True)
        (self.model() * self.weights32).sum().backward()
        return self.model.weight.grad.double().numpy().copy()

    def counters(self):
        return self.counter.snapshot()

    def close(self):
        if getattr(self, "session", None) is not None:
            self.session.close()


FACTORIES: dict[str, Callable[..., Contestant]] = {
    "ours-aer": Ours, "ours-ibm-fake": Ours, "qml-aer": QiskitML, "qml-runtime": QiskitML,
}


def measure_case(depth: int, shots: int, updates: int) -> dict[str, Any]:
    circuit = qpa_ansatz(NUM_QUBITS, depth)
    rng = np.random.default_rng(depth * 1000 + shots)
    theta = rng.uniform(0, 2 * np.pi, circuit.num_parameters)
    weights = rng.standard_normal(2**NUM_QUBITS)
    exact = StatevectorBackend(circuit)
    reference_theta = torch.tensor(theta, requires_grad=True)
    (exact.probabilities(reference_theta) * torch.as_tensor(weights)).sum().backward()
    reference = reference_theta.grad.numpy()
    contestants = {name: factory(name, circuit, theta, weights, shots)
                   for name, factory in FACTORIES.items()}
    entries: dict[str, dict[str, Any]] = {
        name: {"setup_s": c.setup_s, "seconds": [], "jobs": [], "circuits": [],
               "grad_error": []} for name, c in contestants.items()}
    try:
        for turn in range(updates + 1):  # turn 0 is a warm-up, not recorded
            order = list(contestants)[turn % 4:] + list(contestants)[:turn % 4]
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
        entry["median_s"] = median(entry["seconds"])
        entry["jobs_per_update"] = median(entry["jobs"])
        entry["circuits_per_update"] = median(entry["circuits"])
        entry["median_grad_error"] = median(entry["grad_error"])
    return {"num_qubits": NUM_QUBITS, "depth": depth, "parameters": circuit.num_parameters,
            "shots": shots, "gradient_scale": float(np.abs(reference).max()),
            "contestants": entries}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    depths = [2, 4] if args.quick else [2, 4, 8]
    shots_list = [1024] if args.quick else [1024, 4096]
    started = time.perf_counter()
    cases = []
    for depth in depths:
        for shots in shots_list:
            print(f"depth {depth}, {shots} shots ...", flush=True)
            case = measure_case(depth, shots, args.updates)
            for name, entry in case["contestants"].items():
                print(f"  {name:14s} {format_seconds(entry['median_s'])}/update, "
                      f"{entry['jobs_per_update']:.0f} jobs, "
                      f"{entry['circuits_per_update']:.0f} circuits", flush=True)
            cases.append(case)
    import qiskit_ibm_runtime

    return {"name": NAME, "mode": "quick" if args.quick else "full", "machine": machine_facts(),
            "settings": {"num_qubits": NUM_QUBITS, "depths": depths, "shots": shots_list,
                         "updates": args.updates, "threads": args.threads, "fake_backend": FAKE,
                         "qiskit_ibm_runtime": qiskit_ibm_runtime.__version__},
            "cases": cases, "wall_s": time.perf_counter() - started}


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["depth (angles)", "shots", "path", "time / update", "primitive jobs / update",
               "circuits / update", "max grad error (exact max abs grad)", "ours faster by"]
    rows = []
    for case in result["cases"]:
        entries = case["contestants"]
        for name, entry in entries.items():
            if name.startswith("ours"):
                speedup = ""
            else:
                ours = entries["ours-aer" if name == "qml-aer" else "ours-ibm-fake"]["median_s"]
                speedup = format_ratio(entry["median_s"] / ours)
            rows.append([f"{case['depth']} ({case['parameters']})", case["shots"], LABELS[name],
                         format_seconds(entry["median_s"]), f"{entry['jobs_per_update']:g}",
                         f"{entry['circuits_per_update']:g}",
                         f"{entry['median_grad_error']:.3f} ({case['gradient_scale']:.2f})",
                         speedup])
    return headers, rows


def render_markdown(result: dict[str, Any]) -> str:
    headers, rows = table_rows(result)
    settings = result["settings"]
    return "\n".join([
        f"Measured {result['machine']['date'][:16].replace('T', ' ')} UTC ({result['mode']} "
        f"mode) on {machine_line(result['machine'])}; qiskit-ibm-runtime "
        f"{settings['qiskit_ibm_runtime']}. QPA ansatz on {settings['num_qubits']} qubits "
        f"({settings['fake_backend']} has 5); one update = p(theta) and the gradient of "
        f"sum(w * p) through torch; median of {settings['updates']} interleaved updates after "
        "a warm-up. \"ours faster by\" compares each Qiskit ML path with our backend on the "
        "same simulator (Aer with Aer, Runtime local mode with Runtime local mode). Gradient "
        "error: median over the updates of the max |difference| from the exact gradient "
        "(shot noise; the fake backend adds its device noise).",
        "", markdown_table(headers, rows), "",
        f"Raw timings: `bench/results/{NAME}.json`.",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="depths 2 and 4, 1024 shots")
    parser.add_argument("--updates", type=int, default=None, help="timed updates per path")
    parser.add_argument("--threads", type=int, default=1,
                        help="OpenMP/BLAS/torch threads for every contestant (Aer included)")
    args = parser.parse_args(argv)
    if os.environ.get("QPA_BENCH_THREADS") != str(args.threads):
        # qiskit-aer sizes its OpenMP pool when it loads: pin it (and BLAS) for every
        # contestant alike by restarting with the thread variables set. On the 2-core
        # reference VM, Aer's default (all cores) made every path here about 8x slower.
        env = thread_env(args.threads)
        env["QPA_BENCH_THREADS"] = str(args.threads)
        arguments = sys.argv[1:] if argv is None else list(argv)
        os.execve(sys.executable, [sys.executable, "-m", "bench.bench_gradient_paths",
                                   *arguments], env)
    if args.updates is None:
        args.updates = 3 if args.quick else 5
    result = run(args)
    path = write_json(NAME, result)
    headers, rows = table_rows(result)
    print_table(headers, rows)
    print(f"wrote {path.relative_to(REPO_ROOT)} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
