"""GET /v1/backends: what jobs can run on here, and why not when they cannot."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentKey, SettingsDep
from api.errors import ServiceRoute
from api.schemas import BackendList, BackendObject, error_responses
from services.backends import list_backends

router = APIRouter(prefix="/v1/backends", tags=["backends"], route_class=ServiceRoute,
                   responses=error_responses(401))


@router.get("", response_model=BackendList)
def get_backends(_: CurrentKey, settings: SettingsDep) -> BackendList:
    """Simulators, Qiskit Runtime fake backends and the IBM backends configured in
    `QPA_IBM_BACKENDS`; an IBM backend without credentials is listed unavailable."""
    return BackendList(default=settings.default_backend,
                       data=[BackendObject.of(info) for info in list_backends(settings)])
