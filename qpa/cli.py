"""The ``qpa`` command line. ``qpa finetune`` lives here; other packages add commands
(``serve``, ``jobs``, ``keys``) through the ``qpa.cli`` entry-point group, so the library
never imports the service."""

from __future__ import annotations

import logging
import warnings
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from qpa.config import load_config
from qpa.errors import ConfigError, JobCancelled, QPAError

app = typer.Typer(help="QPA: quantum-generated and quantum-inspired adapters for LLMs.",
                  no_args_is_help=True, add_completion=False)
console = Console()


@app.callback()
def main() -> None:
    """QPA: quantum-generated and quantum-inspired adapters for LLMs."""


@app.command()
def finetune(
    config_path: Path = typer.Argument(..., metavar="CONFIG.yaml", help="Job config file."),
    output_dir: Path | None = typer.Option(None, "--output-dir", "-o",
                                           help="Overrides the config's output_dir."),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore an existing checkpoint."),
) -> None:
    """Run one fine-tuning job in this process, with a progress bar."""
    from qpa.training import finetune as run_finetune

    logging.basicConfig(level=logging.WARNING)
    # peft 0.21 calls a transformers method renamed in 5.x; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                            category=FutureWarning)
    try:
        config = load_config(config_path)
    except ConfigError as error:
        _fail(error)
    target = output_dir or Path(config.output_dir or f"runs/{config_path.stem}")
    where = f" (backend {config.backend})" if config.uses_quantum else ""
    console.print(f"[bold]{config.method}[/] on [bold]{config.base_model}[/]{where} "
                  f"for {config.steps} steps -> {target}")
    progress = Progress(TextColumn("{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=console)
    task = progress.add_task("preparing", total=config.steps, info="")

    def on_event(event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "step":
            quantum = event.get("quantum")
            info = f"loss {event['loss']:.3f}"
            if quantum:
                info += f" | {quantum['jobs']} quantum jobs"
            progress.update(task, completed=event["step"], description="training", info=info)
        elif kind == "eval":
            progress.console.print(
                f"  eval loss at step {event['step']}: {event['eval_loss']:.4f}"
            )
        elif kind == "status":
            progress.update(task, description=event["message"][:40],
                            completed=event.get("step", 0))

    try:
        with progress:
            metrics = run_finetune(config, target, on_event=on_event, resume=not fresh)
    except ConfigError as error:
        _fail(error)
    except JobCancelled as error:
        console.print(f"[yellow]{error}; checkpoint kept in {target / 'state'}[/]")
        raise typer.Exit(130) from None
    except QPAError as error:
        console.print(f"[red]error:[/] {error}")
        raise typer.Exit(1) from None
    _summary(metrics, target)


def _fail(error: ConfigError) -> None:
    console.print(f"[red]config error[/] in [bold]{error.field}[/]: {error.reason}")
    raise typer.Exit(2)


def _summary(metrics: dict[str, Any], target: Path) -> None:
    console.print(
        f"eval loss {metrics['eval_loss_before']:.4f} -> {metrics['eval_loss_after']:.4f}; "
        f"trainable params {metrics['trainable_params']:,} "
        f"({metrics['ratio_to_lora']:.1%} of LoRA's {metrics['lora_equivalent_params']:,})"
    )
    if metrics.get("quantum"):
        q = metrics["quantum"]
        console.print(f"quantum: {q['jobs']} jobs, {q['circuits']} circuits, {q['shots']} shots, "
                      f"{q['seconds']:.2f} s on {q['backend']}")
    if metrics.get("sample"):
        console.print(f"[dim]sample:[/] {metrics['sample'].strip()}")
    adapter = target / "adapter"
    console.print(f"\n[green]adapter written to[/] {adapter}")
    console.print(
        "load it with stock PEFT:\n"
        "  from transformers import AutoModelForCausalLM\n  from peft import PeftModel\n"
        f"  base = AutoModelForCausalLM.from_pretrained({metrics['base_model_path']!r})\n"
        f"  model = PeftModel.from_pretrained(base, {str(adapter)!r})"
    )


def _load_plugins() -> None:
    for entry in entry_points(group="qpa.cli"):
        try:
            entry.load()(app)
        except ImportError as error:  # the service extra is optional
            logging.getLogger(__name__).debug(
                "qpa.cli plugin %s unavailable: %s", entry.name, error
            )


_load_plugins()
