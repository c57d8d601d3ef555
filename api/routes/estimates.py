"""POST /v1/estimates: what a job would cost on its backend, without running it.

The body is a job body (``POST /v1/jobs``'s), checked by the same server policy; the answer
is ``qpa.estimate``'s, the numbers ``qpa estimate`` prints. Unlike job creation, a job over
its quantum.max_seconds is not refused here: ``over_budget`` says so, so the caller sees
by how much.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body
from pydantic import BaseModel, Field

from api.deps import CurrentKey, SessionDep, SettingsDep
from api.errors import ServiceRoute
from api.schemas import JOB_BODY_EXAMPLE, error_responses
from qpa.config import JobConfig, parse_config
from services.jobs import prepare_config

router = APIRouter(prefix="/v1/estimates", tags=["estimates"], route_class=ServiceRoute,
                   responses=error_responses(401))


class EstimateObject(BaseModel):
    """A job's quantum cost before it runs (``qpa.estimate.QuantumEstimate``)."""

    object: str = "estimate"
    backend: str
    num_qubits: int = Field(description="Qubits of each generator circuit.")
    sub_generators: int
    circuit_parameters: int = Field(description="Angles per circuit.")
    circuits_per_job_row: int = Field(description="Bindings per circuit in a gradient job "
                                      "(1 + 2 x shift terms x angles).")
    logical_depth: int
    device_qubits: int | None
    isa_depth: int | None = Field(description="Depth after transpilation for the backend.")
    isa_two_qubit_gates: int | None
    jobs: int = Field(description="Primitive jobs of the whole run.")
    circuits: int = Field(description="Circuits (parameter bindings) of the whole run.")
    shots: int
    shots_per_circuit: int
    largest_job_circuits: int
    seconds_per_shot: float | None
    qpu_seconds: float | None = Field(description="Estimated QPU seconds (IBM backends only); "
                                      "`qpu_seconds_method` says how.")
    qpu_seconds_method: str | None
    max_seconds: float | None = Field(description="The job's quantum.max_seconds after the "
                                      "server's cap.")
    over_budget: bool
    warnings: list[str]


@router.post("", response_model=EstimateObject, responses=error_responses(400, 404, 422))
def create_estimate(
    config: Annotated[JobConfig, Body(
        description="A job body, as for `POST /v1/jobs` (uploaded file ids included).",
        examples=[JOB_BODY_EXAMPLE])],
    key: CurrentKey, session: SessionDep, settings: SettingsDep,
) -> EstimateObject:
    """Qubits, depth after transpilation, primitive jobs, circuits, shots and estimated QPU
    seconds of the whole run, with warnings (e.g. a circuit wider than the device)."""
    from qpa.estimate import estimate_job

    stored = prepare_config(session, settings, key.id, config, enforce_budget=False)
    estimate = estimate_job(parse_config(stored))
    return EstimateObject(**estimate.as_dict(), over_budget=estimate.over_budget)
