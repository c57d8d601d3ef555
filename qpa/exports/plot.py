"""The job's loss curve: ``loss.png`` (train loss per step, eval loss at each evaluation).

The curve is read from ``events.jsonl``, the job's log of record, so it covers the whole
run even across resumes: a resumed job repeats the steps after its last checkpoint, and
the later value of a step wins (it is the one the final model was trained with).
Rendered with matplotlib's Agg canvas directly (no pyplot state, safe in worker threads).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

LOSS_PLOT = "loss.png"
TRAIN_COLOUR = "#1f77b4"  # blue
EVAL_COLOUR = "#d62728"  # red
SPARK_BARS = "▁▂▃▄▅▆▇█"


@dataclass
class LossHistory:
    train: dict[int, float] = field(default_factory=dict)  # step -> train loss
    eval: dict[int, float] = field(default_factory=dict)  # step -> eval loss

    def add_event(self, event: dict) -> None:
        kind = event.get("type")
        step = event.get("step")
        if step is None:
            return
        if kind == "step" and _finite(event.get("loss")):
            self.train[int(step)] = float(event["loss"])
        elif kind == "eval" and _finite(event.get("eval_loss")):
            self.eval[int(step)] = float(event["eval_loss"])


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def read_loss_history(events_path: Path) -> LossHistory:
    history = LossHistory()
    if not events_path.is_file():
        return history
    with events_path.open() as stream:
        for line in stream:
            try:
                history.add_event(json.loads(line))
            except (json.JSONDecodeError, TypeError, ValueError):
                continue  # a line cut short by a killed process
    return history


def render_loss_png(history: LossHistory, title: str) -> bytes:
    """The PNG bytes of the loss curve (both series, legend, axes labelled)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    if history.train:
        steps = sorted(history.train)
        axis.plot(steps, [history.train[s] for s in steps], color=TRAIN_COLOUR,
                  linewidth=1.5, label="train loss (per step)")
    if history.eval:
        steps = sorted(history.eval)
        axis.plot(steps, [history.eval[s] for s in steps], color=EVAL_COLOUR, linewidth=2,
                  marker="o", markersize=5, label="eval loss")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("step")
    axis.set_ylabel("loss (mean token cross-entropy)")
    axis.set_title(title, fontsize=10)
    axis.grid(True, alpha=0.3)
    if history.train or history.eval:
        axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def sparkline(values: list[float], width: int = 32) -> str:
    """The last ``width`` values as block characters scaled between their min and max."""
    values = [v for v in values if _finite(v)][-width:]
    if not values:
        return ""
    low, high = min(values), max(values)
    if high - low < 1e-12:
        return SPARK_BARS[len(SPARK_BARS) // 2] * len(values)
    top = len(SPARK_BARS) - 1
    return "".join(SPARK_BARS[round((v - low) / (high - low) * top)] for v in values)


def write_loss_plot(output_dir: Path, title: str, *, copy_to: Path | None = None) -> Path | None:
    """Render ``output_dir/events.jsonl`` into ``output_dir/loss.png`` (and a copy in
    ``copy_to``, the adapter folder whose model card shows it). None when nothing to plot."""
    from qpa.export import atomic_write_bytes

    history = read_loss_history(output_dir / "events.jsonl")
    if not history.train and not history.eval:
        return None
    png = render_loss_png(history, title)
    path = output_dir / LOSS_PLOT
    atomic_write_bytes(path, png)
    if copy_to is not None:
        atomic_write_bytes(copy_to / LOSS_PLOT, png)
    return path
