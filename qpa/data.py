"""JSONL training data: tokenisation and deterministic batching of validated records
(``qpa.records`` holds the record shapes and their validation).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from qpa.errors import ConfigError

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def _encode(tokenizer, record: dict, max_length: int, field: str) -> list[Example]:
    if "text" in record:
        ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        # Long documents become several windows so no text is thrown away.
        return [Example(ids[i : i + max_length], ids[i : i + max_length])
                for i in range(0, max(len(ids) - 1, 1), max_length) if len(ids[i:]) > 1]
    if "messages" in record:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(field, "'messages' records need a base model with a chat template")
        messages = record["messages"]
        prompt_messages = messages[:-1] if messages[-1]["role"] == "assistant" else messages
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt = tokenizer.apply_chat_template(
            prompt_messages, tokenize=False, add_generation_prompt=prompt_messages is not messages
        ) if prompt_messages is not messages else ""
        completion = full[len(prompt):] if full.startswith(prompt) else full
    else:
        prompt, completion = record["prompt"], record["completion"]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return []
    return [Example(ids, labels)]


def tokenize_records(tokenizer, records: list[dict], max_length: int,
                     field: str = "train_file") -> list[Example]:
    examples = [ex for record in records for ex in _encode(tokenizer, record, max_length, field)]
    if not examples:
        raise ConfigError(field, "no record left a trainable token after tokenisation")
    return examples


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions are masked out of attention and loss."""
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        input_ids[row, : len(ex.input_ids)] = torch.tensor(ex.input_ids)
        labels[row, : len(ex.labels)] = torch.tensor(ex.labels)
        attention[row, : len(ex.input_ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


class StepBatches:
    """Batch for step s is a pure function of (seed, s): a resumed job sees the same data."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int):
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.examples)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def examples_for(self, step: int) -> list[Example]:
        """The examples of step ``step``'s (global) batch, in order."""
        chosen = []
        for offset in range(self.batch_size):
            position = step * self.batch_size + offset
            epoch, index = divmod(position, len(self.examples))
            chosen.append(self.examples[self._order(epoch)[index]])
        return chosen

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        return collate(self.examples_for(step), self.pad_id)


def loss_tokens(examples: list[Example]) -> int:
    """Tokens a causal LM's loss averages over: labels after the shift that are not ignored."""
    return sum(1 for ex in examples for label in ex.labels[1:] if label != IGNORE_INDEX)


def fixed_batches(examples: list[Example], batch_size: int, max_batches: int,
                  pad_id: int) -> list[dict[str, torch.Tensor]]:
    """The same evaluation batches every time (first examples in file order)."""
    limit = min(len(examples), batch_size * max_batches)
    return [collate(examples[i : i + batch_size], pad_id) for i in range(0, limit, batch_size)]
