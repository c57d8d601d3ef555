"""The backend registry behind GET /v1/backends and the job-submission check.

Lists the simulators, the fake IBM backends (local testing mode) and the IBM backends
named in settings, each with whether it can be used now and, if not, why. Simulator
versus QPU is configuration: what is listed and allowed comes from ``Settings``.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass
from typing import Any

from qpa.backends.spec import parse_backend
from services.settings import Settings


@dataclass(frozen=True)
class BackendInfo:
    name: str
    kind: str  # simulator | fake | ibm
    available: bool
    allowed: bool
    reason: str | None = None
    description: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def apply_ibm_settings(settings: Settings) -> None:
    """Map the IBM settings onto the standard Qiskit variables the library reads.

    Called once at start-up by the api and the worker, so ``QPA_IBM_*`` and the
    ``QISKIT_IBM_*`` a user may already know configure the same thing.
    """
    if settings.ibm_channel:
        os.environ["QISKIT_IBM_CHANNEL"] = settings.ibm_channel
    if settings.ibm_instance:
        os.environ["QISKIT_IBM_INSTANCE"] = settings.ibm_instance
    if settings.ibm_token_source == "saved":
        os.environ.pop("QISKIT_IBM_TOKEN", None)


def ibm_status(spec: str) -> tuple[bool, str | None]:
    """Whether an ``ibm:<name>`` backend is usable now, and why not."""
    try:
        from qpa.backends.ibm import ibm_status as library_status
    except ImportError:  # a library without IBM support
        return False, "this installation has no Qiskit Runtime support"
    available, reason = library_status(spec)
    return bool(available), reason


def list_backends(settings: Settings) -> list[BackendInfo]:
    backends = [
        BackendInfo("statevector", "simulator", True, settings.backend_allowed("statevector"),
                    description="exact torch statevector simulation with autograd"),
    ]
    aer_installed = importlib.util.find_spec("qiskit_aer") is not None
    backends.append(BackendInfo(
        "aer", "simulator", aer_installed, settings.backend_allowed("aer"),
        None if aer_installed else "qiskit-aer is not installed",
        "qiskit-aer primitives (exact or with shots)",
    ))
    for name in sorted(_fake_backend_names()):
        spec = f"ibm-fake:{name}"
        backends.append(BackendInfo(spec, "fake", True, settings.backend_allowed(spec),
                                    description="Qiskit Runtime local testing mode, "
                                    "with the fake device's noise model"))
    for name in settings.ibm_backends:
        spec = f"ibm:{name}"
        available, reason = ibm_status(spec)
        backends.append(BackendInfo(spec, "ibm", available, settings.backend_allowed(spec),
                                    reason, "IBM Quantum hardware via Qiskit Runtime"))
    return backends


def unusable_reason(spec: str, settings: Settings) -> str | None:
    """Why a job may not use ``spec`` on this server (None: it may)."""
    if not settings.backend_allowed(spec):
        return (f"backend {spec!r} is not allowed on this server (allowed: "
                f"{', '.join(settings.allowed_backends)})")
    parsed = parse_backend(spec)
    kind = parsed.kind.name
    if kind == "aer" and importlib.util.find_spec("qiskit_aer") is None:
        return "backend 'aer' is unavailable: qiskit-aer is not installed"
    if kind == "ibm-fake" and parsed.name not in _fake_backend_names():
        # Only an ibm-fake job makes the API load qiskit-ibm-runtime (to list its fakes).
        return f"qiskit-ibm-runtime ships no fake backend {parsed.name!r}"
    if kind == "ibm":
        available, reason = ibm_status(spec)
        if not available:
            return f"backend {spec!r} is unavailable: {reason}"
    return None


def _fake_backend_names() -> frozenset[str]:
    try:
        from qpa.backends.ibm import fake_backend_names
    except ImportError:
        return frozenset()
    try:
        return fake_backend_names()
    except Exception:  # qiskit-ibm-runtime missing or broken: list no fakes
        return frozenset()
