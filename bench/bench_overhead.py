"""QPA overhead: training-step time and peak memory of ``method: qpa`` against PEFT LoRA
(stock PEFT, ``method: lora``, ``method: qpa`` with update_every 1 and 4), the generator's
cycle alone and a ``torch.profiler`` attribution of one step. docs/BENCHMARKS.md, section 3.
"""

from __future__ import annotations

import gc
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import common
from bench.common import QF, fmt, format_ratio

NAME = "overhead"
SECTION = "overhead"
QUIET = True
TARGET_RATIO = 1.05
BASE_MODEL = "smollm2-135m"
TARGETS = ["q_proj", "v_proj"]
RANK, ALPHA, LR, GRAD_CLIP = 4, 8.0, 2e-3, 1.0  # the trainer's clip, for every variant
VARIANTS = ("peft_lora", "lora", "qpa_u1", "qpa_u4")
LABELS = {"peft_lora": "stock PEFT LoRA (no qpa code)", "lora": "qpa method: lora",
          "qpa_u1": "qpa method: qpa, update_every 1", "qpa_u4": "qpa method: qpa, update_every 4"}
PHASES = ("hook_before", "forward", "backward", "hook_after", "optimizer")
OPTIONS = {
    "--batch-size": {"type": int, "default": QF(2, 4)},
    "--seq-len": {"type": int, "default": 128},
    "--rounds": {"type": int, "default": QF(2, 6), "help": "timed rounds"},
    "--warmup-steps": {"type": int, "default": QF(1, 2), "help": "discarded steps per variant"},
    "--block-steps": {"type": int, "default": 4,
                      "help": "consecutive steps per variant and round (4: one qpa_u4 window)"},
    "--threads": {"type": int, "default": 1, "help": "torch intra-op threads"},
    "--device": {"default": "auto", "choices": ["auto", "cpu", "cuda"]},
    "--memory-steps": {"type": int, "default": QF(2, 3)},
    "--generator-repeats": {"type": int, "default": 30},
}


@dataclass
class Variant:
    """One model + optimiser + the hooks the trainer calls around a step."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]
    method: Any = None
    trainable: int = 0
    step: int = 0
    losses: list[float] = field(default_factory=list)


def build_variant(name: str, device: torch.device) -> Variant:
    """One variant on its own freshly loaded base model, through transformers alone."""
    from transformers import AutoModelForCausalLM

    from qpa.models import resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(BASE_MODEL),
                                                 dtype=torch.float32, local_files_only=True)
    model = model.to(device)
    # The same seed before each attach: PEFT draws LoRA A from the global RNG, so every
    # variant starts from identical weights (and equals the base model at step 0).
    torch.manual_seed(0)
    if name == "peft_lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, bias="none",
            task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]
        return Variant(name, model, torch.optim.AdamW(params, lr=LR, weight_decay=0.0), params,
                       trainable=sum(p.numel() for p in params))
    from qpa.config import parse_config
    from qpa.methods import method_class

    method_name = "lora" if name == "lora" else "qpa"
    config = parse_config({
        "base_model": BASE_MODEL, "method": method_name, "backend": "statevector",
        "train_file": "unused.jsonl", "steps": 10**6,
        "lora": {"r": RANK, "alpha": ALPHA, "target_modules": TARGETS},
        "qpa": {"update_every": 4 if name == "qpa_u4" else 1},
        "train": {"lr": LR, "grad_clip": GRAD_CLIP, "weight_decay": 0.0}})
    method = method_class(method_name)(config, TARGETS)
    model = method.attach(model).to(device)
    return Variant(name, model, torch.optim.AdamW(method.param_groups(LR), lr=LR,
                                                  weight_decay=0.0),
                   method.trainable_parameters(), method=method,
                   trainable=int(method.parameter_report()["trainable_params"]))


def make_batches(count: int, batch_size: int, seq_len: int,
                 device: torch.device) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of exactly ``seq_len`` real tokens (training topics of pydoc)."""
    from transformers import AutoTokenizer

    from qpa.datasets import pydoc_split
    from qpa.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(BASE_MODEL),
                                              local_files_only=True)
    needed, ids = count * batch_size * seq_len, []
    for record in pydoc_split()[0]:
        ids += tokenizer(record["text"], add_special_tokens=False)["input_ids"]
        if len(ids) >= needed:
            break
    if len(ids) < needed:
        raise RuntimeError(f"the corpus has {len(ids)} tokens; {needed} needed")
    tokens = torch.tensor(ids[:needed]).view(count, batch_size, seq_len).to(device)
    return [{"input_ids": t, "labels": t, "attention_mask": torch.ones_like(t)} for t in tokens]


def train_step(variant: Variant, batch: dict[str, torch.Tensor],
               device: torch.device) -> dict[str, float]:
    """One step exactly as the trainer takes it (the benchmark never ends a job, so every
    window pushes: last_step=False); returns seconds per phase and in total."""
    method, step, loss = variant.method, variant.step, None

    def forward() -> None:
        nonlocal loss
        loss = variant.model(**batch).loss

    def optimise() -> None:
        torch.nn.utils.clip_grad_norm_(variant.params, GRAD_CLIP)
        variant.optimizer.step()
        variant.optimizer.zero_grad(set_to_none=True)

    variant.model.train()
    phases = dict(zip(PHASES, [common.timed(part, device) for part in (
        lambda: method and method.before_forward(step), forward, lambda: loss.backward(),
        lambda: method and method.before_optimizer_step(step, last_step=False), optimise)],
        strict=True))
    variant.losses.append(float(loss.detach()))
    variant.step += 1
    return {**phases, "total": sum(phases.values())}


def generator_cycle(num_values: int, device: torch.device, repeats: int) -> dict[str, Any]:
    """Median ms of QPA's extra work per step without the model: refresh (circuit and its
    gradient), forward and backward of the mapping MLP, push (dL/dp to the angles)."""
    from qpa.backends.factory import make_backend
    from qpa.config import QuantumOptions
    from qpa.methods.qpa.generator import QPAGenerator
    from qpa.methods.qpa.options import QpaOptions

    o = QpaOptions()  # the defaults the qpa variants run with
    generator = QPAGenerator(num_values, chunk_size=o.chunk_size, depth=o.depth, ansatz=o.ansatz,
                             mlp_hidden=o.mlp_hidden, sub_generators=o.sub_generators).to(device)
    generator.attach_backend(make_backend("statevector", generator.circuit, QuantumOptions(),
                                          device=str(device)))
    upstream, values = torch.randn(num_values, device=device), None

    def forward() -> None:
        nonlocal values
        values = generator()

    parts = {"refresh": lambda: generator.refresh(with_gradient=True), "forward": forward,
             "backward": lambda: values.backward(upstream),
             "push": generator.push_angle_gradient}
    raw: dict[str, list[float]] = {part: [] for part in parts}
    for _ in range(repeats + 3):
        for part, call in parts.items():
            raw[part].append(common.timed(call, device) * 1e3)
        generator.zero_grad(set_to_none=True)
    raw = {part: samples[3:] for part, samples in raw.items()}  # 3 warm-up cycles
    medians = {part: common.median(samples) for part, samples in raw.items()}
    return {"num_values": num_values, "num_qubits": generator.num_qubits, "median_ms": medians,
            "total_median_ms": sum(medians.values()), "raw_ms": raw}


def profile_steps(variants: dict[str, Variant], batches: list[dict[str, torch.Tensor]],
                  device: torch.device, num_values: int, top: int = 15) -> dict[str, Any]:
    """Operator self time of one warm step of lora and qpa_u1, attributed by structure: per
    (operator, input shapes), the calls one method makes beyond the other's at that method's
    mean time per call (one step each is too noisy to subtract the model's own matmuls)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    tables: dict[str, dict[str, dict[str, float]]] = {}
    for name in ("lora", "qpa_u1"):
        variant = variants[name]
        with profile(activities=activities, record_shapes=True) as prof:
            train_step(variant, batches[variant.step % len(batches)], device)
        tables[name] = {  # by input shape: "fill_ of [230400]" says which tensor
            f"{e.key} {str(e.input_shapes)[:80] if e.input_shapes else ''}".strip():
            {"calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
             "cpu_total_ms": e.cpu_time_total / 1e3}
            for e in prof.key_averages(group_by_input_shape=True)}
    empty = {"self_cpu_ms": 0.0, "calls": 0}

    def beyond(mine: str, other: str) -> list[dict[str, Any]]:
        rows = []
        for key in set(tables["lora"]) | set(tables["qpa_u1"]):
            a, b = tables[mine].get(key, empty), tables[other].get(key, empty)
            if a["calls"] > b["calls"]:
                rows.append({"op": key, "calls_lora": tables["lora"].get(key, empty)["calls"],
                             "calls_qpa": tables["qpa_u1"].get(key, empty)["calls"],
                             "ms": a["self_cpu_ms"] * (a["calls"] - b["calls"]) / a["calls"]})
        return sorted(rows, key=lambda row: -row["ms"])

    def ranked(ops: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
        return [{"op": k, **v} for k, v in sorted(ops.items(),
                                                  key=lambda kv: -kv[1]["self_cpu_ms"])[:top]]

    extra, saved = beyond("qpa_u1", "lora"), beyond("lora", "qpa_u1")
    # Ops on tensors as long as the whole generated vector (split once per step).
    full_vector = [{"op": k, **v} for k, v in tables["qpa_u1"].items() if f"[[{num_values}]" in k]
    return {"top_lora": ranked(tables["lora"]), "top_qpa_u1": ranked(tables["qpa_u1"]),
            "qpa_extra_calls": extra[:top], "qpa_extra_ms": sum(row["ms"] for row in extra),
            "lora_extra_calls": saved[:top], "lora_extra_ms": sum(row["ms"] for row in saved),
            "total_self_cpu_ms": {name: sum(op["self_cpu_ms"] for op in ops.values())
                                  for name, ops in tables.items()},
            "full_vector_ops": full_vector,
            "full_vector_ops_ms": sum(op["self_cpu_ms"] for op in full_vector)}


def _status_kib(key: str) -> int:
    return int((common._proc_field("/proc/self/status", key + ":") or "0 kB").split()[0])


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """A memory child: load, attach, train, report peaks. The kernel's resident high-water
    mark is reset after loading (``/proc/self/clear_refs``), so the loader's transient copy
    does not count as training memory."""
    from qpa.training import pick_device

    torch.set_num_threads(spec["threads"])
    device = pick_device(spec["device"])
    batches = make_batches(spec["steps"], spec["batch_size"], spec["seq_len"], device)
    variant = build_variant(spec["variant"], device)
    with torch.no_grad():  # page every lazily mapped weight in before the baseline
        for tensor in (*variant.model.parameters(), *variant.model.buffers()):
            tensor.sum()
    gc.collect()
    out: dict[str, Any] = {"variant": spec["variant"], "steps": spec["steps"],
                           "rss_after_load_mib": _status_kib("VmRSS") / 1024,
                           "peak_rss_loading_mib": _status_kib("VmHWM") / 1024}
    try:
        Path("/proc/self/clear_refs").write_text("5")
        out["peak_reset"] = True
    except OSError:
        out["peak_reset"] = False
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["cuda_allocated_after_load_mib"] = torch.cuda.memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(spec["steps"]):
        train_step(variant, batches[step], device)
    if variant.method is not None:
        variant.method.close()
    hwm = _status_kib("VmHWM")
    out["peak_rss_training_mib"] = hwm / 1024 if hwm and out["peak_reset"] else None
    if out["peak_rss_training_mib"] is not None:
        out["training_increment_mib"] = out["peak_rss_training_mib"] - out["rss_after_load_mib"]
    else:  # the whole process's peak, loader included
        out["peak_rss_process_mib"] = (hwm or resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss) / 1024
    if device.type == "cuda":
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["training_increment_mib"] = (out["cuda_peak_allocated_mib"]
                                         - out["cuda_allocated_after_load_mib"])
    return out


def summarise(raw: dict[str, list[dict[str, Any]]], block_steps: int) -> dict[str, Any]:
    """Per-variant medians (of block means and single steps, per phase) and paired ratios."""
    median, summary = common.median, {}
    for name, blocks in raw.items():
        means = [block["total_s"] / block_steps for block in blocks]
        steps = [step for block in blocks for step in block["steps"]]
        summary[name] = {
            "step_s_median_of_block_means": median(means), "step_s_min": min(means),
            "step_s_max": max(means), "step_s_median_single": median([s["total"] for s in steps]),
            "phase_s_median": {p: median([s[p] for s in steps]) for p in PHASES},
            "phase_s_mean": {p: sum(s[p] for s in steps) / len(steps) for p in PHASES},
            "blocks": len(blocks), "steps": len(steps)}
    ratios = {}
    for name, reference in (("qpa_u1", "lora"), ("qpa_u4", "lora"), ("lora", "peft_lora"),
                            ("qpa_u1", "peft_lora"), ("qpa_u4", "peft_lora")):
        paired = [a["total_s"] / b["total_s"]
                  for a, b in zip(raw[name], raw[reference], strict=True)]
        ratios[f"{name}/{reference}"] = {
            "paired_median": median(paired), "paired": paired,
            "of_medians": summary[name]["step_s_median_of_block_means"]
            / summary[reference]["step_s_median_of_block_means"]}
    return {"variants": summary, "ratios": ratios}


def run(args: Any) -> dict[str, Any]:
    from qpa.methods.qpa.options import QpaOptions
    from qpa.training import pick_device

    started, device = time.perf_counter(), pick_device(args.device)
    torch.set_num_threads(args.threads)
    batches = make_batches(8, args.batch_size, args.seq_len, device)
    print(f"building {len(VARIANTS)} variants on {device} ...", flush=True)
    variants = {name: build_variant(name, device) for name in VARIANTS}

    def block(variant: Variant, steps: int) -> list[dict[str, float]]:
        return [train_step(variant, batches[variant.step % len(batches)], device)
                for _ in range(steps)]

    # Thrown away: first-touch allocations, lazy init. Any block_steps consecutive steps of
    # qpa_u4 hold one circuit window whatever the offset.
    warmup = {name: [s["total"] for s in block(variants[name], args.warmup_steps)]
              for name in VARIANTS}
    raw: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    for index, order in common.rounds(VARIANTS, args.rounds, shuffle=True):
        for name in order:
            steps = block(variants[name], args.block_steps)
            raw[name].append({"round": index, "order": order,
                              "first_step": variants[name].step - args.block_steps,
                              "total_s": sum(s["total"] for s in steps), "steps": steps})
        print(f"round {index + 1}/{args.rounds}: " + ", ".join(
            f"{n} {raw[n][-1]['total_s'] / args.block_steps:.2f}s" for n in order), flush=True)
    first_losses = {name: v.losses[0] for name, v in variants.items()}
    spread = max(first_losses.values()) - min(first_losses.values())
    quantum = {name: v.method.quantum_report() for name, v in variants.items()
               if v.method is not None and v.method.quantum_report() is not None}
    num_values = variants["qpa_u1"].method.generator.num_values
    print("profiling one step of lora and qpa_u1 ...", flush=True)
    profile = profile_steps(variants, batches, device, num_values)
    trainable = {name: v.trainable for name, v in variants.items()}
    tensors = {name: len(v.params) for name, v in variants.items()}
    for variant in variants.values():
        if variant.method is not None:
            variant.method.close()
    del variants
    gc.collect()
    generator = generator_cycle(num_values, device, args.generator_repeats)
    memory: dict[str, Any] = {}  # one fresh interpreter per variant, one after another
    common.run_children("bench_overhead", [
        {"variant": name, "batch_size": args.batch_size, "seq_len": args.seq_len,
         "steps": args.memory_steps, "device": args.device, "threads": args.threads}
        for name in VARIANTS], lambda spec: spec["variant"], memory)
    return {
        "device": str(device),
        "settings": {
            "base_model": BASE_MODEL, "target_modules": TARGETS, "rank": RANK, "alpha": ALPHA,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": LR,
            "grad_clip": GRAD_CLIP, "optimizer": "AdamW", "threads": args.threads,
            "rounds": args.rounds, "warmup_steps": args.warmup_steps,
            "block_steps": args.block_steps, "backend": "statevector",
            "qpa_options": QpaOptions().model_dump(exclude={"update_every"}),
            "memory_steps": args.memory_steps, "target_ratio": TARGET_RATIO,
            "timed_step": "forward + backward + clip_grad_norm + AdamW step + zero_grad, "
                          "with the method's before_forward/before_optimizer_step hooks"},
        "trainable_params": trainable, "trainable_tensors": tensors,
        # At step 0 every adapter is the identity: the same batch must give the same loss.
        "checks": {"first_loss": first_losses, "first_loss_max_difference": spread,
                   "same_function_at_step_0": spread < 1e-4},
        "timing": summarise(raw, args.block_steps), "raw": raw, "warmup_s": warmup,
        "generator_cycle": generator, "profile": profile, "memory": memory,
        "quantum_usage": quantum, "wall_s": time.perf_counter() - started}


def render_markdown(results: dict[str, Any]) -> str:
    timing, memory, s = results["timing"], results["memory"], results["settings"]
    rows = []
    for name in VARIANTS:
        entry, mem = timing["variants"][name], memory.get(name, {})
        ratio = {ref: timing["ratios"].get(f"{name}/{ref}", {}).get("paired_median")
                 for ref in ("lora", "peft_lora")}
        hooks = entry["phase_s_mean"]["hook_before"] + entry["phase_s_mean"]["hook_after"]
        rows.append([
            LABELS[name], f"{results['trainable_params'][name]:,}",
            fmt(entry["step_s_median_of_block_means"], "{:,.0f} ms", 1e3),
            f"{fmt(entry['step_s_min'], '{:,.0f} ms', 1e3)} - "
            f"{fmt(entry['step_s_max'], '{:,.0f} ms', 1e3)}",
            *["1 (reference)" if name == ref else format_ratio(ratio[ref])
              for ref in ("lora", "peft_lora")],
            f"{hooks * 1e3:.1f} ms" if name.startswith("qpa") else "-",
            fmt(mem.get("cuda_peak_allocated_mib") or mem.get("peak_rss_training_mib")
                or mem.get("peak_rss_process_mib"), "{:,.0f} MiB"),
            fmt(mem.get("training_increment_mib"), "{:,.0f} MiB")])
    gen, profile = results["generator_cycle"], results["profile"]
    lora_ms = timing["variants"]["lora"]["step_s_median_of_block_means"] * 1e3
    parts, paired = gen["median_ms"], timing["ratios"]["qpa_u1/lora"]["paired"]
    net = profile["qpa_extra_ms"] - profile["lora_extra_ms"]
    first = results["checks"]
    return common.markdown(
        common.measured(results, f"{results['device']}, {s['threads']} torch thread(s), batch "
                        f"{s['batch_size']} x {s['seq_len']} tokens, {s['rounds']} interleaved "
                        f"rounds of {s['block_steps']} steps after {s['warmup_steps']} warm-up, "
                        f"memory over {s['memory_steps']} steps; first losses "
                        + ("agree." if first["same_function_at_step_0"] else
                           f"DISAGREE by {first['first_loss_max_difference']:.1e}.")),
        (["variant", "trainable params", "step (median)", "min-max", "vs LoRA (paired)",
          "vs stock PEFT (paired)", "QPA hooks", "peak RSS", "training increment"], rows),
        (["generator alone: circuit + gradient / MLP fwd + bwd", "share of a LoRA step",
          "paired qpa_u1 / LoRA, per round", "profile: QPA's extra calls / LoRA's",
          "expected ratio from the profile", "full-length tensor ops"],
         [[f"{parts['refresh'] + parts['push']:.1f} / {parts['forward'] + parts['backward']:.1f}"
           f" ms ({gen['num_qubits']} qubits)", f"{gen['total_median_ms'] / lora_ms:.1%}",
           f"{min(paired):.3f}-{max(paired):.3f}", f"{profile['qpa_extra_ms']:.1f} / "
           f"{profile['lora_extra_ms']:.1f} ms", f"{1 + net / lora_ms:.3f}x",
           f"{profile['full_vector_ops_ms']:.1f} ms"]]),
        plot=("QPA overhead", NAME))


def plot(results: dict[str, Any]) -> None:
    """Stacked per-phase step time of every variant, and peak memory beside it."""
    timing, memory, names = results["timing"]["variants"], results["memory"], VARIANTS

    def draw(left: Any, right: Any) -> None:
        bottom = [0.0] * len(names)
        for phase in PHASES:
            heights = [timing[n]["phase_s_mean"][phase] * 1e3 for n in names]
            left.bar(names, heights, bottom=bottom, label=phase)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        left.set(ylabel="ms per step (mean over timed steps)", title="training step by phase")
        left.legend(fontsize=8)
        right.bar(names, [memory.get(n, {}).get("cuda_peak_allocated_mib", memory.get(n, {}).get(
            "peak_rss_training_mib")) or 0.0 for n in names], color="tab:gray")
        right.set(ylabel="MiB", title="peak memory while training")
        for axis in (left, right):
            axis.tick_params(axis="x", labelrotation=20, labelsize=8)

    common.save_plot(NAME, results["machine"], draw, panels=2, size=(11, 4.5),
                     gridspec_kw={"width_ratios": [3, 2]})


if __name__ == "__main__":
    raise SystemExit(common.main(sys.modules[__name__]))
