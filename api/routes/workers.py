"""GET /v1/workers: what capacity is up, per resource class."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import func, select

from api.deps import CurrentKey, RedisDep, SessionDep
from api.errors import ServiceRoute
from api.schemas import CapacityObject, WorkerList, WorkerObject, error_responses
from services import store, workers
from services.settings import RESOURCE_CLASSES
from services.status import JobStatus

router = APIRouter(prefix="/v1/workers", tags=["workers"], route_class=ServiceRoute,
                   responses=error_responses(401))


@router.get("", response_model=WorkerList)
def list_workers(_: CurrentKey, session: SessionDep, client: RedisDep) -> WorkerList:
    """The workers up now (each announces itself every `QPA_REAP_SECONDS`), and per
    resource class: workers, job slots, and the jobs of all keys queued and running."""
    data = [WorkerObject(**record) for record in workers.list_workers(client)]
    counts = {(resource_class, status): count for resource_class, status, count in
              session.execute(select(store.Job.resource_class, store.Job.status, func.count())
                              .where(store.Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)))
                              .group_by(store.Job.resource_class, store.Job.status))}
    capacity = []
    for resource_class in RESOURCE_CLASSES:
        serving = [worker for worker in data if resource_class in worker.resource_classes]
        capacity.append(CapacityObject(
            resource_class=resource_class, workers=len(serving),
            slots=sum(worker.concurrency for worker in serving),
            queued=counts.get((resource_class, JobStatus.QUEUED), 0),
            running=counts.get((resource_class, JobStatus.RUNNING), 0)))
    return WorkerList(data=data, capacity=capacity)
