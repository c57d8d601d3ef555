"""Structured logging for api, worker and embedded server: one JSON object per line.

Pass context with ``extra={"job_id": ...}`` (or a ``JobLogger``); every extra field lands
in the line, so a job's whole story can be grepped by its id across processes.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(  # noqa: UP017
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{key}={value}" for key, value in vars(record).items()
                          if key not in _STANDARD and not key.startswith("_"))
        base = super().format(record)
        return f"{base} {extras}" if extras else base


def configure_logging(level: str = "INFO", json_lines: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else
                         PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries that log every request or transpiler pass at INFO drown the job lines.
    for noisy in ("httpx", "httpcore", "qiskit", "qiskit_ibm_runtime", "stevedore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class JobLogger(logging.LoggerAdapter):
    """A logger that stamps every line with the job id (and any other fixed context)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs
