"""A real corpus nobody here wrote: Python's reference documentation (``pydoc_data.topics``).

Split by topic (a topic's text is all train or all eval), deterministic by a hash of the
topic name, so evaluation measures adaptation to held-out documentation, not recall.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def pydoc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return dict(sorted(topics.items()))


def _is_eval(topic: str, eval_fraction: float) -> bool:
    digest = hashlib.sha256(topic.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < eval_fraction


def paragraphs(text: str, min_chars: int = 200, max_chars: int = 1200) -> list[str]:
    """Cut a topic into paragraph groups of readable size."""
    pieces, current = [], ""
    for block in (b.strip() for b in text.split("\n\n")):
        if not block:
            continue
        current = f"{current}\n\n{block}" if current else block
        if len(current) >= min_chars:
            pieces.append(current[:max_chars])
            current = ""
    if current:
        pieces.append(current[:max_chars])
    return pieces


def pydoc_split(eval_fraction: float = 0.1, max_train: int | None = None,
                max_eval: int | None = None) -> tuple[list[dict], list[dict]]:
    """(train, eval) records ``{"text": ...}`` from held-apart topics."""
    train, evaluation = [], []
    for topic, text in pydoc_topics().items():
        records = [{"text": piece} for piece in paragraphs(text)]
        (evaluation if _is_eval(topic, eval_fraction) else train).extend(records)
    return train[:max_train], evaluation[:max_eval]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as stream:
        for record in records:
            stream.write(json.dumps(record) + "\n")
    return path


def write_pydoc_dataset(
    directory: str | Path, eval_fraction: float = 0.1,
    max_train: int | None = None, max_eval: int | None = None,
) -> tuple[Path, Path]:
    """Write train.jsonl and eval.jsonl into ``directory``; return their paths."""
    directory = Path(directory)
    train, evaluation = pydoc_split(eval_fraction, max_train, max_eval)
    return (
        write_jsonl(directory / "train.jsonl", train),
        write_jsonl(directory / "eval.jsonl", evaluation),
    )


if __name__ == "__main__":  # python -m qpa.datasets DIR [MAX_TRAIN MAX_EVAL]
    import sys

    arguments = sys.argv[1:] or ["examples/data"]
    limits = [int(value) for value in arguments[1:3]] + [None, None]
    train_path, eval_path = write_pydoc_dataset(arguments[0], 0.1, limits[0], limits[1])
    print(f"wrote {train_path} and {eval_path}")
