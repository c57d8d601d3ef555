"""Install the benchmark peers: the ``bench`` extra here, TorchQuantum in ``bench/.venv-tq``.

TorchQuantum 0.1.8 (the QPA authors' simulator) imports qiskit < 1.0, so it gets its own
venv. Its declared dependencies pull TensorFlow, pyscf, a CUDA torch and a torchvision built
for it, none of which its state-vector simulator uses: the venv installs it without
dependencies and then only what ``import torchquantum`` needs (``TQ_STEPS``).
``python -m bench.setup_peers`` does both; ``bench.run_all`` calls it first.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import venv

from bench.common import REPO_ROOT

TQ_VENV = REPO_ROOT / "bench" / ".venv-tq"
TQ_PYTHON = TQ_VENV / "bin" / "python"

#: Modules the bench extra provides to this interpreter, and the distribution of each.
MAIN_PEERS = {"pennylane": "pennylane", "qiskit_machine_learning": "qiskit-machine-learning",
              "matplotlib": "matplotlib"}

TQ_STEPS: list[list[str]] = [
    ["--upgrade", "pip"],
    ["torch==2.13.0"],  # first, so pip takes the CPU wheel (unpinned: gigabytes of CUDA)
    ["--no-deps", "torchquantum==0.1.8"],
    # torch pinned again, or pip "repairs" a requirement with a CUDA build; qiskit-aer
    # 0.12 for ``qiskit.providers.aer``; runtime < 0.24 is imported at module level and
    # needs setuptools < 81 (``pkg_resources``).
    ["torch==2.13.0", "qiskit==0.46.3", "qiskit-aer==0.12.2", "qiskit-ibm-runtime<0.24",
     "setuptools<81", "numpy<2.3", "scipy", "matplotlib", "opt-einsum", "dill==0.3.4",
     "pathos", "pylatexenc", "tqdm", "torchdiffeq", "torchpack"],
    # torchquantum.dataset imports torchvision; 0.15 (declaring torch 2.0.1: no deps) only
    # warns when its compiled ops do not load; the build for torch 2.13 needs CUDA torch.
    ["--no-deps", "torchvision==0.15.2"],
]

TQ_CHECK = (
    "import torch, torchquantum, qiskit\n"
    "assert torch.__version__.startswith('2.13'), f'torch {torch.__version__}, wanted 2.13'\n"
    "torch.zeros(1).numpy()  # the numpy bridge works\n"
    "print(f'torchquantum {torchquantum.__version__}, qiskit {qiskit.__version__}, '\n"
    "      f'torch {torch.__version__}')"
)


def missing_main_peers() -> list[str]:
    return [dist for module, dist in MAIN_PEERS.items() if importlib.util.find_spec(module) is None]


def install_main_peers() -> str | None:
    """pip-install the bench extra into this interpreter; returns an error or None."""
    missing = missing_main_peers()
    if not missing:
        return None
    print(f"installing the bench extra (missing: {', '.join(missing)})", flush=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "-e", f"{REPO_ROOT}[bench]"],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        return "pip install -e '.[bench]' failed: " + _tail(result.stderr)
    return None


def tq_status() -> tuple[bool, str]:
    """(usable, detail): versions when TorchQuantum imports in its venv, else why not."""
    if not TQ_PYTHON.exists():
        return False, f"{TQ_VENV.relative_to(REPO_ROOT)} does not exist"
    result = subprocess.run([str(TQ_PYTHON), "-W", "ignore", "-c", TQ_CHECK],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        return False, "import torchquantum failed: " + _tail(result.stderr)
    return True, result.stdout.strip()


def ensure_tq_venv(rebuild: bool = False) -> tuple[bool, str]:
    """Create ``bench/.venv-tq`` if TorchQuantum does not import there yet."""
    usable, detail = tq_status()
    if usable and not rebuild:
        return True, detail
    print(f"building {TQ_VENV.relative_to(REPO_ROOT)} for TorchQuantum (a few minutes)",
          flush=True)
    try:
        venv.EnvBuilder(with_pip=True, clear=True).create(TQ_VENV)
    except Exception as error:  # venv module missing, disk full, ...
        return False, f"could not create the venv: {error}"
    for step in TQ_STEPS:
        result = subprocess.run([str(TQ_PYTHON), "-m", "pip", "install", "-q", *step],
                                capture_output=True, text=True)
        if result.returncode != 0:
            return False, f"pip install {' '.join(step)} failed: " + _tail(result.stderr)
    return tq_status()


def _tail(text: str, lines: int = 6) -> str:
    kept = [line for line in text.strip().splitlines() if "is ignored" not in line]
    return " | ".join(kept[-lines:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebuild-tq", action="store_true", help="recreate bench/.venv-tq")
    args = parser.parse_args(argv)
    error = install_main_peers()
    print("bench extra:", error or "ok")
    usable, detail = ensure_tq_venv(rebuild=args.rebuild_tq)
    print("torchquantum:", detail if usable else f"unavailable ({detail})")
    return 0 if error is None and usable else 1


if __name__ == "__main__":
    raise SystemExit(main())
