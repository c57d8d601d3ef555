"""The job's output folder: adapter (stock PEFT), model card, metrics.json, state/."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from qpa.config import JobConfig
from qpa.paths import CHECKPOINT


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file + rename so a killed process never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def save_checkpoint(state_dir: Path, payload: dict[str, Any], config: JobConfig) -> None:
    write_json(state_dir / "config.json", config.model_dump(mode="json"))
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(state_dir / CHECKPOINT, buffer.getvalue())


def load_checkpoint(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / CHECKPOINT
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "—" if value is None else str(value)


def model_card(config: JobConfig, metrics: dict[str, Any], export_info: dict[str, Any],
               method_rows: list[tuple[str, str]] = ()) -> str:
    """README.md for the adapter folder: what it is, how it was made, how to load it.

    ``method_rows`` are the method's own lines of the training table
    (``AdapterMethod.card_rows``)."""
    params = metrics
    quantum = metrics.get("quantum")
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {metrics['base_model_path']}",
        "tags: [qpa, peft, " + config.method + "]",
        "---",
        f"# {config.method.upper()} adapter for `{config.base_model}`",
        "",
        f"Produced by QPA {metrics['qpa_version']} ({config.method}"
        + (f", backend `{config.backend}`" if config.uses_quantum else "") + "). "
        f"It is a stock PEFT **{export_info.get('peft_type', '?')}** adapter: inference needs "
        "only `transformers` and `peft`, no quantum software.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "from peft import PeftModel",
        f"base = AutoModelForCausalLM.from_pretrained({metrics['base_model_path']!r})",
        "model = PeftModel.from_pretrained(base, 'path/to/adapter')",
        "```",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| method | {config.method} |",
        f"| target modules | {', '.join(metrics['target_modules'])} |",
        f"| steps | {metrics['steps']} |",
        f"| trainable parameters | {params['trainable_params']:,} |",
        f"| plain LoRA (r={config.lora.r}) parameters | {params['lora_equivalent_params']:,} |",
        f"| ratio to LoRA | {params['ratio_to_lora']:.2%} |",
    ]
    lines += [f"| {label} | {value} |" for label, value in method_rows]
    section = config.method_options
    # The measured numbers hold for the preset's options on the preset's own modules.
    changes = [] if not hasattr(section, "preset") else [
        text for text, changed in (("options changed", not section.matches_preset()),
                                   ("modules listed by the job",
                                    config.lora.target_modules is not None)) if changed]
    if hasattr(section, "preset"):
        lines.append(f"| preset | {section.preset}"
                     + (f" ({'; '.join(changes)})" if changes else "") + " |")
    lines.append(f"| learning rate | {config.train.lr:g}, {config.train.schedule}, "
                 f"{config.train.warmup_steps} warm-up steps |")
    lines += [
        f"| eval loss before → after | {_fmt(metrics['eval_loss_before'])} → "
        f"{_fmt(metrics['eval_loss_after'])} |",
        f"| wall time | {metrics['wall_seconds']:.1f} s |",
    ]
    if quantum:
        lines += [
            "",
            "## Quantum usage",
            "",
            f"Backend `{quantum['backend']}`, {quantum['num_qubits']} qubits, depth "
            f"{quantum['depth']}, circuit evaluated once per {quantum['update_every']} step(s): "
            f"{quantum['jobs']} primitive jobs, {quantum['circuits']} circuits, "
            f"{quantum['shots']} shots, {quantum['seconds']:.2f} s.",
        ]
    measured = getattr(section, "MEASURED", {}).get(getattr(section, "preset", None))
    if measured and not changes:
        lines += ["", "## Measured quality of this preset", "", measured]
    if metrics.get("loss_plot"):
        lines += ["", "## Loss", "", f"![train and eval loss]({metrics['loss_plot']})"]
    lines += _other_formats(metrics)
    notes = export_info.get("notes")
    if notes:
        lines += ["", "## Export notes", "", *([notes] if isinstance(notes, str) else notes)]
    return "\n".join(lines) + "\n"


def _other_formats(metrics: dict[str, Any]) -> list[str]:
    """Model-card lines for the merged folder and the GGUF adapter, when the job wrote them."""
    exports = metrics.get("exports") or {}
    lines: list[str] = []
    merged = exports.get("merged")
    if merged:
        lines += [
            "", f"**Merged model** (`{merged['folder']}/` beside this folder, {merged['dtype']}, "
            f"{merged['method']}; largest logit difference from the trained model "
            f"{merged['max_logit_diff_vs_trained']:.1e}, where the adapter moves logits by up "
            f"to {merged['max_logit_change_by_adapter']:.2g}):", "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            f"model = AutoModelForCausalLM.from_pretrained('path/to/{merged['folder']}')",
            "```",
        ]
    gguf = exports.get("gguf")
    if gguf:
        lines += [
            "", f"**llama.cpp LoRA adapter** (`{gguf['file']}` beside this folder, "
            f"{gguf['tensor_type']}, rank {gguf['rank']}, alpha {gguf['alpha']:g}), applied to "
            "the base model's GGUF:", "",
            "```bash",
            f"llama-cli -m base-model.gguf --lora path/to/{gguf['file']}",
            "```",
        ]
        if gguf.get("notes"):
            lines += ["", gguf["notes"]]
    if lines:
        lines = ["", "## Other formats", *lines]
    return lines
