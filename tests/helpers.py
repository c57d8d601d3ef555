"""Test helpers: configs for tiny models and a trainer that keeps the trained logits."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import torch

from qpa.config import JobConfig, parse_config
from qpa.models import TARGET_SETS
from qpa.training import Trainer


def tiny_config(model_dir: Path, data: tuple[Path, Path], **overrides: Any) -> JobConfig:
    """A job that trains a tiny model in seconds; nested dicts merge into the defaults.

    It adapts the architecture's attention q/v (the qubit counts the QPU tests rely on fit
    small fake devices); ``lora={"target_modules": None}`` lets the method's preset choose.
    """
    train_file, eval_file = data
    model_config = Path(model_dir) / "config.json"
    model_type = (json.loads(model_config.read_text())["model_type"]
                  if model_config.is_file() else "llama")
    base: dict[str, Any] = {
        "base_model": str(model_dir), "method": "qpa", "backend": "statevector",
        "train_file": str(train_file), "eval_file": str(eval_file), "steps": 6,
        "lora": {"target_modules": TARGET_SETS["attention_qv"][model_type]},
        "qpa": {"chunk_size": 32, "depth": 2, "mlp_hidden": [16]},
        "train": {"lr": 1e-2, "batch_size": 4, "max_length": 48, "eval_batches": 2,
                  "sample_tokens": 0, "checkpoint_every": 2},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return parse_config(base)


PROBE_IDS = torch.tensor([[5, 17, 42, 99, 7, 123, 250, 3]])


class LogitTrainer(Trainer):
    """Records the trained model's logits on PROBE_IDS just before export."""

    def _finish(self, wall_start: float) -> dict[str, Any]:
        self.method.before_eval()
        self.model.eval()
        with torch.no_grad():
            self.trained_logits = self.model(input_ids=PROBE_IDS).logits.clone()
        return super()._finish(wall_start)


# A child process in which `import qpa` and `import qiskit` fail, as on an inference box.
BLOCKED_IMPORTS_PRELUDE = textwrap.dedent(
    """
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("qpa", "qiskit", "qiskit_aer", "qiskit_ibm_runtime"):
                raise ImportError(f"{name} is blocked in this process")
            return None
    sys.meta_path.insert(0, _Block())
    for mod in [m for m in sys.modules if m.split(".")[0] in ("qpa", "qiskit")]:
        del sys.modules[mod]
    try:
        import qpa  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("qpa must not be importable here")
    try:
        import qiskit  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("qiskit must not be importable here")
    """
)


# One training per (tiny model, method) for the whole session, shared by the export tests
# (test_export_roundtrip, test_exports): every export format, four Llama projections (so
# k_proj's grouped heads are covered too), an evaluation every two steps.
_TRAINED: dict[tuple[str, str], tuple[LogitTrainer, dict[str, Any], Path, Path]] = {}


def trained_job(request: Any, model_fixture: str, method: str
                ) -> tuple[LogitTrainer, dict[str, Any], Path, Path]:
    """(trainer with ``trained_logits``, metrics, output folder, base model folder)."""
    key = (model_fixture, method)
    if key not in _TRAINED:
        model_dir = request.getfixturevalue(model_fixture)
        data = request.getfixturevalue("data_files")
        out = request.getfixturevalue("tmp_path_factory").mktemp(f"{method}-{model_fixture}")
        lora = {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]
                if model_fixture == "tiny_llama_dir" else ["c_attn"]}
        config = tiny_config(model_dir, data, method=method, steps=4, lora=lora,
                             compound={"blocks": 2},
                             export={"formats": ["peft", "merged", "gguf"]},
                             train={"lr": 3e-2, "eval_every": 2})
        trainer = LogitTrainer(config, out)
        metrics = trainer.run()
        _TRAINED[key] = (trainer, metrics, out, model_dir)
    return _TRAINED[key]
