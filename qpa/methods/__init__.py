"""Adapter methods by name. Adding a method = adding a module and one line here."""

from __future__ import annotations

from qpa.methods.base import AdapterMethod


def method_class(name: str) -> type[AdapterMethod]:
    """The AdapterMethod class registered under ``name`` (imported lazily)."""
    if name == "lora":
        from qpa.methods.lora import LoraMethod

        return LoraMethod
    if name == "qpa":
        from qpa.methods.qpa import QPAMethod

        return QPAMethod
    if name == "compound":
        from qpa.methods.compound import CompoundMethod

        return CompoundMethod
    raise KeyError(name)


METHOD_NAMES = ("qpa", "lora", "compound")

__all__ = ["METHOD_NAMES", "AdapterMethod", "method_class"]
