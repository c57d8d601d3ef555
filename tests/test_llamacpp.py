"""Opt-in: adapter.gguf in a real llama.cpp runtime changes SmolLM2's logits as PEFT does.

Needs llama-cpp-python, which compiles llama.cpp from source (about 19 minutes on the 2-core
reference machine), so it is not part of ``make test``:

    make test-llamacpp          # builds bench/.venv-llamacpp once, then runs this file

or ``QPA_LLAMACPP_PYTHON=/path/to/python-with-llama_cpp pytest tests/test_llamacpp.py``.
The comparison itself lives in ``bench/bench_llamacpp.py`` (one place), which also reports
the numbers in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    not os.environ.get("QPA_LLAMACPP_PYTHON"),
    reason="opt-in: set QPA_LLAMACPP_PYTHON (or run `make test-llamacpp`)",
)


def test_gguf_adapter_in_llama_cpp_matches_peft(tmp_path: Path) -> None:
    from bench import bench_llamacpp as bench
    from qpa.datasets import write_pydoc_dataset
    from qpa.models import load_base_model

    python = bench.llamacpp_python()
    assert python is not None, f"{os.environ['QPA_LLAMACPP_PYTHON']} cannot import llama_cpp"
    data = write_pydoc_dataset(tmp_path / "data", max_train=32, max_eval=16)
    _, tokenizer, _ = load_base_model("smollm2-135m")
    ids = bench.probe_ids(tokenizer, data[1], sequences=2, length=32)
    bases = {"q4_1": bench.base_gguf(),
             "f32": bench.dequantised_gguf(bench.base_gguf(), tmp_path / "f32.gguf")}
    job = bench.train_job("lora", data, tmp_path, steps=3)
    row = bench.measure_job("lora", job, ids, python, bases, tmp_path, negative_control=True)
    assert row["delta_peft_max_abs"] > 0.5, "the adapter barely changes the model"
    f32, q4 = row["bases"]["f32"], row["bases"]["q4_1"]
    assert f32["base_max_abs_diff_hf_vs_llamacpp"] < 1e-3  # same weights, same maths
    assert f32["delta"]["relative_error"] <= bench.TOLERANCES["f32"], f32["delta"]
    assert q4["delta"]["relative_error"] <= bench.TOLERANCES["q4_1"], q4["delta"]
    # The check can fail: without the q/k row interleaving the change is far off.
    assert f32["wrong_layout"]["relative_error"] > 100 * bench.TOLERANCES["f32"]
    assert row["merged_vs_peft_max_abs_diff"] <= 1e-3
