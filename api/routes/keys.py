"""GET /v1/keys (the calling key's own record) and DELETE /v1/keys (revoke it).

Creating and listing every key is an operator's job (`qpa keys create|list|revoke` on
the server's database); over HTTP a key sees and revokes only itself, e.g. one that
leaked.
"""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentKey, SessionDep
from api.errors import ServiceRoute
from api.schemas import KeyObject, error_responses
from services import store

router = APIRouter(prefix="/v1/keys", tags=["keys"], route_class=ServiceRoute,
                   responses=error_responses(401))


@router.get("", response_model=KeyObject)
def get_own_key(key: CurrentKey) -> KeyObject:
    """The record of the key this request is made with: name, prefix, expiry."""
    return KeyObject.of(key)


@router.delete("", response_model=KeyObject)
def revoke_own_key(key: CurrentKey, session: SessionDep) -> KeyObject:
    """Revoke the key this request is made with; every later call with it gets 401."""
    return KeyObject.of(store.revoke_api_key(session, key))
