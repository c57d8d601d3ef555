"""No job is lost when a worker dies: SIGKILL the worker running a job (main process and
pool process, so nothing gets to ack, checkpoint or clean up); the other worker notices
the dead lease, the job is requeued and resumed from its last checkpoint, the step
counter never goes back past that checkpoint, and the job succeeds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from .helpers import ServiceStack, job_config, wait_for, wait_for_status


def _parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.fixture(scope="module")
def two_workers(redis_server: str, tmp_path_factory: pytest.TempPathFactory):
    service = ServiceStack(tmp_path_factory.mktemp("redelivery"), redis_server, 1)
    try:
        service.start_worker("worker-a", wait=False)
        service.start_worker("worker-b", wait=False)
        service.start_api()
        for name in ("worker-a", "worker-b"):
            wait_for(lambda name=name: " ready." in service.log(name), 60, f"{name} ready")
        yield service
    finally:
        service.stop()


def test_sigkilled_worker_job_resumes_on_another(two_workers: ServiceStack,
                                                 data_files: tuple[Path, Path],
                                                 tiny_llama_dir: Path) -> None:
    service = two_workers
    with service.client(service.new_key()) as client:
        train_id = client.upload_file(data_files[0])["id"]
        job = client.create_job(job_config(tiny_llama_dir, train_id, steps=40,
                                           checkpoint_every=4))
        job_id = job["id"]

        wait_for(lambda: (client.get_job(job_id)["progress"]["checkpoint_step"] or 0) >= 4,
                 120, "the first checkpoint")
        from services import store

        db = store.Store(service.database_url)
        with db.session() as session:
            holder_pid = store.get_job(session, job_id).lease_pid
        victim = next(name for name, process in service.workers.items()
                      if process.pid == _parent_pid(holder_pid))
        service.kill_worker(victim)
        killed_at = time.monotonic()
        with db.session() as session:
            frozen = store.get_job(session, job_id)
            checkpoint, step_at_kill = frozen.checkpoint_step, frozen.step
        assert frozen.status == "running" and step_at_kill < 40

        # Watch progress through the takeover: never behind the checkpoint.
        seen_steps = []
        resumed_at = None
        while True:
            current = client.get_job(job_id)
            seen_steps.append(current["progress"]["step"])
            if resumed_at is None and current["attempts"] == 2 and current["status"] == "running":
                resumed_at = time.monotonic()
            if current["status"] in ("succeeded", "failed", "cancelled"):
                break
            assert time.monotonic() - killed_at < 180, "job was not finished by the survivor"
            time.sleep(0.1)

        done = wait_for_status(client, job_id)
        assert done["status"] == "succeeded", done["error"]
        assert done["attempts"] == 2
        assert min(seen_steps) >= checkpoint, (checkpoint, seen_steps[:20])
        assert resumed_at is not None
        redeliver_seconds = resumed_at - killed_at
        print(f"\nredelivered {redeliver_seconds:.1f}s after SIGKILL "
              f"(checkpoint {checkpoint}, killed at step {step_at_kill})")
        assert redeliver_seconds < 15

        events = client.events(job_id, limit=1000)["data"]
        second = [event["data"]["step"] for event in events
                  if event["type"] == "step" and event["attempt"] == 2]
        assert second[0] == checkpoint + 1 and second[-1] == 40
        assert second == sorted(second)
        messages = " | ".join(str(event["data"].get("message")) for event in events)
        assert "requeued, resumes from the checkpoint" in messages
        assert f"resumed from checkpoint at step {checkpoint}" in messages
        db.dispose()


def test_sigterm_hands_the_running_job_back(two_workers: ServiceStack,
                                            data_files: tuple[Path, Path],
                                            tiny_llama_dir: Path) -> None:
    """A warm shutdown (SIGTERM to the worker's main process, as `docker stop` sends)
    does not wait hours for the job: it checkpoints, requeues, and another worker resumes."""
    import os
    import signal

    from services import store

    service = two_workers
    service.start_worker("worker-c")
    with service.client(service.new_key()) as client:
        train_id = client.upload_file(data_files[0])["id"]
        job_id = client.create_job(job_config(tiny_llama_dir, train_id, steps=60,
                                              checkpoint_every=50))["id"]
        wait_for(lambda: client.get_job(job_id)["progress"]["step"] >= 2, 120, "training")
        db = store.Store(service.database_url)
        with db.session() as session:
            holder_pid = store.get_job(session, job_id).lease_pid
        db.dispose()
        name = next(name for name, process in service.workers.items()
                    if process.pid == _parent_pid(holder_pid))
        process = service.workers.pop(name)
        stopped_at = time.monotonic()
        os.kill(process.pid, signal.SIGTERM)
        process.wait(60)
        exit_seconds = time.monotonic() - stopped_at
        assert exit_seconds < 30, f"worker took {exit_seconds:.0f}s to stop"

        done = wait_for_status(client, job_id, timeout=180)
        assert done["status"] == "succeeded", done["error"]
        assert done["attempts"] == 2
        events = client.events(job_id, limit=1000)["data"]
        handed_back = [event for event in events if "shutting down" in
                       str(event["data"].get("message"))]
        assert handed_back, [event["data"] for event in events if event["type"] == "status"]
        # The shutdown checkpoint (not the every-50 one) is where attempt 2 starts.
        resumed = [event["data"]["step"] for event in events
                   if event["type"] == "step" and event["attempt"] == 2]
        assert resumed[0] > 2
        print(f"\nworker stopped {exit_seconds:.1f}s after SIGTERM; job resumed at "
              f"step {resumed[0]}")
