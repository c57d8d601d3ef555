"""Key lifecycle (finding 8): `qpa keys create --expires | list | revoke` on the server's
database, `GET/DELETE /v1/keys` for a key's own record, and a revoked or expired key
answered 401 on its very next call."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from services import store

from .helpers import ServiceStack

_SCRIPT = Path(sys.executable).with_name("qpa")
CLI = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "services.cli"]


def _cli(stack: ServiceStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "keys", *args], env=stack.env, capture_output=True,
                          text=True)


def _as(stack: ServiceStack, key: str) -> httpx.Client:
    return httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"},
                        timeout=30)


def test_cli_creates_lists_and_revokes_keys(stack: ServiceStack) -> None:
    created = _cli(stack, "create", "--name", "ci", "--expires", "30")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith(store.KEY_PREFIX) and "expires" in created.stderr

    with _as(stack, key) as client:
        own = client.get("/v1/keys")
        assert own.status_code == 200, own.text
        record = own.json()
        assert record["name"] == "ci" and key.startswith(record["prefix"])
        assert record["revoked_at"] is None and record["expires_at"] > record["created_at"]
        assert key not in own.text  # only the hash is stored

        listed = json.loads(_cli(stack, "list", "--json").stdout)
        mine = next(row for row in listed if row["id"] == record["id"])
        assert mine["state"] == "active" and mine["name"] == "ci"
        assert all(key not in json.dumps(row) for row in listed)

        revoked = _cli(stack, "revoke", record["id"])
        assert revoked.returncode == 0, revoked.stderr
        # Revocation is read on every call: the next request is refused.
        refused = client.get("/v1/jobs")
        assert refused.status_code == 401
        assert "revoked" in refused.json()["detail"] and record["id"] in refused.json()["detail"]
        assert client.get("/v1/keys").status_code == 401

    listed = json.loads(_cli(stack, "list", "--json").stdout)
    assert next(row for row in listed if row["id"] == record["id"])["state"] == "revoked"
    table = _cli(stack, "list").stdout
    assert record["id"] in table and "revoked" in table
    missing = _cli(stack, "revoke", "key-000000000000000000000000")
    assert missing.returncode == 1 and "no key" in missing.stderr


@pytest.mark.parametrize("days", ["0", "-1", "soon"])
def test_cli_refuses_a_bad_expiry(stack: ServiceStack, days: str) -> None:
    result = _cli(stack, "create", "--expires", days)
    assert result.returncode == 2 and not result.stdout.strip()


def test_a_key_revokes_itself_over_http(stack: ServiceStack) -> None:
    key = stack.new_key("leaked")
    with _as(stack, key) as client:
        assert client.get("/v1/backends").status_code == 200
        revoked = client.delete("/v1/keys")
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["revoked_at"] is not None
        after = client.get("/v1/backends")
        assert after.status_code == 401 and "revoked" in after.json()["detail"]
        assert after.headers["www-authenticate"] == "Bearer"
    other = stack.new_key("bystander")
    with _as(stack, other) as client:  # one key's revocation touches no other key
        assert client.get("/v1/backends").status_code == 200


def test_expired_key_gets_401(stack: ServiceStack) -> None:
    db = store.Store(stack.database_url)
    with db.session() as session:
        now = store.utcnow()
        _, expired = store.create_api_key(session, "old", expires_at=now - timedelta(seconds=1))
        _, current = store.create_api_key(session, "new", expires_at=now + timedelta(days=1))
    db.dispose()
    with _as(stack, expired) as client:
        response = client.get("/v1/jobs")
        assert response.status_code == 401 and "expired" in response.json()["detail"]
    with _as(stack, current) as client:
        assert client.get("/v1/jobs").status_code == 200
        assert client.get("/v1/keys").json()["expires_at"] is not None
