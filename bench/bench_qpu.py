"""QPU settings: held-out quality of QPA compact under shots, update_every and device noise,
each row priced by ``qpa.estimate`` on ibm_fez. The cheapest keeping ``KEEP`` of exact QPA's
gain must be ``quantum.preset: qpu-economy`` (tests/test_qpu_preset.py). docs/BENCHMARKS.md,
section 9.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from bench import common
from bench.common import machine_line, write_json

NAME = "qpu"
SECTION = "qpu"
BASE_MODEL = "smollm2-135m"
TARGETS = ["q_proj", "v_proj"]
LEARNING_RATE = 1e-2  # the frontier's sweep for QPA compact
REFERENCE = "exact_ue1"
KEEP = 0.95  # share of exact QPA's gain a recommended setting must keep
TIMING_BACKEND = "ibm-fake:FakeFez"  # whose published timing prices every row
QUIET = True
OPTIONS = {"--workers": {"type": int, "default": 2, "help": "runs at a time (1 thread each)"},
           "--rows": {"help": "comma-separated subset of rows (default: all)"}}


def _row(kind: str, backend: str, update_every: int, shots: int | None,
         frozen: bool = False) -> dict[str, Any]:
    return {"kind": kind, "backend": backend, "update_every": update_every, "shots": shots,
            "frozen": frozen}


ROWS = {
    **{f"exact_ue{u}": _row("exact", "statevector", u, None) for u in (1, 4, 16, 64)},
    **{f"shots{shots}_ue{u}": _row("shots", "aer", u, shots)
       for shots in (256, 1024, 4096) for u in (1, 4, 16, 64)},
    "frozen_exact": _row("noise", "statevector", 1, None, frozen=True),
    "frozen_shots1024": _row("noise", "aer", 1, 1024, frozen=True),
    "frozen_fez1024": _row("noise", "ibm-fake:FakeFez", 1, 1024, frozen=True),
}
QUICK_ROWS = ["exact_ue1", "shots256_ue4", "frozen_fez1024"]


def _label(name: str) -> str:
    row = ROWS[name]
    if row["frozen"]:
        where = {"statevector": "exact", "aer": "noiseless shots",
                 "ibm-fake:FakeFez": "FakeFez noise"}[row["backend"]]
        # Shots are in their own column: quick mode runs the noisy row with fewer.
        return f"angles frozen, {where}"
    if row["kind"] == "exact":
        return f"exact, update_every {row['update_every']}"
    return f"{row['shots']} shots, update_every {row['update_every']}"


def job_config(name: str, s: dict[str, Any], data: dict[str, str]) -> dict[str, Any]:
    row = ROWS[name]
    qpa: dict[str, Any] = {"preset": "compact", "update_every": row["update_every"]}
    if row["frozen"]:
        qpa["ablation"] = "frozen_angles"
    quantum: dict[str, Any] = {"seed": 0}
    if row["shots"]:
        quantum["shots"] = s["noisy_shots"] if row["backend"].startswith("ibm") else row["shots"]
    return {
        "base_model": BASE_MODEL, "method": "qpa", "backend": row["backend"],
        "train_file": data["train"], "eval_file": data["eval"], "steps": s["steps"],
        "lora": {"r": 4, "alpha": 8, "target_modules": TARGETS}, "qpa": qpa,
        "quantum": quantum,
        "train": {"lr": LEARNING_RATE, "batch_size": s["batch_size"],
                  "max_length": s["max_length"], "eval_batches": 1, "seed": 0,
                  "schedule": "cosine", "warmup_steps": round(0.06 * s["steps"]),
                  "checkpoint_every": 10**6, "sample_prompt": None, "device": "cpu"},
    }


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one row with the product's path, evaluate its adapter with stock PEFT, and
    price it with ``qpa.estimate`` on the timing backend."""
    import torch

    from qpa.config import parse_config
    from qpa.estimate import estimate_job
    from qpa.training import finetune

    torch.set_num_threads(1)
    config = spec["config"]

    def train(output: Path) -> dict[str, Any]:
        metrics = finetune(parse_config(config), output, resume=False)
        quantum = metrics["quantum"]
        result: dict[str, Any] = {
            "jobs": quantum["jobs"], "circuits": quantum["circuits"], "shots": quantum["shots"],
            "quantum_wall_seconds": quantum["seconds"], "train_seconds": metrics["train_seconds"],
            "num_qubits": metrics["num_qubits"], "trainable_params": metrics["trainable_params"],
        }
        shots = ROWS[spec["row"]]["shots"]
        if shots:  # what the same run would cost on the device whose timing prices rows
            priced = parse_config({**config, "backend": TIMING_BACKEND,
                                   "quantum": {**config["quantum"], "shots": shots}})
            estimate = estimate_job(priced, num_values=metrics["generated_values"])
            result["estimated_qpu_seconds"] = estimate.qpu_seconds
            result["estimate_matches_run"] = (estimate.jobs, estimate.circuits) == (
                quantum["jobs"], quantum["circuits"])
        return result

    return common.evaluated_run(spec, train, with_base=spec["row"] == REFERENCE)


def _key(spec: dict[str, Any]) -> str:
    return f"{spec['row']}|{common.digest(common.without_data(spec['config']))}"


def save(results: dict[str, Any]) -> None:
    write_json(common.quick_name(NAME, results), results)


def preset_of(name: str) -> dict[str, dict[str, Any]]:
    """The ``quantum.preset`` table entry that reproduces row ``name``."""
    row = ROWS[name]
    qpa = {"ablation": "frozen_angles"} if row["frozen"] else {"update_every": row["update_every"]}
    return {"quantum": {"shots": row["shots"]}, "qpa": qpa}


def _choice(run: dict[str, Any]) -> dict[str, Any]:
    row = ROWS[run["row"]]
    return {"row": run["row"], "shots": row["shots"], "update_every": row["update_every"],
            "frozen": row["frozen"], "share_of_exact_gain": run["share_of_exact_gain"],
            "estimated_qpu_seconds": run["estimated_qpu_seconds"],
            "preset": preset_of(run["row"])}


def summarise(results: dict[str, Any]) -> None:
    """Gains against exact QPA; the cheapest shot-based setting (trained or frozen angles,
    noiseless or device noise) keeping >= 95 % of it, and, when none does, the closest."""
    runs = {run["row"]: run for run in results["runs"].values()}
    base = next((run["eval_loss_base"] for run in runs.values() if "eval_loss_base" in run),
                math.nan)
    reference = runs.get(REFERENCE)
    exact_gain = base - reference["eval_loss"] if reference else math.nan
    for run in runs.values():
        run["share_of_exact_gain"] = (base - run["eval_loss"]) / exact_gain
    priced = [run for name, run in runs.items()
              if ROWS[name]["shots"] and run.get("estimated_qpu_seconds") is not None]
    keeping = [run for run in priced if run["share_of_exact_gain"] >= KEEP]
    best = min(keeping, key=lambda run: run["estimated_qpu_seconds"], default=None)
    closest = max(priced, default=None, key=lambda run: (run["share_of_exact_gain"],
                                                         -run["estimated_qpu_seconds"]))
    results["summary"] = {"base_eval_loss": base, "exact_gain": exact_gain}
    results["recommendation"] = best and _choice(best)
    results["closest"] = None if best or closest is None else _choice(closest)


def _choice_row(label: str, choice: dict[str, Any] | None) -> list[Any]:
    from qpa.estimate import format_seconds

    if choice is None:
        return [label, "none", "-", "-", "-", "-"]
    angles = "frozen" if choice["frozen"] else f"trained, update_every {choice['update_every']}"
    return [label, choice["row"], choice["shots"], angles,
            f"{choice['share_of_exact_gain']:.1%}", format_seconds(choice["estimated_qpu_seconds"])]


def render_markdown(results: dict[str, Any]) -> str:
    from qpa.estimate import format_seconds

    runs = {run["row"]: run for run in results["runs"].values()}
    rows = [["base model", f"{results['summary']['base_eval_loss']:.4f}", "0", "-", "-", "-",
             "-", "-"]]
    for name in [name for name in ROWS if name in runs]:
        run, seconds = runs[name], runs[name].get("estimated_qpu_seconds")
        rows.append([_label(name), f"{run['eval_loss']:.4f}", f"{run['share_of_exact_gain']:.1%}",
                     f"{run['jobs']:,}", f"{run['circuits']:,}", f"{run['shots']:,}",
                     "exact (no device)" if seconds is None else format_seconds(seconds),
                     f"{run['wall_seconds'] / 60:.1f} min"])
    s = results["settings"]
    choices = [_choice_row(f"cheapest keeping >= {KEEP:.0%} of exact QPA's gain",
                           results.get("recommendation"))]
    if results.get("closest"):
        choices.append(_choice_row("closest (none keeps it)", results["closest"]))
    return common.markdown(
        f"{results['mode'].capitalize()} mode, measured on {machine_line(results['machine'])};"
        f" 1 thread per run, {len(results['runs'])} runs, {s['steps']} steps of batch "
        f"{s['batch_size']} x {s['max_length']} tokens, lr {LEARNING_RATE:g}, seed 0, "
        f"{s['eval_batches'] * s['batch_size']} held-out chunks.",
        (["row", "held-out loss", "share of exact gain", "jobs", "circuits", "shots",
          "est. QPU time on ibm_fez", "local wall time"], rows),
        (["setting", "row", "shots", "angles", "share of the gain", "est. QPU time on ibm_fez"],
         choices))


def settings_for(quick: bool) -> dict[str, Any]:
    return {"steps": 4 if quick else 150, "batch_size": 4, "max_length": 32 if quick else 128,
            "eval_batches": 2 if quick else 12,
            # Noisy local simulation of 12 qubits costs ~60 ms per shot (docs/QPU.md).
            "noisy_shots": 64 if quick else 1024}


def run(args: Any) -> dict[str, Any]:
    rows = args.rows.split(",") if args.rows else (QUICK_ROWS if args.quick else list(ROWS))

    def record(spec: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        print(f"{spec['row']}: eval loss {result['eval_loss']:.4f}, {result['jobs']} jobs "
              f"({result['wall_seconds']:.0f} s)", flush=True)
        return {"row": spec["row"], **result}

    s = settings_for(args.quick)
    with common.resumed(NAME, args.quick, s) as results, common.pydoc_data() as data:
        # Slowest first, so that two workers finish together.
        order = sorted(rows, key=lambda name: (ROWS[name]["update_every"],
                                               -(ROWS[name]["shots"] or 0)))
        specs = [{"row": name, "config": job_config(name, s, data),
                  "eval_batches": s["eval_batches"]} for name in order]
        common.run_children("bench_qpu", specs, _key, results["runs"], args.workers, record,
                            lambda: save(results))
    return finish(results)


def finish(results: dict[str, Any]) -> dict[str, Any]:
    summarise(results)
    save(results)
    return results


if __name__ == "__main__":
    raise SystemExit(common.main(sys.modules[__name__]))
