"""Qiskit Runtime backends: IBM hardware (``ibm:<name>``) and local testing mode (``ibm-fake:``).

Both specs run the same code: the circuit is transpiled once to an ISA circuit for the
target, one Session (or Batch) is opened on the first evaluation and reused for the whole
run, and every evaluation is one Sampler job with one PUB carrying all parameter bindings.
``ibm-fake:<FakeX>`` passes one of qiskit-ibm-runtime's own fake backends as the Session's
backend, which is the library's local testing mode: the job is simulated by qiskit-aer with
the fake device's noise model instead of being sent to IBM.

The Sampler is ``qiskit_ibm_runtime.executor_sampler.Sampler``: since 0.50 the top-level
``SamplerV2`` is deprecated in favour of this client-side implementation (same V2 PUB
interface, twirling and dynamical decoupling applied on the client).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qiskit.circuit import QuantumCircuit

from qpa.backends.aer import bit_array_probabilities, parameter_columns
from qpa.backends.base import QuantumBackend, shots_per_circuit
from qpa.backends.spec import parse_backend
from qpa.config import QuantumOptions
from qpa.errors import ConfigError

if TYPE_CHECKING:
    from qiskit.providers import BackendV2
    from qiskit_ibm_runtime import QiskitRuntimeService

_NO_CREDENTIALS = (
    "no IBM Quantum credentials: set QISKIT_IBM_TOKEN (and QISKIT_IBM_INSTANCE, optionally "
    "QISKIT_IBM_CHANNEL) or save an account with "
    "QiskitRuntimeService.save_account(token=..., instance=...)"
)


@functools.cache
def fake_backend_names() -> frozenset[str]:
    """Names of the fake backends qiskit-ibm-runtime ships (usable as ``ibm-fake:<name>``).

    Every exported ``Fake*`` class that is a ``BackendV2``: newer devices have no ``V2``
    suffix (``FakeBrisbane``), older ones do (``FakeManilaV2``).
    """
    from qiskit.providers import BackendV2
    from qiskit_ibm_runtime import fake_provider

    return frozenset(
        name for name, obj in inspect.getmembers(fake_provider, inspect.isclass)
        if name.startswith("Fake") and issubclass(obj, BackendV2)
    )


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``ibm:<name>`` / ``ibm-fake:<FakeX>`` into (kind, name)."""
    parsed = parse_backend(spec)
    if not parsed.kind.device:
        raise ConfigError("backend", f"{spec!r} is not ibm:<backend name> or ibm-fake:<FakeX>")
    return parsed.kind.name, parsed.name


def fake_backend(name: str) -> BackendV2:
    """Instantiate qiskit-ibm-runtime's fake backend class ``name``."""
    if name not in fake_backend_names():
        close = difflib.get_close_matches(name, sorted(fake_backend_names()), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            "backend", f"qiskit-ibm-runtime ships no fake backend {name!r}{hint}"
        )
    from qiskit_ibm_runtime import fake_provider

    return getattr(fake_provider, name)()


def _account_file() -> Path:
    # Resolved per call, not at import (qiskit-ibm-runtime fixes its default path when it is
    # imported), so a changed HOME (tests, containers) is honoured.
    return Path.home() / ".qiskit" / "qiskit-ibm.json"


def _credentials() -> dict[str, Any] | None:
    """Keyword arguments for QiskitRuntimeService, or None when none are configured.

    Decided locally, without any network call: the environment first, then a saved
    account file. The file is only read when it exists, because qiskit-ibm-runtime's
    reader creates an empty one as a side effect.
    """
    token = os.environ.get("QISKIT_IBM_TOKEN")
    if token:
        kwargs: dict[str, Any] = {"token": token}
        if channel := os.environ.get("QISKIT_IBM_CHANNEL"):
            kwargs["channel"] = channel
        if instance := os.environ.get("QISKIT_IBM_INSTANCE"):
            kwargs["instance"] = instance
        return kwargs
    path = _account_file()
    if not path.is_file():
        return None
    from qiskit_ibm_runtime import QiskitRuntimeService

    try:
        saved = QiskitRuntimeService.saved_accounts(filename=str(path))
    except ValueError as err:
        raise ConfigError(
            "backend", f"the saved Qiskit account file {path} is invalid: {err}"
        ) from err
    if not saved:
        return None
    kwargs = {"filename": str(path)}
    # The environment may still pick the channel or instance of the saved account.
    if channel := os.environ.get("QISKIT_IBM_CHANNEL"):
        kwargs["channel"] = channel
    if instance := os.environ.get("QISKIT_IBM_INSTANCE"):
        kwargs["instance"] = instance
    return kwargs


def runtime_service() -> QiskitRuntimeService:
    """An authenticated QiskitRuntimeService; ConfigError when that is impossible.

    One per process and account: preparing a job (width check), running it and the API's
    status check would otherwise each authenticate with IBM Cloud again."""
    kwargs = _credentials()
    if kwargs is None:
        raise ConfigError("backend", _NO_CREDENTIALS)
    return _service(tuple(sorted(kwargs.items())))


@functools.lru_cache(maxsize=4)
def _service(account: tuple[tuple[str, Any], ...]) -> QiskitRuntimeService:
    from qiskit_ibm_runtime import QiskitRuntimeService

    try:
        return QiskitRuntimeService(**dict(account))
    except Exception as err:
        # Authentication talks to IBM Cloud: a bad token, an unknown instance and an
        # unreachable network all surface here, each with a different exception class,
        # and to the user each means the backend setting cannot be used as configured.
        raise ConfigError(
            "backend", f"could not connect to IBM Quantum with the configured account: {err}"
        ) from err


def ibm_backend(service: QiskitRuntimeService, name: str) -> BackendV2:
    """The named IBM backend; ConfigError listing what the account can use if unknown."""
    from qiskit.providers.exceptions import QiskitBackendNotFoundError

    try:
        return service.backend(name)
    except QiskitBackendNotFoundError as err:
        try:
            available = ", ".join(sorted(b.name for b in service.backends())) or "none"
        except Exception:  # listing is only a hint; the unknown name is the error
            available = "unknown"
        raise ConfigError(
            "backend", f"IBM Quantum has no backend {name!r} for this account "
            f"(available: {available})"
        ) from err


@functools.cache  # a device's width does not change; failures are not cached
def target_backend_qubits(spec: str) -> int:
    """Number of qubits of the backend named by ``spec``.

    Raises ConfigError when the fake backend does not exist, or, for ``ibm:``, when no
    credentials are configured (checked locally, so it fails fast offline), the service
    cannot be reached, or the account has no such backend.
    """
    kind, name = parse_spec(spec)
    if kind == "ibm-fake":
        return int(fake_backend(name).num_qubits)
    return int(ibm_backend(runtime_service(), name).num_qubits)


def ibm_status(spec: str) -> tuple[bool, str]:
    """(usable?, reason) for listing backends, e.g. in ``GET /v1/backends``; never raises."""
    try:
        kind, name = parse_spec(spec)
        if kind == "ibm-fake":
            backend = fake_backend(name)
            return True, f"local testing mode with the noise model of {backend.name}"
        if _credentials() is None:
            return False, _NO_CREDENTIALS
        backend = ibm_backend(runtime_service(), name)
        status = backend.status()
        reason = f"{status.status_msg}, {status.pending_jobs} pending jobs"
        return bool(status.operational), reason
    except ConfigError as err:
        return False, err.reason
    except Exception as err:  # a status page must not fail because one backend does
        return False, f"{type(err).__name__}: {err}"


class RuntimeBackend(QuantumBackend):
    """Runs the circuit through Qiskit Runtime's Sampler inside one Session or Batch."""

    def __init__(self, circuit: QuantumCircuit, spec: str, options: QuantumOptions):
        super().__init__(circuit)
        from qiskit.transpiler import generate_preset_pass_manager

        self.spec = spec
        self.options = options
        self.shots = shots_per_circuit(spec, options)
        kind, name = parse_spec(spec)
        self.local = kind == "ibm-fake"
        self.backend = fake_backend(name) if self.local else ibm_backend(runtime_service(), name)
        if circuit.num_qubits > self.backend.num_qubits:
            raise ConfigError(
                "backend", f"{spec} has {self.backend.num_qubits} qubits but the circuit "
                f"needs {circuit.num_qubits}"
            )
        measured = circuit.copy()
        measured.measure_all()
        pass_manager = generate_preset_pass_manager(
            backend=self.backend, optimization_level=options.optimization_level
        )
        # Transpiled once: every evaluation only binds parameters into this ISA circuit.
        self.isa_circuit = pass_manager.run(measured)
        self._columns = parameter_columns(circuit, self.isa_circuit)
        # One seed per job drawn from options.seed: reproducible, yet successive jobs
        # get independent shot noise instead of repeating the same random stream.
        self._seeds = np.random.default_rng(options.seed)
        self.session: Any = None
        self._sampler: Any = None
        self._closed = False

    @property
    def name(self) -> str:
        return self.spec

    def _open(self) -> Any:
        if self._closed:
            raise RuntimeError(f"{self.spec}: the backend was closed; its session is over")
        if self._sampler is None:
            from qiskit_ibm_runtime import Batch, Session
            from qiskit_ibm_runtime.executor_sampler import Sampler

            mode_class = Batch if self.options.execution_mode == "batch" else Session
            self.session = mode_class(backend=self.backend)
            sampler = Sampler(mode=self.session)
            sampler.options.default_shots = self.shots
            sampler.options.dynamical_decoupling.enable = self.options.dynamical_decoupling
            sampler.options.twirling.enable_gates = self.options.twirling
            sampler.options.twirling.enable_measure = self.options.twirling
            self._sampler = sampler
        return self._sampler

    def evaluate(self, bindings: np.ndarray) -> np.ndarray:
        bindings = np.atleast_2d(np.asarray(bindings, dtype=np.float64))
        batch = bindings.shape[0]
        sampler = self._open()
        if self.local:
            # Simulator options only mean something in local testing mode.
            sampler.options.simulator.seed_simulator = int(self._seeds.integers(2**31))
        if self._columns:
            pub = (self.isa_circuit, bindings[:, self._columns])
        else:
            pub = (self.isa_circuit,)
        with self._timed() as timer:
            job = sampler.run([pub])
            job_id = job.job_id()
            self._job_submitted(batch, runtime_job_id=job_id)
            result = job.result()
        bits = result[0].data.meas
        probs = bit_array_probabilities(bits, self.num_qubits)
        probs = np.broadcast_to(probs, (batch, probs.shape[-1])).copy()
        seconds = None if self.local else _quantum_seconds(job)
        # Twirling rounds shots up to randomizations x shots per randomization: count what ran.
        seconds = timer.seconds if seconds is None else seconds
        self.usage.record(circuits=batch, shots=batch * int(bits.num_shots), seconds=seconds)
        self._job_done(seconds, runtime_job_id=job_id)
        return probs

    @property
    def shots_per_circuit(self) -> int:
        return shots_per_circuit(self.spec, self.options)

    @property
    def executed_circuit(self) -> QuantumCircuit:
        return self.isa_circuit

    def seconds_per_shot(self) -> float | None:
        """ISA circuit duration (longest path under the target's gate and readout
        durations) plus the device's ``default_rep_delay``, the pause IBM inserts between
        shots for qubit reset; None when the target publishes no durations."""
        try:
            duration = self.isa_circuit.estimate_duration(self.backend.target, unit="s")
        except Exception:  # a target without durations cannot be timed; not an error
            return None
        rep_delay = getattr(self.backend, "default_rep_delay", None)
        if rep_delay is None:
            configuration = getattr(self.backend, "configuration", None)
            rep_delay = getattr(configuration(), "default_rep_delay", None) if configuration \
                else None
        return float(duration) + float(rep_delay or 0.0)

    def close(self) -> None:
        """Close the Session/Batch (queued jobs still finish). Safe to call repeatedly."""
        if self._closed:
            return
        self._closed = True
        self._sampler = None
        # ``self.session`` stays set: callers (and tests) can still inspect the closed session.
        if self.session is not None:
            self.session.close()


def _quantum_seconds(job: Any) -> float | None:
    """The QPU time the Runtime reports for a finished job, or None if it reports none."""
    try:
        usage = job.metrics().get("usage", {})
    except Exception:  # metrics are a bookkeeping nicety; wall time is the fallback
        return None
    for key in ("quantum_seconds", "qpu_charge_time_seconds", "seconds"):
        value = usage.get(key)
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    return None
