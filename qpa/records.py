"""JSONL training records: the accepted shapes and their line-by-line validation.

A record is one of ``{"text": ...}``, ``{"prompt": ..., "completion": ...}`` (loss on the
completion only) or ``{"messages": [{"role": ..., "content": ...}, ...]}`` (rendered with
the tokenizer's chat template; loss on the final assistant message).

Torch-free on purpose: the API validates uploads with it without loading torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from qpa.errors import ConfigError


def _check_record(record: object, where: str, field: str) -> dict:
    if not isinstance(record, dict):
        raise ConfigError(field, f"{where}: each line must be a JSON object")
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise ConfigError(field, f"{where}: 'text' must be a non-empty string")
    elif "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                raise ConfigError(field, f"{where}: '{key}' must be a string")
        if not record["completion"]:
            raise ConfigError(field, f"{where}: 'completion' must not be empty")
    elif "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ConfigError(field, f"{where}: 'messages' must be a non-empty list")
        for position, message in enumerate(messages):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise ConfigError(
                    field, f"{where}: messages[{position}] needs string 'role' and 'content'"
                )
    else:
        raise ConfigError(
            field, f"{where}: expected a 'text', 'prompt'+'completion' or 'messages' record"
        )
    return record


def iter_jsonl(path: str | Path, field: str = "train_file") -> Iterator[dict]:
    """Yield validated records; the error names the file, line and problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(field, f"file {str(path)!r} does not exist")
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError(field, f"line {number}: not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(field, f"line {number}: invalid JSON ({error.msg})") from None
            except RecursionError:
                # The C parser stops at the interpreter's recursion limit; no record
                # nests more than three levels, so such a line is never a record.
                raise ConfigError(field, f"line {number}: JSON nested too deeply "
                                  "(a record nests at most three levels)") from None
            yield _check_record(record, f"line {number}", field)


def read_jsonl(path: str | Path, field: str = "train_file") -> list[dict]:
    records = list(iter_jsonl(path, field))
    if not records:
        raise ConfigError(field, "the file contains no records")
    return records


def validate_jsonl(path: str | Path, field: str = "train_file") -> int:
    """Validate a whole file without keeping it; return the number of records."""
    count = sum(1 for _ in iter_jsonl(path, field))
    if count == 0:
        raise ConfigError(field, "the file contains no records")
    return count
