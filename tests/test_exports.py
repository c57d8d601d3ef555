"""Acceptance of the inference-ready exports on tiny models (issue 13):

* ``merged``: an ordinary transformers folder whose logits equal the PEFT-loaded adapter's
  within 1e-4 (fp32), for every method;
* ``gguf``: reads back with the ``gguf`` reader with llama.cpp's adapter metadata, and its
  tensors equal the PEFT adapter's in llama.cpp's layout (q/k rows interleaved per head,
  derived here independently of the exporter);
* ``loss.png``: a valid PNG that shows both curves, embedded in the model card.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pytest
import torch
from helpers import PROBE_IDS, tiny_config, trained_job
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from qpa.config import parse_config
from qpa.errors import ConfigError
from qpa.exports.formats import check_exports
from qpa.exports.gguf import read_gguf
from qpa.exports.plot import (
    EVAL_COLOUR,
    TRAIN_COLOUR,
    LossHistory,
    read_loss_history,
    render_loss_png,
    sparkline,
)
from qpa.training import finetune

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # as helpers.trained_job
RUNS = [("tiny_llama_dir", "qpa"), ("tiny_llama_dir", "lora"), ("tiny_llama_dir", "compound"),
        ("tiny_llama_dir", "vera"), ("tiny_gpt2_dir", "lora"), ("tiny_gpt2_dir", "compound")]
#: Methods whose stock PEFT export is itself a LoRA (adapter.gguf holds the same tensors).
LORA_EXPORTS = ("qpa", "lora")


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=PROBE_IDS).logits


@pytest.mark.parametrize(("model_fixture", "method"), RUNS)
def test_merged_equals_peft_logits(request, model_fixture, method):
    trainer, metrics, out, model_dir = trained_job(request, model_fixture, method)
    merged_dir = out / "merged"
    assert (merged_dir / "config.json").is_file() and (merged_dir / "model.safetensors").is_file()
    assert not (merged_dir / "adapter_config.json").exists()
    assert (merged_dir / "tokenizer.json").is_file()
    merged = _logits(AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32))
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base_logits = _logits(base)
    peft = _logits(PeftModel.from_pretrained(base, out / "adapter"))
    assert (peft - base_logits).abs().max().item() > 1e-3, "the adapter changes nothing"
    assert (merged - peft).abs().max().item() <= 1e-4
    assert (merged - trainer.trained_logits).abs().max().item() <= 1e-4
    facts = metrics["exports"]["merged"]
    assert facts["method"] == ("exact weights" if method == "compound"
                               else "peft merge_and_unload")
    assert facts["max_logit_diff_vs_trained"] <= 1e-4
    assert facts["max_logit_change_by_adapter"] > 1e-3


def _llama_rotary_order(out_features: int, heads: int) -> list[int]:
    """GGUF row r of a q/k projection holds HF row order[r]: per head, GGUF interleaves the
    two rotary halves (pair i of halves 0 and 1 side by side) that HF keeps apart."""
    head_dim = out_features // heads
    half = head_dim // 2
    return [head * head_dim + which * half + pair
            for head in range(heads) for pair in range(half) for which in range(2)]


def _expected_names(model_fixture: str) -> dict[str, str]:
    """GGUF base tensor name -> PEFT module name, for the two layers of the tiny models."""
    if model_fixture == "tiny_gpt2_dir":
        return {f"blk.{i}.attn_qkv.weight": f"transformer.h.{i}.attn.c_attn" for i in range(2)}
    gguf_names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
                  "o_proj": "attn_output"}
    return {f"blk.{i}.{gguf_names[target]}.weight": f"model.layers.{i}.self_attn.{target}"
            for i in range(2) for target in LLAMA_TARGETS}


def _rows_in_gguf_order(name: str, rows: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    heads = {"attn_q": config.get("num_attention_heads"),
             "attn_k": config.get("num_key_value_heads")}.get(name.split(".")[2])
    if config["model_type"] != "llama" or heads is None:
        return rows
    return rows[_llama_rotary_order(rows.shape[0], heads)]


@pytest.mark.parametrize(("model_fixture", "method"), RUNS)
def test_gguf_adapter_reads_back_in_llama_cpp_layout(request, model_fixture, method):
    _, metrics, out, model_dir = trained_job(request, model_fixture, method)
    metadata, tensors = read_gguf(out / "adapter.gguf")
    model_config = json.loads((model_dir / "config.json").read_text())
    assert metadata["general.architecture"] == model_config["model_type"]
    assert metadata["general.type"] == "adapter"
    assert metadata["adapter.type"] == "lora"
    names = _expected_names(model_fixture)
    assert set(tensors) == {f"{n}.{part}" for n in names for part in ("lora_a", "lora_b")}
    alpha = metadata["adapter.lora.alpha"]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if method in LORA_EXPORTS:
        adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert alpha == pytest.approx(adapter_config["lora_alpha"])
        state = load_file(out / "adapter" / "adapter_model.safetensors")
    else:
        merged = load_file(out / "merged" / "model.safetensors")
    for gguf_name, module in names.items():
        lora_a, lora_b = tensors[f"{gguf_name}.lora_a"], tensors[f"{gguf_name}.lora_b"]
        rank = lora_a.shape[0]
        assert lora_b.shape[1] == rank, "lora_a must be (rank, in), lora_b (out, rank)"
        if method in LORA_EXPORTS:
            peft_a = state[f"base_model.model.{module}.lora_A.weight"].numpy()
            peft_b = state[f"base_model.model.{module}.lora_B.weight"].numpy()
            np.testing.assert_array_equal(lora_a, peft_a)
            np.testing.assert_array_equal(lora_b, _rows_in_gguf_order(gguf_name, peft_b,
                                                                      model_config))
            assert np.abs(peft_b).max() > 0, "an untrained B proves nothing"
        else:
            # Compound and VeRA: alpha / rank * B @ A must be the exact weight change (read
            # from the merged folder), as llama.cpp applies it (rows in GGUF order, weight
            # as (out, in) also for GPT-2's Conv1D).
            weight = base.get_submodule(module).weight.detach().double()
            changed = merged[f"{module}.weight"].double()
            if model_fixture == "tiny_gpt2_dir":
                weight, changed = weight.T, changed.T
            expected = _rows_in_gguf_order(gguf_name, (changed - weight).numpy(), model_config)
            applied = alpha / rank * (lora_b.astype(np.float64) @ lora_a.astype(np.float64))
            assert np.abs(expected).max() > 1e-4, "the adapter changes nothing"
            np.testing.assert_allclose(applied, expected, atol=1e-5, rtol=0)
    facts = metrics["exports"]["gguf"]
    assert facts["tensor_pairs"] == len(names)
    assert facts["bytes"] == (out / "adapter.gguf").stat().st_size


def test_gguf_f16_and_the_model_card(request, tiny_llama_dir, data_files, tmp_path):
    config = tiny_config(tiny_llama_dir, data_files, method="lora", steps=2,
                         export={"formats": ["gguf"], "gguf_dtype": "f16"})
    metrics = finetune(config, tmp_path)
    metadata, tensors = read_gguf(tmp_path / "adapter.gguf")
    assert metadata["general.file_type"] == 1  # MOSTLY_F16
    assert all(array.dtype == np.float16 for array in tensors.values())
    assert not (tmp_path / "merged").exists()
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "adapter.gguf" in card and "llama-cli" in card and "Merged model" not in card
    assert metrics["exports"]["gguf"]["tensor_type"] == "f16"


def _colour_pixels(png: bytes, colour: str, tolerance: int = 40) -> int:
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    target = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(image - target).sum(axis=-1) < tolerance).sum())


def test_loss_plot_is_a_png_with_both_curves(request):
    _, metrics, out, _ = trained_job(request, "tiny_llama_dir", "lora")
    assert metrics["loss_plot"] == "loss.png"
    png = (out / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    image.verify()  # checksums and structure
    assert image.size == (640, 400)
    assert _colour_pixels(png, TRAIN_COLOUR) > 200
    assert _colour_pixels(png, EVAL_COLOUR) > 200
    # The adapter folder carries a copy that its model card embeds.
    assert (out / "adapter" / "loss.png").read_bytes() == png
    assert "![train and eval loss](loss.png)" in (out / "adapter" / "README.md").read_text()
    history = read_loss_history(out / "events.jsonl")
    assert sorted(history.train) == [1, 2, 3, 4] and sorted(history.eval) == [0, 2, 4]
    # The colour check can fail: a train-only plot has no eval-coloured pixels.
    train_only = render_loss_png(LossHistory(train=history.train), "train only")
    assert _colour_pixels(train_only, EVAL_COLOUR) == 0
    assert _colour_pixels(train_only, TRAIN_COLOUR) > 200


def test_loss_history_after_a_resume(tmp_path):
    events = [
        {"type": "eval", "step": 0, "eval_loss": 5.0},
        {"type": "step", "step": 1, "loss": 4.0},
        {"type": "step", "step": 2, "loss": 3.5},  # the checkpoint was at step 1
        {"type": "status", "message": "resumed from checkpoint at step 1", "step": 1},
        {"type": "step", "step": 2, "loss": 3.25},  # the run that produced the model
        {"type": "eval", "step": 2, "eval_loss": 3.0},
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events) + '{"type": "st')
    history = read_loss_history(path)
    assert history.train == {1: 4.0, 2: 3.25}
    assert history.eval == {0: 5.0, 2: 3.0}
    assert sparkline([3.0, 1.0, 3.0, float("nan"), 1.0]) == "█▁█▁"
    assert sparkline([2.0] * 40, width=8) == "▅" * 8
    assert sparkline([]) == ""


def test_bad_export_options_name_the_field():
    base = {"train_file": "x.jsonl"}
    with pytest.raises(ConfigError) as error:
        parse_config({**base, "export": {"formats": ["onnx"]}})
    assert error.value.field.startswith("export.formats")
    with pytest.raises(ConfigError) as error:
        parse_config({**base, "export": {"formats": ["gguf", "gguf"]}})
    assert error.value.field == "export.formats"
    assert parse_config(base).export.formats == ["peft"]


def test_unexportable_targets_fail_before_training(tiny_llama_dir, data_files, tmp_path):
    # The tiny Llama ties lm_head to the embeddings: merging into it would change both.
    config = tiny_config(tiny_llama_dir, data_files, method="lora",
                         lora={"target_modules": ["q_proj", "lm_head"]},
                         export={"formats": ["merged"]})
    with pytest.raises(ConfigError) as error:
        finetune(config, tmp_path)
    assert error.value.field == "export.formats" and "lm_head" in error.value.reason
    assert not (tmp_path / "state").exists(), "training must not have started"


def test_gguf_refuses_architectures_llama_cpp_layout_is_unknown_for():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=4,
                                             vocab_size=64))
    config = parse_config({"train_file": "x.jsonl", "export": {"formats": ["gguf"]}})
    with pytest.raises(ConfigError) as error:
        check_exports(config, model, ["query_key_value"])
    assert error.value.field == "export.formats" and "gpt_neox" in error.value.reason
    check_exports(parse_config({"train_file": "x.jsonl", "export": {"formats": ["merged"]}}),
                  model, ["query_key_value"])
