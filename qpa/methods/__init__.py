"""Adapter methods, one folder each; ``registry`` lists them (see its docstring)."""

from qpa.methods.registry import MethodSpec, method_class, method_spec, methods

__all__ = ["MethodSpec", "method_class", "method_spec", "methods"]
