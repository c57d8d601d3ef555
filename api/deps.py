"""Dependencies routes inject: settings, a database session, the artifact store, the
Celery publisher, Redis, the event hub, and the caller's API key
(``Authorization: Bearer <key>``).

Only what talks to the database is synchronous. Each synchronous dependency costs a trip
through the threadpool, so the trivial ones are ``async def``, and the session is created
in the event loop (no I/O) and committed in one trip when the route is done.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated

import anyio
import redis
from celery import Celery
from fastapi import Depends, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.errors import RequestError
from api.events import EventHub
from services import store
from services.artifacts import ArtifactStore
from services.settings import Settings

bearer = HTTPBearer(auto_error=False, description="An API key from `qpa keys create`.")
CHALLENGE = {"WWW-Authenticate": "Bearer"}


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> store.Store:
    return request.app.state.store


async def get_session(request: Request) -> AsyncIterator[Session]:
    session = request.app.state.store.new_session()
    try:
        yield session
    except BaseException:
        await _end(session, _rollback)
        raise
    await _end(session, _commit)


async def _end(session: Session, end: Callable[[Session], None]) -> None:
    # Sync routes and get_current_key end their transactions in their own thread
    # (api.errors.ServiceRoute); only a session still in one needs the trip.
    if session.in_transaction():
        await anyio.to_thread.run_sync(end, session)
    else:
        session.close()


def _commit(session: Session) -> None:
    try:
        session.commit()
    finally:
        session.close()


def _rollback(session: Session) -> None:
    try:
        session.rollback()
    finally:
        session.close()


async def get_artifacts(request: Request) -> ArtifactStore:
    return request.app.state.artifacts


async def get_celery(request: Request) -> Celery:
    return request.app.state.celery


async def get_redis(request: Request) -> redis.Redis:
    return request.app.state.redis


async def get_hub(request: Request) -> EventHub:
    return request.app.state.hub


# scope="function": the session commits when the route returns, before the response is
# sent, so a client that gets an id can read the object back at once.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
StoreDep = Annotated[store.Store, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ArtifactsDep = Annotated[ArtifactStore, Depends(get_artifacts)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]
HubDep = Annotated[EventHub, Depends(get_hub)]


async def get_bearer_token(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    """The key the caller sent (401 when none); not yet checked against the store."""
    if credentials is None:
        raise _missing_key()
    return credentials.credentials


def bearer_token(request: Request) -> str:
    """``get_bearer_token`` for a route that reads the header itself (the hot paths:
    solving a dependency costs more than reading a header). Such a route declares
    ``openapi_extra=BEARER_SECURITY`` so the schema still says it needs the key."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials:
        raise _missing_key()
    return credentials


def _missing_key() -> RequestError:
    return RequestError(status.HTTP_401_UNAUTHORIZED,
                        "missing API key: send 'Authorization: Bearer <key>' (create one "
                        "with `qpa keys create`)", headers=CHALLENGE)


BearerToken = Annotated[str, Depends(get_bearer_token)]
BEARER_SECURITY = {"security": [{"HTTPBearer": []}]}


def refuse_key(key_id: str | None, problem: str | None) -> None:
    """401 for an unknown key (``key_id`` None) or one with a ``problem``."""
    if key_id is None:
        raise RequestError(status.HTTP_401_UNAUTHORIZED, "invalid API key", headers=CHALLENGE)
    if problem:
        raise RequestError(status.HTTP_401_UNAUTHORIZED,
                           f"{problem}; create a new one with `qpa keys create`",
                           headers=CHALLENGE)


def get_current_key(session: SessionDep, token: BearerToken) -> store.ApiKey:
    """The caller's key; 401 when it is missing, unknown, revoked or expired (checked on
    every call, so revoking a key takes effect at once)."""
    key = store.find_api_key(session, token)
    # End the transaction here, in this thread: its connection goes back to the pool
    # before the route's own trip to the threadpool (see api.errors.ServiceRoute).
    session.commit()
    refuse_key(key and key.id, key and key.problem(store.utcnow()))
    return key


CurrentKey = Annotated[store.ApiKey, Depends(get_current_key)]
