"""A llama.cpp LoRA adapter file (``adapter.gguf``) written with the ``gguf`` package.

The layout is what llama.cpp's own ``convert_lora_to_gguf.py`` writes and what its loader
(``llama_adapter_lora_init``) checks:

* metadata ``general.architecture`` (must equal the base model's), ``general.type =
  adapter``, ``adapter.type = lora``, ``adapter.lora.alpha`` (float32); the runtime scales
  each pair by ``alpha / rank`` with ``rank`` read from the tensor shapes;
* per adapted weight ``W`` named as in the base GGUF (``blk.0.attn_q.weight``), two tensors
  ``<name>.lora_a`` with numpy shape (rank, in_features) and ``<name>.lora_b`` with shape
  (out_features, rank) -- PEFT's own ``nn.Linear`` orientation (GGUF stores dimensions
  reversed, so llama.cpp sees ``ne = [in, rank]`` and ``[rank, out]``);
* for the llama architecture, ``B``'s rows of ``q_proj`` and ``k_proj`` permuted exactly as
  llama.cpp's converter permutes those base weights (Hugging Face keeps each head's rotary
  pairs in two halves, GGUF interleaves them). The permutation acts on output rows only, so
  ``A`` is unchanged; without it the adapter would load and silently do the wrong thing.

Architectures: ``llama`` (SmolLM2 and other Llama-family models; checked against a real
llama.cpp runtime in ``bench/bench_llamacpp.py``) and ``gpt2`` (``c_attn`` and friends,
whose GGUF tensors are the transposed Conv1D weights, i.e. ``nn.Linear`` orientation again;
layout checked by the tests only). Others raise ``GGUFExportError``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from qpa.exports.lora import LoraForm


class GGUFExportError(ValueError):
    """This base model or adapter cannot be written as a llama.cpp LoRA adapter."""


@dataclass(frozen=True)
class GGUFArchitecture:
    arch: gguf.MODEL_ARCH
    #: q/k rows are stored rotary-interleaved in GGUF (llama.cpp's LlamaModel.permute).
    interleaved_rope: bool


#: Hugging Face ``model_type`` -> how llama.cpp's converter lays that model out.
ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture(gguf.MODEL_ARCH.LLAMA, interleaved_rope=True),
    "gpt2": GGUFArchitecture(gguf.MODEL_ARCH.GPT2, interleaved_rope=False),
}

DTYPES = {"f32": (np.float32, gguf.LlamaFileType.ALL_F32),
          "f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16)}


def architecture(config: Any) -> GGUFArchitecture:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise GGUFExportError(
            f"llama.cpp LoRA export supports the model types {sorted(ARCHITECTURES)}; this "
            f"base model is {model_type!r} (export 'merged' instead)"
        )
    return ARCHITECTURES[model_type]


def gguf_tensor_name(config: Any, module: str) -> str:
    """The base GGUF's name for ``module``'s weight, e.g. ``blk.3.attn_q.weight``."""
    arch = architecture(config)
    name_map = gguf.get_tensor_name_map(arch.arch, int(config.num_hidden_layers))
    name = name_map.get_name(module)
    if name is None:
        raise GGUFExportError(f"{module} has no tensor in llama.cpp's "
                              f"{gguf.MODEL_ARCH_NAMES[arch.arch]} layout")
    if name == "output" and getattr(config, "tie_word_embeddings", False):
        # The base GGUF then has no output tensor; llama.cpp reuses token_embd.
        raise GGUFExportError(f"{module} shares its weight with the token embeddings, which "
                              "a llama.cpp LoRA cannot adapt separately")
    return f"{name}.weight"


def rope_head_count(config: Any, tensor_name: str) -> int | None:
    """Heads whose rows llama.cpp interleaves in ``tensor_name`` (None: not permuted)."""
    if not architecture(config).interleaved_rope:
        return None
    heads = int(config.num_attention_heads)
    if tensor_name.endswith(".attn_q.weight"):
        return heads
    if tensor_name.endswith(".attn_k.weight"):
        return int(getattr(config, "num_key_value_heads", None) or heads)
    return None


def interleave_rope_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder output rows from Hugging Face's rotary layout to GGUF's.

    Within each head of size d, HF row ``j * d/2 + i`` (half j, pair i) becomes GGUF row
    ``2 * i + j``.
    """
    out_features = rows.shape[0]
    half = out_features // heads // 2
    if heads * 2 * half != out_features:
        raise GGUFExportError(f"{out_features} rows do not split into {heads} rotary heads")
    return rows.reshape(heads, 2, half, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def write_lora_gguf(path: Path, form: LoraForm, config: Any, *, dtype: str = "f32",
                    name: str | None = None) -> dict[str, Any]:
    """Write ``form`` as a llama.cpp LoRA adapter for the model ``config`` describes.

    Written to a temporary file and renamed, so a killed job never leaves half a file.
    Returns facts for metrics.json and the model card.
    """
    arch = architecture(config)
    numpy_dtype, file_type = DTYPES[dtype]
    tensors: list[tuple[str, np.ndarray]] = []
    for module in sorted(form.factors):
        lora_a, lora_b = form.factors[module]
        tensor_name = gguf_tensor_name(config, module)
        heads = rope_head_count(config, tensor_name)
        if heads is not None:
            lora_b = interleave_rope_rows(lora_b, heads)
        tensors.append((f"{tensor_name}.lora_a", _array(lora_a, numpy_dtype)))
        tensors.append((f"{tensor_name}.lora_b", _array(lora_b, numpy_dtype)))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        writer = gguf.GGUFWriter(temporary, gguf.MODEL_ARCH_NAMES[arch.arch])
        writer.add_type(gguf.GGUFType.ADAPTER)
        if name:
            writer.add_name(name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(form.alpha))
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tensor_name, array in tensors:
            writer.add_tensor(tensor_name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(temporary, 0o644)  # mkstemp made it private; it is a deliverable
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "architecture": gguf.MODEL_ARCH_NAMES[arch.arch],
        "tensor_type": dtype,
        "rank": form.rank,
        "alpha": form.alpha,
        "tensor_pairs": len(tensors) // 2,
    }


def _array(tensor: torch.Tensor, numpy_dtype: type) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy()
                                .astype(numpy_dtype))


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metadata, tensors) of a GGUF file; tensors in numpy (PyTorch) orientation.

    For tests and benchmarks: quantised tensors are returned as their raw bytes.
    """
    reader = gguf.GGUFReader(path)
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        metadata[key] = field.contents()
    tensors = {tensor.name: np.array(tensor.data) for tensor in reader.tensors}
    return metadata, tensors
