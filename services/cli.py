"""The service's commands for the ``qpa`` console script: ``serve``, ``jobs ...``, ``keys``.

``register(app)`` adds them to a typer app (``qpa.cli`` mounts them); ``python -m
services.cli`` runs them standalone. The ``jobs`` commands are a REST client
(``QPA_API_URL``, ``QPA_API_KEY``); ``keys create`` and ``serve`` work on the server-side
state under ``QPA_HOME`` (or ``QPA_DATABASE_URL``) directly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from qpa.exports.plot import sparkline
from services.client import APIError, QPAClient
from services.status import JobStatus

jobs_app = typer.Typer(help="Submit and follow jobs on a QPA server (QPA_API_URL, QPA_API_KEY).",
                       no_args_is_help=True)
keys_app = typer.Typer(help="API keys (stored hashed in the server's database).",
                       no_args_is_help=True)
out = Console()
err = Console(stderr=True)


def _client() -> QPAClient:
    return QPAClient(on_retry=lambda message: err.print(f"[yellow]{message}[/yellow]"))


def _fail(error: Exception) -> typer.Exit:
    err.print(f"[red]error:[/red] {error}")
    return typer.Exit(1)


def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="API port.")] = 8000,
) -> None:
    """Run the API, a worker and (with no QPA_BROKER_URL) its own Redis; Ctrl-C stops all."""
    from services.embedded import serve as run_embedded

    raise typer.Exit(run_embedded(host, port))


def _open_store() -> Any:
    from services import store
    from services.settings import get_settings

    settings = get_settings()
    return store.Store(settings.resolved_database_url), settings.resolved_database_url


def _positive_days(days: float | None) -> float | None:
    if days is not None and not days > 0:
        raise typer.BadParameter("must be a number of days above 0")
    return days


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="A label to recognise the key by.")] = "",
    expires: Annotated[float | None, typer.Option(
        metavar="DAYS", callback=_positive_days,
        help="Days until the key expires (default: never).")] = None,
) -> None:
    """Create an API key and print it (it is shown once; only its hash is stored)."""
    from datetime import timedelta

    from services import store

    db, url = _open_store()
    expires_at = store.utcnow() + timedelta(days=expires) if expires is not None else None
    with db.session() as session:
        row, plaintext = store.create_api_key(session, name, expires_at=expires_at)
    db.dispose()
    until = f", expires {expires_at:%Y-%m-%d %H:%M} UTC" if expires_at else ""
    err.print(f"created key {row.id} ({name or 'unnamed'}{until}) in {url}; "
              "export it as QPA_API_KEY")
    print(plaintext)


@keys_app.command("list")
def keys_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List every key of the server's database: id, name, prefix, expiry, state."""
    from services import store

    db, _ = _open_store()
    now = store.utcnow()
    with db.session() as session:
        rows = [{"id": row.id, "name": row.name, "prefix": row.prefix,
                 "created_at": _iso(row.created_at), "expires_at": _iso(row.expires_at),
                 "revoked_at": _iso(row.revoked_at),
                 "state": row.state(now)}
                for row in store.list_api_keys(session)]
    db.dispose()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(Column("id", no_wrap=True, min_width=28), "name", "prefix",
                  Column("expires", min_width=10), "state")
    for row in rows:
        table.add_row(row["id"], row["name"] or "-", row["prefix"] + "…",
                      (row["expires_at"] or "never")[:10], row["state"])
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id (key-…).")]) -> None:
    """Revoke a key: every call made with it gets 401 from now on."""
    from services import store

    db, url = _open_store()
    with db.session() as session:
        row = store.get_api_key(session, key_id)
        if row is not None:
            store.revoke_api_key(session, row)
            revoked_at = row.revoked_at
    db.dispose()
    if row is None:
        err.print(f"[red]error:[/red] no key {key_id!r} in {url} (see `qpa keys list`)")
        raise typer.Exit(1)
    err.print(f"revoked {key_id} at {revoked_at:%Y-%m-%d %H:%M:%S} UTC")


def _iso(moment: Any) -> str | None:
    return moment.isoformat(timespec="seconds") + "Z" if moment is not None else None


@jobs_app.command("submit")
def jobs_submit(
    config: Annotated[Path, typer.Argument(exists=True, dir_okay=False,
                                           help="Job config YAML (as for `qpa finetune`).")],
    watch: Annotated[bool, typer.Option("--watch", help="Follow it until it ends.")] = False,
) -> None:
    """Upload the config's local train/eval files, create the job, print its id."""
    try:
        with _client() as client:
            job = client.submit(config)
            err.print(f"submitted {job['id']} ({job['method']} on {job['backend']}), "
                      f"status {job['status']}")
            print(job["id"])
            if watch:
                raise typer.Exit(_watch(client, job["id"]))
    except (APIError, ValueError, OSError) as error:
        raise _fail(error) from None


@jobs_app.command("list")
def jobs_list(
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    status: Annotated[str | None, typer.Option(help="Only jobs with this status.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List your jobs."""
    try:
        with _client() as client:
            page = client.list_jobs(limit=limit, status=status)
    except APIError as error:
        raise _fail(error) from None
    if as_json:
        print(json.dumps(page, indent=2))
        return
    table = Table("id", "status", "method", "backend", "step", "loss", "created")
    for job in page["data"]:
        progress = job["progress"]
        loss = progress["loss"]
        table.add_row(job["id"], job["status"], job["method"], job["backend"],
                      f"{progress['step']}/{progress['total_steps']}",
                      f"{loss:.4f}" if loss is not None else "-", job["created_at"][:19])
    out.print(table)


@jobs_app.command("get")
def jobs_get(job_id: str) -> None:
    """Print a job as JSON (status, progress, quantum usage, metrics, error)."""
    try:
        with _client() as client:
            print(json.dumps(client.get_job(job_id), indent=2))
    except APIError as error:
        raise _fail(error) from None


@jobs_app.command("watch")
def jobs_watch(job_id: str) -> None:
    """Live progress until the job ends; exits 0 only if it succeeded."""
    try:
        with _client() as client:
            raise typer.Exit(_watch(client, job_id))
    except APIError as error:
        raise _fail(error) from None


@jobs_app.command("cancel")
def jobs_cancel(job_id: str) -> None:
    """Cancel a job (a running one stops within one step; its checkpoint is kept)."""
    try:
        with _client() as client:
            job = client.cancel_job(job_id)
    except APIError as error:
        raise _fail(error) from None
    err.print(f"{job_id}: cancel requested, status {job['status']}")


@jobs_app.command("download")
def jobs_download(
    job_id: str,
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder to unpack into.")] =
    Path("."),
    export_format: Annotated[str, typer.Option(
        "--format", "-f", help="peft (adapter folder), merged (transformers folder with the "
        "adapter merged in) or gguf (llama.cpp LoRA file); merged and gguf need the job's "
        "export.formats to have asked for them.")] = "peft",
) -> None:
    """Download a succeeded job's adapter and print the path to load it from."""
    if export_format not in ("peft", "merged", "gguf"):
        raise _fail(ValueError(f"--format: {export_format!r} is not one of peft, merged, gguf"))
    try:
        with _client() as client:
            path = client.download(job_id, output, export_format)
    except APIError as error:
        raise _fail(error) from None
    hint = {
        "peft": f"load it with PeftModel.from_pretrained(base, '{path}')",
        "merged": f"load it with AutoModelForCausalLM.from_pretrained('{path}')",
        "gguf": f"use it with llama-cli -m <base model>.gguf --lora {path}",
    }[export_format]
    err.print(f"{export_format} export downloaded; {hint}")
    print(path)


def _watch(client: QPAClient, job_id: str) -> int:
    from qpa.estimate import describe_quantum_job

    job = client.get_job(job_id)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task(f"{job_id} {job['status']}",
                                 total=job["progress"]["total_steps"] or None,
                                 completed=job["progress"]["step"], info="")
        info: dict[str, Any] = {}
        losses: list[float] = []
        for event in client.stream_events(job_id):
            data = event["data"]
            kind = event["type"]
            if kind == "step":
                if data.get("loss") is not None:
                    losses.append(float(data["loss"]))
                info["loss"] = f"loss {data.get('loss', 0):.4f} {sparkline(losses, 24)}"
                quantum = data.get("quantum") or {}
                if quantum.get("circuits"):
                    info["q"] = f"{quantum['circuits']} circuits {quantum.get('seconds', 0):.1f}s"
                progress.update(task, completed=data["step"],
                                total=data.get("total_steps") or None,
                                info="  ".join(info.values()))
            elif kind == "eval" and data.get("eval_loss") is not None:
                info["eval"] = f"eval {data['eval_loss']:.4f}"
                progress.update(task, info="  ".join(info.values()))
            elif kind == "quantum_job":
                # A primitive job on a device can run for minutes: say which, how big.
                info["q"] = describe_quantum_job(data)
                progress.update(task, info="  ".join(info.values()))
            elif kind == "status":
                progress.update(task, description=f"{job_id} {data.get('status', '')}".strip())
                if data.get("message"):
                    progress.console.print(f"[dim]{data['message']}[/dim]")
    job = client.get_job(job_id)
    colour = {JobStatus.SUCCEEDED: "green", JobStatus.FAILED: "red"}.get(job["status"], "yellow")
    err.print(f"{job_id}: [{colour}]{job['status']}[/{colour}]"
              + (f" - {job['error']}" if job.get("error") else ""))
    return 0 if job["status"] == JobStatus.SUCCEEDED else 1


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``jobs`` and ``keys`` to the ``qpa`` typer app."""
    app.command("serve")(serve)
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(keys_app, name="keys")


app = typer.Typer(help="QPA service commands (mounted into `qpa`).", no_args_is_help=True)
register(app)

if __name__ == "__main__":
    sys.exit(app())
