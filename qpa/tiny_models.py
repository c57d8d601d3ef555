"""Tiny random models for tests and benchmarks: nothing downloads, each builds in seconds.

A 384-token byte-level BPE tokenizer trained on Python's own documentation
(``qpa.datasets.pydoc_topics``), with a chat template, and two 2-layer models with random
weights (seed 0) built from configs: a Llama (grouped-query attention, tied embeddings)
and a GPT-2. A job on either trains in seconds on a CPU; the weights are noise, so what
such a run shows is that the machinery works, never model quality.

Used by ``tests/conftest.py`` (session fixtures) and ``bench/bench_service.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

VOCAB_SIZE = 384
#: Enough for ``apply_chat_template`` (chat-formatted data files, sample prompts).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Token ids of the tokenizer's special tokens, in the order they are trained in.
UNK_ID, EOS_ID, PAD_ID = 0, 1, 2


def build_tokenizer(directory: Path) -> Any:
    """Train the tokenizer on the first 40 pydoc topics and save it into ``directory``;
    returns it (a ``PreTrainedTokenizerFast``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qpa.datasets import pydoc_topics

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["<unk>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(list(pydoc_topics().values())[:40], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def build_tiny_llama(directory: Path, tokenizer_dir: Path | None = None) -> Path:
    """A random 2-layer Llama (hidden size 32, 4 heads over 2 key-value heads) saved with
    its tokenizer into ``directory``: a copy of the one in ``tokenizer_dir``, else one
    trained here. Returns ``directory``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _save_tokenizer(directory, tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=256,
        eos_token_id=EOS_ID, pad_token_id=PAD_ID, bos_token_id=None, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def build_tiny_gpt2(directory: Path, tokenizer_dir: Path | None = None) -> Path:
    """A random 2-layer GPT-2 (embedding size 32, 4 heads), saved like ``build_tiny_llama``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    _save_tokenizer(directory, tokenizer_dir)
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB_SIZE, n_positions=256,
                        eos_token_id=EOS_ID, bos_token_id=EOS_ID, pad_token_id=PAD_ID)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


def _save_tokenizer(directory: Path, tokenizer_dir: Path | None) -> None:
    if tokenizer_dir is None:
        build_tokenizer(directory)
        return
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
