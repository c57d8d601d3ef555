"""A LoRA job's path runs no quantum code and no other method's code (tests/service/job_path.py
traces it)."""

from __future__ import annotations

from pathlib import Path

from tests.service.job_path import trace_job

#: What only a quantum job may run: circuits, simulators and devices, the QPU estimate and
#: the server's backend checks.
QUANTUM = ("qpa/backends/", "qpa/circuits.py", "qpa/estimate.py", "services/backends.py")
#: Every method's options section is part of every config, so it is validated for every
#: job; the rest of another method's folder must not run. The backend string is parsed
#: (not used) for every job too.
OTHER_METHODS = ("qpa/methods/qpa/", "qpa/methods/compound/", "qpa/methods/vera/")
ALLOWED = ("qpa/backends/spec.py", "qpa/methods/qpa/options.py",
           "qpa/methods/compound/options.py", "qpa/methods/vera/options.py")


def test_a_lora_job_runs_no_quantum_or_other_method_code(redis_server: str,
                                                          tmp_path: Path) -> None:
    path = trace_job("lora", tmp_path / "home", f"{redis_server}/14")
    assert path["status"] == "succeeded"
    # The profiler saw both sides: the route on the API's, the method on the worker's.
    assert "api/routes/jobs.py" in path["api"] and "services/queue.py" in path["api"]
    assert "qpa/methods/lora/method.py" in path["worker"]
    foreign = [file for file in path["api"] + path["worker"]
               if file.startswith(QUANTUM + OTHER_METHODS) and file not in ALLOWED]
    assert foreign == [], path
