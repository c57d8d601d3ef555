"""Shared fixtures: tiny random Llama and GPT-2 models built from configs, an offline
tokenizer trained on Python's own docs, and small JSONL data files. Nothing downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qpa.datasets import pydoc_topics

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<unk>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = list(pydoc_topics().values())[:40]
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(directory)
    return directory


def _save_model(model, tokenizer_dir: Path, directory: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=384, max_position_embeddings=256,
        eos_token_id=1, pad_token_id=2, bos_token_id=None, tie_word_embeddings=True,
    )
    return _save_model(LlamaForCausalLM(config), tokenizer_dir, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tokenizer_dir) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=384, n_positions=256,
                        eos_token_id=1, bos_token_id=1, pad_token_id=2)
    return _save_model(GPT2LMHeadModel(config), tokenizer_dir, tmp_path_factory.mktemp("gpt2"))


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
