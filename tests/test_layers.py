"""The layering, checked statically (no module is run) with import-linter and its graph
library grimp: the library imports none of the service, api and worker meet only in
services (pyproject.toml's [tool.importlinter]), and no module of the project imports
itself back through others. A new import that breaks a rule fails here with its chain."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("qpa", "services", "api", "worker")


def test_import_contracts_are_kept():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "2 kept, 0 broken" in result.stdout


def test_no_import_cycles():
    # Imports inside functions count (they run too); TYPE_CHECKING imports never run.
    graph = grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True)
    cycles = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back:
                cycles.append(" -> ".join((module, *back)))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_api_process_starts_without_torch_or_qiskit():
    # The API validates jobs and uploads; training libraries load only in workers. Loading
    # torch here once cost the API 2 s and ~190 MiB per process (services.artifacts
    # reached qpa.data for the JSONL validator).
    script = ("import sys, api.main\n"
              "print(sorted(n for n in ('torch', 'transformers', 'peft', 'qiskit') "
              "if n in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parent.parent)
    assert result.stdout.strip() == "[]"
