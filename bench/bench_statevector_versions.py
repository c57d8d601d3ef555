"""What each optimisation of the statevector backend bought, measured side by side.

Loads ``qpa/backends/statevector.py`` as it was at each listed commit (``git show``) and
times forward + backward of the QPA ansatz (depth 8, loss sum(w * p)) for every version in
the same process, interleaved turn by turn, next to the working tree's version. The
versions must agree with the current one to 1e-12 before they are timed. Needs the git
history (a clean clone has it).

    python -m bench.bench_statevector_versions [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
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
    write_json,
)
from qpa.circuits import qpa_ansatz

NAME = "statevector_versions"
SECTION = "statevector-versions"
DEPTH = 8
#: (commit, what it changed), oldest first; "working tree" is appended.
VERSIONS = [
    ("c941717", "gate-by-gate RY views, CX runs as one gather, autograd tape"),
    ("a438e05", "4-qubit groups as GEMMs, reversible adjoint backward, no per-gate allocation"),
    ("4a3e780", "group matrices and gradient reductions batched per group size"),
    ("e2e26ad", "float64 permutations as scatters with the inverse index"),
]
CAP_SECONDS = 20.0  # a version slower than this per step is not run at larger n


def load_version(commit: str | None, workdir: Path):
    """The StatevectorBackend class of ``commit`` (None: the working tree)."""
    if commit is None:
        from qpa.backends.statevector import StatevectorBackend

        return StatevectorBackend
    source = subprocess.run(["git", "show", f"{commit}:qpa/backends/statevector.py"],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    path = workdir / f"statevector_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"_statevector_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while decorating
    spec.loader.exec_module(module)
    return module.StatevectorBackend


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    sizes = [8, 14, 16, 18] if args.quick else [8, 12, 14, 16, 18, 20]
    labels = [commit for commit, _ in VERSIONS] + ["working tree"]
    descriptions = dict(VERSIONS) | {"working tree": "this checkout"}
    with tempfile.TemporaryDirectory() as tmp:
        classes = {}
        for commit, _ in VERSIONS:
            try:
                classes[commit] = load_version(commit, Path(tmp))
            except Exception as error:  # e.g. a shallow clone without that commit
                print(f"skipping {commit}: {error}", file=sys.stderr)
        classes["working tree"] = load_version(None, Path(tmp))
        labels = [label for label in labels if label in classes]
        runs: dict[str, dict[str, Any]] = {label: {} for label in labels}
        too_slow: set[str] = set()
        for num_qubits in sizes:
            circuit = qpa_ansatz(num_qubits, DEPTH)
            rng = np.random.default_rng(7)
            theta0 = torch.as_tensor(rng.uniform(0, 2 * np.pi, circuit.num_parameters))
            weights = torch.as_tensor(rng.standard_normal(2**num_qubits))
            backends = {label: classes[label](circuit) for label in labels
                        if label not in too_slow}
            reference = None
            steps = {}
            for label, backend in backends.items():
                theta = theta0.clone().requires_grad_(True)

                def step(backend=backend, theta=theta, weights=weights) -> torch.Tensor:
                    theta.grad = None
                    (backend.probabilities(theta) * weights).sum().backward()
                    return theta.grad

                start = time.perf_counter()
                grad = step().clone()
                first = time.perf_counter() - start
                if reference is None:
                    reference = grad
                    reference_p = backend.probabilities(theta0).detach()
                else:
                    assert torch.allclose(grad, reference, atol=1e-10), label
                    assert torch.allclose(backend.probabilities(theta0).detach(), reference_p,
                                          atol=1e-12), label
                steps[label] = step
                runs[label][str(num_qubits)] = {"first_call_s": first, "seconds": []}
            for turn in range(args.reps):
                order = list(steps)[turn % len(steps):] + list(steps)[:turn % len(steps)]
                for label in order:
                    entry = runs[label][str(num_qubits)]
                    estimate = median(entry["seconds"]) if entry["seconds"] else \
                        entry["first_call_s"]
                    for _ in range(max(1, min(20, int(0.25 / max(estimate, 1e-6))))):
                        start = time.perf_counter()
                        steps[label]()
                        entry["seconds"].append(time.perf_counter() - start)
            for label in steps:
                entry = runs[label][str(num_qubits)]
                entry["median_s"] = median(entry["seconds"])
                if entry["median_s"] > CAP_SECONDS / 4:  # the next n costs about 4x more
                    too_slow.add(label)
            print(f"n={num_qubits}: " + ", ".join(
                f"{label} {format_seconds(runs[label][str(num_qubits)]['median_s'])}"
                for label in steps), flush=True)
    return {
        "name": NAME, "mode": "quick" if args.quick else "full", "machine": machine_facts(),
        "settings": {"sizes": sizes, "depth": DEPTH, "reps": args.reps,
                     "threads": args.threads, "precision": "float64"},
        "versions": [{"label": label, "change": descriptions[label]} for label in labels],
        "runs": runs,
    }


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    sizes = result["settings"]["sizes"]
    headers = ["version", "change"] + [f"n = {n}" for n in sizes]
    current = result["runs"]["working tree"]
    rows = []
    for version in result["versions"]:
        per_n = result["runs"][version["label"]]
        cells = []
        for n in sizes:
            entry = per_n.get(str(n))
            if not entry:
                cells.append("(too slow)")
                continue
            speedup = entry["median_s"] / current[str(n)]["median_s"]
            cells.append(f"{format_seconds(entry['median_s'])} ({format_ratio(speedup)})")
        rows.append([f"`{version['label']}`", version["change"]] + cells)
    return headers, rows


def render_markdown(result: dict[str, Any]) -> str:
    headers, rows = table_rows(result)
    return "\n".join([
        f"Measured {result['machine']['date'][:16].replace('T', ' ')} UTC ({result['mode']} "
        f"mode) on {machine_line(result['machine'])}; {result['settings']['threads']} "
        "thread, float64, median forward+backward step, every version timed in the same "
        "process, interleaved. In brackets: time relative to the working tree's version.",
        "", markdown_table(headers, rows), "",
        f"Raw timings: `bench/results/{NAME}.json`.",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 8, 14, 16, 18")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=None, help="turns per version and n")
    args = parser.parse_args(argv)
    if args.reps is None:
        args.reps = 3 if args.quick else 5
    result = run(args)
    path = write_json(NAME, result)
    headers, rows = table_rows(result)
    print_table(headers, rows)
    print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
