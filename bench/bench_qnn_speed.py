"""QNN simulation speed: forward + backward of p(theta) for the QPA ansatz, against peers.

Workload (issue 5, part 2): the QPA ansatz on n qubits, depth 8 (RY on every qubit then a
CNOT chain q -> q+1, eight times), p(theta) = its 2^n basis-state probabilities,
loss = sum_i w_i p_i with fixed random w, backward to the 8n angles. Contestants:

* ours: ``qpa.backends.statevector.StatevectorBackend``, float64 and float32;
* PennyLane ``default.qubit``, ``diff_method="backprop"``, torch interface (complex128);
* Qiskit Machine Learning ``SamplerQNN`` (its exact sampler) + ``TorchConnector``; its
  backward is ``ParamShiftSamplerGradient``: 2P + 1 statevector simulations;
* TorchQuantum 0.1.8 (the QPA authors' simulator), complex64, from ``bench/.venv-tq``.

Every contestant runs in its own worker process (``bench/qnn_worker.py``) with the same
thread count; the coordinator interleaves them round by round (rotating the order) so that
machine noise hits all alike, and first checks that all of them compute the same p and the
same gradient. A contestant whose single measurement exceeds ``--cap`` seconds is not run
at larger n ("skipped: too slow"); one still running at twice the cap is killed.

    python -m bench.bench_qnn_speed [--quick] [--threads 1] [--cap 30]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import selectors
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import setup_peers
from bench.common import (
    REPO_ROOT,
    format_ratio,
    format_seconds,
    machine_facts,
    machine_line,
    markdown_table,
    median,
    plot_lines,
    print_table,
    thread_env,
    write_json,
)

NAME = "qnn_speed"
SECTION = "qnn-speed"
WORKER = Path(__file__).resolve().parent / "qnn_worker.py"
OURS = ("qpa-float64", "qpa-float32")
PEERS = ("pennylane", "qiskit-ml", "torchquantum")
LABELS = {
    "qpa-float64": "ours float64",
    "qpa-float32": "ours float32",
    "pennylane": "PennyLane default.qubit (backprop)",
    "qiskit-ml": "Qiskit ML SamplerQNN + TorchConnector",
    "torchquantum": "TorchQuantum 0.1.8",
}
DEPTH = 8
SEED = 1234
INNER_SECONDS = 0.25
MAX_INNER_REPS = 25


class WorkerTimeout(Exception):
    pass


class Worker:
    """A contestant's process; requests and replies are JSON lines."""

    def __init__(self, name: str, python: str, threads: int, env_extra: dict[str, str]):
        env = thread_env(threads)
        env.update(env_extra)
        self.name = name
        self.stderr_path = REPO_ROOT / "bench" / "results" / f".{NAME}-{name}.stderr.tmp"
        self.stderr_path.parent.mkdir(parents=True, exist_ok=True)
        self._stderr = self.stderr_path.open("w")
        self.process = subprocess.Popen(
            [python, "-u", str(WORKER), name, str(threads)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env, cwd=REPO_ROOT,
        )
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.process.stdout, selectors.EVENT_READ)

    def call(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} worker exited ({self.process.returncode}): "
                               + self.stderr_tail())
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        if not self._selector.select(timeout):
            self.kill()
            raise WorkerTimeout(f"{self.name}: no answer within {timeout:.0f} s")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker died: " + self.stderr_tail())
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"{self.name}: {reply.get('error')}")
        return reply

    def stderr_tail(self, lines: int = 5) -> str:
        self._stderr.flush()
        text = self.stderr_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._stderr.close()
        self.stderr_path.unlink(missing_ok=True)


def start_workers(names: list[str], threads: int) -> tuple[dict[str, Worker], dict[str, str]]:
    """Start a worker per contestant; returns (workers, why-not for those that could not)."""
    workers, unavailable = {}, {}
    for name in names:
        python, env_extra = sys.executable, {"PYTHONPATH": str(REPO_ROOT)}
        if name == "torchquantum":
            usable, detail = setup_peers.ensure_tq_venv()
            if not usable:
                unavailable[name] = f"not installable here: {detail}"
                continue
            python, env_extra = str(setup_peers.TQ_PYTHON), {"PYTHONWARNINGS": "ignore"}
        worker = Worker(name, python, threads, env_extra)
        try:
            worker.call({"cmd": "info"}, timeout=300)
        except Exception as error:
            worker.kill()
            worker.close()
            unavailable[name] = f"worker failed to start: {error}"
            continue
        workers[name] = worker
    return workers, unavailable


def verify(workers: dict[str, Worker], num_qubits: int, cap: float) -> dict[str, Any]:
    """All contestants must give the same p (1e-6) and gradient at one n before timing."""
    answers = {}
    for name, worker in workers.items():
        worker.call({"cmd": "setup", "n": num_qubits, "depth": DEPTH, "seed": SEED},
                    timeout=4 * cap)
        probs = np.array(worker.call({"cmd": "probs"}, timeout=4 * cap)["probs"])
        grad = np.array(worker.call({"cmd": "grad"}, timeout=4 * cap)["grad"])
        answers[name] = (probs, grad)
    reference_p, reference_g = answers["qpa-float64"]
    # p to 1e-6 absolute for all; gradients to 1e-9 between float64 codes, and a float32
    # rounding bound (relative 1e-4 of the gradient's scale) when either side is float32.
    report: dict[str, Any] = {"n": num_qubits, "depth": DEPTH, "seed": SEED, "contestants": {}}
    scale = float(np.abs(reference_g).max())
    for name, (probs, grad) in answers.items():
        p_err = float(np.abs(probs - reference_p).max())
        g_err = float(np.abs(grad - reference_g).max())
        single = name in ("qpa-float32", "qiskit-ml", "torchquantum")
        g_tol = 1e-4 * max(scale, 1.0) if single else 1e-9
        report["contestants"][name] = {
            "max_abs_p_error": p_err, "max_abs_grad_error": g_err, "grad_tolerance": g_tol,
            "passed": bool(p_err <= 1e-6 and g_err <= g_tol),
        }
    return report


def measure(workers: dict[str, Worker], sizes: list[int], reps: int, cap: float,
            unavailable: dict[str, str]) -> dict[str, Any]:
    runs: dict[str, dict[str, Any]] = {name: {} for name in workers}
    too_slow_from: dict[str, int] = {}
    for num_qubits in sizes:
        active = [name for name in workers if name not in too_slow_from
                  and name not in unavailable]
        print(f"n={num_qubits}: {', '.join(active)}", flush=True)
        entries: dict[str, dict[str, Any]] = {}
        for name in active:
            try:
                reply = workers[name].call(
                    {"cmd": "setup", "n": num_qubits, "depth": DEPTH, "seed": SEED},
                    timeout=2 * cap + 60)
            except WorkerTimeout:
                entries[name] = {"status": f"skipped: too slow (setup + first call > "
                                           f"{2 * cap + 60:.0f} s, killed)"}
                too_slow_from[name] = num_qubits
                unavailable[name] = f"killed at n={num_qubits}"
                continue
            except RuntimeError as error:
                entries[name] = {"status": f"failed: {error}"}
                too_slow_from[name] = num_qubits
                continue
            entries[name] = {"setup_s": reply["setup_s"], "first_call_s": reply["first_call_s"],
                             "seconds": []}
            if reply["first_call_s"] > cap:
                # One (warm-up) call already exceeds the cap: record it and go no further.
                entries[name]["seconds"] = [reply["first_call_s"]]
                entries[name]["status"] = "single warm-up sample: exceeds cap"
                too_slow_from[name] = num_qubits + 1
        for round_index in range(reps):
            order = active[round_index % len(active):] + active[:round_index % len(active)]
            for name in order:
                entry = entries.get(name, {})
                if "status" in entry or name in unavailable:
                    continue
                if sum(entry["seconds"]) > 2 * cap:  # enough samples for a slow contestant
                    continue
                # Fast steps are repeated within a turn (about 0.25 s of work) so that a
                # burst of load from other processes does not decide a whole median.
                estimate = median(entry["seconds"]) if entry["seconds"] else entry["first_call_s"]
                inner = max(1, min(MAX_INNER_REPS, int(INNER_SECONDS / max(estimate, 1e-6))))
                try:
                    reply = workers[name].call({"cmd": "time", "reps": inner},
                                               timeout=2 * cap + inner * estimate)
                except WorkerTimeout:
                    entry["status"] = f"skipped: too slow (one step > {2 * cap:.0f} s, killed)"
                    too_slow_from[name] = num_qubits
                    unavailable[name] = f"killed at n={num_qubits}"
                    continue
                entry["seconds"].extend(reply["seconds"])
                if max(reply["seconds"]) > cap:
                    too_slow_from[name] = num_qubits + 1
        for name, entry in entries.items():
            if entry.get("seconds"):
                entry["median_s"] = median(entry["seconds"])
            if name not in unavailable:
                with contextlib.suppress(WorkerTimeout, RuntimeError):
                    entry["max_rss_mib"] = workers[name].call({"cmd": "rss"}, timeout=60)[
                        "max_rss_mib"]
            runs[name][str(num_qubits)] = entry
            print(f"  {name:14s} {format_seconds(entry.get('median_s'))}"
                  f"  {entry.get('status', '')}", flush=True)
        for name, first in too_slow_from.items():
            if first == num_qubits + 1:
                print(f"  {name}: a step exceeded {cap:.0f} s; not run at larger n", flush=True)
    for name, first in too_slow_from.items():
        for num_qubits in sizes:
            if num_qubits >= first and str(num_qubits) not in runs[name]:
                runs[name][str(num_qubits)] = {"status": "skipped: too slow at smaller n"}
    return runs


def ratios(runs: dict[str, dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    """Per n: the fastest measured peer and our speed-up over it (peer time / our time)."""
    table = {}
    for num_qubits in sizes:
        key = str(num_qubits)
        peers = {name: runs[name][key]["median_s"] for name in PEERS
                 if name in runs and "median_s" in runs[name].get(key, {})
                 and "status" not in runs[name][key]}
        row: dict[str, Any] = {"fastest_peer": None}
        if peers:
            fastest = min(peers, key=peers.get)
            row = {"fastest_peer": fastest, "fastest_peer_s": peers[fastest]}
            for ours in OURS:
                ours_s = runs.get(ours, {}).get(key, {}).get("median_s")
                row[f"speedup_{ours}"] = peers[fastest] / ours_s if ours_s else None
        table[key] = row
    return table


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [8, 12, 14, 16] if args.quick else list(range(8, 21, 2))
    if args.sizes:
        sizes = [int(x) for x in args.sizes.split(",")]
    names = list(OURS) + [p for p in PEERS if p not in args.skip]
    started = time.perf_counter()
    workers, unavailable = start_workers(names, args.threads)
    try:
        versions = {name: worker.call({"cmd": "info"}, timeout=60)["versions"]
                    for name, worker in workers.items()}
        print(f"verifying at n={args.verify_n} ...", flush=True)
        check = verify(workers, args.verify_n, args.cap)
        for name, result in check["contestants"].items():
            if not result["passed"]:
                unavailable[name] = f"excluded: disagrees with ours at n={args.verify_n}"
        runs = measure(workers, sizes, args.reps, args.cap, unavailable)
    finally:
        for worker in workers.values():
            worker.close()
    result = {
        "name": NAME,
        "mode": "quick" if args.quick else "full",
        "machine": machine_facts(),
        "settings": {"depth": DEPTH, "sizes": sizes, "reps": args.reps, "cap_s": args.cap,
                     "threads_per_contestant": args.threads, "seed": SEED,
                     "loss": "sum(w * p), w ~ N(0, 1) fixed; timed = forward + backward",
                     "verify_n": args.verify_n},
        "versions": versions,
        "unavailable": {name: why for name, why in unavailable.items()
                        if not why.startswith("killed")},
        "verification": check,
        "runs": runs,
        "ratios": ratios(runs, sizes),
        "wall_s": time.perf_counter() - started,
    }
    return result


# -- reporting ------------------------------------------------------------------------------


def _cell(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "-"
    if "median_s" in entry and "status" not in entry:
        return format_seconds(entry["median_s"])
    if "median_s" in entry:
        return f"> {format_seconds(entry['median_s'])}*"
    return "too slow" if "too slow" in entry.get("status", "") else "n/a"


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    names = [n for n in list(OURS) + list(PEERS) if n in result["runs"]]
    headers = ["n"] + [LABELS[n] for n in names] + ["fastest peer", "speed-up f64",
                                                    "speed-up f32"]
    rows = []
    for num_qubits in result["settings"]["sizes"]:
        key = str(num_qubits)
        ratio = result["ratios"].get(key, {})
        fastest = ratio.get("fastest_peer")
        rows.append([str(num_qubits)]
                    + [_cell(result["runs"][n].get(key)) for n in names]
                    + [LABELS[fastest].split(" ")[0] if fastest else "none measured",
                       format_ratio(ratio.get("speedup_qpa-float64")),
                       format_ratio(ratio.get("speedup_qpa-float32"))])
    return headers, rows


def render_markdown(result: dict[str, Any]) -> str:
    """The markdown that run_all puts between the qnn-speed markers of docs/BENCHMARKS.md."""
    headers, rows = table_rows(result)
    settings = result["settings"]
    lines = [
        f"Measured {result['machine']['date'][:16].replace('T', ' ')} UTC "
        f"({result['mode']} mode) on: {machine_line(result['machine'])}; "
        f"{settings['threads_per_contestant']} thread(s) per contestant, load average at "
        f"start {result['machine'].get('load_average_at_start')}. Median of up to "
        f"{settings['reps']} interleaved turns (a turn repeats a fast step for about "
        f"{INNER_SECONDS} s) of forward+backward after one warm-up step; "
        f"depth {settings['depth']}; cap {settings['cap_s']:.0f} s per step.",
        "",
        markdown_table(headers, rows),
        "",
        "Speed-up = fastest measured peer's median / ours (higher is better). "
        "\"too slow\": a step exceeded the cap at this or a smaller n, so it was not run "
        "(its time is above the cap); `> t*`: only the warm-up step was taken.",
    ]
    check = result["verification"]
    lines += ["", f"Agreement at n = {check['n']} (max |difference| from ours float64): "
              + "; ".join(f"{LABELS[n]}: p {c['max_abs_p_error']:.1e}, "
                          f"grad {c['max_abs_grad_error']:.1e}"
                          + ("" if c["passed"] else " **FAILED**")
                          for n, c in check["contestants"].items() if n != "qpa-float64")
              + "."]
    if result.get("unavailable"):
        lines += [""] + [f"- {LABELS.get(n, n)}: {why}" for n, why in
                         result["unavailable"].items()]
    memory = []
    top = str(max(int(k) for k in result["ratios"]))
    for name in result["runs"]:
        entry = result["runs"][name].get(top, {})
        if "max_rss_mib" in entry and "median_s" in entry:
            memory.append(f"{LABELS[name]} {entry['max_rss_mib']:.0f} MiB")
    if memory:
        lines += ["", f"Peak resident memory of each worker process after n = {top}: "
                  + ", ".join(memory) + "."]
    lines += ["", f"![QNN forward+backward time](../bench/results/{NAME}.png)",
              "", f"Raw timings: `bench/results/{NAME}.json`."]
    return "\n".join(lines)


def plot(result: dict[str, Any]) -> None:
    sizes = result["settings"]["sizes"]
    series = {}
    for name, per_n in result["runs"].items():
        ys = [per_n.get(str(n), {}).get("median_s") if "status" not in per_n.get(str(n), {})
              else None for n in sizes]
        series[LABELS[name]] = (sizes, [math.nan if y is None else y for y in ys])
    plot_lines(NAME, series, title=f"QPA ansatz depth {DEPTH}: forward + backward of p(theta)",
               xlabel="qubits n", ylabel="seconds per step (median)",
               note=machine_line(result["machine"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 8, 12, 14, 16 and 3 reps")
    parser.add_argument("--sizes", help="comma-separated qubit counts (overrides the mode)")
    parser.add_argument("--reps", type=int, default=None,
                        help="interleaved turns per contestant and n (default 3 quick, 5 full)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch/BLAS threads per contestant (default 1: the reference "
                             "machine is shared, and one thread keeps timings stable)")
    parser.add_argument("--cap", type=float, default=30.0,
                        help="seconds; a contestant slower than this per step stops growing n")
    parser.add_argument("--verify-n", type=int, default=8,
                        help="qubits at which all contestants must agree before timing")
    parser.add_argument("--skip", action="append", default=[], choices=PEERS,
                        help="leave a peer out (repeatable)")
    args = parser.parse_args(argv)
    if args.reps is None:
        args.reps = 3 if args.quick else 5
    result = run(args)
    path = write_json(NAME, result)
    plot(result)
    headers, rows = table_rows(result)
    print()
    print_table(headers, rows)
    print(f"\nwrote {path.relative_to(REPO_ROOT)} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
