"""The trainer's two calls into the export formats: check before training, write after.

``check_exports`` runs before the first step so that a format this job cannot produce
fails at once, naming ``export.formats``; ``write_exports`` writes every requested format
beyond the adapter folder and returns the facts metrics.json and the model card show.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from qpa.config import JobConfig
from qpa.errors import ConfigError
from qpa.exports.gguf import GGUFExportError, architecture, gguf_tensor_name, write_lora_gguf
from qpa.exports.merged import write_merged

if TYPE_CHECKING:
    from qpa.methods.base import AdapterMethod

MERGED_DIR = "merged"
GGUF_FILE = "adapter.gguf"


def check_exports(config: JobConfig, model: nn.Module, target_modules: list[str]) -> None:
    """Raise ConfigError (field ``export.formats``) for a requested format this base model
    and these targets cannot produce. Called before the first training step."""
    from qpa.models import matched_modules

    formats = config.export.formats
    modules = matched_modules(model, target_modules)
    if "merged" in formats or "gguf" in formats:
        embeddings = model.get_input_embeddings()
        shared = [name for name, module in modules.items()
                  if embeddings is not None and module.weight is embeddings.weight]
        if shared:
            raise ConfigError("export.formats",
                              f"{shared} share their weight with the input embeddings; merging "
                              "an adapter into them would change the embeddings too")
    if "gguf" in formats:
        try:
            architecture(model.config)
            for name in modules:
                gguf_tensor_name(model.config, name)
        except GGUFExportError as error:
            raise ConfigError("export.formats", f"gguf: {error}") from None


def write_exports(config: JobConfig, method: AdapterMethod, output_dir: Path, *,
                  base_model_path: str, base_config: Any, trained: nn.Module
                  ) -> dict[str, Any]:
    """Write the formats beyond ``peft`` (the adapter folder must exist); return their facts."""
    adapter_dir = output_dir / "adapter"
    facts: dict[str, Any] = {"peft": {"folder": adapter_dir.name}}
    formats = config.export.formats
    if "merged" in formats:
        facts["merged"] = write_merged(
            output_dir / MERGED_DIR, base_model_path=base_model_path, adapter_dir=adapter_dir,
            merged_weights=method.merged_weights(), trained=trained,
            dtype=config.export.merged_dtype,
        )
    if "gguf" in formats:
        form = method.lora_form(adapter_dir)
        facts["gguf"] = write_lora_gguf(
            output_dir / GGUF_FILE, form, base_config, dtype=config.export.gguf_dtype,
            name=f"{config.method} adapter for {config.base_model}",
        )
        if form.notes:
            facts["gguf"]["notes"] = form.notes
    return facts
