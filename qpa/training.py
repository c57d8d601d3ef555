"""The trainer: one function that runs a whole job, used alike by the CLI and the worker.

Every bad input is found in ``_prepare`` before the first step. The loop checkpoints
every ``train.checkpoint_every`` steps (and on cancel or failure) into ``state/``; a run
started on a folder that holds a checkpoint resumes from it, and a finished folder is
returned as is, so a redelivered task is harmless.

With a ``DataParallel`` of N > 1 processes (``qpa.distributed``) every rank runs this same
loop on its slice of each global batch; rank 0 alone writes events, checkpoints and
outputs, and decides on cancellation for all.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch

import qpa
from qpa.backends.base import QuantumUsage
from qpa.backends.factory import check_backend
from qpa.config import JobConfig
from qpa.data import (
    StepBatches,
    collate,
    fixed_batches,
    loss_tokens,
    tokenize_records,
)
from qpa.distributed import SINGLE_PROCESS, DataParallel, check_nproc, check_world, launch
from qpa.errors import ConfigError, JobCancelled
from qpa.export import load_checkpoint, model_card, save_checkpoint, write_json
from qpa.exports.formats import check_exports, write_exports
from qpa.exports.plot import LOSS_PLOT, write_loss_plot
from qpa.methods import method_class
from qpa.methods.base import AdapterMethod
from qpa.models import load_base_model, resolve_target_modules
from qpa.records import read_jsonl
from qpa.tracking import TensorBoardLog

EventSink = Callable[[dict[str, Any]], None]


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_mixed_precision(requested: str, device: torch.device) -> str:
    """``bf16`` or ``no`` for ``train.mixed_precision`` on ``device``."""
    if requested == "auto":
        bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16" if bf16_gpu else "no"
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.mixed_precision", "this GPU does not support bfloat16; use no")
    return requested


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _split_eval(records: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """Without an eval file, hold out 10 % of the training records (at least one)."""
    if len(records) < 2:
        return records, records
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = max(1, len(records) // 10)
    eval_ids = set(order[:held])
    train = [r for i, r in enumerate(records) if i not in eval_ids]
    return train, [records[i] for i in sorted(eval_ids)]


def lr_schedule(optimizer: torch.optim.Optimizer,
                config: JobConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``train.warmup_steps``, then ``train.schedule`` to the last step."""
    warmup, schedule, total = config.train.warmup_steps, config.train.schedule, config.steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "linear":
            return 1.0 - progress
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Trainer:
    """Owns the model, the method, the optimiser and the output folder of one job."""

    def __init__(self, config: JobConfig, output_dir: str | Path, *,
                 on_event: EventSink | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 data_parallel: DataParallel = SINGLE_PROCESS):
        self.config = config
        self.data_parallel = data_parallel
        self.output_dir = Path(output_dir)
        self.state_dir = self.output_dir / "state"
        self._sink = on_event
        self.should_stop = should_stop or (lambda: False)
        self.method: AdapterMethod | None = None
        self.tracker: TensorBoardLog | None = None
        self.planned_jobs: int | None = None

    # -- events -----------------------------------------------------------------------
    def emit(self, event_type: str, **fields: Any) -> None:
        if not self.data_parallel.is_main:
            return  # one job, one log: rank 0 speaks for every rank
        event = {"type": event_type, "time": time.time(), **fields}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with (self.output_dir / "events.jsonl").open("a") as stream:
            stream.write(json.dumps(event) + "\n")
        if self.tracker is not None:
            self.tracker.record(event)
        if self._sink is not None:
            self._sink(event)

    def _quantum_job(self, info: dict[str, Any]) -> None:
        """One event per primitive job submitted and done, numbered against the plan."""
        if self.planned_jobs is not None:
            info = {**info, "planned_jobs": self.planned_jobs}
        self.emit("quantum_job", **info)

    # -- set-up: everything that can be wrong is found here -----------------------------
    def _prepare(self) -> None:
        config, data_parallel = self.config, self.data_parallel
        check_world(config, data_parallel.world_size)
        if config.uses_quantum:
            check_backend(config.backend)  # the device exists and the account may use it
        train_records = read_jsonl(config.train_file, "train_file")
        if config.eval_file:
            eval_records = read_jsonl(config.eval_file, "eval_file")
        else:
            train_records, eval_records = _split_eval(train_records, config.train.seed)
        self.device = (data_parallel.device if data_parallel.active
                       else pick_device(config.train.device))
        self.mixed_precision = resolve_mixed_precision(config.train.mixed_precision, self.device)
        self.emit("status", message=f"loading base model {config.base_model}")
        with data_parallel.main_first():  # a first use converts the model once, on rank 0
            model, self.tokenizer, self.base_model_path = load_base_model(
                config.base_model, self.device
            )
        if config.train.gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise ConfigError("train.gradient_checkpointing",
                                  f"{type(model).__name__} does not support it")
            # Non-reentrant: torch's recommended mode, and correct with a frozen base.
            # transformers 5 renamed the method (the old name warns); 4.x has only the old.
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
        self.target_modules = resolve_target_modules(model, config.lora.target_modules,
                                                     config.method_options.target_set)
        check_exports(config, model, self.target_modules)
        self.base_config = model.config
        self.train_examples = tokenize_records(
            self.tokenizer, train_records, config.train.max_length, "train_file"
        )
        self.eval_examples = tokenize_records(
            self.tokenizer, eval_records, config.train.max_length,
            "eval_file" if config.eval_file else "train_file",
        )
        seed_everything(config.train.seed)
        self.method = method_class(config.method)(config, self.target_modules)
        self.method.data_parallel = data_parallel
        self.method.on_quantum_job = self._quantum_job
        self.model = self.method.attach(model)
        self.model.to(self.device)
        self._plan_quantum_work()
        # Start every rank from rank 0's weights, as DDP does (they agree already when the
        # seed fixes every random initialisation; this makes it so regardless).
        data_parallel.broadcast_tensors(self.method.trainable_parameters())
        pad_id = self.tokenizer.pad_token_id
        self.batches = StepBatches(self.train_examples, config.train.batch_size,
                                   config.train.seed, pad_id)
        self.eval_set = fixed_batches(self.eval_examples, config.train.batch_size,
                                      config.train.eval_batches, pad_id)
        self.optimizer = torch.optim.AdamW(
            self.method.param_groups(config.train.lr), lr=config.train.lr,
            weight_decay=config.train.weight_decay,
        )
        self.scheduler = lr_schedule(self.optimizer, config)

    def _plan_quantum_work(self) -> None:
        """Estimate the run's quantum jobs before the first one (``qpa.estimate``), tell
        the user, and refuse a run whose QPU-seconds estimate exceeds quantum.max_seconds."""
        backend = self.method.backend
        if not self.data_parallel.is_main or backend is None:
            return
        from qpa.estimate import check_budget, estimate_job

        estimate = estimate_job(self.config, num_values=self.method.generated_values,
                                backend=backend)
        check_budget(estimate)
        self.planned_jobs = estimate.jobs
        self.emit("quantum_plan", **estimate.as_dict())

    # -- pieces of the loop ------------------------------------------------------------
    def _autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.mixed_precision == "bf16")

    @torch.no_grad()
    def evaluate(self) -> float:
        self.method.before_eval()
        self.model.eval()
        data_parallel = self.data_parallel
        total_loss, total_tokens = 0.0, 0
        # Each rank evaluates every N-th batch; the sums are added up over the ranks.
        for batch in self.eval_set[data_parallel.rank::data_parallel.world_size]:
            batch = {key: value.to(self.device) for key, value in batch.items()}
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            with self._autocast():
                total_loss += float(self.model(**batch).loss) * tokens
            total_tokens += tokens
        total_loss, total_tokens = data_parallel.sum_floats([total_loss, total_tokens])
        return total_loss / max(total_tokens, 1)

    def _step_loss(self, step: int) -> torch.Tensor:
        """This rank's share of the step's loss; the shares add up to the global batch's."""
        data_parallel = self.data_parallel
        if not data_parallel.active:
            batch = {k: v.to(self.device) for k, v in self.batches(step).items()}
            with self._autocast():
                return self.model(**batch).loss
        examples = self.batches.examples_for(step)
        share = len(examples) // data_parallel.world_size
        mine = examples[data_parallel.rank * share:(data_parallel.rank + 1) * share]
        batch = {k: v.to(self.device)
                 for k, v in collate(mine, self.tokenizer.pad_token_id).items()}
        # Sum over this rank's tokens / tokens of the whole global batch (transformers'
        # num_items_in_batch): summed over ranks, exactly the single-process mean.
        with self._autocast():
            return self.model(**batch, num_items_in_batch=loss_tokens(examples)).loss

    def _checkpoint(self, step: int, **extra: Any) -> None:
        if not self.data_parallel.is_main:
            return  # every rank holds the same state; rank 0 writes it
        payload = {
            "step": step,
            "method_state": self.method.state_dict(),
            "method_extra": self.method.extra_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "quantum_usage": (self.method.quantum_report() or {}),
            "eval_loss_before": self.eval_loss_before,
            "losses": self.losses[-200:],
            "train_seconds": self.train_seconds,
            "rng": torch.get_rng_state(),
            **extra,
        }
        save_checkpoint(self.state_dir, payload, self.config)
        self.emit("checkpoint", step=step)
        if not extra.get("finished"):
            self._write_plot()  # so a running job's curve can be looked at

    def _restore(self, payload: dict[str, Any]) -> int:
        self.method.load_state_dict(payload["method_state"])
        self.method.load_extra_state(payload["method_extra"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if self.method.backend is not None and payload.get("quantum_usage"):
            self.method.backend.usage.load(payload["quantum_usage"])
        self.eval_loss_before = payload["eval_loss_before"]
        self.losses = list(payload.get("losses", []))
        self.train_seconds = payload.get("train_seconds", 0.0)
        torch.set_rng_state(payload["rng"])
        return int(payload["step"])

    def sample(self) -> str | None:
        prompt = self.config.train.sample_prompt
        if not prompt or self.config.train.sample_tokens == 0:
            return None
        tokenizer = self.tokenizer
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = prompt
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.device)
        with torch.no_grad(), self._autocast():
            output = self.model.generate(
                **inputs, max_new_tokens=self.config.train.sample_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    # -- the job --------------------------------------------------------------------------
    def run(self, resume: bool = True) -> dict[str, Any]:
        # Rank 0 reads the output folder; every rank resumes from what it read.
        payload, finished = self.data_parallel.from_main(lambda: self._previous_run(resume))
        if finished is not None:
            return finished
        wall_start = time.perf_counter()
        self.losses: list[float] = []
        self.train_seconds = 0.0
        self.eval_loss_before: float | None = None
        try:
            self._prepare_everywhere()
            if self.data_parallel.is_main:
                self.tracker = TensorBoardLog.for_job(
                    self.output_dir / "tensorboard", self.config,
                    resume_step=int(payload["step"]) if payload else None)
            return self._train(payload, wall_start)
        finally:
            if self.tracker is not None:
                self.tracker.close()
            if self.method is not None:
                self.method.close()

    def _previous_run(self, resume: bool) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(checkpoint or None, metrics of a finished run or None) from the output folder."""
        payload = load_checkpoint(self.state_dir) if resume else None
        metrics_path = self.output_dir / "metrics.json"
        if payload and payload.get("finished") and metrics_path.is_file():
            return payload, json.loads(metrics_path.read_text())
        return payload, None

    def _prepare_everywhere(self) -> None:
        """``_prepare`` on every rank; if it fails anywhere, it fails everywhere."""
        try:
            self._prepare()
        except Exception:
            self.data_parallel.all_agree(False)
            raise
        if not self.data_parallel.all_agree(True):
            raise ConfigError("config", "another process of this data-parallel job rejected "
                              "it (rank 0 reports why)")

    def _train(self, payload: dict[str, Any] | None, wall_start: float) -> dict[str, Any]:
        config, steps = self.config, self.config.steps
        start = 0
        if payload is not None:
            start = self._restore(payload)
            self.emit("status", message=f"resumed from checkpoint at step {start}", step=start)
        else:
            self.method.before_forward(0)  # one quantum evaluation serves eval and step 0
            self.eval_loss_before = self.evaluate()
            self.emit("eval", step=0, eval_loss=self.eval_loss_before)
        data_parallel = self.data_parallel
        where = f" on {data_parallel.world_size} processes" if data_parallel.active else ""
        self.emit("status", message=f"training{where}", step=start, total_steps=steps)
        completed = start
        try:
            for step in range(start, steps):
                if data_parallel.decide(self.should_stop):
                    self._checkpoint(completed)
                    raise JobCancelled(completed)
                step_start = time.perf_counter()
                self.model.train()
                self.method.before_forward(step)
                loss = self._step_loss(step)
                loss_value = data_parallel.backward(loss, self.method)
                self.method.before_optimizer_step(step, last_step=step == steps - 1)
                if config.train.grad_clip:
                    torch.nn.utils.clip_grad_norm_(
                        self.method.trainable_parameters(), config.train.grad_clip
                    )
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                completed = step + 1
                elapsed = time.perf_counter() - step_start
                self.train_seconds += elapsed
                self.losses.append(loss_value)
                self.emit("step", step=completed, total_steps=steps, loss=self.losses[-1],
                          lr=self.scheduler.get_last_lr()[0], step_seconds=elapsed,
                          quantum=self._usage())
                if config.train.eval_every and completed % config.train.eval_every == 0 \
                        and completed < steps:
                    self.emit("eval", step=completed, eval_loss=self.evaluate())
                if completed % config.train.checkpoint_every == 0 and completed < steps:
                    self._checkpoint(completed)
        except JobCancelled:
            raise
        except Exception as error:
            if completed > start:
                self._checkpoint(completed)  # keep the progress a failed job made
            self.emit("error", step=completed, message=f"{type(error).__name__}: {error}")
            raise
        return self._finish(wall_start)

    def _usage(self) -> dict[str, Any] | None:
        report = self.method.quantum_report()
        if report is None:
            return None
        return {key: report[key] for key in QuantumUsage().as_dict()}

    def _finish(self, wall_start: float) -> dict[str, Any]:
        config = self.config
        eval_after = self.evaluate()
        if not self.data_parallel.is_main:
            return {"eval_loss_after": eval_after}  # rank 0 exports and reports
        self.emit("eval", step=config.steps, eval_loss=eval_after)
        adapter_dir = self.output_dir / "adapter"
        export_info = self.method.export_adapter(adapter_dir)
        exports = write_exports(config, self.method, self.output_dir,
                                base_model_path=self.base_model_path,
                                base_config=self.base_config, trained=self.model)
        tail = self.losses[-10:]
        metrics: dict[str, Any] = {
            "qpa_version": qpa.__version__,
            "method": config.method,
            "base_model": config.base_model,
            "base_model_path": self.base_model_path,
            "backend": config.backend if config.uses_quantum else None,
            "target_modules": self.target_modules,
            "steps": config.steps,
            "eval_loss_before": self.eval_loss_before,
            "eval_loss_after": eval_after,
            "perplexity_before": _perplexity(self.eval_loss_before),
            "perplexity_after": _perplexity(eval_after),
            "train_loss_last": sum(tail) / len(tail) if tail else None,
            **self.method.parameter_report(),
            "quantum": self.method.quantum_report(),
            "train_seconds": self.train_seconds,
            "world_size": self.data_parallel.world_size,
            "mixed_precision": self.mixed_precision,
            "gradient_checkpointing": config.train.gradient_checkpointing,
            "export": export_info,
            "exports": exports,
        }
        metrics["sample"] = self.sample()
        metrics["loss_plot"] = LOSS_PLOT if self._write_plot(copy_to=adapter_dir) else None
        metrics["wall_seconds"] = time.perf_counter() - wall_start
        write_json(self.output_dir / "metrics.json", metrics)
        (adapter_dir / "README.md").write_text(model_card(config, metrics, export_info,
                                                              self.method.card_rows(metrics)))
        self._checkpoint(config.steps, finished=True)
        self.emit("done", step=config.steps, metrics=metrics)
        return metrics

    def _write_plot(self, copy_to: Path | None = None) -> bool:
        """loss.png from events.jsonl; a failure is logged, never fatal to the job."""
        title = (f"{self.config.method} on {Path(self.config.base_model).name}: "
                 f"{self.config.steps} steps")
        try:
            return write_loss_plot(self.output_dir, title, copy_to=copy_to) is not None
        except Exception as error:
            self.emit("log", level="error",
                      message=f"loss plot not written: {type(error).__name__}: {error}")
            return False


def _perplexity(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))


def finetune(config: JobConfig, output_dir: str | Path, *,
             on_event: EventSink | None = None,
             should_stop: Callable[[], bool] | None = None,
             resume: bool = True, nproc: int = 1) -> dict[str, Any]:
    """Run one fine-tuning job into ``output_dir`` and return its metrics.

    ``nproc`` > 1 trains data-parallel with that many processes on this machine (this one
    is rank 0 and calls ``on_event``/``should_stop``; see ``qpa.distributed``). Raises
    ConfigError (before training) for bad input, JobCancelled when ``should_stop`` turned
    True (after checkpointing), QuantumBudgetExceeded past ``quantum.max_seconds``.
    """
    check_nproc(nproc)
    if nproc > 1:
        return launch(config, output_dir, nproc, trainer=Trainer, on_event=on_event,
                      should_stop=should_stop, resume=resume)
    return Trainer(config, output_dir, on_event=on_event, should_stop=should_stop).run(resume)
