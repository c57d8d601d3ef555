"""Turning a REST job body into a stored, queued job: validation and server policy.

The body is the job config (one schema, ``qpa.config``) with ``train_file``/``eval_file``
set to file ids owned by the caller. Policy from settings is applied here: allowed
backends, and caps on qubits and quantum seconds, which the library then enforces.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from qpa.config import parse_config
from qpa.errors import ConfigError
from services import store
from services.backends import unusable_reason
from services.settings import Settings


class NotFoundError(LookupError):
    """An id that does not exist for this API key (answered 404, never 403: a key must
    not learn which ids other keys own)."""

    def __init__(self, detail: str):
        self.detail = detail
        super().__init__(detail)


def prepare_config(session: Session, settings: Settings, owner_id: str,
                   body: Any) -> dict[str, Any]:
    """Validate a job body into the config dict to store. Raises ConfigError or
    NotFoundError naming the field at fault."""
    if not isinstance(body, dict):
        raise ConfigError("config", "must be a JSON object")
    body = dict(body)
    body.setdefault("backend", settings.default_backend)
    # output_dir is CLI only: the service chooses the job's folder. A CLI config reused
    # as a REST body keeps working.
    body.pop("output_dir", None)
    config = parse_config(body)

    for field in ("train_file", "eval_file"):
        file_id = getattr(config, field)
        if file_id is not None and store.get_file(session, file_id, owner_id) is None:
            raise NotFoundError(f"{field}: no uploaded file {file_id!r} (upload it with "
                                "POST /v1/files and pass the returned id)")

    reason = unusable_reason(config.backend, settings)
    if reason:
        raise ConfigError("backend", reason)

    quantum = config.quantum
    if quantum.max_qubits is None or quantum.max_qubits > settings.max_qubits:
        quantum.max_qubits = settings.max_qubits
    cap = settings.max_quantum_seconds
    if cap is not None and (quantum.max_seconds is None or quantum.max_seconds > cap):
        quantum.max_seconds = cap
    return config.model_dump(mode="json")
