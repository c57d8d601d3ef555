"""Turning a REST job body into a stored, queued job: validation and server policy.

The body is the job config (one schema, ``qpa.config``) with ``train_file``/``eval_file``
set to file ids owned by the caller. Policy from settings is applied here: allowed
backends, and caps on qubits and quantum seconds, which the library then enforces.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from qpa.config import JobConfig
from qpa.errors import ConfigError
from services import store
from services.backends import unusable_reason
from services.settings import Settings


class NotFoundError(LookupError):
    """An id that does not exist for this API key (answered 404, never 403: a key must
    not learn which ids other keys own)."""

    def __init__(self, detail: str, field: str | None = None):
        self.detail = detail
        self.field = field
        super().__init__(detail)


# Widest values the job table's columns hold (services.store.Job).
COLUMN_LIMITS = {"backend": 200, "base_model": 500}


def prepare_config(session: Session, settings: Settings, owner_id: str,
                   body: JobConfig, enforce_budget: bool = True) -> dict[str, Any]:
    """Apply server policy to a validated job config and return the config dict to
    store. Raises ConfigError or NotFoundError naming the field at fault.

    With ``enforce_budget`` a job whose estimated QPU seconds (``qpa.estimate``) exceed
    its quantum.max_seconds, or the server's cap, is refused here, at submission."""
    config = body.model_copy(deep=True)
    if "backend" not in config.model_fields_set:
        config.backend = settings.default_backend
    # output_dir is CLI only: the service chooses the job's folder. A CLI config reused
    # as a REST body keeps working.
    config.output_dir = None
    for field, width in COLUMN_LIMITS.items():
        value = getattr(config, field)
        if len(value) > width or "\x00" in value:
            raise ConfigError(field, f"must be at most {width} characters, without NUL")

    for field in ("train_file", "eval_file"):
        file_id = getattr(config, field)
        if file_id is not None and store.get_file(session, file_id, owner_id) is None:
            raise NotFoundError(f"{field}: no uploaded file {file_id!r} (upload it with "
                                "POST /v1/files and pass the returned id)", field)

    # A classical job never runs a circuit: the server's default backend must not refuse it
    # (an IBM default that is down would block every LoRA job). A backend the job names
    # itself is still checked, so a typo or a forbidden device is reported, not ignored.
    if config.uses_quantum or "backend" in body.model_fields_set:
        reason = unusable_reason(config.backend, settings)
        if reason:
            raise ConfigError("backend", reason)

    quantum = config.quantum
    if quantum.max_qubits is None or quantum.max_qubits > settings.max_qubits:
        quantum.max_qubits = settings.max_qubits
    cap = settings.max_quantum_seconds
    capped = cap is not None and (quantum.max_seconds is None or quantum.max_seconds > cap)
    if capped:
        quantum.max_seconds = cap
    if enforce_budget and quantum.max_seconds is not None:
        from qpa.estimate import check_budget, estimate_job, has_device_timing

        if has_device_timing(config):
            note = " (the server's cap, QPA_MAX_QUANTUM_SECONDS)" if capped else ""
            check_budget(estimate_job(config), limit_note=note)
    return config.model_dump(mode="json")
