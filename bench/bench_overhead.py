"""QPA overhead: training-step time and peak memory of ``method: qpa`` against PEFT LoRA.

Workload (issue 5, part 4): SmolLM2-135M-Instruct, LoRA rank 4 on ``q_proj``/``v_proj``,
sequences of exactly ``--seq-len`` (128) real tokens cut from Python's reference
documentation, one timed step = forward + backward + gradient clipping + AdamW step, as in
``qpa.training.Trainer``. Variants, each on its own freshly loaded copy of the base model:

* ``peft_lora``: stock PEFT, ``peft.get_peft_model(model, LoraConfig(...))`` with no qpa
  code at all: the true peer;
* ``lora``: the library's ``method: lora`` (``qpa.methods.method_class("lora")``);
* ``qpa_u1``: the library's ``method: qpa`` on the ``statevector`` backend, exact joint
  training (``qpa.update_every: 1``): every step evaluates the circuit and its gradient,
  runs the mapping MLP, writes the LoRA weights through the parametrisations and pulls
  the gradient back into the angles;
* ``qpa_u4``: the same with ``qpa.update_every: 4`` (one circuit evaluation per 4 steps).

Timing is interleaved: after discarded warm-up steps, every round runs one block of
``--block-steps`` consecutive steps of each variant, in a shuffled order, so background
load on a shared machine hits all variants alike. Any 4 consecutive steps hold exactly one
circuit window of ``qpa_u4``, so a block's mean is its amortised per-step cost. The
headline ratio is the median over rounds of the *paired* ratio (QPA's block mean / LoRA's
block mean in the same round), which cancels slow drifts of the machine's load.

Each step is also split into phases (QPA's pre-forward hook, forward, backward, QPA's
post-backward hook, clipping + optimiser), the generator's own cycle is timed in
isolation (many repeats: precise where the full-step difference drowns in noise), and
``torch.profiler`` attributes one warm step of each method to operators (always, unless
``--no-profile`` and the ratio meets the target).

Peak memory is measured per variant in a separate subprocess so peaks never mix: resident
set size on CPU (the peak is reset after the model is loaded, through
``/proc/self/clear_refs``, so the loader's transient copy does not count as training
memory), ``torch.cuda.max_memory_allocated`` on GPU.

    python -m bench.bench_overhead            # full: batch 4, 6 timed rounds of 4 steps
    python -m bench.bench_overhead --quick    # batch 2, 2 timed rounds (a smoke test)

Threads default to 1 on CPU: on a shared machine two intra-op threads fighting other
processes for two cores made a step 5-7x slower and erratic; ``--threads`` changes it and
the value is recorded.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.common import (
    REPO_ROOT,
    format_ratio,
    machine_facts,
    machine_line,
    markdown_table,
    print_table,
    pyplot,
    quiet_transformers,
    results_path,
    thread_env,
    write_json,
)

NAME = "overhead"
SECTION = "overhead"
TARGET_RATIO = 1.05
BASE_MODEL = "smollm2-135m"
TARGETS = ["q_proj", "v_proj"]
RANK = 4
ALPHA = 8.0
LR = 2e-3
GRAD_CLIP = 1.0  # the trainer's default; applied to every variant alike

VARIANTS = ("peft_lora", "lora", "qpa_u1", "qpa_u4")
LABELS = {
    "peft_lora": "stock PEFT LoRA (no qpa code)",
    "lora": "qpa method: lora",
    "qpa_u1": "qpa method: qpa, update_every 1",
    "qpa_u4": "qpa method: qpa, update_every 4",
}
PHASES = ("hook_before", "forward", "backward", "hook_after", "optimizer")


# -- building the variants ------------------------------------------------------------------


@dataclass
class Variant:
    """One model + optimiser + the hooks the trainer would call around a step."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]
    before_forward: Callable[[int], None] = lambda step: None
    before_optimizer_step: Callable[[int], None] = lambda step: None
    method: Any = None
    trainable: int = 0
    step: int = 0
    first_loss: float | None = None
    losses: list[float] = field(default_factory=list)


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def model_path() -> str:
    """The cached Hugging Face directory of the base model (converted from GGUF once)."""
    from qpa.models import resolve_model_path

    return resolve_model_path(BASE_MODEL)


def load_plain_model(device: torch.device) -> nn.Module:
    """The base model through transformers alone, as a PEFT user would load it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_path(), dtype=torch.float32, local_files_only=True
    )
    return model.to(device)


def build_variant(name: str, device: torch.device, seed: int = 0) -> Variant:
    """Build one variant on its own freshly loaded base model."""
    model = load_plain_model(device)
    # Same seed before each attach: PEFT draws LoRA A from the global RNG, so peft_lora and
    # lora start from identical weights (and every variant equals the base model at step 0).
    torch.manual_seed(seed)
    if name == "peft_lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                            bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
        return Variant(name, model, optimizer, params, trainable=sum(p.numel() for p in params))

    from qpa.config import parse_config
    from qpa.methods import method_class

    method_name = "lora" if name == "lora" else "qpa"
    update_every = 4 if name == "qpa_u4" else 1
    config = parse_config({
        "base_model": BASE_MODEL, "method": method_name, "backend": "statevector",
        "train_file": "unused.jsonl", "steps": 10**6,
        "lora": {"r": RANK, "alpha": ALPHA, "target_modules": TARGETS},
        "qpa": {"update_every": update_every},
        "train": {"lr": LR, "grad_clip": GRAD_CLIP, "weight_decay": 0.0},
    })
    method = method_class(method_name)(config, TARGETS)
    model = method.attach(model)
    model.to(device)
    optimizer = torch.optim.AdamW(method.param_groups(LR), lr=LR, weight_decay=0.0)
    params = method.trainable_parameters()
    return Variant(
        name, model, optimizer, params,
        before_forward=method.before_forward,
        # last_step=False always: the benchmark never ends a job, so every window pushes.
        before_optimizer_step=lambda step: method.before_optimizer_step(step, last_step=False),
        method=method,
        trainable=int(method.parameter_report()["trainable_params"]),
    )


def make_batches(count: int, batch_size: int, seq_len: int,
                 device: torch.device) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of exactly ``seq_len`` real tokens (training topics of pydoc)."""
    from transformers import AutoTokenizer

    from qpa.datasets import pydoc_split

    tokenizer = AutoTokenizer.from_pretrained(model_path(), local_files_only=True)
    needed = count * batch_size * seq_len
    ids: list[int] = []
    for record in pydoc_split()[0]:
        ids += tokenizer(record["text"], add_special_tokens=False)["input_ids"]
        if len(ids) >= needed:
            break
    if len(ids) < needed:
        raise RuntimeError(f"the corpus has {len(ids)} tokens; {needed} needed")
    tokens = torch.tensor(ids[:needed]).view(count, batch_size, seq_len)
    return [{"input_ids": t.to(device), "labels": t.to(device),
             "attention_mask": torch.ones_like(t, device=device)} for t in tokens]


# -- one training step, split into phases ---------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(variant: Variant, batch: dict[str, torch.Tensor],
               device: torch.device) -> dict[str, float]:
    """One step exactly as the trainer takes it; returns seconds per phase."""
    marks = [time.perf_counter()]

    def mark() -> None:
        _sync(device)
        marks.append(time.perf_counter())

    step = variant.step
    variant.model.train()
    variant.before_forward(step)
    mark()
    loss = variant.model(**batch).loss
    mark()
    loss.backward()
    mark()
    variant.before_optimizer_step(step)
    mark()
    torch.nn.utils.clip_grad_norm_(variant.params, GRAD_CLIP)
    variant.optimizer.step()
    variant.optimizer.zero_grad(set_to_none=True)
    mark()
    value = float(loss.detach())
    if variant.first_loss is None:
        variant.first_loss = value
    variant.losses.append(value)
    variant.step += 1
    phases = {name: marks[i + 1] - marks[i] for i, name in enumerate(PHASES)}
    phases["total"] = marks[-1] - marks[0]
    return phases


# -- the generator alone -------------------------------------------------------------------


def generator_cycle(num_values: int, device: torch.device, repeats: int) -> dict[str, Any]:
    """Median ms of QPA's extra work per step, isolated from the 135M-parameter model.

    refresh = circuit probabilities with autograd; forward = mapping MLP over every chunk;
    backward = dL/d(values) -> MLP weights and dL/dp; push = dL/dp -> angles through the
    circuit. Same sizes as the ``qpa`` variant (generated values = LoRA r=4 on q/v).
    """
    from qpa.backends.factory import make_backend
    from qpa.config import QuantumOptions
    from qpa.generator import QPAGenerator
    from qpa.methods.qpa.options import QpaOptions

    options = QpaOptions()  # the defaults the qpa variants run with
    generator = QPAGenerator(num_values, chunk_size=options.chunk_size, depth=options.depth,
                             ansatz=options.ansatz, mlp_hidden=options.mlp_hidden,
                             sub_generators=options.sub_generators).to(device)
    backend = make_backend("statevector", generator.circuit, QuantumOptions(),
                           device=str(device))
    generator.attach_backend(backend)
    upstream = torch.randn(num_values, device=device)
    parts = ("refresh", "forward", "backward", "push")
    raw: dict[str, list[float]] = {part: [] for part in parts}
    for _ in range(repeats + 3):
        marks = [time.perf_counter()]
        generator.refresh(with_gradient=True)
        _sync(device)
        marks.append(time.perf_counter())
        values = generator()
        _sync(device)
        marks.append(time.perf_counter())
        values.backward(upstream)
        _sync(device)
        marks.append(time.perf_counter())
        generator.push_angle_gradient()
        _sync(device)
        marks.append(time.perf_counter())
        generator.zero_grad(set_to_none=True)
        for i, part in enumerate(parts):
            raw[part].append((marks[i + 1] - marks[i]) * 1e3)
    raw = {part: values[3:] for part, values in raw.items()}  # 3 warm-up cycles
    medians = {part: statistics.median(values) for part, values in raw.items()}
    return {"num_values": num_values, "num_qubits": generator.num_qubits,
            "median_ms": medians, "total_median_ms": sum(medians.values()), "raw_ms": raw}


# -- profile -------------------------------------------------------------------------------


def profile_steps(variants: dict[str, Variant], batches: list[dict[str, torch.Tensor]],
                  device: torch.device, num_values: int, top: int = 15) -> dict[str, Any]:
    """Operator-level self time of one step of lora and qpa_u1, and where they differ.

    Runs after the timed rounds, so both variants are warm (a cold first step spends
    most of its extra time on first-touch page faults of fresh allocations).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    tables: dict[str, dict[str, dict[str, float]]] = {}
    for name in ("lora", "qpa_u1"):
        variant = variants[name]
        with profile(activities=activities, record_shapes=True) as prof:
            train_step(variant, batches[variant.step % len(batches)], device)
        ops: dict[str, dict[str, float]] = {}
        # Grouped by input shape: "fill_ of [230400]" says which tensor, not just which op.
        for event in prof.key_averages(group_by_input_shape=True):
            shapes = str(event.input_shapes)[:80] if event.input_shapes else ""
            ops[f"{event.key} {shapes}".strip()] = {"calls": event.count,
                              "self_cpu_ms": event.self_cpu_time_total / 1e3,
                              "cpu_total_ms": event.cpu_time_total / 1e3}
        tables[name] = ops

    def ranked(ops: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
        rows = sorted(ops.items(), key=lambda kv: -kv[1]["self_cpu_ms"])[:top]
        return [{"op": key, **value} for key, value in rows]

    # A plain difference of self times is dominated by noise in the model's own matmuls
    # (one step each, on a shared machine). Attribute by *structure* instead: for each
    # (operator, input shapes), the calls one method makes beyond the other's, at that
    # method's mean time per call. Same calls on both sides cancel exactly.
    names = set(tables["lora"]) | set(tables["qpa_u1"])
    extra, saved = [], []
    empty = {"self_cpu_ms": 0.0, "calls": 0}
    for key in names:
        lora, qpa = tables["lora"].get(key, empty), tables["qpa_u1"].get(key, empty)
        if qpa["calls"] > lora["calls"]:
            extra.append({"op": key, "calls_lora": lora["calls"], "calls_qpa": qpa["calls"],
                          "ms": qpa["self_cpu_ms"] * (qpa["calls"] - lora["calls"])
                          / qpa["calls"]})
        elif lora["calls"] > qpa["calls"]:
            saved.append({"op": key, "calls_lora": lora["calls"], "calls_qpa": qpa["calls"],
                          "ms": lora["self_cpu_ms"] * (lora["calls"] - qpa["calls"])
                          / lora["calls"]})
    extra.sort(key=lambda row: -row["ms"])
    saved.sort(key=lambda row: -row["ms"])
    totals = {name: sum(op["self_cpu_ms"] for op in ops.values())
              for name, ops in tables.items()}
    # Ops on tensors as long as the whole generated vector. This was the largest overhead
    # while each LoRA weight sliced that vector (one zero-filled full-length gradient buffer
    # per weight); QPAMethod now splits it once per step, and this line tracks the remainder.
    full_vector = [{"op": key, **value} for key, value in tables["qpa_u1"].items()
                   if f"[[{num_values}]" in key]
    return {"top_lora": ranked(tables["lora"]), "top_qpa_u1": ranked(tables["qpa_u1"]),
            "qpa_extra_calls": extra[:top], "qpa_extra_ms": sum(row["ms"] for row in extra),
            "lora_extra_calls": saved[:top], "lora_extra_ms": sum(row["ms"] for row in saved),
            "total_self_cpu_ms": totals,
            "full_vector_ops": full_vector,
            "full_vector_ops_ms": sum(op["self_cpu_ms"] for op in full_vector)}


# -- memory, one subprocess per variant ----------------------------------------------------


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark (Linux: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_child(name: str, batch_size: int, seq_len: int, steps: int, device_name: str,
                 threads: int) -> dict[str, Any]:
    """Runs inside the subprocess: load, attach, train ``steps`` steps, report peaks."""
    torch.set_num_threads(threads)
    device = pick_device(device_name)
    batches = make_batches(steps, batch_size, seq_len, device)
    variant = build_variant(name, device)
    # transformers may map the safetensors file lazily: read every weight once so the pages
    # count in the baseline, not as "training memory" on the first forward.
    with torch.no_grad():
        for tensor in (*variant.model.parameters(), *variant.model.buffers()):
            tensor.sum()
    gc.collect()
    out: dict[str, Any] = {"variant": name, "steps": steps}
    out["rss_after_load_mib"] = (_status_kib("VmRSS") or 0) / 1024
    out["peak_rss_loading_mib"] = (_status_kib("VmHWM") or 0) / 1024  # loader's transient
    out["peak_reset"] = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["cuda_allocated_after_load_mib"] = torch.cuda.memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(steps):
        train_step(variant, batches[step], device)
    if variant.method is not None:
        variant.method.close()
    hwm = _status_kib("VmHWM")
    out["peak_rss_training_mib"] = hwm / 1024 if (hwm and out["peak_reset"]) else None
    if not out["peak_reset"]:
        # Without clear_refs, fall back to the whole process's peak (loader included).
        # (ru_maxrss of a forked child can also inherit the parent's peak: last resort only.)
        out["peak_rss_process_mib"] = (hwm or resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss) / 1024
    if out["peak_rss_training_mib"] is not None:
        out["training_increment_mib"] = out["peak_rss_training_mib"] - out["rss_after_load_mib"]
    if device.type == "cuda":
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["training_increment_mib"] = (out["cuda_peak_allocated_mib"]
                                         - out["cuda_allocated_after_load_mib"])
    return out


def measure_memory(names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """One fresh interpreter per variant, run one after another (never concurrently)."""
    results: dict[str, Any] = {}
    for name in names:
        command = [sys.executable, "-m", "bench.bench_overhead", "--memory-child", name,
                   "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                   "--memory-steps", str(args.memory_steps), "--device", args.device,
                   "--threads", str(args.threads)]
        print(f"memory: {name} ...", flush=True)
        done = subprocess.run(command, cwd=REPO_ROOT, env=thread_env(args.threads),
                              capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            results[name] = {"error": done.stderr.strip().splitlines()[-5:]}
            continue
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


# -- the interleaved timing ----------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise(raw: dict[str, list[dict[str, Any]]], block_steps: int) -> dict[str, Any]:
    """Per-variant medians (block means and single steps, per phase) and paired ratios."""
    summary: dict[str, Any] = {}
    for name, blocks in raw.items():
        block_means = [block["total_s"] / block_steps for block in blocks]
        steps = [step for block in blocks for step in block["steps"]]
        summary[name] = {
            "step_s_median_of_block_means": _median(block_means),
            "step_s_min": min(block_means) if block_means else None,
            "step_s_max": max(block_means) if block_means else None,
            "step_s_median_single": _median([s["total"] for s in steps]),
            "phase_s_median": {p: _median([s[p] for s in steps]) for p in PHASES},
            "phase_s_mean": {p: statistics.fmean([s[p] for s in steps]) for p in PHASES},
            "blocks": len(blocks),
            "steps": len(steps),
        }
    ratios: dict[str, Any] = {}
    for name, reference in (("qpa_u1", "lora"), ("qpa_u4", "lora"), ("lora", "peft_lora"),
                            ("qpa_u1", "peft_lora"), ("qpa_u4", "peft_lora")):
        if name not in raw or reference not in raw:
            continue
        paired = [a["total_s"] / b["total_s"]
                  for a, b in zip(raw[name], raw[reference], strict=True)]
        ratios[f"{name}/{reference}"] = {
            "paired_median": _median(paired),
            "of_medians": summary[name]["step_s_median_of_block_means"]
            / summary[reference]["step_s_median_of_block_means"],
            "paired": paired,
        }
    return {"variants": summary, "ratios": ratios}


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    facts = machine_facts()
    names = [name for name in VARIANTS if name not in args.skip]
    batches = make_batches(8, args.batch_size, args.seq_len, device)
    print(f"building {len(names)} variants on {device} ...", flush=True)
    variants = {name: build_variant(name, device) for name in names}
    # Warm-up steps (first-touch allocations, lazy init) are taken and thrown away. Any
    # block_steps consecutive steps of qpa_u4 hold exactly one circuit window whatever the
    # offset, so the warm-up need not be a multiple of 4.
    warmup: dict[str, list[float]] = {}
    for name in names:
        warmup[name] = [train_step(variants[name], batches[variants[name].step % len(batches)],
                                   device)["total"] for _ in range(args.warmup_steps)]
    print(f"warm-up ({args.warmup_steps} step(s) each): "
          + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in warmup.items() if t), flush=True)

    raw: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    order = list(names)
    for round_index in range(args.rounds):
        random.Random(round_index).shuffle(order)  # no variant always goes first
        for name in order:
            variant = variants[name]
            steps = []
            for _ in range(args.block_steps):
                steps.append(train_step(variant, batches[variant.step % len(batches)], device))
            raw[name].append({"round": round_index, "order": list(order),
                              "first_step": variant.step - args.block_steps,
                              "total_s": sum(s["total"] for s in steps), "steps": steps})
        last = {n: f"{raw[n][-1]['total_s'] / args.block_steps:.2f}s" for n in order}
        print(f"round {round_index + 1}/{args.rounds}: {last}", flush=True)

    summary = summarise(raw, args.block_steps)
    first_losses = {name: v.first_loss for name, v in variants.items()}
    spread = max(first_losses.values()) - min(first_losses.values())
    checks = {
        "first_loss": first_losses,
        # At step 0 every adapter is the identity: the same batch must give the same loss.
        "first_loss_max_difference": spread,
        "same_function_at_step_0": spread < 1e-4,
    }
    trainable = {name: v.trainable for name, v in variants.items()}
    tensors = {name: len(v.params) for name, v in variants.items()}
    quantum = {name: v.method.quantum_report() for name, v in variants.items()
               if v.method is not None and v.method.quantum_report() is not None}
    qpa = next((v for v in variants.values() if v.name.startswith("qpa")), None)
    num_values = qpa.method.generator.num_values if qpa is not None else None

    worst = max((summary["ratios"][key]["paired_median"]
                 for key in ("qpa_u1/lora", "qpa_u4/lora") if key in summary["ratios"]),
                default=float("nan"))
    profile = None
    if {"lora", "qpa_u1"} <= set(names) and (worst > TARGET_RATIO or not args.no_profile):
        print("profiling one step of lora and qpa_u1 ...", flush=True)
        profile = profile_steps(variants, batches, device,
                                variants["qpa_u1"].method.generator.num_values)
    for variant in variants.values():
        if variant.method is not None:
            variant.method.close()
    del variants
    gc.collect()

    generator = None
    if num_values is not None:
        print("generator cycle alone ...", flush=True)
        generator = generator_cycle(num_values, device, args.generator_repeats)
    memory = None if args.no_memory else measure_memory(names, args)
    return {
        "name": NAME,
        "mode": "quick" if args.quick else "full",
        "machine": facts,
        "device": str(device),
        "settings": {
            "base_model": BASE_MODEL, "target_modules": TARGETS, "rank": RANK, "alpha": ALPHA,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": LR,
            "grad_clip": GRAD_CLIP, "optimizer": "AdamW", "threads": args.threads,
            "rounds": args.rounds, "warmup_steps": args.warmup_steps,
            "block_steps": args.block_steps, "backend": "statevector",
            "qpa_options": _qpa_defaults(),
            "memory_steps": args.memory_steps, "target_ratio": TARGET_RATIO,
            "timed_step": "forward + backward + clip_grad_norm + AdamW step + zero_grad, "
                          "with the method's before_forward/before_optimizer_step hooks",
        },
        "trainable_params": trainable,
        "trainable_tensors": tensors,
        "checks": checks,
        "timing": summary,
        "raw": raw,
        "warmup_s": warmup,
        "generator_cycle": generator,
        "profile": profile,
        "memory": memory,
        "quantum_usage": quantum,
        "wall_s": time.perf_counter() - started,
    }


def _qpa_defaults() -> dict[str, Any]:
    from qpa.methods.qpa.options import QpaOptions

    return QpaOptions().model_dump(exclude={"update_every"})


# -- reporting -----------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.0f} ms"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} MiB"


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    timing = results["timing"]
    memory = results.get("memory") or {}
    headers = ["variant", "trainable params", "step (median)", "min-max", "vs LoRA (paired)",
               "vs stock PEFT (paired)", "QPA hooks", "peak RSS", "training increment"]
    rows = []
    for name in VARIANTS:
        if name not in timing["variants"]:
            continue
        entry = timing["variants"][name]
        ratio_lora = timing["ratios"].get(f"{name}/lora", {}).get("paired_median")
        ratio_peft = timing["ratios"].get(f"{name}/peft_lora", {}).get("paired_median")
        hooks = entry["phase_s_mean"]["hook_before"] + entry["phase_s_mean"]["hook_after"]
        mem = memory.get(name, {})
        peak = mem.get("cuda_peak_allocated_mib") or mem.get("peak_rss_training_mib") \
            or mem.get("peak_rss_process_mib")
        rows.append([
            LABELS[name], f"{results['trainable_params'][name]:,}",
            _ms(entry["step_s_median_of_block_means"]),
            f"{_ms(entry['step_s_min'])} - {_ms(entry['step_s_max'])}",
            "1 (reference)" if name == "lora" else format_ratio(ratio_lora),
            "1 (reference)" if name == "peft_lora" else format_ratio(ratio_peft),
            f"{hooks * 1e3:.1f} ms" if name.startswith("qpa") else "-",
            _mib(peak), _mib(mem.get("training_increment_mib")),
        ])
    return headers, rows


def _verdict(results: dict[str, Any]) -> list[str]:
    """Two to four sentences computed from the numbers (nothing hard-coded)."""
    ratios = results["timing"]["ratios"]
    variants = results["timing"]["variants"]
    sentences = []
    if "qpa_u1/lora" in ratios:
        r1 = ratios["qpa_u1/lora"]["paired_median"]
        text = (f"With a circuit evaluation every step, a QPA training step costs "
                f"{r1:.3f}x a LoRA step (median of paired rounds), ")
        text += ("within the 1.05x target." if r1 <= TARGET_RATIO else
                 f"**above the {TARGET_RATIO}x target**.")
        if "qpa_u4/lora" in ratios:
            text += (f" With `update_every: 4` the ratio is "
                     f"{ratios['qpa_u4/lora']['paired_median']:.3f}x.")
        sentences.append(text)
    gen = results.get("generator_cycle")
    if gen and "lora" in variants and "qpa_u1/lora" in ratios:
        share = gen["total_median_ms"] / (variants["lora"]["step_s_median_of_block_means"] * 1e3)
        parts = gen["median_ms"]
        paired = ratios["qpa_u1/lora"]["paired"]
        sentences.append(
            f"Measured alone, the generator's work per step (circuit of {gen['num_qubits']} "
            f"qubits with its gradient {parts['refresh'] + parts['push']:.1f} ms, mapping MLP "
            f"forward and backward {parts['forward'] + parts['backward']:.1f} ms) is "
            f"{gen['total_median_ms']:.1f} ms, {share:.1%} of a LoRA step here, while the "
            f"paired full-step ratios ranged {min(paired):.3f}-{max(paired):.3f} over "
            f"{len(paired)} rounds: that spread is the machine's noise at this sample size.")
    profile = results.get("profile")
    if profile and "lora" in variants:
        # Noise-robust estimate: only the operator calls that differ between the two steps.
        net = profile["qpa_extra_ms"] - profile["lora_extra_ms"]
        lora_ms = variants["lora"]["step_s_median_of_block_means"] * 1e3
        sentences.append(
            f"Counting only the operator calls that differ between the two steps (profile "
            f"below), QPA adds {profile['qpa_extra_ms']:.0f} ms and saves "
            f"{profile['lora_extra_ms']:.0f} ms of LoRA's optimiser work: net {net:+.0f} ms, "
            f"an expected ratio of {1 + net / lora_ms:.3f}x at this step size.")
    if "lora/peft_lora" in ratios:
        r = ratios["lora/peft_lora"]["paired_median"]
        sentences.append(f"The library's LoRA variant ran at {r:.3f}x stock PEFT's step time; "
                         f"both are the same PEFT layers, so this is the noise floor of the "
                         f"comparison.")
    memory = results.get("memory") or {}
    if memory.get("qpa_u1", {}).get("training_increment_mib") is not None and \
            memory.get("lora", {}).get("training_increment_mib") is not None:
        delta = (memory["qpa_u1"]["training_increment_mib"]
                 - memory["lora"]["training_increment_mib"])
        sentences.append(f"Training memory above the loaded model differs by {delta:+,.0f} MiB "
                         f"(QPA - LoRA).")
    return sentences


def render_markdown(results: dict[str, Any]) -> str:
    """The docs/BENCHMARKS.md section: caption, table, and commentary from the numbers."""
    settings = results["settings"]
    headers, rows = table_rows(results)
    lines = [
        f"Measured {results['machine']['date'][:16].replace('T', ' ')} UTC "
        f"({results['mode']} mode) on {results['device']}: {machine_line(results['machine'])}; "
        f"{settings['threads']} torch thread(s), load average at start "
        f"{results['machine'].get('load_average_at_start')}. SmolLM2-135M-Instruct, LoRA "
        f"r={settings['rank']} on {'/'.join(settings['target_modules'])}, batch "
        f"{settings['batch_size']} x {settings['seq_len']} tokens, AdamW, grad clip "
        f"{settings['grad_clip']}. One step = forward + backward + clip + optimiser step. "
        f"{settings['rounds']} interleaved rounds of {settings['block_steps']} steps per "
        f"variant after {settings['warmup_steps']} warm-up step(s); peak memory from one "
        f"subprocess per variant ({settings['memory_steps']} steps).",
        "",
        markdown_table(headers, rows),
        "",
        " ".join(_verdict(results)),
    ]
    if results["mode"] == "quick":
        lines += ["", "Quick mode is a smoke test: too few steps to resolve a few percent on "
                  "a shared machine; run `python -m bench.bench_overhead` for the full numbers."]
    if not results["checks"]["same_function_at_step_0"]:
        lines += ["", "**Check failed:** the variants disagree on the first loss "
                  f"({results['checks']['first_loss']})."]
    profile = results.get("profile")
    if profile:
        extra = ", ".join(f"`{row['op']}` {row['ms']:.1f} ms ({row['calls_qpa']} vs "
                          f"{row['calls_lora']} calls)" for row in profile["qpa_extra_calls"][:5])
        tensors = results.get("trainable_tensors", {})
        lines += ["", f"Profile of one warm step each (torch.profiler, self CPU time of the "
                  f"operator calls one method makes beyond the other's): QPA's extra calls "
                  f"take {profile['qpa_extra_ms']:.1f} ms, largest {extra}; LoRA's extra "
                  f"calls (chiefly clipping and AdamW over {tensors.get('lora', '?')} LoRA "
                  f"tensors instead of the generator's {tensors.get('qpa_u1', '?')}) take "
                  f"{profile['lora_extra_ms']:.1f} ms. Of QPA's step, "
                  f"{profile['full_vector_ops_ms']:.1f} ms go to operations on full-length "
                  f"tensors (the generator's output and its gradient, split once per step "
                  f"into the adapted weights)."]
    lines += ["", f"![QPA overhead](../bench/results/{NAME}.png)", "",
              f"Raw timings: `bench/results/{NAME}.json`."]
    return "\n".join(lines)



def plot(results: dict[str, Any]) -> Path | None:
    """Stacked per-phase step time of every variant, and peak memory beside it."""
    plt = pyplot()
    if plt is None:
        return None
    timing = results["timing"]["variants"]
    names = [n for n in VARIANTS if n in timing]
    memory = results.get("memory") or {}
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110,
                                         gridspec_kw={"width_ratios": [3, 2]})
    bottom = [0.0] * len(names)
    for phase in PHASES:
        heights = [timing[n]["phase_s_mean"][phase] * 1e3 for n in names]
        left.bar(names, heights, bottom=bottom, label=phase)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    left.set_ylabel("ms per step (mean over timed steps)")
    left.set_title("training step by phase")
    left.legend(fontsize=8)
    peaks = [memory.get(n, {}).get("cuda_peak_allocated_mib",
                                   memory.get(n, {}).get("peak_rss_training_mib")) or 0.0
             for n in names]
    right.bar(names, peaks, color="tab:gray")
    right.set_ylabel("MiB")
    right.set_title("peak memory while training")
    for axis in (left, right):
        axis.tick_params(axis="x", labelrotation=20, labelsize=8)
    figure.text(0.01, 0.01, machine_line(results["machine"]), fontsize=7, alpha=0.7)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    path = results_path(NAME, ".png")
    figure.savefig(path)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="batch 2, 2 timed rounds, 2 memory steps (a smoke test)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 4 (quick: 2)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 6; "
                        "quick 2)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="discarded steps per variant before timing (default 2; quick 1)")
    parser.add_argument("--block-steps", type=int, default=4,
                        help="consecutive steps per variant per round (4 = one qpa_u4 window)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: stable on a shared machine)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--memory-steps", type=int, default=None, help="default 3 (quick 2)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--no-profile", action="store_true",
                        help="profile only when the ratio misses the target")
    parser.add_argument("--generator-repeats", type=int, default=30)
    parser.add_argument("--skip", action="append", default=[], choices=VARIANTS)
    parser.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 2 if args.quick else 4
    if args.rounds is None:
        args.rounds = 2 if args.quick else 6
    if args.warmup_steps is None:
        args.warmup_steps = 1 if args.quick else 2
    if args.memory_steps is None:
        args.memory_steps = 2 if args.quick else 3
    _quiet()
    if args.memory_child:
        result = memory_child(args.memory_child, args.batch_size, args.seq_len,
                              args.memory_steps, args.device, args.threads)
        print(json.dumps(result))
        return 0
    results = run(args)
    path = write_json(NAME, results)
    plot(results)
    headers, rows = table_rows(results)
    print()
    print_table(headers, rows)
    print()
    print("\n".join(_verdict(results)))
    print(f"\nwrote {path.relative_to(REPO_ROOT)} ({results['wall_s']:.0f} s)")
    return 0


def _quiet() -> None:
    """Keep transformers' loading bars and deprecation notes out of the benchmark's output."""
    quiet_transformers()

if __name__ == "__main__":
    raise SystemExit(main())
