"""docker-compose.yml (Docker is not available here) is checked by parsing it: its
commands name real entry points, its QPA_ variables are real settings, its URLs point at
its own services, and the Dockerfile it builds ships the packages those commands import."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _option(command: list[str], *names: str) -> str:
    for index, part in enumerate(command):
        if part in names:
            return command[index + 1]
        for name in names:
            if part.startswith(f"{name}="):
                return part.split("=", 1)[1]
    raise AssertionError(f"{names} not in {command}")


def _resolve(value: str) -> str:
    """What compose makes of ${VAR:-default} when VAR is unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_services_present(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "api", "worker", "flower", "postgres"} <= set(services)
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, (name, dependency)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in compose["volumes"], (name, source)
    # Scalable: no fixed container name or host port on the worker.
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]


def test_api_command_is_the_asgi_app(compose: dict[str, Any]) -> None:
    command = compose["services"]["api"]["command"]
    assert command[0] == "uvicorn"
    module, attribute = command[1].split(":")
    from fastapi import FastAPI

    assert isinstance(getattr(importlib.import_module(module), attribute), FastAPI)
    port = _option(command, "--port")
    assert any(mapping.endswith(f":{port}") for mapping in compose["services"]["api"]["ports"])


def test_worker_command_is_the_celery_app(compose: dict[str, Any]) -> None:
    command = compose["services"]["worker"]["command"]
    assert command[:1] == ["celery"] and "worker" in command
    from celery import Celery

    app = importlib.import_module(_option(command, "-A", "--app")).app
    assert isinstance(app, Celery)
    from services.queue import RUN_JOB_TASK

    importlib.import_module("worker.tasks")
    assert RUN_JOB_TASK in app.tasks
    assert _option(command, "--queues", "-Q") == Settings(_env_file=None).queue
    assert _option(command, "--concurrency", "-c") == "1"


def test_environment_names_real_settings(compose: dict[str, Any]) -> None:
    fields = set(Settings.model_fields)
    environment = compose["x-qpa-env"]
    for service in ("api", "worker"):
        assert compose["services"][service]["environment"] == environment
    names = [name for name in environment if name.startswith("QPA_")]
    assert len(names) >= 10
    for name in names:
        assert name.removeprefix("QPA_").lower() in fields, f"{name} is not a setting"
    # And the values parse as those settings.
    values = {name: _resolve(str(value)) for name, value in environment.items()
              if name.startswith("QPA_")}
    settings = Settings(_env_file=None, **{name.removeprefix("QPA_").lower(): value
                                           for name, value in values.items() if value})
    assert settings.resolved_broker_url.startswith("redis://redis:")
    assert settings.resolved_database_url.startswith("postgresql+psycopg://")
    assert "@postgres:" in settings.resolved_database_url
    flower = compose["services"]["flower"]["command"]
    assert _option(flower, "--broker") == settings.resolved_broker_url


def test_dockerfile_ships_what_the_commands_import(compose: dict[str, Any]) -> None:
    for service in ("api", "worker"):
        build = compose["services"][service]["build"]
        dockerfile = ROOT / build["context"] / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file()
    text = (ROOT / "Dockerfile").read_text()
    for package in ("qpa", "services", "api", "worker"):
        assert re.search(rf"^COPY {package} \./{package}$", text, re.MULTILINE), package
        assert (ROOT / package).is_dir()
    assert '".[service]"' in text and "psycopg" in text
    cmd = re.search(r"^CMD (.+)$", text, re.MULTILINE).group(1)
    assert "api.main:app" in cmd
