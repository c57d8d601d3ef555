"""The job config's ``backend`` string: its syntax and the kinds of backend, without qiskit.

The one place that parses a backend string. Validating a job needs only this module, so the
API process checks a config without importing qiskit; whether a named device exists, how
wide it is and whether the account may use it are found out once, when a job is prepared
(``qpa.backends.check_backend``), because that needs qiskit-ibm-runtime and, for ``ibm:``,
the network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qpa.errors import ConfigError


@dataclass(frozen=True)
class BackendKind:
    name: str
    description: str
    #: How the ``:<name>`` part must look; None: the kind takes no name.
    name_pattern: re.Pattern[str] | None = None
    #: Differentiates p(theta) with torch autograd (no parameter-shift jobs).
    autograd: bool = False
    #: A simulator's memory bound on the register; None for devices (their width decides).
    max_qubits: int | None = None

    @property
    def device(self) -> bool:
        """Runs on a (real or fake) IBM device: width, routing and timing come from it."""
        return self.name_pattern is not None


KINDS: dict[str, BackendKind] = {kind.name: kind for kind in (
    BackendKind("statevector", "exact torch statevector simulation with autograd",
                autograd=True, max_qubits=30),
    BackendKind("aer", "qiskit-aer primitives (exact or with shots)", max_qubits=30),
    BackendKind("ibm", "IBM Quantum hardware via Qiskit Runtime",
                name_pattern=re.compile(r"[A-Za-z0-9_\-]+")),
    BackendKind("ibm-fake", "Qiskit Runtime local testing mode, with the fake device's noise "
                "model", name_pattern=re.compile(r"Fake[A-Za-z0-9_]+")),
)}


@dataclass(frozen=True)
class BackendSpec:
    kind: BackendKind
    name: str | None = None

    def __str__(self) -> str:
        return self.kind.name if self.name is None else f"{self.kind.name}:{self.name}"


def parse_backend(text: str) -> BackendSpec:
    """``statevector`` | ``aer`` | ``ibm:<name>`` | ``ibm-fake:<FakeX>``, or ConfigError."""
    kind_name, colon, name = text.partition(":") if isinstance(text, str) else ("", "", "")
    kind = KINDS.get(kind_name)
    if kind is not None and (
        (kind.name_pattern is None and not colon)
        or (kind.name_pattern is not None and kind.name_pattern.fullmatch(name))
    ):
        return BackendSpec(kind, name or None)
    raise ConfigError("backend", f"unknown backend {text!r}; use statevector, aer, "
                      "ibm:<name> or ibm-fake:<FakeBackend class, e.g. FakeManilaV2>")
