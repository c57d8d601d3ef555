"""What an adapter method is to the trainer: attach, train hooks, state, export, accounting.

Each method lives in its own folder under ``qpa/methods`` and registers itself by name in
``qpa.methods.registry``. The trainer never branches on the method's name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from qpa.backends.base import JobListener, QuantumBackend
from qpa.config import JobConfig
from qpa.distributed import SINGLE_PROCESS, DataParallel
from qpa.errors import ConfigError
from qpa.exports.lora import LoraForm, NotLoraError, read_peft_lora


class AdapterMethod(ABC):
    """One adapter method applied to one base model for one job."""

    name: ClassVar[str]
    #: Set by the trainer before ``attach``. A method that runs circuits gets its backend
    #: from ``data_parallel.quantum_backend(...)`` so that only rank 0 submits jobs.
    data_parallel: DataParallel = SINGLE_PROCESS
    #: Set by the trainer before ``attach``: receives each primitive job's announcements
    #: (``QuantumBackend._job_submitted`` / ``_job_done``) for the job's event stream.
    on_quantum_job: JobListener | None = None
    #: Set by ``attach`` of a method that runs circuits: the backend its primitive jobs go
    #: to (the trainer plans the run's jobs against it and restores its usage on resume),
    #: and how many values its circuits generate. None / 0 for classical methods.
    backend: QuantumBackend | None = None
    generated_values: int = 0

    def __init__(self, config: JobConfig, target_modules: list[str]):
        self.config = config
        self.target_modules = target_modules
        self.model: nn.Module | None = None

    @abstractmethod
    def attach(self, base_model: nn.Module) -> nn.Module:
        """Wrap ``base_model`` (frozen) and return the model to train; sets ``self.model``.

        At step 0 the returned model must compute exactly what the base model computes.
        """

    @abstractmethod
    def trainable_modules(self) -> dict[str, nn.Module | nn.Parameter]:
        """Named trainable pieces; their state is what ``state/`` saves and restores."""

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups (override to give parts their own learning rate)."""
        params = [p for p in self.trainable_parameters() if p.requires_grad]
        return [{"params": params, "lr": lr}]

    def trainable_parameters(self) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for piece in self.trainable_modules().values():
            if isinstance(piece, nn.Parameter):
                params.append(piece)
            else:
                params.extend(p for p in piece.parameters() if p.requires_grad)
        return params

    def gradient_leaves(self) -> list[torch.Tensor]:
        """Tensors other than the trainable parameters whose ``.grad`` collects gradient over
        several steps (QPA: dL/dp over an update window). Data-parallel training sums each
        step's part of it over the ranks, as it does for the parameters' gradients."""
        return []

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, piece in self.trainable_modules().items():
            # Copies, not live references: a checkpoint must not follow later steps.
            out[key] = piece.detach().clone() if isinstance(piece, nn.Parameter) else {
                name: value.detach().clone() for name, value in piece.state_dict().items()
            }
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, piece in self.trainable_modules().items():
            if isinstance(piece, nn.Parameter):
                with torch.no_grad():
                    piece.copy_(state[key])
            else:
                piece.load_state_dict(state[key])

    # -- training-loop hooks (no-ops for purely classical methods) --------------------
    def before_forward(self, step: int) -> None:
        """Called before each training forward pass (QPA refreshes circuit outputs here)."""

    def before_optimizer_step(self, step: int, last_step: bool) -> None:
        """Called after backward, before gradient clipping and ``optimizer.step()``."""

    def before_eval(self) -> None:
        """Called before evaluation, generation and export: make the weights current."""

    def extra_state(self) -> dict[str, Any]:
        """Non-parameter state to checkpoint (e.g. QPA's accumulated circuit gradient)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what ``extra_state`` returned."""

    # -- results -----------------------------------------------------------------
    @abstractmethod
    def export_adapter(self, directory: Path) -> dict[str, Any]:
        """Write a stock-PEFT adapter (adapter_config.json + adapter_model.safetensors).

        Returns facts for the model card (e.g. the PEFT type, caveats of the export).
        """

    def merged_weights(self) -> dict[str, torch.Tensor] | None:
        """Exact merged weights by module name, in each layer's own layout, or None to let
        PEFT's ``merge_and_unload`` merge the exported adapter (the ``merged`` format)."""
        return None

    def lora_form(self, adapter_dir: Path) -> LoraForm:
        """This job's adapter as plain LoRA factors (what the ``gguf`` format writes).

        Default: read back the stock PEFT LoRA that ``export_adapter`` wrote. A method whose
        export is another PEFT type must override this (or ``gguf`` fails at export time).
        """
        try:
            return read_peft_lora(adapter_dir)
        except NotLoraError as error:
            raise ConfigError("export.formats", f"gguf: method {self.name}: {error}") from None

    @abstractmethod
    def parameter_report(self) -> dict[str, Any]:
        """Exact trainable parameters and the equivalents they are compared against.

        Must contain ``trainable_params`` and ``lora_equivalent_params`` (plain LoRA with
        the config's rank on the same targets); methods may add more (``oft_equivalent_params``).
        """

    def card_rows(self, metrics: dict[str, Any]) -> list[tuple[str, str]]:
        """The method's own (label, value) lines in the model card's training table, from
        the job's ``metrics`` (e.g. compound's comparison with PEFT OFT)."""
        return []

    def quantum_report(self) -> dict[str, Any] | None:
        """Quantum usage (jobs, circuits, shots, seconds) or None for classical methods."""
        return None

    def close(self) -> None:
        """Release quantum sessions. Called on every exit path."""
