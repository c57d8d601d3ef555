"""Experiment-tracker output: a job's training curves as TensorBoard event files.

Every job writes ``<output>/tensorboard/events.out.tfevents.*`` next to its adapter, so
``tensorboard --logdir <output>`` (or a folder of many jobs) shows the train and eval loss,
the learning rate, step time and the cumulative quantum usage, with the config as text.

TensorBoard rather than MLflow: its event files are plain append-only files in the job's
own folder that the tool reads directly (MLflow wants a tracking store, an ``mlruns/``
layout or a server, and brings a web stack of its own), and the writer is PyTorch's own
``torch.utils.tensorboard``. A resumed job restarts its writer with ``purge_step`` at the
step after the checkpoint, so steps run twice (after a worker died) are shown once.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from qpa.config import JobConfig

# Quantum usage counters of a step event, plotted as cumulative totals.
QUANTUM_FIELDS = ("jobs", "circuits", "shots", "seconds")


class TensorBoardLog:
    """Turns trainer events (``step``, ``eval``, ``done``) into TensorBoard scalars."""

    def __init__(self, log_dir: str | Path, *, purge_step: int | None = None,
                 flush_secs: int = 5):
        # Imported here: ``import qpa`` stays light, and only a training run needs it.
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge_step,
                                    flush_secs=flush_secs)

    @classmethod
    def for_job(cls, log_dir: str | Path, config: JobConfig, *,
                resume_step: int | None = None) -> TensorBoardLog:
        """The log of one job; a resumed job drops what was logged after its checkpoint
        (a step event's ``step`` counts completed steps, so the checkpoint's own is kept)."""
        log = cls(log_dir, purge_step=None if resume_step is None else resume_step + 1)
        if resume_step is None:
            log.add_config(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        return log

    def add_config(self, config_yaml: str) -> None:
        # Indented four spaces: TensorBoard renders text summaries as Markdown.
        body = "\n".join(f"    {line}" for line in config_yaml.splitlines())
        self.writer.add_text("config", body, global_step=0)

    def record(self, event: dict[str, Any]) -> None:
        kind, step = event.get("type"), event.get("step")
        if step is None:
            return
        if kind == "step":
            self._scalar("train/loss", event.get("loss"), step)
            self._scalar("train/lr", event.get("lr"), step)
            self._scalar("train/step_seconds", event.get("step_seconds"), step)
            for field in QUANTUM_FIELDS:
                self._scalar(f"quantum/{field}", (event.get("quantum") or {}).get(field), step)
        elif kind == "eval":
            self._scalar("eval/loss", event.get("eval_loss"), step)
        elif kind == "done":
            self.writer.flush()

    def _scalar(self, tag: str, value: Any, step: int) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            self.writer.add_scalar(tag, value, global_step=int(step))

    def close(self) -> None:
        self.writer.close()
