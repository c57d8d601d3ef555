"""docker-compose.yml (Docker is not available here) is checked by parsing it: its
commands name real entry points, its QPA_ variables are real settings, its URLs point at
its own services (the object store's endpoint, credentials and bucket included), workers
share no disk, the GPU worker serves the gpu queue on a reserved device, and the
Dockerfile it builds ships the packages those commands import."""

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


WORKERS = ("worker", "gpu-worker")


def _settings(environment: dict[str, Any]) -> Settings:
    """The Settings a container with this environment reads (compose defaults applied)."""
    values = {name.removeprefix("QPA_").lower(): _resolve(str(value))
              for name, value in environment.items() if name.startswith("QPA_")}
    return Settings(_env_file=None, **{name: value for name, value in values.items() if value})


def test_services_present(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "api", "worker", "gpu-worker", "flower", "postgres", "s3"} <= set(services)
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, (name, dependency)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in compose["volumes"], (name, source)
    # Scalable: no fixed container name or host port on the workers.
    for worker in WORKERS:
        assert "container_name" not in services[worker] and "ports" not in services[worker]
    # Nothing on disk is shared between api and workers: only Redis, PostgreSQL and S3.
    for name in ("api", *WORKERS):
        assert services[name].get("volumes", []) == [], name
        for dependency in ("redis", "postgres", "s3"):
            assert services[name]["depends_on"][dependency]["condition"] == "service_healthy"


def test_api_command_is_the_asgi_app(compose: dict[str, Any]) -> None:
    command = compose["services"]["api"]["command"]
    assert command[0] == "uvicorn"
    module, attribute = command[1].split(":")
    from fastapi import FastAPI

    assert isinstance(getattr(importlib.import_module(module), attribute), FastAPI)
    port = _option(command, "--port")
    assert any(mapping.endswith(f":{port}") for mapping in compose["services"]["api"]["ports"])


@pytest.mark.parametrize("worker", WORKERS)
def test_worker_command_is_the_celery_app(compose: dict[str, Any], worker: str) -> None:
    command = compose["services"][worker]["command"]
    assert command[:1] == ["celery"] and "worker" in command
    from celery import Celery

    app = importlib.import_module(_option(command, "-A", "--app")).app
    assert isinstance(app, Celery)
    from services.queue import RUN_JOB_TASK

    importlib.import_module("worker.tasks")
    assert RUN_JOB_TASK in app.tasks
    # The queues come from QPA_WORKER_RESOURCES (worker.app), never a fixed -Q.
    assert not {"--queues", "-Q"} & set(command)
    assert _option(command, "--concurrency", "-c") == "1"


def test_workers_serve_their_resource_class(compose: dict[str, Any]) -> None:
    services = compose["services"]
    defaults = Settings(_env_file=None)
    cpu, gpu = (_settings(services[name]["environment"]) for name in WORKERS)
    assert (cpu.worker_resources, cpu.worker_queues) == (["cpu"], [defaults.queue])
    assert (gpu.worker_resources, gpu.worker_queues) == (["gpu"], [defaults.gpu_queue])
    # The GPU worker gets a device (and is opt-in: a host without NVIDIA's runtime
    # could not start it), and builds torch's default CUDA wheels, not the CPU index.
    gpu_worker = services["gpu-worker"]
    devices = gpu_worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu_worker["profiles"] == ["gpu"]
    assert gpu_worker["build"]["args"]["PIP_EXTRA_INDEX_URL"] == ""
    assert "PIP_EXTRA_INDEX_URL" in (ROOT / "Dockerfile").read_text()


def test_object_store_settings_point_at_the_s3_service(compose: dict[str, Any]) -> None:
    environment = compose["x-qpa-env"]
    settings = _settings(environment)
    bucket = settings.resolved_artifact_url.removeprefix("s3://").split("/")[0]
    assert settings.resolved_artifact_url.startswith("s3://") and bucket
    from services.artifacts import ObjectArtifactStore, open_artifacts

    assert isinstance(open_artifacts(settings.resolved_artifact_url), ObjectArtifactStore)
    s3 = compose["services"]["s3"]
    script = _resolve(" ".join(s3["command"]))
    assert s3["entrypoint"] == ["sh", "-c"] and "rclone serve s3 /data" in script
    # The endpoint the services use is the port rclone listens on, in the s3 container.
    endpoint = _resolve(environment["AWS_ENDPOINT_URL"])
    assert endpoint == f"http://s3:{_option(script.split(), '--addr').lstrip(':')}"
    # The credentials the services send are the ones rclone accepts.
    access, secret = _option(script.split(), "--auth-key").split(",")
    assert (access, secret) == (_resolve(environment["AWS_ACCESS_KEY_ID"]),
                                _resolve(environment["AWS_SECRET_ACCESS_KEY"]))
    # The bucket exists before the API checks it at start-up.
    assert f"mkdir -p /data/{bucket} " in script
    assert "s3-data:/data" in s3["volumes"]


def test_environment_names_real_settings(compose: dict[str, Any]) -> None:
    fields = set(Settings.model_fields)
    environment = compose["x-qpa-env"]
    assert compose["services"]["api"]["environment"] == environment
    for worker in WORKERS:  # the shared block, plus what the worker serves
        worker_environment = compose["services"][worker]["environment"]
        assert {name: worker_environment[name] for name in environment} == environment
        assert set(worker_environment) - set(environment) == {"QPA_WORKER_RESOURCES"}
    names = [name for name in environment if name.startswith("QPA_")]
    assert len(names) >= 10
    for name in names:
        assert name.removeprefix("QPA_").lower() in fields, f"{name} is not a setting"
    # The storage settings are the three URLs of DESIGN.md; no local artifact folder.
    assert {"QPA_DATABASE_URL", "QPA_BROKER_URL", "QPA_ARTIFACT_URL"} <= set(names)
    assert "QPA_ARTIFACT_DIR" not in names
    # And the values parse as those settings.
    settings = _settings(environment)
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
