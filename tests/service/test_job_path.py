"""A classical job's path runs no quantum machinery (tests/service/job_path.py traces it)."""

from __future__ import annotations

from pathlib import Path

from tests.service.job_path import trace_job

#: What only a quantum job may run: circuits, simulators and devices, the QPU estimate, the
#: server's backend checks, and the quantum methods' code (their options sections are part
#: of every config, so they are validated for every job).
QUANTUM = ("qpa/backends/", "qpa/circuits.py", "qpa/estimate.py", "services/backends.py",
           "qpa/methods/qpa/", "qpa/methods/compound/")
ALLOWED = ("qpa/backends/spec.py", "qpa/methods/qpa/options.py",
           "qpa/methods/compound/options.py")


def test_a_lora_job_runs_no_quantum_code(redis_server: str, tmp_path: Path) -> None:
    path = trace_job("lora", tmp_path / "home", f"{redis_server}/14")
    assert path["status"] == "succeeded"
    # The profiler saw both sides: the route on the API's, the method on the worker's.
    assert "api/routes/jobs.py" in path["api"] and "services/queue.py" in path["api"]
    assert "qpa/methods/lora/method.py" in path["worker"]
    quantum = [file for file in path["api"] + path["worker"]
               if file.startswith(QUANTUM) and file not in ALLOWED]
    assert quantum == [], path
