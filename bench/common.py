"""The benchmark harness every ``bench/bench_*.py`` shares: machine facts, result files,
interleaved rounds, timing, tables, plots and the command line (``main``).

A script defines ``NAME`` (``bench/results/<NAME>.json``), ``SECTION`` (its block of
docs/BENCHMARKS.md), ``OPTIONS`` (argparse flags; a ``QF`` default differs between quick and
full mode), ``run(args) -> results`` (``main`` adds ``name``, ``mode`` and ``machine`` where
missing) and ``render_markdown(results)``: the block, one settings line and tables (plus a
plot link), never commentary. Optional hooks: ``plot``, ``save`` (instead of writing
``<NAME>.json``), ``finish`` (recompute a summary for ``--docs-only``), ``failures``
(messages that make the exit status 1), ``run_one`` (one run in a child process, see
``run_children``) and ``SECTIONS`` (several blocks: section -> results name).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
#: Distributions whose versions every result records when installed.
TRACKED_PACKAGES = (
    "torch", "numpy", "qiskit", "qiskit-aer", "qiskit-ibm-runtime", "qiskit-machine-learning",
    "pennylane", "pennylane-lightning", "peft", "transformers", "matplotlib",
)


# -- machine facts: an absolute time is never quoted without them ------------------------------


def _proc_field(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def package_versions(names: Sequence[str] = TRACKED_PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def git_commit() -> str | None:
    """The checkout's short commit, ``+dirty`` when qpa/ or bench/ has changes."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10)
    try:
        out, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--",
                                                               "qpa", "bench")
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine_facts() -> dict[str, Any]:
    """What an absolute time needs beside it: hardware, load, software, date."""
    memory = _proc_field("/proc/meminfo", "MemTotal")
    flags = (_proc_field("/proc/cpuinfo", "flags") or "").split()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    facts: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _proc_field("/proc/cpuinfo", "model name")
        or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        # The vector extensions that decide BLAS kernels.
        "cpu_vector_flags": sorted(f for f in flags if f.startswith(("avx", "fma", "amx"))),
        "memory_gib": round(int(memory.split()[0]) / 2**20, 1) if memory else None,
        "load_average_at_start": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "git_commit": git_commit(),
    }
    try:
        import torch

        facts["torch_threads"] = torch.get_num_threads()
        facts["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return facts


def machine_line(facts: dict[str, Any]) -> str:
    """One line naming the machine."""
    return (f"{facts.get('cpu_model')} ({facts.get('cpu_count')} cores, "
            f"{facts.get('memory_gib')} GiB), {facts.get('platform', '').split('-with')[0]}, "
            f"Python {facts.get('python')}, torch {facts.get('packages', {}).get('torch')}, "
            f"{facts.get('date', '')[:10]}")


# -- result files ------------------------------------------------------------------------------


def results_path(name: str, suffix: str = ".json") -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    return RESULTS_DIR / f"{name}{suffix}"


def write_json(name: str, data: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` atomically (a crash never leaves half a file)."""
    def jsonable(value: Any) -> Any:
        if hasattr(value, "tolist"):
            return value.tolist()
        if isinstance(value, Path):
            return str(value)
        raise TypeError(f"cannot store {type(value).__name__} in JSON")

    path = results_path(name)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=jsonable) + "\n")
    tmp.replace(path)
    return path


def read_json(name: str) -> dict[str, Any] | None:
    path = results_path(name)
    return json.loads(path.read_text()) if path.exists() else None


def quick_name(name: str, results: dict[str, Any]) -> str:
    """Quick runs of a resumable script keep their own file: a smoke test never replaces the
    committed numbers."""
    return name if results["mode"] == "full" else f"{name}_quick"


# -- numbers and tables ------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def format_seconds(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def format_ratio(ratio: float | None) -> str:
    return fmt(ratio, "{:.1f}x" if ratio is not None and ratio >= 10 else "{:.2f}x")


def fmt(value: float | None, template: str, scale: float = 1.0) -> str:
    """``template`` filled with ``value * scale``, or "-" for a missing value (None, NaN)."""
    return "-" if value is None or math.isnan(value) else template.format(value * scale)


Table = tuple[Sequence[str], Sequence[Sequence[Any]]]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |"
                              for row in rows])


def measured(results: dict[str, Any], details: str) -> str:
    """The settings line a generated block starts with: when, which mode, what machine, how."""
    machine = results["machine"]
    mode = f" ({results['mode']} mode)" if "mode" in results else ""
    return (f"Measured {machine['date'][:16].replace('T', ' ')} UTC{mode} on "
            f"{machine_line(machine)}; load average at start "
            f"{machine.get('load_average_at_start')}; {details}")


def markdown(line: str, *tables: Table, plot: tuple[str, str] | None = None) -> str:
    """A generated block: the settings line, the tables, and ``plot`` = (alt text, name)."""
    parts = [line, *(markdown_table(*table) for table in tables)]
    if plot:
        parts.append(f"![{plot[0]}](../bench/results/{plot[1]}.png)")
    return "\n\n".join(parts)


# -- timing ------------------------------------------------------------------------------------


def rounds(names: Sequence[str], count: int, shuffle: bool = False
           ) -> Iterator[tuple[int, list[str]]]:
    """``count`` rounds that each take every contestant once, the order rotated by one per
    round (or shuffled, seeded by the round), so that a drift of the machine's load hits all
    contestants alike instead of whichever runs last."""
    order = list(names)
    for index in range(count):
        if shuffle:
            random.Random(index).shuffle(order)
            yield index, list(order)
        else:
            shift = index % max(len(order), 1)
            yield index, order[shift:] + order[:shift]


def timed(step: Callable[[], Any], device: Any = None) -> float:
    """Seconds of ``step()``; on a CUDA device the queue is drained before and after."""
    sync = getattr(device, "type", None) == "cuda"
    if sync:
        import torch

        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if sync:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def thread_env(threads: int) -> dict[str, str]:
    """Environment that pins every math library of a child process to ``threads`` threads."""
    return {**os.environ, **dict.fromkeys(
        ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
         "RAYON_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"), str(threads))}


def quiet() -> None:
    """Keep transformers' loading bars, tokenizer notes, FutureWarnings and qpa's info logs out
    of a benchmark's output (child processes inherit the variables)."""
    import logging
    import warnings

    os.environ.update({"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
                       "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore"})
    warnings.filterwarnings("ignore")
    logging.getLogger("qpa").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


# -- training runs in child processes ---------------------------------------------------------


def run_children(script: str, specs: list[dict[str, Any]], key: Callable[[dict], str],
                 done: dict[str, Any], workers: int = 1,
                 record: Callable[[dict, dict], Any] = lambda spec, result: result,
                 save: Callable[[], Any] = lambda: None) -> None:
    """``python -m bench.<script> --one SPEC`` for every spec whose key is not in ``done``,
    ``workers`` processes at a time (each pinned to ``spec["threads"]``, default 1). Each
    that succeeds is stored as ``done[key] = record(spec, result)`` and ``save()`` runs, so a
    restart resumes."""
    todo = [spec for spec in specs if key(spec) not in done]
    running: list[tuple[dict[str, Any], Path, subprocess.Popen]] = []
    while todo or running:
        while todo and len(running) < workers:
            spec = todo.pop(0)
            out = Path(tempfile.mkstemp(suffix=".json")[1])
            running.append((spec, out, subprocess.Popen(
                [sys.executable, "-m", f"bench.{script}", "--one", json.dumps(spec), "--out",
                 str(out)], cwd=REPO_ROOT, env=thread_env(spec.get("threads", 1)))))
        time.sleep(2)
        for item in [item for item in running if item[2].poll() is not None]:
            running.remove(item)
            spec, out, process = item
            if process.returncode == 0:
                done[key(spec)] = record(spec, json.loads(out.read_text()))
                save()
            else:
                print(f"{key(spec)}: FAILED (exit {process.returncode})", flush=True)
            out.unlink(missing_ok=True)


def digest(value: Any) -> str:
    """Eight hex digits naming ``value`` (JSON, keys sorted): a run's config in its key."""
    return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]


def without_data(config: dict[str, Any]) -> dict[str, Any]:
    """A job config without its data files, whose temporary paths say nothing of the run."""
    return {k: v for k, v in config.items() if k not in ("train_file", "eval_file")}


@contextlib.contextmanager
def resumed(name: str, quick: bool, settings: dict[str, Any],
            ignore: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
    """The results a resumable script adds its keyed runs to (``results["runs"]``, filled by
    ``run_children``): the committed ``<name>.json`` when its settings are these (the keys in
    ``ignore`` aside), else a new file; quick runs always start afresh. ``wall_s`` adds up
    the time spent inside over every session."""
    previous = None if quick else read_json(name)
    same = previous and all(previous["settings"].get(key) == value
                            for key, value in settings.items() if key not in ignore)
    results = previous if same else {"mode": "quick" if quick else "full",
                                     "settings": settings, "runs": {}}
    results.update(settings=settings, machine=machine_facts())
    started = time.perf_counter()
    yield results
    results["wall_s"] = results.get("wall_s", 0.0) + time.perf_counter() - started


@contextlib.contextmanager
def pydoc_data() -> Iterator[dict[str, str]]:
    """The pydoc topics as train/eval JSONL files in a temporary folder: {"train", "eval"}."""
    from qpa.datasets import write_pydoc_dataset

    folder = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        train, evaluation = write_pydoc_dataset(folder)
        yield {"train": str(train), "eval": str(evaluation)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def evaluated_run(spec: dict[str, Any], train: Callable[[Path], dict[str, Any]],
                  with_base: bool = False) -> dict[str, Any]:
    """One run of a quality benchmark: what ``train(folder)`` returns (it trains in a temporary
    folder and saves ``folder / "adapter"``), that adapter's token-weighted loss (as
    ``Trainer.evaluate``; loaded by stock ``peft.PeftModel.from_pretrained``) on
    ``spec["eval_batches"]`` fixed batches of the job's eval file, with ``with_base`` the base
    model's alone too, and the wall time of it all."""
    import torch
    from peft import PeftModel

    from qpa.data import fixed_batches, tokenize_records
    from qpa.models import load_base_model
    from qpa.records import read_jsonl

    @torch.no_grad()
    def loss(model: Any, eval_set: list[dict[str, Any]]) -> float:
        model.eval()
        total, tokens = 0.0, 0
        for batch in eval_set:
            count = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * count
            tokens += count
        return total / max(tokens, 1)

    config, folder = spec["config"], Path(tempfile.mkdtemp(prefix="bench-run-"))
    wall = time.perf_counter()
    try:
        result = train(folder)
        base, tokenizer, _ = load_base_model(config["base_model"], "cpu")
        examples = tokenize_records(tokenizer, read_jsonl(config["eval_file"], "eval_file"),
                                    config["train"]["max_length"], "eval_file")
        eval_set = fixed_batches(examples, config["train"]["batch_size"], spec["eval_batches"],
                                 tokenizer.pad_token_id)
        if with_base:
            result["eval_loss_base"] = loss(base, eval_set)
        result["eval_loss"] = loss(PeftModel.from_pretrained(base, folder / "adapter"), eval_set)
        result["eval_chunks"] = sum(len(batch["input_ids"]) for batch in eval_set)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result["wall_seconds"] = time.perf_counter() - wall
    return result


# -- plots -------------------------------------------------------------------------------------


def save_plot(name: str, machine: dict[str, Any], draw: Callable[..., None], panels: int = 1,
              size: tuple[float, float] = (7, 4.5), **subplots: Any) -> Path | None:
    """``bench/results/<name>.png``: ``draw(*axes)`` fills ``panels`` side-by-side axes, the
    machine goes in the corner. None (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')", file=sys.stderr)
        return None
    figure, axes = plt.subplots(1, panels, figsize=size, dpi=110, **subplots)
    draw(*(axes if panels > 1 else [axes]))
    figure.text(0.01, 0.01, machine_line(machine), fontsize=7, alpha=0.7)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    path = results_path(name, ".png")
    figure.savefig(path)
    plt.close(figure)
    return path


# -- the command line --------------------------------------------------------------------------


class QF(NamedTuple):
    """An option's default in quick mode and in full mode."""

    quick: Any
    full: Any


def main(module: ModuleType, argv: list[str] | None = None) -> int:
    """Parse the common and the script's options; then run, save, plot and print the block
    (or, with ``--docs-only``, print the block of the committed results)."""
    parser = argparse.ArgumentParser(description=(module.__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick version (a smoke test)")
    parser.add_argument("--docs-only", action="store_true",
                        help=f"only print the tables of bench/results/{module.NAME}.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child of run_children
    parser.add_argument("--out", help=argparse.SUPPRESS)
    for flags, options in getattr(module, "OPTIONS", {}).items():
        parser.add_argument(*flags.split(), **options)
    args = parser.parse_args(argv)
    for key, value in vars(args).items():
        if isinstance(value, QF):
            setattr(args, key, value.quick if args.quick else value.full)
    if getattr(module, "QUIET", False):
        quiet()
    if args.one:
        Path(args.out).write_text(json.dumps(module.run_one(json.loads(args.one))))
        return 0
    if args.docs_only:
        results = read_json(module.NAME)
        if results is None:
            print(f"no bench/results/{module.NAME}.json yet", file=sys.stderr)
            return 1
        results = getattr(module, "finish", lambda r: r)(results)
    else:
        started, facts = time.perf_counter(), machine_facts()
        results = module.run(args)
        if results is None:
            return 0
        for key, value in (("name", module.NAME), ("mode", "quick" if args.quick else "full"),
                           ("machine", facts)):
            results.setdefault(key, value)
        getattr(module, "save", lambda r: write_json(module.NAME, r))(results)
        if hasattr(module, "plot"):
            module.plot(results)
        print(f"measured in {time.perf_counter() - started:.0f} s", flush=True)
    print(module.render_markdown(results))
    failures = getattr(module, "failures", lambda r: [])(results)
    for message in failures:
        print(message, file=sys.stderr)
    return 1 if failures else 0
