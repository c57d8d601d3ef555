"""The adapter methods by name: the one place that lists them.

A method is a package under ``qpa/methods/<name>/`` whose ``__init__`` defines ``METHOD``, a
``MethodSpec``: its options section (the job config's ``<name>:`` key), where its
``AdapterMethod`` lives, and whether it runs circuits. Adding a method is adding its folder
and its name to ``BUILTIN``. The config schema, the trainer, the export and the model card
ask this registry; nothing else names a method.

Loading a spec imports only the method's options (pydantic): validating a job imports
no torch, PEFT or qiskit. The implementation is imported when a job runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qpa.estimate import QuantumEstimate
    from qpa.methods.base import AdapterMethod
    from qpa.options import Section

#: The built-in methods, one registration each, in the order the config lists their sections.
BUILTIN = ("lora", "qpa", "compound", "vera")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    #: The job config section ``<name>:`` (its ``learning_rate`` is the method's default).
    options: type[Section]
    #: ``"module:Class"`` of the method's ``AdapterMethod``, imported lazily.
    implementation: str
    #: Runs circuits on the job's ``backend`` (the model card and CLI then name it).
    uses_quantum: bool = False
    #: ``"module:function"`` computing the job's ``qpa.estimate.QuantumEstimate`` before it
    #: runs (``qpa estimate``, the budget check); None for methods with no quantum cost.
    estimator: str | None = None

    def load(self) -> type[AdapterMethod]:
        return _attribute(self.implementation)

    def load_estimator(self) -> Callable[..., QuantumEstimate] | None:
        return None if self.estimator is None else _attribute(self.estimator)


def _attribute(path: str) -> Any:
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


@cache
def methods() -> dict[str, MethodSpec]:
    """Every registered method by name."""
    specs = {}
    for package in BUILTIN:
        spec: MethodSpec = importlib.import_module(f"qpa.methods.{package}").METHOD
        if spec.name != package:
            raise RuntimeError(f"qpa.methods.{package} registers {spec.name!r}")
        specs[spec.name] = spec
    return specs


def method_spec(name: str) -> MethodSpec:
    try:
        return methods()[name]
    except KeyError:
        raise KeyError(f"no adapter method {name!r}; registered: {', '.join(methods())}") from None


def method_class(name: str) -> type[AdapterMethod]:
    """The AdapterMethod class registered under ``name`` (imported on first use)."""
    return method_spec(name).load()
