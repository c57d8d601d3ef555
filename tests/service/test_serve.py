"""`qpa serve` with an empty environment: its own Redis, SQLite and artifact folder under
QPA_HOME; the CLI client does a full round trip against it; Ctrl-C stops everything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from services.supervisor import REPO_ROOT, free_port

from .helpers import HANG_GUARD, wait_until

# The real console script (services.cli is mounted into it through the qpa.cli entry
# point); `python -m services.cli` runs the same commands where it is not installed.
_SCRIPT = Path(sys.executable).with_name("qpa")
CLI = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "services.cli"]


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def test_serve_round_trip_with_the_cli(tmp_path: Path, tiny_llama_dir: Path,
                                       data_files: tuple[Path, Path]) -> None:
    home = tmp_path / "qpa-home"
    env = {
        "PATH": os.environ["PATH"], "HOME": str(tmp_path), "QPA_HOME": str(home),
        # Offline and one thread per process: the test machine, not the service, needs these.
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
    }
    key = subprocess.run([*CLI, "keys", "create", "--name", "cli"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert key.startswith("qpa_")

    port = free_port()
    # A file, not a pipe: the worker and API inherit it, and a full pipe would block them.
    log_path = tmp_path / "serve.log"
    server = subprocess.Popen([*CLI, "serve", "--port", str(port)], env=env, cwd=tmp_path,
                              stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    client_env = {**env, "QPA_API_URL": url, "QPA_API_KEY": key}
    try:
        def healthy() -> bool:
            assert server.poll() is None, log_path.read_text()[-3000:]
            try:
                return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, HANG_GUARD, "qpa serve to come up", 0.3)
        assert (home / "qpa.db").is_file() and (home / "redis").is_dir()

        config = tmp_path / "job.yaml"
        config.write_text(yaml.safe_dump({
            "base_model": str(tiny_llama_dir), "method": "qpa", "backend": "statevector",
            "train_file": str(data_files[0]), "eval_file": str(data_files[1]), "steps": 3,
            "output_dir": "runs/ignored-by-the-service",
            "lora": {"r": 2}, "qpa": {"chunk_size": 64, "depth": 1, "mlp_hidden": [8]},
            "train": {"batch_size": 2, "max_length": 32, "eval_batches": 1,
                      "sample_prompt": None},
        }))
        submitted = subprocess.run([*CLI, "jobs", "submit", str(config), "--watch"],
                                   env=client_env, cwd=REPO_ROOT, capture_output=True,
                                   text=True, timeout=240)
        assert submitted.returncode == 0, submitted.stderr[-3000:]
        job_id = submitted.stdout.strip().splitlines()[0]
        assert "succeeded" in submitted.stderr

        got = subprocess.run([*CLI, "jobs", "get", job_id], env=client_env,
                             capture_output=True, text=True, check=True)
        job = json.loads(got.stdout)
        assert job["status"] == "succeeded" and job["progress"]["step"] == 3
        listed = subprocess.run([*CLI, "jobs", "list", "--json"], env=client_env,
                                capture_output=True, text=True, check=True)
        assert [item["id"] for item in json.loads(listed.stdout)["data"]] == [job_id]
        downloaded = subprocess.run([*CLI, "jobs", "download", job_id, "-o",
                                     str(tmp_path / "out")], env=client_env,
                                    capture_output=True, text=True, check=True)
        adapter = Path(downloaded.stdout.strip())
        assert (adapter / "adapter_config.json").is_file()
        assert (home / "artifacts" / "jobs" / job_id / "adapter").is_dir()
        missing = subprocess.run([*CLI, "jobs", "get", "job-missing"], env=client_env,
                                 capture_output=True, text=True)
        assert missing.returncode == 1 and "404" in missing.stderr
    finally:
        started = time.monotonic()
        os.kill(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            raise
        output = log_path.read_text()
    assert server.returncode == 0, output[-3000:]
    assert "QPA stopped" in output
    print(f"\nqpa serve stopped {time.monotonic() - started:.1f}s after SIGINT")
    # Nothing it started is left behind: not Redis, not the worker, not the API.
    assert _processes_mentioning(str(home)) == []
    assert _processes_mentioning(f"qpa-serve-{server.pid}@") == []
