"""Qiskit Runtime backends: IBM hardware (``ibm:<name>``) and local testing mode (``ibm-fake:``)."""

from __future__ import annotations

import functools
import inspect


@functools.cache
def fake_backend_names() -> frozenset[str]:
    """Names of the V2 fake backends qiskit-ibm-runtime ships (usable as ``ibm-fake:<name>``)."""
    from qiskit_ibm_runtime import fake_provider

    return frozenset(
        name for name, obj in inspect.getmembers(fake_provider, inspect.isclass)
        if name.startswith("Fake") and name.endswith("V2")
    )
