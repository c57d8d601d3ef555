"""The ``qpa`` command line. ``qpa finetune`` lives here; other packages add commands
(``serve``, ``jobs``, ``keys``) through the ``qpa.cli`` entry-point group, so the library
never imports the service."""

from __future__ import annotations

import logging
import os
import warnings
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from qpa.config import load_config
from qpa.errors import ConfigError, JobCancelled, QPAError
from qpa.exports.plot import sparkline

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
    nproc: int = typer.Option(
        1, "--nproc", metavar="N",
        help="Train with N processes on this machine (torch.distributed data parallel: gloo "
        "on CPU, NCCL with one GPU each). Under torchrun, leave it out.",
    ),
) -> None:
    """Run one fine-tuning job in this process (or N), with a progress bar."""
    from qpa.distributed import check_nproc, check_world, torchrun_world_size
    from qpa.estimate import describe_estimate, describe_quantum_job
    from qpa.training import finetune as run_finetune

    logging.basicConfig(level=logging.WARNING)
    # peft 0.21 calls a transformers method renamed in 5.x; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                            category=FutureWarning)
    torchrun_world = torchrun_world_size()
    try:
        config = load_config(config_path)
        check_nproc(nproc)
        if torchrun_world > 1 and nproc != 1:
            raise ConfigError("nproc", "under torchrun the process count is torchrun's "
                              "(--nproc-per-node); leave --nproc out")
        check_world(config, max(nproc, torchrun_world))
    except ConfigError as error:
        _fail(error)
    target = output_dir or Path(config.output_dir or f"runs/{config_path.stem}")
    if torchrun_world > 1 and int(os.environ.get("RANK", "0")) != 0:
        try:  # rank 0 does the talking, errors included
            _torchrun_rank(config, target, None, resume=not fresh)
        except QPAError:
            raise typer.Exit(1) from None
        return
    where = f" (backend {config.backend})" if config.uses_quantum else ""
    processes = max(nproc, torchrun_world)
    on_many = f" on {processes} processes" if processes > 1 else ""
    console.print(f"[bold]{config.method}[/] on [bold]{config.base_model}[/]{where} "
                  f"for {config.steps} steps{on_many} -> {target}")
    progress = Progress(TextColumn("{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=console)
    task = progress.add_task("preparing", total=config.steps, info="")
    losses: list[float] = []

    def on_event(event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "step":
            quantum = event.get("quantum")
            losses.append(event["loss"])
            info = f"loss {event['loss']:.3f} {sparkline(losses, 24)}"
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
        elif kind == "quantum_plan":
            for line in describe_estimate(event):
                progress.console.print(f"  [dim]{line}[/]")
            for warning in event.get("warnings", []):
                progress.console.print(f"  [yellow]warning:[/] {warning}")
        elif kind == "quantum_job":
            # A job on a device can take minutes: say which one runs, and how big it is.
            line = describe_quantum_job(event)
            if event.get("phase") == "submitted":
                progress.update(task, description=line.split(":")[0], info=line.split(": ")[1])
            else:
                progress.update(task, info=line)

    try:
        with progress:
            if torchrun_world > 1:
                metrics = _torchrun_rank(config, target, on_event, resume=not fresh)
            else:
                metrics = run_finetune(config, target, on_event=on_event, resume=not fresh,
                                       nproc=nproc)
    except ConfigError as error:
        _fail(error)
    except JobCancelled as error:
        console.print(f"[yellow]{error}; checkpoint kept in {target / 'state'}[/]")
        raise typer.Exit(130) from None
    except QPAError as error:
        console.print(f"[red]error:[/] {error}")
        raise typer.Exit(1) from None
    _summary(metrics, target)


@app.command()
def estimate(
    config_path: Path = typer.Argument(..., metavar="CONFIG.yaml", help="Job config file."),
    as_json: bool = typer.Option(False, "--json", help="Print the estimate as JSON."),
) -> None:
    """What a job will cost on its backend, without training: qubits, depth after
    transpilation, primitive jobs, circuits, shots and QPU seconds, with warnings."""
    import json

    from qpa.estimate import describe_estimate, estimate_job

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                            category=FutureWarning)
    try:
        result = estimate_job(load_config(config_path))
    except ConfigError as error:
        _fail(error)
    if as_json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        for line in describe_estimate(result.as_dict()):
            console.print(line)
        for warning in result.warnings:
            console.print(f"[yellow]warning:[/] {warning}")
    if result.over_budget:
        raise typer.Exit(3)


def _torchrun_rank(config: Any, target: Path, on_event: Any, *, resume: bool) -> dict[str, Any]:
    """This process is one rank of a torchrun launch: join its group and train."""
    import torch.distributed as dist

    from qpa.distributed import from_torchrun_env
    from qpa.training import Trainer

    data_parallel = from_torchrun_env(config.train.device)
    try:
        return Trainer(config, target, on_event=on_event, data_parallel=data_parallel).run(resume)
    finally:
        dist.destroy_process_group()


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
    if metrics.get("loss_plot"):
        console.print(f"loss curve: {target / metrics['loss_plot']}")
    for name, facts in (metrics.get("exports") or {}).items():
        if name != "peft":
            console.print(f"{name} export: {target / (facts.get('folder') or facts['file'])}")
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


if __name__ == "__main__":  # python -m qpa.cli (e.g. under torchrun)
    app()
