"""Forward+backward time of a compound-adapted linear layer against PEFT's OFT (exact Cayley
and Cayley-Neumann) at the same block size. docs/BENCHMARKS.md, section 5.
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import platform
import sys
from typing import Any, NamedTuple

import torch
from torch import nn

from bench import common
from bench.common import QF, format_ratio

NAME = "compound_vs_oft"
SECTION = "compound-vs-oft"
OPTIONS = {"--repeats": {"type": int, "default": QF(5, 21), "help": "timed repeats per variant"},
           "--threads": {"type": int, "default": 1, "help": "torch intra-op threads (CPU)"},
           "--device": {"default": "auto", "choices": ["auto", "cpu", "cuda"]}}


class Case(NamedTuple):
    in_features: int
    out_features: int
    tokens: int
    blocks: int
    orders: tuple[int, ...]
    label: str


CASES = [  # quick mode: the first two
    Case(576, 576, 512, 4, (1, 2), "SmolLM2-135M q_proj"),
    Case(576, 192, 512, 4, (1, 2), "SmolLM2-135M v_proj"),
    Case(1024, 1024, 1024, 8, (1, 2), "1024 wide"),
    Case(1024, 1024, 1024, 8, (1, 2, 3), "1024 wide, k<=3"),
    Case(2048, 2048, 1024, 16, (1, 2), "2048 wide"),
    Case(2048, 2048, 1024, 4, (1, 2, 3), "2048 wide, big blocks, k<=3"),
]


class _Holder(nn.Module):
    """Gives the layer a name PEFT can target."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def run_case(case: Case, device: torch.device, repeats: int, warmup: int) -> dict[str, Any]:
    from peft import OFTConfig, get_peft_model

    from qpa.methods.compound.layer import CompoundLinear
    from qpa.methods.compound.minors import plan_layout
    from qpa.methods.compound.options import CompoundOptions

    torch.manual_seed(0)
    base = nn.Linear(case.in_features, case.out_features).to(device).requires_grad_(False)
    layout = plan_layout(case.in_features, case.blocks, case.orders)
    compound = CompoundLinear(copy.deepcopy(base), layout,
                              CompoundOptions(blocks=case.blocks, orders=list(case.orders)))
    with torch.no_grad():  # away from U = I so nothing is trivially the identity
        compound.compound.weight.normal_(std=0.05)
    variants: dict[str, nn.Module] = {"base": base, "compound": compound}
    for label, neumann in (("oft_exact", False), ("oft_neumann", True)):
        config = OFTConfig(r=case.blocks, oft_block_size=0, target_modules=["proj"],
                           use_cayley_neumann=neumann, init_weights=False)
        variants[label] = get_peft_model(_Holder(copy.deepcopy(base)), config).to(device)
    x = torch.randn(case.tokens, case.in_features, device=device, requires_grad=True)
    grad = torch.randn(case.tokens, case.out_features, device=device)

    def step(module: nn.Module) -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad)

    raw: dict[str, list[float]] = {name: [] for name in variants}
    for repeat, order in common.rounds(list(variants), warmup + repeats, shuffle=True):
        for name in order:
            seconds = common.timed(lambda name=name: step(variants[name]), device)
            if repeat >= warmup:
                raw[name].append(seconds * 1e3)
    median = {name: common.median(values) for name, values in raw.items()}
    trainable = {name: sum(p.numel() for p in variants[key].parameters() if p.requires_grad)
                 for name, key in (("compound", "compound"), ("oft", "oft_exact"))}
    return {**case._asdict(), "orders": list(case.orders), "block_size": layout.block_size,
            "n": layout.n, "trainable_params": trainable, "median_ms": median,
            "ratio_vs_oft_exact": median["compound"] / median["oft_exact"],
            "ratio_vs_oft_neumann": median["compound"] / median["oft_neumann"], "raw_ms": raw}


def run(args: Any) -> dict[str, Any]:
    import peft
    import transformers

    from qpa.training import pick_device

    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    warmup = 2 if args.quick else 3
    rows = [run_case(case, device, args.repeats, warmup)
            for case in (CASES[:2] if args.quick else CASES)]
    machine = {"platform": platform.platform(),
               "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "device": str(device)}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    return {
        "benchmark": "compound adapter vs PEFT OFT, forward+backward of one adapted linear layer",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "peft": peft.__version__, "transformers": transformers.__version__,
                     "qpa_commit": common.git_commit()},
        "settings": {"quick": args.quick, "repeats": args.repeats, "warmup": warmup,
                     "dtype": "float32"},
        "cases": rows,
        "worst_ratio_vs_oft_exact": max(row["ratio_vs_oft_exact"] for row in rows),
        "worst_ratio_vs_oft_neumann": max(row["ratio_vs_oft_neumann"] for row in rows),
    }


def render_markdown(results: dict[str, Any]) -> str:
    rows = [[case["label"], f"{case['in_features']}x{case['out_features']}", case["tokens"],
             case["blocks"], "".join(map(str, case["orders"])),
             *[f"{case['median_ms'][name]:.2f}" for name in
               ("base", "compound", "oft_exact", "oft_neumann")],
             format_ratio(case["ratio_vs_oft_exact"]), format_ratio(case["ratio_vs_oft_neumann"])]
            for case in results["cases"]]
    machine, versions = results["machine"], results["versions"]
    return common.markdown(
        f"Measured {results['date'][:16].replace('T', ' ')} UTC "
        f"({'quick' if results['settings']['quick'] else 'full'} mode) on "
        f"{machine['processor']} ({machine['cpu_count']} cores, {machine['torch_threads']} "
        f"torch thread(s), {machine['device']}), torch {versions['torch']}, peft "
        f"{versions['peft']}; median ms of {results['settings']['repeats']} repeats.",
        (["case", "shape", "tokens", "blocks", "orders", "bare layer", "compound", "OFT (Cayley)",
          "OFT (Cayley-Neumann)", "compound / OFT", "compound / OFT-CN"], rows))


if __name__ == "__main__":
    raise SystemExit(common.main(sys.modules[__name__]))
