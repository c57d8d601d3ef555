"""What each optimisation of the statevector backend bought: ``qpa/backends/statevector.py``
as it was at each commit of ``VERSIONS`` (``git show``), timed in one process, interleaved,
beside the working tree's. docs/BENCHMARKS.md, section 1.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import common
from bench.common import QF, REPO_ROOT, format_ratio, format_seconds, median

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
OPTIONS = {"--threads": {"type": int, "default": 1},
           "--reps": {"type": int, "default": QF(3, 5), "help": "turns per version and n"}}


def load_version(commit: str, workdir: Path) -> type:
    """The StatevectorBackend class of ``commit``."""
    source = subprocess.run(["git", "show", f"{commit}:qpa/backends/statevector.py"],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    path = workdir / f"statevector_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"_statevector_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while decorating
    spec.loader.exec_module(module)
    return module.StatevectorBackend


def run(args: Any) -> dict[str, Any]:
    from qpa.backends.statevector import StatevectorBackend
    from qpa.circuits import qpa_ansatz

    torch.set_num_threads(args.threads)
    sizes = [8, 14, 16, 18] if args.quick else [8, 12, 14, 16, 18, 20]
    descriptions = dict(VERSIONS) | {"working tree": "this checkout"}
    classes: dict[str, type] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for commit, _ in VERSIONS:
            try:
                classes[commit] = load_version(commit, Path(tmp))
            except Exception as error:  # e.g. a shallow clone without that commit
                print(f"skipping {commit}: {error}", file=sys.stderr)
    classes["working tree"] = StatevectorBackend
    runs: dict[str, dict[str, Any]] = {label: {} for label in classes}
    too_slow: set[str] = set()
    for n in sizes:
        circuit = qpa_ansatz(n, DEPTH)
        rng = np.random.default_rng(7)
        theta0 = torch.as_tensor(rng.uniform(0, 2 * np.pi, circuit.num_parameters))
        weights = torch.as_tensor(rng.standard_normal(2**n))
        steps, reference = {}, None
        for label in [label for label in classes if label not in too_slow]:
            backend, theta = classes[label](circuit), theta0.clone().requires_grad_(True)

            def step(backend=backend, theta=theta, weights=weights) -> torch.Tensor:
                theta.grad = None
                (backend.probabilities(theta) * weights).sum().backward()
                return theta.grad

            first = common.timed(step)
            probs = backend.probabilities(theta0).detach()
            if reference is None:
                reference = (theta.grad.clone(), probs)
            else:
                assert torch.allclose(theta.grad, reference[0], atol=1e-10), label
                assert torch.allclose(probs, reference[1], atol=1e-12), label
            steps[label] = step
            runs[label][str(n)] = {"first_call_s": first, "seconds": []}
        for _, order in common.rounds(list(steps), args.reps):
            for label in order:
                entry = runs[label][str(n)]
                estimate = median(entry["seconds"]) if entry["seconds"] else entry["first_call_s"]
                for _ in range(max(1, min(20, int(0.25 / max(estimate, 1e-6))))):
                    entry["seconds"].append(common.timed(steps[label]))
        for label in steps:
            entry = runs[label][str(n)]
            entry["median_s"] = median(entry["seconds"])
            if entry["median_s"] > CAP_SECONDS / 4:  # the next n costs about 4x more
                too_slow.add(label)
        print(f"n={n}: " + ", ".join(f"{label} {format_seconds(runs[label][str(n)]['median_s'])}"
                                     for label in steps), flush=True)
    return {"settings": {"sizes": sizes, "depth": DEPTH, "reps": args.reps,
                         "threads": args.threads, "precision": "float64"},
            "versions": [{"label": label, "change": descriptions[label]} for label in classes],
            "runs": runs}


def render_markdown(results: dict[str, Any]) -> str:
    sizes, current = results["settings"]["sizes"], results["runs"]["working tree"]
    rows = []
    for version in results["versions"]:
        cells = []
        for n in map(str, sizes):
            entry = results["runs"][version["label"]].get(n)
            cells.append(f"{format_seconds(entry['median_s'])} "
                         f"({format_ratio(entry['median_s'] / current[n]['median_s'])})"
                         if entry else "(too slow)")
        rows.append([f"`{version['label']}`", version["change"], *cells])
    return common.markdown(
        common.measured(results, f"{results['settings']['threads']} thread, float64, median "
                        "forward+backward step; in brackets: time / the working tree's."),
        (["version", "change", *[f"n = {n}" for n in sizes]], rows))


if __name__ == "__main__":
    raise SystemExit(common.main(sys.modules[__name__]))
