"""QPA: PEFT LoRA layers whose A and B are written by the quantum parameter generator.

The LoRA layers are stock PEFT. Each generated lora_A / lora_B weight gets a torch
parametrisation that reads its slice of the generator's output: W = W_init + generated.
PEFT initialises B to zero and the generator's last layer starts at zero, so W_B = 0 and
the adapted model equals the base model at step 0, exactly as in LoRA. With
``qpa.generate_a: false`` only B is generated and A keeps PEFT's random initialisation. At
export the generated values are materialised into the weights and PEFT saves an ordinary
LoRA adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model
from qiskit.circuit import QuantumCircuit
from torch import nn
from torch.nn.utils import parametrize

from qpa.backends.base import QuantumBackend, QuantumUsage
from qpa.backends.factory import backend_qubit_limit, check_width
from qpa.errors import ConfigError
from qpa.methods.base import AdapterMethod
from qpa.methods.lora.method import lora_config
from qpa.methods.qpa.generator import QPAGenerator, fit_sub_generators

ADAPTER = "default"


class _GeneratedSlice(nn.Module):
    """Parametrisation: weight = frozen initial weight + this weight's generated values."""

    def __init__(self, owner: QPAMethod, index: int, shape: torch.Size):
        super().__init__()
        # A plain attribute, not a submodule: the owner is not part of the model tree.
        object.__setattr__(self, "owner", owner)
        self.index = index
        self.shape = shape

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        values = self.owner.pieces[self.index]
        return original + values.view(self.shape).to(original.dtype)


def generated_layers(peft_model: nn.Module, generate_a: bool) -> list[tuple[str, nn.Module]]:
    """The LoRA weights the generator writes, by name, in model order (B only without
    ``generate_a``, whose A then stays PEFT's random initialisation, frozen, as in LoRA-FA).
    Works on a model built on the meta device, as the pre-run estimate does."""
    weights: list[tuple[str, nn.Module]] = []
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and ADAPTER in getattr(module, "lora_A", {}):
            lora_a, lora_b = module.lora_A[ADAPTER], module.lora_B[ADAPTER]
            if generate_a:
                weights.append((f"{name}.lora_A", lora_a))
            else:
                lora_a.weight.requires_grad_(False)
            weights.append((f"{name}.lora_B", lora_b))
    return weights


def runs_circuit(ablation: str) -> bool:
    """Whether a job with this ``qpa.ablation`` evaluates the circuit (frozen angles: once);
    the others replace p by a fixed distribution and never build a backend."""
    return ablation in ("none", "frozen_angles")


def resolve_sub_generators(config: Any, num_values: int) -> int:
    """``qpa.sub_generators`` as a count: ``auto`` picks the fewest whose circuits fit the
    backend's qubits and ``quantum.max_qubits`` (ConfigError when none fits)."""
    options = config.qpa
    if options.sub_generators != "auto":
        return options.sub_generators
    limits = [config.quantum.max_qubits, backend_qubit_limit(config.backend)]
    width = min(limit for limit in limits if limit is not None)
    count = fit_sub_generators(num_values, options.chunk_size, options.ansatz, width)
    if count is None:
        raise ConfigError("qpa.sub_generators", f"even 1024 sub-generators need more than "
                          f"{width} qubits; raise qpa.chunk_size")
    return count


def lora_equivalent_params(peft_model: nn.Module) -> int:
    """Parameters plain LoRA would train on the same layers (A and B of each)."""
    return sum(
        module.lora_A[ADAPTER].weight.numel() + module.lora_B[ADAPTER].weight.numel()
        for module in peft_model.modules()
        if hasattr(module, "lora_A") and ADAPTER in getattr(module, "lora_A", {})
    )


class QPAMethod(AdapterMethod):
    """Quantum Parameter Adaptation (Liu et al., ICLR 2025) on PEFT LoRA layers."""

    name = "qpa"

    def attach(self, base_model: nn.Module) -> nn.Module:
        self.model = get_peft_model(
            base_model, lora_config(self.config, self.target_modules, base_model)
        )
        self.weights = generated_layers(self.model, self.config.qpa.generate_a)
        self.lora_equivalent = lora_equivalent_params(self.model)
        num_values = sum(layer.weight.numel() for _, layer in self.weights)
        device = next(base_model.parameters()).device

        def backend_for(circuit):
            # Data-parallel: only rank 0 runs the circuit; the other ranks receive p from it.
            return self.data_parallel.quantum_backend(
                self.config.backend, circuit, self.config.quantum, device=str(device))

        self.setup_generator(num_values, device, backend_for)
        self.sizes = [layer.weight.numel() for _, layer in self.weights]
        self._set_current(torch.zeros(num_values, device=device))
        for index, (_, layer) in enumerate(self.weights):
            layer.weight.requires_grad_(False)
            parametrize.register_parametrization(
                layer, "weight", _GeneratedSlice(self, index, layer.weight.shape)
            )
        # PEFT's random A (B is zero): kept so a resumed job rebuilds the same weights.
        self.initial_weights = {
            name: layer.parametrizations.weight.original.detach().cpu().clone()
            for name, layer in self.weights
        }
        return self.model

    def setup_generator(self, num_values: int, device: torch.device | str,
                        backend_for: Callable[[QuantumCircuit], QuantumBackend],
                        check: bool = True) -> None:
        """Build the generator of ``num_values`` and give it ``backend_for(circuit)``.

        Shared by ``attach`` and the pre-run estimate (``estimate.py``), which passes a
        counting backend: the estimate's jobs are the ones this code would submit.
        ``check=False`` skips the width check (the estimate reports it as a warning).
        """
        options = self.config.qpa
        sub_generators = resolve_sub_generators(self.config, num_values)
        self.generator = QPAGenerator(
            num_values,
            chunk_size=options.chunk_size,
            depth=options.depth,
            ansatz=options.ansatz,
            mlp_hidden=options.mlp_hidden,
            sub_generators=sub_generators,
            features=options.features,
            read_bits=options.basis_bits,
            postprocess=options.postprocess,
            seed=self.config.train.seed,
        )
        self.generator.to(device)
        self.generated_values = self.generator.num_values
        self.backend = None
        self._pending_grad = None
        if runs_circuit(options.ablation):
            if check:  # width and credentials are checked here, before any training step
                check_width(self.config.backend, self.generator.num_qubits, self.config.quantum)
            self.backend = backend_for(self.generator.circuit)
            self.backend.set_job_listener(self.on_quantum_job)
            self.generator.attach_backend(self.backend, self.config.quantum.max_seconds)
        if options.ablation != "none":
            fixed = {"frozen_angles": "initial", "constant_p": "uniform", "random_p": "random"}
            self.generator.fix_distribution(fixed[options.ablation], seed=self.config.train.seed)

    def _set_current(self, values: torch.Tensor) -> None:
        # Split once per step: every weight then reads its own view, and backward joins the
        # pieces with one concatenation instead of one full-length zero buffer per weight.
        self.current = values
        self.pieces = values.split(self.sizes)

    def trainable_modules(self) -> dict[str, nn.Module | nn.Parameter]:
        return {"generator": self.generator}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        groups = [{"params": list(self.generator.mlps.parameters()), "lr": lr}]
        if self.generator.theta.requires_grad:
            angle_lr = self.config.qpa.angle_lr or lr
            groups.append({"params": [self.generator.theta], "lr": angle_lr,
                           "weight_decay": 0.0})
        return groups

    def gradient_leaves(self) -> list[torch.Tensor]:
        held = self.generator.held_distribution
        return [held] if held is not None and held.requires_grad else []

    # -- training-loop hooks ------------------------------------------------------------
    def before_forward(self, step: int) -> None:
        if not self.generator.has_window:
            self.generator.refresh(with_gradient=True)
            if self._pending_grad is not None:
                self.generator.restore_accumulated_gradient(self._pending_grad)
                self._pending_grad = None
        self._set_current(self.generator())

    def before_optimizer_step(self, step: int, last_step: bool) -> None:
        if last_step:
            # An angle update now would change p after the MLP's last update, and the MLP
            # could never adapt to it (with shots it would also draw fresh noise). Export
            # with the distribution the MLP was trained against instead: no extra job.
            self.generator.discard_accumulated_gradient()
        elif (step + 1) % self.config.qpa.update_every == 0:
            self.generator.push_angle_gradient()

    def before_eval(self) -> None:
        if not self.generator.is_current:
            self.generator.refresh(with_gradient=False)
        with torch.no_grad():
            self._set_current(self.generator().detach())

    def extra_state(self) -> dict[str, Any]:
        grad = self.generator.accumulated_gradient()
        return {
            "accumulated_grad_p": None if grad is None else grad.detach().cpu(),
            "initial_weights": self.initial_weights,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.initial_weights = state["initial_weights"]
        with torch.no_grad():
            for name, layer in self.weights:
                layer.parametrizations.weight.original.copy_(self.initial_weights[name])
        self._pending_grad = state.get("accumulated_grad_p")
        self.generator.mark_stale()

    # -- results ----------------------------------------------------------------------
    def export_adapter(self, directory: Path) -> dict[str, Any]:
        self.before_eval()
        for _, layer in self.weights:
            if parametrize.is_parametrized(layer, "weight"):
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        self.model.save_pretrained(directory)
        return {"peft_type": "LORA", "exact": True}

    def parameter_report(self) -> dict[str, Any]:
        trainable = self.generator.angle_count + self.generator.mlp_count
        return {
            "trainable_params": trainable,
            "lora_equivalent_params": self.lora_equivalent,
            "ratio_to_lora": trainable / self.lora_equivalent,
            "circuit_angles": self.generator.angle_count,
            "mapping_mlp_params": self.generator.mlp_count,
            "generated_values": self.generator.num_values,
            "num_qubits": self.generator.num_qubits,
            "sub_generators": self.generator.num_subs,
            "chunks": self.generator.chunks_per_sub * self.generator.num_subs,
        }

    def quantum_report(self) -> dict[str, Any]:
        # Ablations that replace p by a fixed distribution run no circuit at all.
        usage = (self.backend.usage if self.backend is not None else QuantumUsage()).as_dict()
        usage.update(
            backend=self.config.backend,
            num_qubits=self.generator.num_qubits,
            depth=self.config.qpa.depth,
            ansatz=self.config.qpa.ansatz,
            update_every=self.config.qpa.update_every,
            ablation=self.config.qpa.ablation,
        )
        return usage

    def close(self) -> None:
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()
