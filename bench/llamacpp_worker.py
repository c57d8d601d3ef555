"""Logits from a real llama.cpp runtime, with and without LoRA adapters.

Runs inside ``bench/.venv-llamacpp`` (numpy and llama_cpp only, nothing of this project),
driven by ``bench/bench_llamacpp.py``: ``python bench/llamacpp_worker.py REQUEST.json``, where
REQUEST is ``{"model", "adapters": {label: adapter.gguf}, "ids": [[token ids]], "threads",
"options": {Llama keyword arguments}, "output": out.npz}``. Writes one (sequences, tokens,
vocab) float32 array per label (``base``: no adapter) to ``out.npz``, timings to ``out.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from llama_cpp import Llama


def main() -> int:
    request = json.loads(Path(sys.argv[1]).read_text())
    ids, threads = request["ids"], int(request.get("threads", 2))
    arrays, timings = {}, {}
    for label, adapter in [("base", None), *request["adapters"].items()]:
        started = time.perf_counter()
        llm = Llama(model_path=request["model"], lora_path=adapter,
                    n_ctx=max(len(s) for s in ids) + 8, n_batch=512, n_threads=threads,
                    n_threads_batch=threads, logits_all=True, seed=0, verbose=False,
                    **request.get("options", {}))
        loaded = time.perf_counter() - started
        llm.eval(ids[0])  # warm-up: pages the mmapped weights in before anything is timed
        rows, seconds = [], []
        for sequence in ids:
            llm.reset()
            tic = time.perf_counter()
            llm.eval(sequence)
            seconds.append(time.perf_counter() - tic)
            rows.append(np.array(llm.scores[: len(sequence)], dtype=np.float32))
        llm.close()
        arrays[label] = np.stack(rows)
        timings[label] = {"load_s": loaded, "eval_s_median": float(np.median(seconds)),
                          "eval_s": seconds}
    output = Path(request["output"])
    np.savez(output, **arrays)
    output.with_suffix(".json").write_text(json.dumps(timings, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
