"""Data-parallel scaling: training steps per second of LoRA and QPA with 1 and 2 processes
(``LocalGroup``, gloo) through the real trainer. docs/BENCHMARKS.md, section 7.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common
from bench.common import QF, format_ratio

NAME = "scaling"
SECTION = "scaling"
QUIET = True
METHODS = ("lora", "qpa")
LABELS = {"1x1": "1 process x 1 thread", "2x1": "2 processes x 1 thread",
          "1xN": "1 process x all cores"}
OPTIONS = {"--batch-size": {"type": int, "default": 4, "help": "global batch"},
           "--seq-len": {"type": int, "default": 128},
           "--rounds": {"type": int, "default": 2},
           "--steps": {"type": int, "default": QF(2, 5), "help": "timed steps per run"},
           "--warmup-steps": {"type": int, "default": 1, "help": "discarded steps per run"}}


def train(method: str, data: Path, output: Path, group: Any, threads: int,
          args: Any) -> dict[str, Any]:
    """Train one job; returns rank 0's step times (with the all-reduce wait) and losses."""
    import torch

    from qpa.config import parse_config
    from qpa.training import finetune

    config = parse_config({
        "base_model": "smollm2-135m", "method": method, "backend": "statevector",
        "train_file": str(data / "train.jsonl"), "eval_file": str(data / "eval.jsonl"),
        "steps": args.warmup_steps + args.steps,
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "qpa": {"update_every": 1},
        "train": {"batch_size": args.batch_size, "max_length": args.seq_len, "eval_batches": 1,
                  "sample_prompt": None, "checkpoint_every": 10_000, "device": "cpu",
                  "mixed_precision": "no"}})
    events: list[dict[str, Any]] = []
    torch.set_num_threads(threads)
    start = time.perf_counter()
    metrics = (group.finetune if group else finetune)(config, output, on_event=events.append,
                                                      resume=False)
    steps = [e for e in events if e["type"] == "step"]
    return {"step_seconds": [e["step_seconds"] for e in steps],
            "losses": [e["loss"] for e in steps], "world_size": metrics["world_size"],
            "quantum_jobs": (metrics.get("quantum") or {}).get("jobs"),
            "wall_s": time.perf_counter() - start}


def run(args: Any) -> dict[str, Any]:
    from qpa.datasets import write_pydoc_dataset
    from qpa.distributed import LocalGroup
    from qpa.training import Trainer

    cores = os.cpu_count() or 1
    layouts = {"1x1": (1, 1), "2x1": (2, max(1, cores // 2))}
    if not args.quick:
        layouts["1xN"] = (1, cores)
    variants = [f"{method}/{layout}" for method in METHODS for layout in layouts]
    raw: dict[str, list[dict[str, Any]]] = {key: [] for key in variants}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qpa-scaling-") as scratch:
        write_pydoc_dataset(Path(scratch) / "data", max_train=200, max_eval=16)
        group = LocalGroup(2, "cpu", trainer=Trainer)  # started once: start-up is no step
        group.start()
        try:
            for index, order in common.rounds(variants, args.rounds, shuffle=True):
                for key in order:
                    method, layout = key.split("/")
                    processes, threads = layouts[layout]
                    result = train(method, Path(scratch) / "data",
                                   Path(scratch) / f"{method}-{layout}-{index}",
                                   group if processes > 1 else None, threads, args)
                    raw[key].append({**result, "round": index, "threads_per_process": threads})
                    print(f"round {index} {key}: median step "
                          f"{statistics.median(result['step_seconds'][args.warmup_steps:]):.2f}"
                          f" s ({threads} thread(s) each)", flush=True)
        finally:
            group.close()
    return {"settings": {"batch_size": args.batch_size, "seq_len": args.seq_len,
                         "steps": args.steps, "warmup_steps": args.warmup_steps,
                         "rounds": args.rounds, "cores": cores,
                         "layouts": {name: {"processes": n, "threads_per_process": t}
                                     for name, (n, t) in layouts.items()},
                         "backend": "gloo", "model": "smollm2-135m"},
            "raw": raw, "summary": summarise(raw, args.warmup_steps),
            "wall_s": time.perf_counter() - started}


def summarise(raw: dict[str, list[dict[str, Any]]], warmup: int) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for key, runs in raw.items():
        times = [t for run in runs for t in run["step_seconds"][warmup:]]
        median = statistics.median(times)
        summary[key] = {"median_step_s": median, "steps_per_s": 1.0 / median,
                        "min_step_s": min(times), "max_step_s": max(times),
                        "samples": len(times)}

    def per_round(key: str) -> list[float]:
        return [statistics.median(r["step_seconds"][warmup:])
                for r in sorted(raw[key], key=lambda r: r["round"])]

    for method in METHODS:
        for reference in ("1x1", "1xN"):
            if f"{method}/{reference}" in raw:
                paired = [a / b for a, b in zip(per_round(f"{method}/{reference}"),
                                                per_round(f"{method}/2x1"), strict=True)]
                summary[f"{method}/speedup_vs_{reference}"] = {
                    "paired_median": statistics.median(paired), "per_round": paired}
        # Same global batch, same data: the first loss must agree (a sanity check).
        two = min(raw[f"{method}/2x1"], key=lambda r: r["round"])
        summary[f"{method}/first_loss_gap"] = abs(raw[f"{method}/1x1"][0]["losses"][0]
                                                  - two["losses"][0])
    return summary


def render_markdown(results: dict[str, Any]) -> str:
    s, summary = results["settings"], results["summary"]
    rows, checks = [], []
    for method in METHODS:
        for layout in s["layouts"]:
            stats, speedup = summary[f"{method}/{layout}"], summary.get(
                f"{method}/speedup_vs_{layout}")
            rows.append([method, LABELS[layout], f"{stats['median_step_s']:.2f} s",
                         f"{stats['min_step_s']:.2f}-{stats['max_step_s']:.2f} s",
                         f"{stats['steps_per_s']:.3f}",
                         f"{stats['steps_per_s'] * s['batch_size']:.2f}",
                         format_ratio(speedup["paired_median"]) if speedup else "-"])
            if speedup:
                checks.append([method, LABELS[layout], ", ".join(
                    format_ratio(x) for x in speedup["per_round"]),
                    f"{summary[f'{method}/first_loss_gap']:.1e}"])
    return common.markdown(
        common.measured(results, f"global batch {s['batch_size']} x <= {s['seq_len']} tokens, "
                        f"{s['rounds']} interleaved rounds of {s['steps']} timed steps after "
                        f"{s['warmup_steps']} warm-up step(s), {s['backend']}."),
        (["method", "layout", "step (median)", "min-max", "steps/s", "sequences/s",
          "2 processes vs this (paired)"], rows),
        (["method", "2 processes vs", "paired speed-up per round",
          "first-step loss, 1 vs 2 processes"], checks))


if __name__ == "__main__":
    raise SystemExit(common.main(sys.modules[__name__]))
