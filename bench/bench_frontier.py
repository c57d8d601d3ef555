"""Quality frontier: held-out eval loss against trainable parameters, every method tuned alike
(issue 8's protocol, docs/BENCHMARKS.md section 4).

Every finished run is saved at once under a key holding its full config (``_key``), so a
restart skips what is done and a changed preset is run again.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import common
from bench.common import machine_line, read_json, write_json

NAME = "frontier"
SECTION = "frontier"
BASE_MODEL = "smollm2-135m"
TARGETS = ["q_proj", "v_proj"]  # every row's, and LoRA r=4's (the reference), unless a row
# names its method preset's own module set (qpa.models.TARGET_SETS; its share of LoRA r=4's
# parameters is still counted against LoRA r=4 on q/v).
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REFERENCE = "lora_r4"
QUIET = True
OPTIONS = {
    "--steps": {"type": int, "default": None, "help": "final budget (default 150)"},
    "--sweep-steps": {"type": int, "default": None, "help": "default 60"},
    "--eval-chunks": {"type": int, "default": 48},
    "--workers": {"type": int, "default": 2, "help": "runs at a time (1 thread each)"},
    "--check-loop": {"action": "store_true", "help": "also LoRA r=4 in the PEFT loop"},
    "--rows": {"help": "comma-separated subset of rows (default: all)"},
    "--variants": {"help": "JSON list of research variants ({name, method, lr, options, "
                   "targets, seed}) to run at the sweep's budget instead of the frontier; "
                   "kept in bench/results/frontier_variants.json"},
}
VARIANTS = "frontier_variants"


@dataclass(frozen=True)
class Row:
    label: str
    family: str
    config: dict[str, Any] = field(default_factory=dict)  # job config (library rows)
    peft: tuple[str, dict[str, Any]] | None = None        # (kind, PEFT config) loop rows
    of: str | None = None                                  # ablation: parent row's rate
    targets: tuple[str, ...] = tuple(TARGETS)


def _lora(r: int) -> Row:
    return Row(f"LoRA r={r}", "LoRA", {"method": "lora", "lora": {"r": r, "alpha": 2 * r}})


def _qpa(label: str, preset: str, ablation: str | None = None, *, family: str | None = None,
         of: str | None = None, targets: tuple[str, ...] = tuple(TARGETS)) -> Row:
    """A QPA row: a preset, optionally one of its ablations (which take ``of``'s rate)."""
    options = {"preset": preset, **({"ablation": ablation} if ablation else {})}
    return Row(label, family or ("QPA ablation" if ablation else "QPA"),
               {"method": "qpa", "qpa": options}, of=of, targets=targets)


ROWS: dict[str, Row] = {
    "lora_r1": _lora(1),
    "lora_r2": _lora(2),
    "lora_r4": _lora(4),
    "lora_r8": _lora(8),
    "vera_r16": Row("PEFT VeRA r=16", "VeRA", peft=("vera", {"r": 16})),
    "vera_r256": Row("PEFT VeRA r=256", "VeRA", peft=("vera", {"r": 256})),
    # The product's vera method (the same adapter trained by qpa.training) at PEFT VeRA
    # r=256's rate: the two paths side by side.
    "vera": Row("VeRA r=256 (method vera)", "VeRA", {"method": "vera"}, of="vera_r256"),
    "oft": Row("PEFT OFT (blocks of 32)", "OFT", peft=("oft", {"r": 0, "oft_block_size": 32})),
    "qpa_compact": _qpa("QPA compact", "compact"),
    "qpa_balanced": _qpa("QPA balanced", "balanced", targets=ALL_PROJECTIONS),
    "qpa_paper": _qpa("QPA paper", "paper", targets=ALL_PROJECTIONS),
    "qpa_compact_frozen": _qpa("QPA compact, angles frozen", "compact", "frozen_angles",
                               of="qpa_compact"),
    # Compact's eight circuits writing every projection instead of q/v (its 60-step research
    # run, frontier_variants.json qpa_compact_all7, gained 5 points at 4.5 % more parameters).
    "qpa_compact_all": _qpa("QPA compact, every projection", "compact",
                            family="QPA ablation", targets=ALL_PROJECTIONS),
    "qpa_compact_all_frozen": _qpa("QPA compact every projection, angles frozen", "compact",
                                   "frozen_angles", of="qpa_compact_all",
                                   targets=ALL_PROJECTIONS),
    "qpa_balanced_frozen": _qpa("QPA balanced, angles frozen", "balanced", "frozen_angles",
                                of="qpa_balanced", targets=ALL_PROJECTIONS),
    # The balanced and paper generators writing LoRA for q/v only (the presets before they
    # took every projection), and what the balanced circuit contributes there.
    "qpa_balanced_qv": _qpa("QPA balanced, q/v only", "balanced", family="QPA ablation"),
    "qpa_paper_qv": _qpa("QPA paper, q/v only", "paper", family="QPA ablation"),
    "qpa_balanced_qv_frozen": _qpa("QPA balanced q/v, angles frozen", "balanced",
                                   "frozen_angles", of="qpa_balanced_qv"),
    "qpa_balanced_qv_constant_p": _qpa("QPA balanced q/v, p constant (bits only)", "balanced",
                                       "constant_p", of="qpa_balanced_qv"),
    "qpa_balanced_qv_random_p": _qpa("QPA balanced q/v, p random (untrained)", "balanced",
                                     "random_p", of="qpa_balanced_qv"),
    "compound_compact": Row("compound compact (q k v o gate up)", "compound",
                            {"method": "compound", "compound": {"preset": "compact"}},
                            targets=ALL_PROJECTIONS[:6]),
    "compound_balanced": Row("compound balanced (every projection)", "compound",
                             {"method": "compound", "compound": {"preset": "balanced"}},
                             targets=ALL_PROJECTIONS),
    "compound_paper": Row("compound paper", "compound",
                          {"method": "compound", "compound": {"preset": "paper"}}),
}
QUICK_ROWS = ["lora_r4", "vera_r16", "oft", "qpa_compact", "qpa_compact_frozen",
              "compound_compact"]


# -- one run (in its own process) -----------------------------------------------------------


def _job_config(row: Row, lr: float, seed: int, steps: int, s: dict[str, Any],
                data: dict[str, str]) -> dict[str, Any]:
    config = json.loads(json.dumps(row.config))
    config.setdefault("lora", {})["target_modules"] = list(row.targets)
    config.update(base_model=BASE_MODEL, train_file=data["train"], eval_file=data["eval"],
                  steps=steps)
    config["train"] = {"lr": lr, "batch_size": s["batch_size"], "max_length": s["max_length"],
                       "eval_batches": s["trainer_eval_batches"], "seed": seed,
                       "schedule": s["schedule"], "warmup_steps": round(s["warmup"] * steps),
                       "checkpoint_every": 10**6, "sample_prompt": None, "device": "cpu"}
    return config


def _loop(kind: str, peft_options: dict[str, Any], config: dict[str, Any],
          output: Path) -> dict[str, Any]:
    """Stock PEFT ``kind`` trained with the trainer's batches, optimiser, schedule and clip."""
    import torch
    from peft import LoraConfig, OFTConfig, VeraConfig, get_peft_model

    from qpa.config import parse_config
    from qpa.data import StepBatches, tokenize_records
    from qpa.models import load_base_model
    from qpa.records import read_jsonl
    from qpa.training import lr_schedule, seed_everything

    job = parse_config(config)
    model, tokenizer, _ = load_base_model(BASE_MODEL, "cpu")
    train = tokenize_records(tokenizer, read_jsonl(job.train_file), job.train.max_length)
    seed_everything(job.train.seed)  # as the trainer does right before attaching
    peft_config = {"lora": LoraConfig, "vera": VeraConfig, "oft": OFTConfig}[kind](
        target_modules=job.lora.target_modules, **peft_options)
    model = get_peft_model(model, peft_config)
    batches = StepBatches(train, job.train.batch_size, job.train.seed, tokenizer.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=job.train.lr, weight_decay=job.train.weight_decay)
    scheduler = lr_schedule(optimizer, job)
    losses, started = [], time.perf_counter()
    for step in range(job.steps):
        model.train()
        loss = model(**batches(step)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, job.train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.save_pretrained(output / "adapter")
    return {"trainable_params": sum(p.numel() for p in params), "train_losses": losses,
            "train_seconds": time.perf_counter() - started, "path": f"peft {kind} loop"}


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one (row, lr, seed, steps), then evaluate its exported adapter with stock PEFT."""
    import torch

    from qpa.config import parse_config
    from qpa.training import finetune

    torch.set_num_threads(spec["threads"])
    row, config = ROWS.get(spec["row"], Row(spec["row"], "variant")), spec["config"]

    def train(output: Path) -> dict[str, Any]:
        if row.peft is not None or spec.get("loop"):
            kind, options = row.peft or ("lora", {"r": 4, "lora_alpha": 8})
            return _loop(kind, options, config, output)
        metrics = finetune(parse_config(config), output, resume=False)
        events = [json.loads(line) for line in (output / "events.jsonl").open()]
        return {
            "trainable_params": metrics["trainable_params"],
            "train_losses": [e["loss"] for e in events if e["type"] == "step"],
            "train_seconds": metrics["train_seconds"], "path": "qpa.training.finetune",
            "trainer_eval_loss": metrics["eval_loss_after"],
            "quantum": metrics.get("quantum") and {
                k: metrics["quantum"][k] for k in ("jobs", "circuits", "shots", "seconds")},
            **{key: metrics[key] for key in ("num_qubits", "circuit_angles",
                                             "mapping_mlp_params", "oft_equivalent_params")
               if key in metrics},
        }

    # The base loss is the same for every run: once per reference run.
    return common.evaluated_run(spec, train, with_base=spec["row"] == REFERENCE)


def save(results: dict[str, Any]) -> None:
    write_json(common.quick_name(NAME, results), results)


# -- scheduling -----------------------------------------------------------------------------


def _key(spec: dict[str, Any]) -> str:
    config = common.without_data(spec["config"])
    if preset := _preset_options(config):  # a changed preset is a new run
        config["preset_options"] = preset
    identity = common.digest({"row": spec["row"], "loop": spec["loop"], "config": config})
    return f"{spec['row']}|lr={spec['lr']:g}|seed={spec['seed']}|steps={spec['steps']}|{identity}"


def _preset_options(config: dict[str, Any]) -> dict[str, Any] | None:
    from qpa.methods import methods

    method = config.get("method")  # PEFT loop rows have none
    if method not in methods():
        return None
    preset = config.get(method, {}).get("preset")
    return methods()[method].options.PRESETS[preset] if preset else None


def _spec(name: str, lr: float, seed: int, steps: int, s: dict[str, Any],
          data: dict[str, str], loop: bool = False, row: Row | None = None) -> dict[str, Any]:
    """One run of row ``name`` (or of ``row``, a research variant)."""
    config = _job_config(row or ROWS[name], lr, seed, steps, s, data)
    return {"row": name, "lr": lr, "seed": seed, "steps": steps, "loop": loop,
            "config": config, "threads": s["threads"], "eval_batches": s["eval_batches"]}


def run_specs(specs: list[dict[str, Any]], results: dict[str, Any], workers: int) -> None:
    """Run what is missing, ``workers`` processes at a time; save after every finished run."""
    def record(spec: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        print(f"{_key(spec)}: eval loss {result['eval_loss']:.4f} "
              f"({result['wall_seconds']:.0f} s)", flush=True)
        return {**{k: spec[k] for k in ("row", "lr", "seed", "steps", "loop")}, **result}

    common.run_children("bench_frontier", specs, _key, results["runs"], workers, record,
                        lambda: save(results))


#: Half-decade rates above the grid a row may try when its best rate is the highest tried.
EXTEND = 2


def current_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs made with their row's current definition: a row whose config changed (a new
    preset, other modules) keeps its old runs in the file, and they count no more."""
    s, paths = results["settings"], {"train": "", "eval": ""}
    return [run for key, run in results["runs"].items() if run["row"] in ROWS and key == _key(
        _spec(run["row"], run["lr"], run["seed"], run["steps"], s, paths, run["loop"]))]


def _sweep_losses(results: dict[str, Any], name: str) -> dict[float, float]:
    s = results["settings"]
    return {run["lr"]: run["eval_loss"] for run in current_runs(results)
            if run["row"] == name and run["steps"] == s["sweep_steps"] and run["seed"] == 0
            and not run["loop"]}


def _next_rate(lr: float) -> float:
    """The next half-decade rate: 3e-2 -> 1e-1 -> 3e-1."""
    mantissa = float(f"{lr:.0e}".split("e")[0])
    return float(f"{lr * (10 / 3 if mantissa >= 3 else 3):.0e}")


def extended_rates(results: dict[str, Any], name: str) -> list[float]:
    """The rates above the grid this row must still try: the next one while the best rate
    so far is the highest tried and the extension budget is not spent."""
    grid = results["settings"]["lr_grid"]
    losses = _sweep_losses(results, name)
    if len(grid) < 2 or not all(lr in losses for lr in grid):
        return []  # a one-rate smoke grid, or the grid itself is not done
    top, best = max(losses), min(losses, key=losses.get)
    if best != top or len([lr for lr in losses if lr > max(grid)]) >= EXTEND:
        return []
    return [_next_rate(top)]


def chosen_rates(results: dict[str, Any], rows: list[str]) -> dict[str, dict[str, Any]]:
    """Per row: the sweep's losses per rate and the rate with the lowest loss."""
    out: dict[str, dict[str, Any]] = {}
    parents = [ROWS[name].of for name in rows if ROWS[name].of]
    for name in dict.fromkeys([*rows, *parents]):  # an ablation's parent, even if not asked
        if ROWS[name].of:
            continue
        losses = _sweep_losses(results, name)
        if losses:
            best = min(losses, key=losses.get)
            out[name] = {"lr": best, "losses": {f"{lr:g}": v for lr, v in sorted(losses.items())},
                         "at_edge": best in (min(losses), max(losses))}
    for name in rows:
        if ROWS[name].of and ROWS[name].of in out:
            out[name] = {"lr": out[ROWS[name].of]["lr"], "from": ROWS[name].of}
    return out


# -- summary --------------------------------------------------------------------------------


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    s = results["settings"]
    rates = results.get("rates", {})
    finals = [run for run in current_runs(results)
              if run["steps"] == s["steps"] and not run["loop"]
              and rates.get(run["row"], {}).get("lr") == run["lr"]]
    bases = [run["eval_loss_base"] for run in results["runs"].values() if "eval_loss_base" in run]
    base = statistics.fmean(bases) if bases else math.nan
    rows: dict[str, Any] = {}
    for name in ROWS:
        runs = sorted((run for run in finals if run["row"] == name), key=lambda r: r["seed"])
        if not runs:
            continue
        losses = [run["eval_loss"] for run in runs]
        rows[name] = {
            "eval_loss_mean": statistics.fmean(losses),
            "eval_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "eval_losses": {str(run["seed"]): run["eval_loss"] for run in runs},
            "seeds": len(runs),
            "trainable_params": runs[0]["trainable_params"], "lr": runs[0]["lr"],
            "seconds_per_step": statistics.median(
                run["train_seconds"] / max(len(run["train_losses"]), 1) for run in runs),
        }
    reference = rows.get(REFERENCE)
    for row in rows.values():
        if reference:
            gain = base - reference["eval_loss_mean"]
            row["share_of_reference_gain"] = (base - row["eval_loss_mean"]) / gain
            row["params_vs_reference"] = row["trainable_params"] / reference["trainable_params"]
    return {"base_eval_loss": base, "rows": rows}


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 8's targets, each judged on the measured rows."""
    rows = summary["rows"]
    ref = rows.get(REFERENCE)
    if not ref:
        return []
    qpa = {n: r for n, r in rows.items() if ROWS[n].family == "QPA"}
    out = []

    def add(target: str, met: bool | None, evidence: str) -> None:
        out.append({"target": target, "met": met, "evidence": evidence})

    bar = ref["eval_loss_mean"] + ref["eval_loss_std"]
    small = {n: r for n, r in qpa.items() if r["params_vs_reference"] <= 0.15}
    best = min(small.items(), key=lambda item: item[1]["eval_loss_mean"], default=None)
    add("QPA at <= 15 % of LoRA r=4's parameters with mean eval loss <= LoRA r=4 mean + 1 std",
        best[1]["eval_loss_mean"] <= bar if best else None,
        f"best {best[0]}: {best[1]['eval_loss_mean']:.4f} at {best[1]['params_vs_reference']:.1%}"
        f" vs {bar:.4f}" if best else "no QPA row at <= 15 %")
    beats = []
    for name, row in qpa.items():
        peers = [n for n, r in rows.items() if (n == "lora_r1" or ROWS[n].family == "VeRA")
                 and r["trainable_params"] >= row["trainable_params"]]
        if peers:
            ok = all(row["eval_loss_mean"] < rows[p]["eval_loss_mean"] for p in peers)
            beats.append((name, ok, peers))
    add("QPA beats LoRA r=1 and VeRA of equal or larger size",
        all(ok for _, ok, _ in beats) if beats else None,
        "; ".join(f"{n} vs {', '.join(p)}: {'yes' if ok else 'no'}" for n, ok, p in beats)
        or "no LoRA r=1 or VeRA row measured yet")
    pairs = []
    for name in ("qpa_compact", "qpa_compact_all", "qpa_balanced", "qpa_balanced_qv"):
        parent, frozen = rows.get(name), rows.get(f"{name}_frozen")
        if parent and frozen:
            diff = frozen["eval_loss_mean"] - parent["eval_loss_mean"]
            std = max(parent["eval_loss_std"], frozen["eval_loss_std"])
            pairs.append((name, diff > std, f"{name}: frozen - trained = {diff:+.4f}, "
                                            f"seed std {std:.4f}"))
    add("trained angles beat frozen angles by more than the seed std",
        any(ok for _, ok, _ in pairs) if pairs else None,
        "; ".join(text for _, _, text in pairs) or "no trained/frozen pair measured yet")
    tiny = {n: r for n, r in qpa.items() if r["params_vs_reference"] <= 0.02}
    best = max(tiny.items(), key=lambda item: item[1]["share_of_reference_gain"], default=None)
    add("QPA at <= 2 % of LoRA's parameters reaches >= 90 % of its gain",
        best[1]["share_of_reference_gain"] >= 0.90 if best else None,
        f"{best[0]}: {best[1]['share_of_reference_gain']:.1%} at "
        f"{best[1]['params_vs_reference']:.2%}" if best else "no QPA row at <= 2 %")
    compound = {n: r for n, r in rows.items() if ROWS[n].family == "compound"
                and r["params_vs_reference"] <= 0.023}
    best = max(compound.items(), key=lambda item: item[1]["share_of_reference_gain"],
               default=None)
    add("compound at <= 2.3 % of LoRA's parameters reaches >= 99 % of its gain",
        best[1]["share_of_reference_gain"] >= 0.99 if best else None,
        f"{best[0]}: {best[1]['share_of_reference_gain']:.1%} at "
        f"{best[1]['params_vs_reference']:.2%}" if best else "no compound row at <= 2.3 %")
    return out


# -- the benchmark ----------------------------------------------------------------------------


def settings_for(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    return {
        "steps": args.steps or (6 if quick else 150),
        "sweep_steps": args.sweep_steps or (3 if quick else 60),
        "seeds": [0] if quick else [0, 1, 2],
        "lr_grid": [1e-2] if quick else [1e-3, 3e-3, 1e-2, 3e-2],
        "batch_size": 4, "max_length": 32 if quick else 128,
        "eval_batches": 2 if quick else args.eval_chunks // 4,
        "schedule": "cosine", "warmup": 0.06, "threads": 1, "trainer_eval_batches": 1,
    }


def run_variants(args: argparse.Namespace) -> None:
    """Research runs (docs/BENCHMARKS.md quotes them by hand): each variant of ``--variants``
    (a job's method, options, targets, rate and seed) at the sweep's budget, evaluated as every
    frontier run, kept in ``frontier_variants.json`` under frontier-style keys."""
    s = settings_for(args)
    results = read_json(VARIANTS) or {"settings": s, "runs": {}}

    def record(spec: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        print(f"{spec['row']}: eval loss {result['eval_loss']:.4f}, "
              f"{result['trainable_params']:,} trainable parameters", flush=True)
        result.pop("train_losses", None)
        return {"name": spec["row"], "config": common.without_data(spec["config"]), **result}

    with common.pydoc_data() as data:
        specs = []
        for variant in json.loads(Path(args.variants).read_text()):
            method = variant["method"]
            row = Row(variant["name"], "variant", {"method": method,
                                                   method: variant.get("options", {})},
                      targets=tuple(variant.get("targets", TARGETS)))
            specs.append(_spec(row.label, variant["lr"], variant.get("seed", 0),
                               s["sweep_steps"], s, data, row=row))
        common.run_children("bench_frontier", specs, _key, results["runs"], args.workers,
                            record, lambda: write_json(VARIANTS, results))


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.variants:
        return run_variants(args)
    s = settings_for(args)
    rows = args.rows.split(",") if args.rows else (QUICK_ROWS if args.quick else list(ROWS))
    # Runs are keyed by their full config, so rows may change; the protocol may not (but a
    # wider grid keeps the runs it has).
    with (common.resumed(NAME, args.quick, s, ignore=("lr_grid",)) as results,
          common.pydoc_data() as data):
        sweep = [_spec(name, lr, 0, s["sweep_steps"], s, data) for name in rows
                 if not ROWS[name].of for lr in s["lr_grid"]]
        run_specs(sweep, results, args.workers)
        while extra := [_spec(name, lr, 0, s["sweep_steps"], s, data) for name in rows
                        if not ROWS[name].of for lr in extended_rates(results, name)]:
            run_specs(extra, results, args.workers)
        results["rates"] = {**results.get("rates", {}), **chosen_rates(results, rows)}
        final = [_spec(name, results["rates"][name]["lr"], seed, s["steps"], s, data)
                 for seed in s["seeds"] for name in rows if name in results["rates"]]
        if args.check_loop or args.quick:
            final.append(_spec(REFERENCE, results["rates"][REFERENCE]["lr"], 0, s["steps"], s,
                               data, loop=True))
        run_specs(final, results, args.workers)
    return finish(results)


def finish(results: dict[str, Any]) -> dict[str, Any]:
    # Every row with sweep runs gets its rate (from its current runs), also rows whose
    # finals are still to come.
    results["rates"] = {**results.get("rates", {}), **chosen_rates(results, list(ROWS))}
    results["summary"] = summarise(results)
    results["targets"] = targets(results["summary"])
    s = results["settings"]
    loop = [r for r in current_runs(results) if r["loop"]]
    direct = {(r["lr"], r["seed"]): r for r in current_runs(results)
              if r["row"] == REFERENCE and r["steps"] == s["steps"] and not r["loop"]}
    results["checks"] = {"loop_vs_finetune": [
        abs(r["eval_loss"] - direct[(r["lr"], r["seed"])]["eval_loss"]) for r in loop
        if (r["lr"], r["seed"]) in direct]}
    save(results)
    _plot(results)
    return results


# -- reporting --------------------------------------------------------------------------------


def render_markdown(results: dict[str, Any]) -> str:
    s, summary = results["settings"], results["summary"]
    rows = [["base model", "0", "0", "-", "-", f"{summary['base_eval_loss']:.4f}", "0", "-"]]
    for name, row in sorted(summary["rows"].items(),
                            key=lambda item: (ROWS[item[0]].family, item[1]["trainable_params"])):
        rows.append([
            ROWS[name].label, f"{row['trainable_params']:,}",
            f"{row.get('params_vs_reference', math.nan):.2%}", f"{row['lr']:g}",
            str(row.get("seeds", len(row["eval_losses"]))),
            f"{row['eval_loss_mean']:.4f} ± {row['eval_loss_std']:.4f}",
            f"{row.get('share_of_reference_gain', math.nan):.1%}",
            f"{row['seconds_per_step']:.2f}"])
    rates = results.get("rates", {})
    tried = sorted({float(lr) for info in rates.values() for lr in info.get("losses", {})}
                   | set(s["lr_grid"]))
    sweep = [[ROWS[name].label, *[f"{info['losses'][f'{lr:g}']:.4f}" if f"{lr:g}" in
                                  info["losses"] else "-" for lr in tried], f"{info['lr']:g}"]
             for name, info in rates.items() if "losses" in info]
    verdicts = [[t["target"], {True: "met", False: "not met", None: "not measured"}[t["met"]],
                 t["evidence"]] for t in results.get("targets", [])]
    return common.markdown(
        f"{results['mode'].capitalize()} mode, measured on {machine_line(results['machine'])};"
        f" {s['threads']} thread per run, {len(results['runs'])} runs, "
        f"{sum(r['wall_seconds'] for r in results['runs'].values()) / 3600:.1f} run-hours; "
        f"{s['steps']} steps of batch {s['batch_size']} x {s['max_length']} tokens, seeds "
        f"{', '.join(map(str, s['seeds']))}; sweep {s['sweep_steps']} steps, seed 0; "
        f"{s['eval_batches'] * s['batch_size']} held-out chunks.",
        (["row", "trainable params", "% of LoRA r=4", "lr", "seeds", "eval loss (mean ± std)",
          "share of LoRA r=4's gain", "s / step"], rows),
        (["row", *[f"lr {lr:g}" for lr in tried], "chosen"], sweep),
        (["target (issue 8)", "verdict", "measured"], verdicts),
        plot=("Held-out loss against trainable parameters", NAME))


def _plot(results: dict[str, Any]) -> None:
    summary = results["summary"]
    families: dict[str, list[tuple[int, float, float, str]]] = {}
    for name, row in summary["rows"].items():
        families.setdefault(ROWS[name].family, []).append(
            (row["trainable_params"], row["eval_loss_mean"], row["eval_loss_std"],
             ROWS[name].label))

    def draw(axis: Any) -> None:
        for family, points in sorted(families.items()):
            xs, ys, errs, labels = zip(*sorted(points), strict=True)
            axis.errorbar(xs, ys, yerr=errs, fmt="o" if "ablation" in family else "o-",
                          capsize=3, label=family)
            if "ablation" in family:
                for x, y, label in zip(xs, ys, labels, strict=True):
                    axis.annotate(label.split(", ")[-1], (x, y), fontsize=6, alpha=0.7)
        axis.axhline(summary["base_eval_loss"], color="gray", linestyle="--", label="base model")
        axis.set(xscale="log", xlabel="trainable parameters",
                 ylabel="held-out eval loss (mean ± std over seeds)",
                 title=f"SmolLM2-135M on held-out pydoc topics, {results['settings']['steps']} "
                       f"steps ({results['mode']} mode)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)

    common.save_plot(common.quick_name(NAME, results), results["machine"], draw, size=(8, 5))


if __name__ == "__main__":
    raise SystemExit(common.main(sys.modules[__name__]))
