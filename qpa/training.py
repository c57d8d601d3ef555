"""The trainer: one function that runs a whole job, used alike by the CLI and the worker.

Every bad input is found in ``_prepare`` before the first step. The loop checkpoints
every ``train.checkpoint_every`` steps (and on cancel or failure) into ``state/``; a run
started on a folder that holds a checkpoint resumes from it, and a finished folder is
returned as is, so a redelivered task is harmless.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import qpa
from qpa.backends.base import QuantumUsage
from qpa.config import JobConfig
from qpa.data import StepBatches, fixed_batches, read_jsonl, tokenize_records
from qpa.errors import JobCancelled
from qpa.export import load_checkpoint, model_card, save_checkpoint, write_json
from qpa.methods import method_class
from qpa.methods.base import AdapterMethod
from qpa.models import load_base_model, resolve_target_modules
from qpa.tracking import TensorBoardLog

EventSink = Callable[[dict[str, Any]], None]


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


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


class Trainer:
    """Owns the model, the method, the optimiser and the output folder of one job."""

    def __init__(self, config: JobConfig, output_dir: str | Path, *,
                 on_event: EventSink | None = None,
                 should_stop: Callable[[], bool] | None = None):
        self.config = config
        self.output_dir = Path(output_dir)
        self.state_dir = self.output_dir / "state"
        self._sink = on_event
        self.should_stop = should_stop or (lambda: False)
        self.method: AdapterMethod | None = None
        self.tracker: TensorBoardLog | None = None

    # -- events -----------------------------------------------------------------------
    def emit(self, event_type: str, **fields: Any) -> None:
        event = {"type": event_type, "time": time.time(), **fields}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with (self.output_dir / "events.jsonl").open("a") as stream:
            stream.write(json.dumps(event) + "\n")
        if self.tracker is not None:
            self.tracker.record(event)
        if self._sink is not None:
            self._sink(event)

    # -- set-up: everything that can be wrong is found here -----------------------------
    def _prepare(self) -> None:
        config = self.config
        train_records = read_jsonl(config.train_file, "train_file")
        if config.eval_file:
            eval_records = read_jsonl(config.eval_file, "eval_file")
        else:
            train_records, eval_records = _split_eval(train_records, config.train.seed)
        self.device = pick_device(config.train.device)
        self.emit("status", message=f"loading base model {config.base_model}")
        model, self.tokenizer, self.base_model_path = load_base_model(
            config.base_model, self.device
        )
        self.target_modules = resolve_target_modules(model, config.lora.target_modules)
        self.train_examples = tokenize_records(
            self.tokenizer, train_records, config.train.max_length, "train_file"
        )
        self.eval_examples = tokenize_records(
            self.tokenizer, eval_records, config.train.max_length,
            "eval_file" if config.eval_file else "train_file",
        )
        seed_everything(config.train.seed)
        self.method = method_class(config.method)(config, self.target_modules)
        self.model = self.method.attach(model)
        self.model.to(self.device)
        pad_id = self.tokenizer.pad_token_id
        self.batches = StepBatches(self.train_examples, config.train.batch_size,
                                   config.train.seed, pad_id)
        self.eval_set = fixed_batches(self.eval_examples, config.train.batch_size,
                                      config.train.eval_batches, pad_id)
        self.optimizer = torch.optim.AdamW(
            self.method.param_groups(config.train.lr), lr=config.train.lr,
            weight_decay=config.train.weight_decay,
        )
        warmup = config.train.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )

    # -- pieces of the loop ------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        self.method.before_eval()
        self.model.eval()
        total_loss, total_tokens = 0.0, 0
        for batch in self.eval_set:
            batch = {key: value.to(self.device) for key, value in batch.items()}
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            total_loss += float(self.model(**batch).loss) * tokens
            total_tokens += tokens
        return total_loss / max(total_tokens, 1)

    def _checkpoint(self, step: int, **extra: Any) -> None:
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

    def _restore(self, payload: dict[str, Any]) -> int:
        self.method.load_state_dict(payload["method_state"])
        self.method.load_extra_state(payload["method_extra"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        backend = getattr(self.method, "backend", None)
        if backend is not None and payload.get("quantum_usage"):
            backend.usage.load(payload["quantum_usage"])
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
        with torch.no_grad():
            output = self.model.generate(
                **inputs, max_new_tokens=self.config.train.sample_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    # -- the job --------------------------------------------------------------------------
    def run(self, resume: bool = True) -> dict[str, Any]:
        metrics_path = self.output_dir / "metrics.json"
        payload = load_checkpoint(self.state_dir) if resume else None
        if payload and payload.get("finished") and metrics_path.is_file():
            return json.loads(metrics_path.read_text())
        wall_start = time.perf_counter()
        self.losses: list[float] = []
        self.train_seconds = 0.0
        self.eval_loss_before: float | None = None
        try:
            self._prepare()
            self.tracker = TensorBoardLog.for_job(
                self.output_dir / "tensorboard", self.config,
                resume_step=int(payload["step"]) if payload else None)
            return self._train(payload, wall_start)
        finally:
            if self.tracker is not None:
                self.tracker.close()
            if self.method is not None:
                self.method.close()

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
        self.emit("status", message="training", step=start, total_steps=steps)
        completed = start
        try:
            for step in range(start, steps):
                if self.should_stop():
                    self._checkpoint(completed)
                    raise JobCancelled(completed)
                step_start = time.perf_counter()
                self.model.train()
                self.method.before_forward(step)
                batch = {k: v.to(self.device) for k, v in self.batches(step).items()}
                loss = self.model(**batch).loss
                loss.backward()
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
                self.losses.append(loss.item())
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
        self.emit("eval", step=config.steps, eval_loss=eval_after)
        adapter_dir = self.output_dir / "adapter"
        export_info = self.method.export_adapter(adapter_dir)
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
            "export": export_info,
        }
        metrics["sample"] = self.sample()
        metrics["wall_seconds"] = time.perf_counter() - wall_start
        write_json(self.output_dir / "metrics.json", metrics)
        (adapter_dir / "README.md").write_text(model_card(config, metrics, export_info))
        self._checkpoint(config.steps, finished=True)
        self.emit("done", step=config.steps, metrics=metrics)
        return metrics


def _perplexity(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))


def finetune(config: JobConfig, output_dir: str | Path, *,
             on_event: EventSink | None = None,
             should_stop: Callable[[], bool] | None = None,
             resume: bool = True) -> dict[str, Any]:
    """Run one fine-tuning job into ``output_dir`` and return its metrics.

    Raises ConfigError (before training) for bad input, JobCancelled when ``should_stop``
    turned True (after checkpointing), QuantumBudgetExceeded past ``quantum.max_seconds``.
    """
    return Trainer(config, output_dir, on_event=on_event, should_stop=should_stop).run(resume)
