"""Dependencies routes inject: settings, a database session, the artifact store, the
Celery publisher, and the caller's API key (``Authorization: Bearer <key>``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.errors import RequestError
from services import store
from services.artifacts import ArtifactStore
from services.settings import Settings

bearer = HTTPBearer(auto_error=False, description="An API key from `qpa keys create`.")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.store.session() as session:
        yield session


def get_artifacts(request: Request) -> ArtifactStore:
    return request.app.state.artifacts


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


# scope="function": the session commits when the route returns, before the response is
# sent, so a client that gets an id can read the object back at once.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ArtifactsDep = Annotated[ArtifactStore, Depends(get_artifacts)]
CeleryDep = Annotated[Celery, Depends(get_celery)]


def get_current_key(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> store.ApiKey:
    """The caller's key; 401 when it is missing, unknown, revoked or expired (checked on
    every call, so revoking a key takes effect at once)."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise RequestError(
            status.HTTP_401_UNAUTHORIZED,
            "missing API key: send 'Authorization: Bearer <key>' (create one with "
            "`qpa keys create`)", headers=challenge,
        )
    key = store.find_api_key(session, credentials.credentials)
    if key is None:
        raise RequestError(status.HTTP_401_UNAUTHORIZED, "invalid API key", headers=challenge)
    problem = key.problem(store.utcnow())
    if problem:
        raise RequestError(status.HTTP_401_UNAUTHORIZED,
                           f"{problem}; create a new one with `qpa keys create`",
                           headers=challenge)
    return key


CurrentKey = Annotated[store.ApiKey, Depends(get_current_key)]
