"""QNN simulation speed: forward + backward of p(theta) for the QPA ansatz, against peers,
each contestant in its own ``bench/qnn_worker.py`` process. docs/BENCHMARKS.md, section 1.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import common, setup_peers
from bench.common import QF, REPO_ROOT, format_ratio, format_seconds, median

NAME = "qnn_speed"
SECTION = "qnn-speed"
WORKER = Path(__file__).resolve().parent / "qnn_worker.py"
OURS = ("qpa-float64", "qpa-float32")
PEERS = ("pennylane", "qiskit-ml", "torchquantum")
LABELS = {"qpa-float64": "ours float64", "qpa-float32": "ours float32",
          "pennylane": "PennyLane default.qubit (backprop)",
          "qiskit-ml": "Qiskit ML SamplerQNN + TorchConnector",
          "torchquantum": "TorchQuantum 0.1.8"}
DEPTH, SEED = 8, 1234
INNER_SECONDS, MAX_INNER_REPS = 0.25, 25  # a turn repeats a fast step for about 0.25 s
OPTIONS = {
    "--sizes": {"help": "comma-separated qubit counts (default 8-20 step 2; quick 8,12,14,16)"},
    "--reps": {"type": int, "default": QF(3, 5), "help": "interleaved turns per contestant"},
    "--threads": {"type": int, "default": 1, "help": "torch/BLAS threads per contestant"},
    "--cap": {"type": float, "default": 30.0,
              "help": "seconds; a contestant slower than this per step stops growing n"},
    "--verify-n": {"type": int, "default": 8, "help": "qubits at which all must agree"},
}


class WorkerTimeout(Exception):
    pass


class Worker:
    """A contestant's process; requests and replies are JSON lines."""

    def __init__(self, name: str, python: str, threads: int, env: dict[str, str]):
        self.name = name
        self.stderr_path = common.results_path(f".{NAME}-{name}.stderr", ".tmp")
        self._stderr = self.stderr_path.open("w")
        self.process = subprocess.Popen(
            [python, "-u", str(WORKER), name, str(threads)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._stderr, text=True,
            env={**common.thread_env(threads), **env}, cwd=REPO_ROOT)
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

    def stderr_tail(self) -> str:
        self._stderr.flush()
        return " | ".join(self.stderr_path.read_text(errors="replace").strip().splitlines()[-5:])

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
    """A worker per contestant; returns (workers, why-not for those that could not start)."""
    workers, unavailable = {}, {}
    for name in names:
        python, env = sys.executable, {"PYTHONPATH": str(REPO_ROOT)}
        if name == "torchquantum":
            usable, detail = setup_peers.ensure_tq_venv()
            if not usable:
                unavailable[name] = f"not installable here: {detail}"
                continue
            python, env = str(setup_peers.TQ_PYTHON), {"PYTHONWARNINGS": "ignore"}
        worker = Worker(name, python, threads, env)
        try:
            worker.call({"cmd": "info"}, timeout=300)
            workers[name] = worker
        except Exception as error:
            worker.kill()
            worker.close()
            unavailable[name] = f"worker failed to start: {error}"
    return workers, unavailable


def verify(workers: dict[str, Worker], num_qubits: int, cap: float) -> dict[str, Any]:
    """p to 1e-6 for all; gradients to 1e-9 between float64 codes and to 1e-4 of the
    gradient's scale when either side computes in single precision."""
    answers = {}
    for name, worker in workers.items():
        worker.call({"cmd": "setup", "n": num_qubits, "depth": DEPTH, "seed": SEED},
                    timeout=4 * cap)
        answers[name] = [np.array(worker.call({"cmd": cmd}, timeout=4 * cap)[cmd])
                         for cmd in ("probs", "grad")]
    reference_p, reference_g = answers["qpa-float64"]
    scale = float(np.abs(reference_g).max())
    report: dict[str, Any] = {"n": num_qubits, "depth": DEPTH, "seed": SEED, "contestants": {}}
    for name, (probs, grad) in answers.items():
        p_err, g_err = (float(np.abs(probs - reference_p).max()),
                        float(np.abs(grad - reference_g).max()))
        single = name in ("qpa-float32", "qiskit-ml", "torchquantum")
        g_tol = 1e-4 * max(scale, 1.0) if single else 1e-9
        report["contestants"][name] = {
            "max_abs_p_error": p_err, "max_abs_grad_error": g_err, "grad_tolerance": g_tol,
            "passed": bool(p_err <= 1e-6 and g_err <= g_tol)}
    return report


def measure(workers: dict[str, Worker], sizes: list[int], reps: int, cap: float,
            unavailable: dict[str, str]) -> dict[str, Any]:
    runs: dict[str, dict[str, Any]] = {name: {} for name in workers}
    too_slow_from: dict[str, int] = {}

    def give_up(name: str, n: int, entry: dict, status: str) -> None:
        entry["status"], too_slow_from[name], unavailable[name] = status, n, f"killed at n={n}"

    for n in sizes:
        active = [name for name in workers if name not in too_slow_from
                  and name not in unavailable]
        print(f"n={n}: {', '.join(active)}", flush=True)
        entries: dict[str, dict[str, Any]] = {name: {} for name in active}
        for name in active:
            try:
                reply = workers[name].call({"cmd": "setup", "n": n, "depth": DEPTH,
                                            "seed": SEED}, timeout=2 * cap + 60)
            except WorkerTimeout:
                give_up(name, n, entries[name], f"skipped: too slow (setup + first call > "
                                                f"{2 * cap + 60:.0f} s, killed)")
                continue
            except RuntimeError as error:
                entries[name]["status"], too_slow_from[name] = f"failed: {error}", n
                continue
            entries[name] = {"setup_s": reply["setup_s"], "first_call_s": reply["first_call_s"],
                             "seconds": []}
            if reply["first_call_s"] > cap:  # one warm-up call exceeds the cap: go no further
                entries[name].update(seconds=[reply["first_call_s"]],
                                     status="single warm-up sample: exceeds cap")
                too_slow_from[name] = n + 1
        for _, order in common.rounds(active, reps):
            for name in order:
                entry = entries[name]
                if "status" in entry or name in unavailable or sum(entry["seconds"]) > 2 * cap:
                    continue  # the last: enough samples of a slow contestant
                # Fast steps repeat within a turn so a burst of load cannot decide a median.
                estimate = median(entry["seconds"]) if entry["seconds"] else entry["first_call_s"]
                inner = max(1, min(MAX_INNER_REPS, int(INNER_SECONDS / max(estimate, 1e-6))))
                try:
                    reply = workers[name].call({"cmd": "time", "reps": inner},
                                               timeout=2 * cap + inner * estimate)
                except WorkerTimeout:
                    give_up(name, n, entry, f"skipped: too slow (one step > {2 * cap:.0f} s, "
                                            "killed)")
                    continue
                entry["seconds"].extend(reply["seconds"])
                if max(reply["seconds"]) > cap:
                    too_slow_from[name] = n + 1
        for name, entry in entries.items():
            if entry.get("seconds"):
                entry["median_s"] = median(entry["seconds"])
            if name not in unavailable:
                with contextlib.suppress(WorkerTimeout, RuntimeError):
                    entry["max_rss_mib"] = workers[name].call({"cmd": "rss"}, 60)["max_rss_mib"]
            runs[name][str(n)] = entry
            print(f"  {name:14s} {format_seconds(entry.get('median_s'))}  "
                  f"{entry.get('status', '')}", flush=True)
    for name, first in too_slow_from.items():
        for n in sizes:
            if n >= first and str(n) not in runs[name]:
                runs[name][str(n)] = {"status": "skipped: too slow at smaller n"}
    return runs


def ratios(runs: dict[str, dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    """Per n: the fastest measured peer and our speed-up over it (peer time / our time)."""
    table = {}
    for n in map(str, sizes):
        peers = {name: runs[name][n]["median_s"] for name in PEERS if name in runs
                 and "median_s" in runs[name].get(n, {}) and "status" not in runs[name][n]}
        row: dict[str, Any] = {"fastest_peer": None}
        if peers:
            fastest = min(peers, key=peers.get)
            row = {"fastest_peer": fastest, "fastest_peer_s": peers[fastest]}
            for ours in OURS:
                ours_s = runs.get(ours, {}).get(n, {}).get("median_s")
                row[f"speedup_{ours}"] = peers[fastest] / ours_s if ours_s else None
        table[n] = row
    return table


def run(args: Any) -> dict[str, Any]:
    sizes = ([int(x) for x in args.sizes.split(",")] if args.sizes
             else [8, 12, 14, 16] if args.quick else list(range(8, 21, 2)))
    started = time.perf_counter()
    workers, unavailable = start_workers(list(OURS + PEERS), args.threads)
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
    return {
        "settings": {"depth": DEPTH, "sizes": sizes, "reps": args.reps, "cap_s": args.cap,
                     "threads_per_contestant": args.threads, "seed": SEED,
                     "loss": "sum(w * p), w ~ N(0, 1) fixed; timed = forward + backward",
                     "verify_n": args.verify_n},
        "versions": versions,
        "unavailable": {n: why for n, why in unavailable.items() if not why.startswith("killed")},
        "verification": check, "runs": runs, "ratios": ratios(runs, sizes),
        "wall_s": time.perf_counter() - started,
    }


def _cell(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "-"
    if "median_s" in entry:
        seconds = format_seconds(entry["median_s"])
        return seconds if "status" not in entry else f"> {seconds}*"
    return "too slow" if "too slow" in entry.get("status", "") else "n/a"


def render_markdown(results: dict[str, Any]) -> str:
    names = [n for n in OURS + PEERS if n in results["runs"]]
    rows = []
    for n in map(str, results["settings"]["sizes"]):
        ratio = results["ratios"].get(n, {})
        fastest = ratio.get("fastest_peer")
        rows.append([n, *[_cell(results["runs"][name].get(n)) for name in names],
                     LABELS[fastest].split(" ")[0] if fastest else "none measured",
                     format_ratio(ratio.get("speedup_qpa-float64")),
                     format_ratio(ratio.get("speedup_qpa-float32"))])
    check, top = results["verification"], str(max(int(k) for k in results["ratios"]))
    rss = {name: f"{per_n[top]['max_rss_mib']:.0f} MiB" for name, per_n in results["runs"].items()
           if "max_rss_mib" in per_n.get(top, {}) and "median_s" in per_n[top]}
    agreement = [[LABELS[name], f"{c['max_abs_p_error']:.1e}", f"{c['max_abs_grad_error']:.1e}"
                  + ("" if c["passed"] else " (FAILED)"), rss.get(name, "-")]
                 for name, c in check["contestants"].items()]
    s = results["settings"]
    missing = "".join(f"; {LABELS.get(n, n)}: {why}" for n, why in results["unavailable"].items())
    return common.markdown(
        common.measured(results, f"{s['threads_per_contestant']} thread(s) per contestant, "
                        f"median of up to {s['reps']} interleaved turns, depth {s['depth']}, "
                        f"cap {s['cap_s']:.0f} s per step{missing}."),
        (["n", *[LABELS[name] for name in names], "fastest peer", "speed-up f64",
          "speed-up f32"], rows),
        (["contestant", f"max abs p difference from ours float64 at n = {check['n']}",
          "max abs gradient difference", f"peak RSS after n = {top}"], agreement),
        plot=("QNN forward+backward time", NAME))


def plot(results: dict[str, Any]) -> None:
    sizes = results["settings"]["sizes"]

    def draw(axis: Any) -> None:
        for name, per_n in results["runs"].items():
            points = [(n, per_n[str(n)]["median_s"]) for n in sizes if "median_s" in
                      per_n.get(str(n), {}) and "status" not in per_n[str(n)]]
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=LABELS[name])
        axis.set(yscale="log", xlabel="qubits n", ylabel="seconds per step (median)",
                 title=f"QPA ansatz depth {DEPTH}: forward + backward of p(theta)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()

    common.save_plot(NAME, results["machine"], draw)


if __name__ == "__main__":
    raise SystemExit(common.main(sys.modules[__name__]))
