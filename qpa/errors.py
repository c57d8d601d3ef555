"""Exceptions a user can act on: each names the config field at fault and why."""

from __future__ import annotations


class QPAError(Exception):
    """Base class for every error the library raises on purpose."""


class ConfigError(QPAError, ValueError):
    """A job config (or something it points to) is unusable.

    ``field`` is the dotted config path (``backend``, ``lora.target_modules``,
    ``train_file``...) so CLI, REST and Python callers can all show where the problem is.
    """

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")

    def __reduce__(self):  # pickled whole (data-parallel ranks re-raise rank 0's errors)
        return type(self), (self.field, self.reason)


class JobCancelled(QPAError):
    """Training stopped because the caller asked it to; the last checkpoint is kept."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(f"cancelled at step {step}")

    def __reduce__(self):
        return type(self), (self.step,)


class QuantumBudgetExceeded(QPAError):
    """The job used more quantum seconds than ``quantum.max_seconds`` allows."""
