"""Run every benchmark script and regenerate the tables of docs/BENCHMARKS.md.

Each ``bench/bench_*.py`` runs in its own process, one after another so they never compete for
the cores, with its output in ``bench/results/<name>.log``; one that fails or runs past its
budget is reported and the others still run. Then every block between ``<!-- BEGIN GENERATED:
<section> -->`` and ``<!-- END GENERATED: <section> -->`` is rewritten from the JSON results;
the rest of the document is hand-written and kept.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import setup_peers
from bench.common import (
    REPO_ROOT,
    RESULTS_DIR,
    machine_facts,
    markdown_table,
    read_json,
    write_json,
)

DOC = REPO_ROOT / "docs" / "BENCHMARKS.md"
#: Scripts in running order (cheap first) with their budgets in seconds, quick and full.
#: Any other bench/bench_*.py runs after these with DEFAULT_BUDGET.
SCRIPTS: dict[str, tuple[int, int]] = {
    "bench_qnn_speed": (480, 3600),
    "bench_statevector_versions": (240, 1800),
    "bench_gradient_paths": (240, 1800),
    "bench_compound_vs_oft": (180, 1200),
    "bench_overhead": (300, 2400),
    "bench_service": (180, 1200),
    "bench_scaling": (1200, 3600),
    "bench_qpu": (600, 8 * 3600),  # full: ~5 run-hours, two at a time on 2 cores
    "bench_frontier": (900, 86400),  # full: ~10 h on 2 CPU cores, minutes on a GPU
    "bench_llamacpp": (900, 2400),  # skips itself until `make bench-llamacpp` built llama.cpp
}
DEFAULT_BUDGET = (300, 3600)
_BLOCK = re.compile(r"(<!-- BEGIN GENERATED: (?P<name>[\w-]+)[^>]*-->\n)(?P<body>.*?)"
                    r"(<!-- END GENERATED: (?P=name) -->)", re.S)


def discover() -> list[str]:
    present = {path.stem for path in (REPO_ROOT / "bench").glob("bench_*.py")}
    return [name for name in SCRIPTS if name in present] + sorted(present - set(SCRIPTS))


def run_script(name: str, quick: bool) -> dict[str, Any]:
    budget = SCRIPTS.get(name, DEFAULT_BUDGET)[0 if quick else 1]
    log = RESULTS_DIR / f"{name}.log"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    print(f"== {name} ({'quick' if quick else 'full'}, budget {budget} s) -> "
          f"{log.relative_to(REPO_ROOT)}", flush=True)
    start = time.perf_counter()
    with log.open("w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", f"bench.{name}"] + (["--quick"] if quick else []),
            cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=budget)
            status = "ok" if returncode == 0 else f"failed (exit {returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the script and its worker processes
            process.wait()
            returncode, status = None, f"stopped after its {budget} s budget"
    seconds = time.perf_counter() - start
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    print(f"   {status} in {seconds:.0f} s"
          + ("" if status == "ok" else "\n   " + "\n   ".join(tail)), flush=True)
    return {"script": name, "status": status, "returncode": returncode, "seconds": seconds}


def rendered_sections(scripts: list[str]) -> dict[str, str]:
    """Section name -> markdown, for every block whose results exist."""
    sections: dict[str, str] = {}
    for name in scripts:
        try:
            module = importlib.import_module(f"bench.{name}")
            blocks = getattr(module, "SECTIONS", {module.SECTION: module.NAME})
        except Exception as error:  # a broken script must not stop the others' tables
            print(f"   cannot import bench.{name}: {error}", file=sys.stderr)
            continue
        for section, results_name in blocks.items():
            results = read_json(results_name)
            try:
                if results is not None:
                    sections[section] = module.render_markdown(results)
            except Exception as error:
                print(f"   rendering {section} failed: {error!r}", file=sys.stderr)
    return sections


def rewrite_doc(sections: dict[str, str], doc: Path = DOC) -> list[str]:
    """Replace the generated blocks named in ``sections``; returns the names replaced."""
    text = doc.read_text()
    replaced: list[str] = []

    def substitute(match: re.Match) -> str:
        if match.group("name") not in sections:
            return match.group(0)
        replaced.append(match.group("name"))
        return f"{match.group(1)}{sections[match.group('name')].rstrip()}\n{match.group(4)}"

    new_text = _BLOCK.sub(substitute, text)
    for name in sorted(set(sections) - {m.group("name") for m in _BLOCK.finditer(text)}):
        print(f"   docs/BENCHMARKS.md has no block '{name}'; add <!-- BEGIN GENERATED: {name}"
              f" --> ... <!-- END GENERATED: {name} -->", file=sys.stderr)
    if new_text != text:
        doc.write_text(new_text)
    return replaced


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="the quick version of every script (about 20 minutes in all)")
    parser.add_argument("--only", action="append", default=[], help="run only these scripts")
    parser.add_argument("--skip", action="append", default=[], help="do not run these")
    parser.add_argument("--docs-only", action="store_true",
                        help="regenerate docs/BENCHMARKS.md from existing results")
    parser.add_argument("--no-install", action="store_true",
                        help="do not install missing peers (bench extra, bench/.venv-tq)")
    args = parser.parse_args(argv)
    scripts = discover()
    selected = [s for s in scripts if (not args.only or s in args.only) and s not in args.skip]
    runs = []
    if not args.docs_only:
        if not args.no_install:
            error = setup_peers.install_main_peers()
            if error:
                print(f"bench extra: {error}", file=sys.stderr)
            print(f"torchquantum venv: {setup_peers.ensure_tq_venv()[1]}", flush=True)
        started = time.perf_counter()
        runs = [run_script(name, args.quick) for name in selected]
        write_json("run_all", {"mode": "quick" if args.quick else "full",
                               "machine": machine_facts(), "runs": runs,
                               "wall_s": time.perf_counter() - started})
        print("\n" + markdown_table(["script", "status", "seconds"], [
            [r["script"], r["status"], f"{r['seconds']:.0f}"] for r in runs]))
    replaced = rewrite_doc(rendered_sections(scripts))
    print(f"docs/BENCHMARKS.md: regenerated {', '.join(replaced) or 'nothing'}")
    return 0 if all(r["status"] == "ok" for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
