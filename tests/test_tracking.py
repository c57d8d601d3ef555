"""TensorBoard event files per job: the curves TensorBoard itself reads back, and a job
resumed after its worker died shows each step once."""

from __future__ import annotations

import pytest
from helpers import tiny_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qpa.training import finetune


class WorkerKilled(BaseException):
    """Like SIGKILL mid-step: no checkpoint is written on the way out."""


def test_tensorboard_curves_survive_a_killed_worker(tiny_llama_dir, data_files, tmp_path):
    config = tiny_config(tiny_llama_dir, data_files, steps=4, train={"checkpoint_every": 2})

    def die_after_step_three(event: dict) -> None:
        if event["type"] == "step" and event["step"] == 3:
            raise WorkerKilled

    with pytest.raises(WorkerKilled):
        finetune(config, tmp_path, on_event=die_after_step_three)
    events: list[dict] = []
    finetune(config, tmp_path, on_event=events.append)  # resumes from step 2

    log_dir = tmp_path / "tensorboard"
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 2  # one per attempt
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    train = [(event.step, event.value) for event in accumulator.Scalars("train/loss")]
    # Step 3 ran twice; the first run's value was purged when the job resumed.
    assert [step for step, _ in train] == [1, 2, 3, 4]
    resumed = {e["step"]: e["loss"] for e in events if e["type"] == "step"}
    assert sorted(resumed) == [3, 4]
    assert train[2][1] == pytest.approx(resumed[3]) and train[3][1] == pytest.approx(resumed[4])
    evals = {event.step: event.value for event in accumulator.Scalars("eval/loss")}
    final_eval = next(e["eval_loss"] for e in events if e["type"] == "eval")
    assert sorted(evals) == [0, 4] and evals[4] == pytest.approx(final_eval)
    circuits = [event.value for event in accumulator.Scalars("quantum/circuits")]
    assert circuits == sorted(circuits) and circuits[0] > 0
    assert "config/text_summary" in accumulator.Tags()["tensors"]
