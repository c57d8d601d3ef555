"""Forward+backward time of a compound-adapted linear layer against PEFT's OFT, side by side.

For each layer shape, the same frozen ``nn.Linear`` is wrapped three ways at the same block
size (in_features / blocks): our ``CompoundLinear``, PEFT's OFT with the exact Cayley map
(``use_cayley_neumann=False``, the form our adapters export to) and PEFT's OFT with its
default Cayley-Neumann series. The bare layer is timed too, as the floor. One timed call is
``y = layer(x); y.backward(grad)`` with ``x.requires_grad`` (as inside a network), the variants
are interleaved within every repeat so background load hits all of them alike, and the
median over repeats is reported with the ratio compound / OFT.

    python bench/bench_compound_vs_oft.py          # -> bench/results/compound_vs_oft.json
    python bench/bench_compound_vs_oft.py --quick  # 2 shapes, same file, settings.quick

Threads default to 1 on CPU: on a shared machine several intra-op threads make timings of
small kernels erratic; pass ``--threads`` to measure otherwise (it is recorded in the JSON).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from peft import OFTConfig, get_peft_model
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import format_ratio, git_commit, markdown_table  # noqa: E402
from qpa.methods.compound.layer import CompoundLinear  # noqa: E402
from qpa.methods.compound.minors import plan_layout  # noqa: E402
from qpa.methods.compound.options import CompoundOptions  # noqa: E402

RESULTS = ROOT / "bench" / "results"
NAME = "compound_vs_oft"  # results file, for bench.run_all
SECTION = "compound-vs-oft"  # the generated block of docs/BENCHMARKS.md


@dataclass(frozen=True)
class Case:
    in_features: int
    out_features: int
    tokens: int
    blocks: int
    orders: tuple[int, ...]
    label: str


FULL_CASES = [
    Case(576, 576, 512, 4, (1, 2), "SmolLM2-135M q_proj"),
    Case(576, 192, 512, 4, (1, 2), "SmolLM2-135M v_proj"),
    Case(1024, 1024, 1024, 8, (1, 2), "1024 wide"),
    Case(1024, 1024, 1024, 8, (1, 2, 3), "1024 wide, k<=3"),
    Case(2048, 2048, 1024, 16, (1, 2), "2048 wide"),
    Case(2048, 2048, 1024, 4, (1, 2, 3), "2048 wide, big blocks, k<=3"),
]
QUICK_CASES = FULL_CASES[:2]


class _Holder(nn.Module):
    """Gives the layer a name PEFT can target."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build_variants(case: Case, device: torch.device) -> tuple[dict[str, nn.Module], dict]:
    torch.manual_seed(0)
    base = nn.Linear(case.in_features, case.out_features).to(device).requires_grad_(False)
    layout = plan_layout(case.in_features, case.blocks, case.orders)
    options = CompoundOptions(blocks=case.blocks, orders=list(case.orders))
    compound = CompoundLinear(copy.deepcopy(base), layout, options)
    with torch.no_grad():  # away from U = I so nothing is trivially the identity
        compound.compound.weight.normal_(std=0.05)
    variants: dict[str, nn.Module] = {"base": base, "compound": compound}
    for label, neumann in (("oft_exact", False), ("oft_neumann", True)):
        config = OFTConfig(r=case.blocks, oft_block_size=0, target_modules=["proj"],
                           use_cayley_neumann=neumann, init_weights=False)
        variants[label] = get_peft_model(_Holder(copy.deepcopy(base)), config).to(device)
    params = {
        "compound": sum(p.numel() for p in compound.parameters() if p.requires_grad),
        "oft": sum(p.numel() for p in variants["oft_exact"].parameters() if p.requires_grad),
    }
    info = {"block_size": layout.block_size, "n": layout.n, "trainable_params": params}
    return variants, info


def _timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    def measure(step: Callable[[], None]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return measure


def run_case(case: Case, device: torch.device, repeats: int, warmup: int) -> dict:
    variants, info = build_variants(case, device)
    x = torch.randn(case.tokens, case.in_features, device=device, requires_grad=True)
    grad = torch.randn(case.tokens, case.out_features, device=device)
    measure = _timer(device)

    def step_for(module: nn.Module) -> Callable[[], None]:
        def step() -> None:
            module.zero_grad(set_to_none=True)
            x.grad = None
            module(x).backward(grad)

        return step

    steps = {name: step_for(module) for name, module in variants.items()}
    raw: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for repeat in range(warmup + repeats):
        random.Random(repeat).shuffle(order)
        for name in order:
            seconds = measure(steps[name])
            if repeat >= warmup:
                raw[name].append(seconds * 1e3)
    median = {name: statistics.median(values) for name, values in raw.items()}
    return {
        "label": case.label,
        "in_features": case.in_features,
        "out_features": case.out_features,
        "tokens": case.tokens,
        "blocks": case.blocks,
        "orders": list(case.orders),
        **info,
        "median_ms": median,
        "ratio_vs_oft_exact": median["compound"] / median["oft_exact"],
        "ratio_vs_oft_neumann": median["compound"] / median["oft_neumann"],
        "raw_ms": raw,
    }


def machine(device: torch.device) -> dict:
    out = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def print_table(rows: list[dict]) -> None:
    header = (f"{'case':<30} {'shape':>11} {'T':>5} {'b':>4} {'n':>3} {'k':>6} "
              f"{'base':>8} {'compound':>9} {'oft':>8} {'oft-CN':>8} {'/oft':>6} {'/oft-CN':>8}")
    print(header)
    print("-" * len(header))
    for row in rows:
        median = row["median_ms"]
        print(f"{row['label']:<30} {row['in_features']:>5}x{row['out_features']:<5} "
              f"{row['tokens']:>5} {row['block_size']:>4} {row['n']:>3} "
              f"{''.join(map(str, row['orders'])):>6} {median['base']:>8.2f} "
              f"{median['compound']:>9.2f} {median['oft_exact']:>8.2f} "
              f"{median['oft_neumann']:>8.2f} {row['ratio_vs_oft_exact']:>6.2f} "
              f"{row['ratio_vs_oft_neumann']:>8.2f}")
    print("times: median ms of forward+backward; oft = PEFT OFT exact Cayley, "
          "oft-CN = Cayley-Neumann (PEFT default)")


def render_markdown(results: dict[str, Any]) -> str:
    """The docs/BENCHMARKS.md section for this script's JSON."""
    rows = []
    for case in results["cases"]:
        median = case["median_ms"]
        rows.append([case["label"], f"{case['in_features']}x{case['out_features']}",
                     case["tokens"], case["blocks"], "".join(map(str, case["orders"])),
                     f"{median['base']:.2f}", f"{median['compound']:.2f}",
                     f"{median['oft_exact']:.2f}", f"{median['oft_neumann']:.2f}",
                     format_ratio(case["ratio_vs_oft_exact"]),
                     format_ratio(case["ratio_vs_oft_neumann"])])
    machine = results.get("machine", {})
    versions = results.get("versions", {})
    head = (f"Measured {results.get('date', '')[:16].replace('T', ' ')} UTC "
            f"({'quick' if results.get('settings', {}).get('quick') else 'full'} mode) on "
            f"{machine.get('processor')} ({machine.get('cpu_count')} cores, "
            f"{machine.get('torch_threads')} torch thread(s), {machine.get('device')}), "
            f"torch {versions.get('torch')}, peft {versions.get('peft')}. Median ms of "
            "forward+backward of one adapted linear layer; ratios are compound / OFT "
            "(below 1 = ours faster).")
    table = markdown_table(
        ["case", "shape", "tokens", "blocks", "orders", "bare layer", "compound", "OFT (Cayley)",
         "OFT (Cayley-Neumann)", "compound / OFT", "compound / OFT-CN"], rows)
    return f"{head}\n\n{table}\n\nRaw timings: `bench/results/compound_vs_oft*.json`."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, few repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = parser.parse_args(argv)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    cases = QUICK_CASES if args.quick else FULL_CASES
    repeats = args.repeats or (5 if args.quick else 21)
    warmup = 2 if args.quick else 3
    out = args.out or RESULTS / f"{NAME}.json"

    rows = [run_case(case, device, repeats, warmup) for case in cases]
    print_table(rows)
    report = {
        "benchmark": "compound adapter vs PEFT OFT, forward+backward of one adapted linear layer",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(device),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__,
            "qpa_commit": git_commit(),
        },
        "settings": {"quick": args.quick, "repeats": repeats, "warmup": warmup,
                     "dtype": "float32"},
        "cases": rows,
        "worst_ratio_vs_oft_exact": max(row["ratio_vs_oft_exact"] for row in rows),
        "worst_ratio_vs_oft_neumann": max(row["ratio_vs_oft_neumann"] for row in rows),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
