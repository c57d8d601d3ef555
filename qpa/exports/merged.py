"""``<output>/merged/``: the base model with the adapter merged in, as a transformers folder.

A fresh copy of the base model is loaded from the same place the job loaded it, and the
adapter is merged into it: by PEFT's own ``merge_and_unload`` of the adapter folder the job
just wrote (``qpa``, ``lora``), or with the exact weights a method computes itself
(``AdapterMethod.merged_weights``: compound's ``W R^T`` in float64). Before anything is
written, the merged model's logits on a probe sequence are compared with the trained
model's; the largest difference (and the adapter's own effect on those logits, for scale)
goes into metrics.json.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Largest logit difference between the fp32 merged model and the trained model that we
# ship, relative to the largest logit: merging changes the order of fp32 sums, which costs
# ~1e-7 on the 2-layer test models and up to 2.3e-5 (6.8e-4 absolute) on SmolLM2's 30
# layers; a wrong merge is off by the adapter's whole effect.
LOGIT_TOLERANCE = 1e-4


class MergeError(RuntimeError):
    """The merged model does not reproduce the trained model."""


def probe_ids(vocab_size: int, length: int = 16) -> torch.Tensor:
    """A fixed token sequence every vocabulary has (spread over the ids, no specials)."""
    step = max(1, (vocab_size - 8) // length)
    return (torch.arange(length) * step + 7).clamp(max=vocab_size - 1).unsqueeze(0)


@torch.no_grad()
def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits = model(input_ids=ids.to(device)).logits.float().cpu()
    model.train(was_training)
    return logits


def load_base(base_model_path: str) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(base_model_path, dtype=torch.float32,
                                                local_files_only=True)


def merge_model(base: nn.Module, adapter_dir: Path,
                merged_weights: dict[str, torch.Tensor] | None) -> nn.Module:
    """``base`` (a fresh fp32 copy, changed in place) with the adapter merged in."""
    if merged_weights is None:
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    with torch.no_grad():
        for name, weight in merged_weights.items():
            target = base.get_submodule(name).weight
            if target.shape != weight.shape:
                raise MergeError(f"{name}: merged weight {tuple(weight.shape)} does not fit "
                                 f"the base weight {tuple(target.shape)}")
            target.copy_(weight.to(target.dtype))
    return base


def write_merged(directory: Path, *, base_model_path: str, adapter_dir: Path,
                 merged_weights: dict[str, torch.Tensor] | None, trained: nn.Module,
                 dtype: str = "float32") -> dict[str, Any]:
    """Write the merged folder atomically (staging folder + rename); return its facts."""
    base = load_base(base_model_path)
    ids = probe_ids(int(base.config.vocab_size))
    base_logits = logits_of(base, ids)
    model = merge_model(base, adapter_dir, merged_weights)
    trained_logits = logits_of(trained, ids)
    difference = (logits_of(model, ids) - trained_logits).abs().max().item()
    tolerance = LOGIT_TOLERANCE * max(1.0, trained_logits.abs().max().item())
    if not difference <= tolerance:
        raise MergeError(f"merged model's logits differ from the trained model's by "
                         f"{difference:.2e} (> {tolerance:.1e}); not written")
    model.to(DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(base_model_path, local_files_only=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
        directory.chmod(0o755)  # mkdtemp made it private; it is a deliverable
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())
    return {
        "folder": directory.name,
        "bytes": size,
        "dtype": dtype,
        "method": "peft merge_and_unload" if merged_weights is None else "exact weights",
        "max_logit_diff_vs_trained": difference,
        # How much the adapter moves the same logits: the difference above is only
        # meaningful when it is far below this.
        "max_logit_change_by_adapter": (trained_logits - base_logits).abs().max().item(),
    }
