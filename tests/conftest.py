"""Shared fixtures: tiny random Llama and GPT-2 models built from configs, an offline
tokenizer trained on Python's own docs (``qpa.tiny_models``), and small JSONL data files.
Nothing downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qpa.tiny_models import build_tiny_gpt2, build_tiny_llama, build_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("llama"), tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), tokenizer_dir)


@pytest.fixture(scope="session")
def data_files(tmp_path_factory) -> tuple[Path, Path]:
    from qpa.datasets import write_pydoc_dataset

    return write_pydoc_dataset(tmp_path_factory.mktemp("data"), max_train=64, max_eval=16)


@pytest.fixture(autouse=True)
def _isolated_qpa_home(tmp_path_factory, monkeypatch):
    """Keep test state out of the user's ~/.qpa (the converted SmolLM2 cache is shared)."""
    if "QPA_HOME" not in os.environ:
        monkeypatch.setenv("QPA_HOME", str(tmp_path_factory.getbasetemp() / "qpa_home"))
    # The converted SmolLM2 (about 540 MB, a minute to convert) is shared with `make demo`.
    monkeypatch.setenv("QPA_MODELS", os.environ.get("QPA_MODELS", "~/.qpa/models"))


@pytest.fixture(scope="session")
def memorise_files(tmp_path_factory, data_files) -> tuple[Path, Path]:
    """Eight records evaluated on themselves: a tiny random model can show learning in a
    few steps here, whereas held-out topics barely move it."""
    path = tmp_path_factory.mktemp("memorise") / "train.jsonl"
    path.write_text("".join(data_files[0].read_text().splitlines(keepends=True)[:8]))
    return path, path
