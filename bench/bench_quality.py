"""Adaptation quality: eval loss of every method on held-out Python documentation.

Workload (issue 5, part 5): SmolLM2-135M-Instruct fine-tuned on Python's reference
documentation (``pydoc_data.topics``), split by topic with ``qpa.datasets`` (a topic is all
train or all eval, so eval measures adaptation to *unseen* documentation), evaluated on
the same fixed held-out batches for every method. Rows, at one equal step budget, learning
rate, batch size and data order, over several seeds:

* ``base``: the model without adapter (every run's eval loss before training; they agree);
* ``lora_r4``, ``lora_r8``: ``method: lora`` through ``qpa.training.finetune`` (alpha = 2r,
  so the scaling alpha/r is the same);
* ``qpa``: ``method: qpa`` generating a rank-4 LoRA (library defaults: 8 layers of RY +
  CNOT chain, chunk 64, MLP 32x32, statevector backend, update_every 1), via ``finetune``;
* ``compound``: ``method: compound`` with default options (orders 1+2, 4 blocks), via
  ``finetune``;
* ``peft_oft``: stock PEFT ``OFTConfig(target_modules=...)`` with PEFT's defaults (blocks
  of 32, Cayley-Neumann). ``--oft-block-size 144`` gives compound's own block layout (4
  blocks, the form compound adapters export to), but at the shared learning rate that OFT
  is unstable (its eval loss rose in our trials), so it is not the default peer. The
  library has no OFT *training* method, so this row runs a small loop here on the
  library's own data pipeline (``qpa.data.StepBatches`` / ``fixed_batches``: identical
  batches in the identical order), with the trainer's optimiser (AdamW, no weight decay),
  gradient clip and token-weighted evaluation. ``--check-loop`` also runs stock PEFT LoRA
  r=4 through this loop, which must reproduce ``finetune``'s ``lora_r4`` for each seed.

LoRA-relative quality of a method = (base loss - method loss) / (base loss - LoRA r=4
loss): the share of LoRA's eval-loss improvement it achieves; parameter ratio = its
trainable parameters / LoRA r=4's. Both are put beside the papers' claims.

    python -m bench.bench_quality            # full: 150 steps, 128 tokens, 3 seeds
    python -m bench.bench_quality --quick    # 8 steps, 64 tokens, 2 seeds: a smoke test

Threads default to 1 (see bench_overhead: two threads on two shared cores were slower).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    REPO_ROOT,
    machine_facts,
    machine_line,
    markdown_table,
    print_table,
    pyplot,
    results_path,
    write_json,
)

NAME = "quality"
SECTION = "quality"
BASE_MODEL = "smollm2-135m"
TARGETS = ["q_proj", "v_proj"]
EVAL_FRACTION = 0.1  # qpa.datasets' default topic split
OFT_BLOCK_SIZE = 32  # PEFT's default OFTConfig block size

METHODS = ("lora_r4", "lora_r8", "qpa", "compound", "peft_oft")
LABELS = {
    "base": "base model (no adapter)",
    "lora_r4": "LoRA r=4",
    "lora_r8": "LoRA r=8",
    "qpa": "QPA (generates LoRA r=4)",
    "compound": "compound adapters (default)",
    "peft_oft": "PEFT OFT (PEFT defaults)",
    "peft_lora_loop": "stock PEFT LoRA r=4, bench loop (check)",
}
# What each row is in the library's config (method rows only).
LIBRARY_RUNS: dict[str, dict[str, Any]] = {
    "lora_r4": {"method": "lora", "lora": {"r": 4, "alpha": 8}},
    "lora_r8": {"method": "lora", "lora": {"r": 8, "alpha": 16}},
    "qpa": {"method": "qpa", "backend": "statevector", "lora": {"r": 4, "alpha": 8}},
    "compound": {"method": "compound", "lora": {"r": 4, "alpha": 8}},
}

# The papers' headline claims, as the papers state them (their tasks and metrics).
PAPER_CLAIMS = [
    {"claim": "QPA on GPT-2 (Liu et al., ICLR 2025, arXiv 2410.09846)", "ours": "qpa",
     "reference": "lora_r4", "param_ratio": 0.5206, "quality": 1.0075,
     "as_stated": "52.06 % of LoRA's parameters, +0.75 % performance"},
    {"claim": "QPA on Gemma-2 (Liu et al.)", "ours": "qpa", "reference": "lora_r4",
     "param_ratio": 0.1684, "quality": 1.0007,
     "as_stated": "16.84 % of LoRA's parameters, +0.07 % performance"},
    {"claim": "compound vs LoRA (Coyle & Raj 2025, arXiv 2502.06916)", "ours": "compound",
     "reference": "lora_r4", "param_ratio": 1 / 44, "quality": 0.992,
     "as_stated": "99.2 % of LoRA's performance at 44x fewer parameters"},
    {"claim": "compound vs OFT/BOFT (Coyle & Raj)", "ours": "compound",
     "reference": "peft_oft", "param_ratio": 1 / 25, "quality": 0.98,
     "as_stated": "98 % of OFT/BOFT's performance at 25x fewer parameters"},
]


# -- settings ------------------------------------------------------------------------------


def settings_for(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    return {
        # Quick: 8 steps keep the 10 runs near 6 minutes on 2 busy cores (12 steps took
        # 437 s, past run_all's 420 s budget); a smoke test, not a measurement.
        "steps": args.steps or (8 if quick else 150),
        "max_length": args.max_length or (64 if quick else 128),
        "batch_size": args.batch_size or 4,
        "eval_batches": args.eval_batches or (4 if quick else 20),
        "seeds": [int(s) for s in args.seeds.split(",")] if args.seeds
        else ([0, 1] if quick else [0, 1, 2]),
        "lr": args.lr,
        "grad_clip": 1.0,
        "weight_decay": 0.0,
        "threads": args.threads,
        "device": args.device,
        "methods": [m for m in METHODS if m not in args.skip],
        "check_loop": args.check_loop,
        "base_model": BASE_MODEL,
        "target_modules": TARGETS,
        "eval_fraction": EVAL_FRACTION,
        # Only the block size is set; the rest are PEFT's defaults (recorded after the run).
        "oft": {"r": 0, "oft_block_size": args.oft_block_size},
    }


# -- one run through the library -----------------------------------------------------------


def run_library(row: str, seed: int, data: dict[str, str], s: dict[str, Any],
                workdir: Path) -> dict[str, Any]:
    """``qpa.training.finetune`` for one method row and seed; the product's own path."""
    from qpa.config import parse_config
    from qpa.training import finetune

    config = parse_config({
        "base_model": BASE_MODEL, "train_file": data["train"], "eval_file": data["eval"],
        "steps": s["steps"], **LIBRARY_RUNS[row],
        "lora": {**LIBRARY_RUNS[row].get("lora", {}), "target_modules": TARGETS},
        "train": {"lr": s["lr"], "batch_size": s["batch_size"], "max_length": s["max_length"],
                  "eval_batches": s["eval_batches"], "seed": seed, "grad_clip": s["grad_clip"],
                  "weight_decay": s["weight_decay"], "checkpoint_every": 10**6,
                  "sample_prompt": None, "device": s["device"]},
    })
    output = Path(tempfile.mkdtemp(prefix=f"{row}-s{seed}-", dir=workdir))
    try:
        metrics = finetune(config, output, resume=False)
        with (output / "events.jsonl").open() as stream:
            events = [json.loads(line) for line in stream if line.strip()]
        losses = [event["loss"] for event in events if event["type"] == "step"]
    finally:
        shutil.rmtree(output, ignore_errors=True)
    out = {
        "eval_loss_before": metrics["eval_loss_before"],
        "eval_loss_after": metrics["eval_loss_after"],
        "trainable_params": metrics["trainable_params"],
        "lora_equivalent_params": metrics["lora_equivalent_params"],
        "train_seconds": metrics["train_seconds"],
        "wall_seconds": metrics["wall_seconds"],
        "train_losses": losses,
        "path": "qpa.training.finetune",
    }
    for key in ("oft_equivalent_params", "num_qubits", "circuit_angles", "mapping_mlp_params"):
        if key in metrics:
            out[key] = metrics[key]
    if metrics.get("quantum"):
        out["quantum"] = {k: metrics["quantum"][k]
                          for k in ("jobs", "circuits", "shots", "seconds")}
    return out


# -- one run of stock PEFT in a trainer-equivalent loop ------------------------------------


def run_peft_loop(kind: str, seed: int, data: dict[str, str], s: dict[str, Any]) -> dict[str, Any]:
    """Stock PEFT (``oft`` or ``lora``) with the trainer's batches, optimiser and evaluation."""
    from peft import LoraConfig, OFTConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qpa.data import StepBatches, fixed_batches, read_jsonl, tokenize_records
    from qpa.models import resolve_model_path
    from qpa.training import pick_device, seed_everything

    wall_start = time.perf_counter()
    device = pick_device(s["device"])
    path = resolve_model_path(BASE_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 local_files_only=True).to(device)
    train = tokenize_records(tokenizer, read_jsonl(data["train"]), s["max_length"])
    evaluation = tokenize_records(tokenizer, read_jsonl(data["eval"], "eval_file"),
                                  s["max_length"], "eval_file")
    # The trainer seeds right before attaching; doing the same gives PEFT's random init the
    # same draws (which is what makes the lora check reproduce finetune exactly).
    seed_everything(seed)
    if kind == "oft":
        config = OFTConfig(target_modules=TARGETS, **s["oft"])
    else:
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                            bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    pad = tokenizer.pad_token_id
    batches = StepBatches(train, s["batch_size"], seed, pad)
    eval_set = fixed_batches(evaluation, s["batch_size"], s["eval_batches"], pad)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s["lr"], weight_decay=s["weight_decay"])

    @torch.no_grad()
    def evaluate() -> float:  # token-weighted mean, as Trainer.evaluate
        model.eval()
        total, tokens = 0.0, 0
        for batch in eval_set:
            batch = {k: v.to(device) for k, v in batch.items()}
            count = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * count
            tokens += count
        return total / max(tokens, 1)

    before = evaluate()
    losses = []
    train_seconds = 0.0
    for step in range(s["steps"]):
        started = time.perf_counter()
        model.train()
        batch = {k: v.to(device) for k, v in batches(step).items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - started
        losses.append(loss.item())
    peft_config = {key: getattr(config, key) for key in (
        "r", "oft_block_size", "use_cayley_neumann", "num_cayley_neumann_terms",
        "module_dropout", "block_share", "coft", "lora_alpha", "lora_dropout")
        if hasattr(config, key)}
    return {
        "eval_loss_before": before,
        "eval_loss_after": evaluate(),
        "peft_config": peft_config,
        "trainable_params": sum(p.numel() for p in params),
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - wall_start,
        "train_losses": losses,
        "path": f"peft.get_peft_model({type(config).__name__}) in bench_quality's loop",
    }


# -- the benchmark -------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: dict[str, dict[str, dict[str, Any]]], seeds: list[int]) -> dict[str, Any]:
    """Mean +- std per row, base loss, LoRA-relative quality and parameter ratios."""
    befores = [run["eval_loss_before"] for per_seed in runs.values() for run in per_seed.values()]
    base = statistics.fmean(befores)
    rows: dict[str, Any] = {
        # The eval set is fixed and every adapter starts as the identity: one number.
        "base": {"eval_loss_mean": base, "eval_loss_std": 0.0,
                 "perplexity_mean": math.exp(base), "perplexity_std": 0.0,
                 "trainable_params": 0, "seeds": len(seeds)},
    }
    for name, per_seed in runs.items():
        by_seed = {str(seed): per_seed[str(seed)]["eval_loss_after"] for seed in seeds
                   if str(seed) in per_seed}
        losses = list(by_seed.values())
        mean, std = _mean_std(losses)
        ppl_mean, ppl_std = _mean_std([math.exp(loss) for loss in losses])
        step_s = [run["train_seconds"] / max(len(run["train_losses"]), 1)
                  for run in per_seed.values()]
        rows[name] = {"eval_loss_mean": mean, "eval_loss_std": std, "eval_losses": by_seed,
                      "perplexity_mean": ppl_mean, "perplexity_std": ppl_std,
                      "trainable_params": next(iter(per_seed.values()))["trainable_params"],
                      "seconds_per_step_median": statistics.median(step_s) if step_s else None,
                      "seeds": len(losses)}

    def relative(name: str, reference: str) -> dict[str, Any] | None:
        if name not in rows or reference not in rows:
            return None
        gain_ref = base - rows[reference]["eval_loss_mean"]
        ours, theirs = rows[name]["eval_losses"], rows[reference]["eval_losses"]
        paired = [(base - ours[seed]) / (base - theirs[seed]) for seed in ours
                  if seed in theirs and base - theirs[seed] != 0]
        paired_mean, paired_std = _mean_std(paired)
        return {
            "quality": (base - rows[name]["eval_loss_mean"]) / gain_ref if gain_ref else None,
            "quality_paired_mean": paired_mean, "quality_paired_std": paired_std,
            "param_ratio": rows[name]["trainable_params"] / rows[reference]["trainable_params"],
            "reference_improves": gain_ref > 0,
        }

    for name in list(rows):
        if name == "base":
            continue
        rows[name]["vs_lora_r4"] = relative(name, "lora_r4")
        rows[name]["vs_peft_oft"] = relative(name, "peft_oft")
    claims = []
    for claim in PAPER_CLAIMS:
        ours = rows.get(claim["ours"], {}).get(
            "vs_lora_r4" if claim["reference"] == "lora_r4" else "vs_peft_oft")
        claims.append({**claim, "our_param_ratio": ours and ours["param_ratio"],
                       "reference_improves": ours and ours["reference_improves"],
                       "our_quality": ours and ours["quality"],
                       "our_quality_paired_std": ours and ours["quality_paired_std"]})
    spread = max(befores) - min(befores) if befores else math.nan
    return {"base_eval_loss": base, "base_agreement_max_difference": spread, "rows": rows,
            "paper_claims": claims}


def assemble(args: argparse.Namespace, s: dict[str, Any], facts: dict[str, Any],
             counts: dict[str, int], runs: dict[str, dict[str, dict[str, Any]]],
             started: float, total: int) -> dict[str, Any]:
    """The results document, from however many runs have finished."""
    done = sum(len(per_seed) for per_seed in runs.values())
    checks: dict[str, Any] = {}
    if runs.get("peft_lora_loop") and runs.get("lora_r4"):
        checks["loop_vs_finetune_lora_r4"] = {
            seed: abs(runs["peft_lora_loop"][seed]["eval_loss_after"]
                      - runs["lora_r4"][seed]["eval_loss_after"])
            for seed in runs["lora_r4"] if seed in runs["peft_lora_loop"]}
    method_runs = {row: per_seed for row, per_seed in runs.items()
                   if row != "peft_lora_loop" and per_seed}
    return {
        "name": NAME,
        "mode": "quick" if args.quick else "full",
        "complete": done == total,
        "runs_done": done,
        "runs_total": total,
        "machine": facts,
        "settings": s,
        "data": {"source": "pydoc_data.topics split by topic (qpa.datasets.write_pydoc_dataset)",
                 "records": counts,
                 "eval_examples_used": f"first {s['eval_batches']} batches of "
                                       f"{s['batch_size']} (<= {s['max_length']} tokens each)"},
        "runs": runs,
        "summary": summarise(method_runs, s["seeds"]) if method_runs else None,
        "checks": checks,
        "wall_s": time.perf_counter() - started,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from qpa.datasets import write_pydoc_dataset

    started = time.perf_counter()
    s = settings_for(args)
    torch.set_num_threads(s["threads"])
    facts = machine_facts()
    workdir = Path(tempfile.mkdtemp(prefix="qpa-bench-quality-"))
    try:
        train_path, eval_path = write_pydoc_dataset(workdir / "data", EVAL_FRACTION)
        data = {"train": str(train_path), "eval": str(eval_path)}
        counts = {key: len(Path(path).read_text().splitlines()) for key, path in data.items()}
        rows = list(s["methods"]) + (["peft_lora_loop"] if s["check_loop"] else [])
        runs: dict[str, dict[str, dict[str, Any]]] = {row: {} for row in rows}
        total = len(rows) * len(s["seeds"])
        done = 0
        # Seed-major order, and the results file is rewritten after every run: a full run
        # stopped by a time budget still leaves every method for the seeds it finished.
        for seed in s["seeds"]:
            for row in rows:
                tick = time.perf_counter()
                if row in LIBRARY_RUNS:
                    result = run_library(row, seed, data, s, workdir)
                elif row == "peft_oft":
                    result = run_peft_loop("oft", seed, data, s)
                else:
                    result = run_peft_loop("lora", seed, data, s)
                runs[row][str(seed)] = result
                done += 1
                print(f"[{done}/{total}] {row} seed {seed}: eval loss "
                      f"{result['eval_loss_before']:.4f} -> {result['eval_loss_after']:.4f} "
                      f"({time.perf_counter() - tick:.0f} s, {time.perf_counter() - started:.0f}"
                      f" s total)", flush=True)
                if done < total:
                    write_json(NAME, assemble(args, s, facts, counts, runs, started, total))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return assemble(args, s, facts, counts, runs, started, total)


# -- reporting -----------------------------------------------------------------------------


def _pm(mean: float | None, std: float | None, digits: int = 4) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = results["summary"]["rows"]
    headers = ["method", "trainable params", "params / LoRA r=4", "eval loss", "perplexity",
               "share of LoRA r=4's loss gain", "s / step"]
    out = []
    for name in ("base", *METHODS):
        if name not in rows:
            continue
        row = rows[name]
        rel = row.get("vs_lora_r4") or {}
        out.append([
            LABELS[name], f"{row['trainable_params']:,}",
            _pct(rel.get("param_ratio")) if name != "base" else "0",
            _pm(row["eval_loss_mean"], row["eval_loss_std"]),
            _pm(row["perplexity_mean"], row["perplexity_std"], 2),
            (f"{rel['quality']:.1%} (± {rel['quality_paired_std']:.1%})"
             if rel.get("quality") is not None else "-") if name != "base" else "0",
            f"{row['seconds_per_step_median']:.2f}" if row.get("seconds_per_step_median")
            else "-",
        ])
    return headers, out


def claim_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["paper's claim", "as stated", "our parameter ratio", "our share of the "
               "reference's loss gain", "verdict"]
    out = []
    for claim in results["summary"]["paper_claims"]:
        ours, ratio = claim["our_quality"], claim["our_param_ratio"]
        verdict = _verdict(claim)
        reference = "LoRA r=4" if claim["reference"] == "lora_r4" else "PEFT OFT"
        out.append([claim["claim"], claim["as_stated"],
                    f"{ratio:.2%} of {reference}" if ratio is not None else "-",
                    _pct(ours), verdict])
    return headers, out


def _verdict(claim: dict[str, Any]) -> str:
    """Judge quality *and* parameter share: a claim is a point on both axes."""
    ours, ratio = claim["our_quality"], claim["our_param_ratio"]
    if ours is None:
        return "not measured"
    if not claim["reference_improves"]:
        return "undefined: the reference did not improve on the base model"
    times = ratio / claim["param_ratio"]
    if ours >= claim["quality"]:
        if times <= 1:
            return "matches or beats the claim"
        return (f"quality matches, but with {times:.1f}x the claimed parameter share: "
                f"short on compression")
    gap = f"falls short by {claim['quality'] - ours:.1%} of the reference's gain"
    if times < 1:
        return f"{gap}, at {1 / times:.0f}x fewer parameters than the claim's operating point"
    return gap


def _commentary(results: dict[str, Any]) -> list[str]:
    """Two to four sentences computed from the numbers."""
    summary = results["summary"]
    rows = summary["rows"]
    s = results["settings"]
    sentences = []
    lora = rows.get("lora_r4")
    if lora:
        gain = summary["base_eval_loss"] - lora["eval_loss_mean"]
        sentences.append(
            f"After {s['steps']} steps LoRA r=4 lowers the held-out loss by {gain:.4f} "
            f"(from {summary['base_eval_loss']:.4f}); the std of its eval loss over seeds is "
            f"{lora['eval_loss_std']:.4f}.")
    for name, what in (("qpa", "QPA reaches"), ("compound", "Compound adapters reach")):
        rel = (rows.get(name) or {}).get("vs_lora_r4")
        if rel and rel["quality"] is not None:
            sentences.append(
                f"{what} {rel['quality']:.0%} of LoRA r=4's gain with "
                f"{rel['param_ratio']:.1%} of its parameters.")
    measured = [c for c in summary["paper_claims"]
                if c["our_quality"] is not None and c["reference_improves"]]
    short_quality = [c for c in measured if c["our_quality"] < c["quality"]]
    short_params = [c for c in measured if c["our_quality"] >= c["quality"]
                    and c["our_param_ratio"] > c["param_ratio"]]
    if short_quality or short_params:
        parts = [f"{c['claim'].split(' (')[0]}: {c['our_quality']:.0%} of the reference's gain "
                 f"vs the claimed {c['quality']:.1%}" for c in short_quality]
        parts += [f"{c['claim'].split(' (')[0]}: quality reached, but at "
                  f"{c['our_param_ratio']:.1%} of the reference's parameters vs the claimed "
                  f"{c['param_ratio']:.1%}" for c in short_params]
        sentences.append(
            "Where we fall short: " + "; ".join(parts)
            + ". The papers report task metrics (accuracy, perplexity) after full training on "
              "other models; ours is the share of the reference's eval-loss gain at one short, "
              "equal step budget, so the comparison is indicative only.")
    return sentences


def _oft_description(results: dict[str, Any]) -> str:
    runs = results["runs"].get("peft_oft") or {}
    config = next(iter(runs.values()), {}).get("peft_config")
    if not config:
        return "(not run)"
    return (f"blocks of {config['oft_block_size']} (in_features / "
            f"{config['oft_block_size']} per module), Cayley-Neumann "
            f"{config['use_cayley_neumann']}")


def render_markdown(results: dict[str, Any]) -> str:
    """The docs/BENCHMARKS.md section: caption, results table, claims table, commentary."""
    s = results["settings"]
    headers, rows = table_rows(results)
    claim_headers, claims = claim_rows(results)
    lines = [
        f"Measured {results['machine']['date'][:16].replace('T', ' ')} UTC ({results['mode']} "
        f"mode) on {machine_line(results['machine'])}; {s['threads']} torch thread(s). "
        f"SmolLM2-135M-Instruct, adapters on {'/'.join(s['target_modules'])}, "
        f"{s['steps']} steps of batch {s['batch_size']} x <= {s['max_length']} tokens, AdamW lr "
        f"{s['lr']}, grad clip {s['grad_clip']}, seeds {', '.join(map(str, s['seeds']))} "
        f"(mean ± std). Train and eval are disjoint pydoc topics "
        f"({results['data']['records']['train']} / {results['data']['records']['eval']} "
        f"records); eval = {results['data']['eval_examples_used']}, the same for every row. "
        f"LoRA, QPA and compound run through `qpa.training.finetune`; PEFT OFT "
        f"(`OFTConfig` {_oft_description(results)}) runs in the benchmark's own loop on the "
        f"same batches. One learning rate for every method, tuned for none of them.",
        "",
        markdown_table(headers, rows),
        "",
        "Share of LoRA r=4's loss gain = (base loss - method loss) / (base loss - LoRA r=4 "
        "loss), from the seed means (± the std of the per-seed paired shares).",
        "",
        markdown_table(claim_headers, claims),
        "",
        " ".join(_commentary(results)),
    ]
    if not results.get("complete", True):
        lines += ["", f"**Partial results:** {results['runs_done']} of {results['runs_total']} "
                  f"runs finished (the run was stopped); rows average the seeds they have."]
    if results["mode"] == "quick":
        lines += ["", f"**Quick mode is a smoke test**: {s['steps']} steps and a "
                  f"{s['eval_batches'] * s['batch_size']}-example eval set say that every "
                  "method trains and evaluates, not how good it is; the full run "
                  "(`python -m bench.bench_quality`) gives the numbers to quote."]
    spread = results["summary"]["base_agreement_max_difference"]
    if spread > 1e-4:
        lines += ["", f"**Check failed:** the runs disagree on the base loss by {spread:.2e}."]
    loop = results.get("checks", {}).get("loop_vs_finetune_lora_r4")
    if loop:
        lines += ["", "Loop check: stock PEFT LoRA r=4 in the OFT loop vs `finetune`'s LoRA r=4, "
                  "|difference of eval loss| per seed: "
                  + ", ".join(f"{seed}: {diff:.1e}" for seed, diff in loop.items()) + "."]
    lines += ["", f"![Eval loss against trainable parameters](../bench/results/{NAME}.png)",
              "", f"Raw losses: `bench/results/{NAME}.json`."]
    return "\n".join(lines)



def plot(results: dict[str, Any]) -> Path | None:
    """Eval loss (mean ± std over seeds) against trainable parameters, base as a line."""
    plt = pyplot()
    if plt is None:
        return None
    rows = results["summary"]["rows"]
    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name in METHODS:
        if name not in rows:
            continue
        row = rows[name]
        axis.errorbar([row["trainable_params"]], [row["eval_loss_mean"]],
                      yerr=[row["eval_loss_std"]], marker="o", capsize=4, label=LABELS[name])
    axis.axhline(rows["base"]["eval_loss_mean"], color="gray", linestyle="--",
                 label=LABELS["base"])
    axis.set_xscale("log")
    axis.set_xlabel("trainable parameters")
    axis.set_ylabel("held-out eval loss (mean ± std over seeds)")
    s = results["settings"]
    axis.set_title(f"SmolLM2-135M on pydoc, {s['steps']} steps, {results['mode']} mode")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.text(0.01, 0.01, machine_line(results["machine"]), fontsize=7, alpha=0.7)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    path = results_path(NAME, ".png")
    figure.savefig(path)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="8 steps, 64 tokens, 4 eval batches, seeds 0,1 (a smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="default 150 (quick 8)")
    parser.add_argument("--max-length", type=int, default=None, help="default 128 (quick 64)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 4")
    parser.add_argument("--eval-batches", type=int, default=None, help="default 20 (quick 4)")
    parser.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; "
                        "quick 0,1)")
    parser.add_argument("--lr", type=float, default=2e-3, help="the same for every method")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--oft-block-size", type=int, default=OFT_BLOCK_SIZE,
                        help="PEFT OFT block size (default PEFT's 32; 144 = compound's layout)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--skip", action="append", default=[], choices=METHODS,
                        help="leave a method out (repeatable)")
    parser.add_argument("--check-loop", action="store_true",
                        help="also run stock PEFT LoRA r=4 in the OFT loop (must match "
                             "finetune's LoRA r=4)")
    args = parser.parse_args(argv)
    _quiet()
    results = run(args)
    path = write_json(NAME, results)
    plot(results)
    headers, rows = table_rows(results)
    print()
    print_table(headers, rows)
    print()
    print_table(*claim_rows(results))
    print()
    print("\n".join(_commentary(results)))
    print(f"\nwrote {path.relative_to(REPO_ROOT)} ({results['wall_s']:.0f} s)")
    return 0


def _quiet() -> None:
    """Keep transformers' loading bars and deprecation notes out of the benchmark's output."""
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")
    logging.getLogger("qpa").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    raise SystemExit(main())
