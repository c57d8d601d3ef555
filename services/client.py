"""A small Python client for the QPA REST API (what ``qpa jobs ...`` uses).

    client = QPAClient()                       # QPA_API_URL, QPA_API_KEY
    job = client.submit("examples/quickstart.yaml")   # uploads local data files first
    for event in client.stream_events(job["id"]):     # server-sent events until it ends
        print(event["type"], event["data"])
    client.download_adapter(job["id"], "adapters/")
    client.download(job["id"], "models/", "merged")   # or "gguf": adapter.gguf

Connection failures are retried with exponential backoff (tenacity), a bounded number of
times, then reported as ``APIError`` with status 0; a dropped event stream reconnects from
the last event it delivered (``after``), and the count starts again after each event.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml
from httpx_sse import ServerSentEvent, connect_sse
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

DEFAULT_API_URL = "http://127.0.0.1:8000"
# Requests whose repetition is harmless; any other request is retried only when the
# connection could not be made (so it was not sent).
IDEMPOTENT = frozenset({"GET", "HEAD", "DELETE"})
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout)


class APIError(Exception):
    """The server answered with an error (or, status 0, could not be reached);
    ``detail`` is its explanation."""

    def __init__(self, status_code: int, detail: str):
        self.status_code = status_code
        self.detail = detail
        super().__init__(f"HTTP {status_code}: {detail}" if status_code else detail)


class QPAClient:
    """``retries`` reconnection attempts after a failed connection, waiting ``backoff``
    seconds before the first and doubling up to ``max_backoff``; ``on_retry`` hears one
    sentence per wait (the CLI prints it)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None,
                 timeout: float = 60.0, *, retries: int = 5, backoff: float = 0.5,
                 max_backoff: float = 8.0, on_retry: Callable[[str], None] | None = None):
        self.base_url = (base_url or os.environ.get("QPA_API_URL") or DEFAULT_API_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("QPA_API_KEY")
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.on_retry = on_retry
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> QPAClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------

    def _retrying(self, what: str, retry_on: tuple[type[Exception], ...]) -> Retrying:
        def announce(state: RetryCallState) -> None:
            if self.on_retry is not None and state.outcome is not None:
                wait = state.next_action.sleep if state.next_action else 0.0
                self.on_retry(f"{what}: {state.outcome.exception()}; retrying in {wait:.3g}s "
                              f"(attempt {state.attempt_number + 1} of {self.retries + 1})")

        return Retrying(stop=stop_after_attempt(self.retries + 1),
                        wait=wait_exponential(multiplier=self.backoff, max=self.max_backoff),
                        retry=retry_if_exception_type(retry_on), before_sleep=announce,
                        reraise=True)

    def _unreachable(self, error: Exception) -> APIError:
        return APIError(0, f"cannot reach {self.base_url} ({error}) after {self.retries + 1} "
                        "attempts; is `qpa serve` running and QPA_API_URL right?")

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        retry_on = (httpx.TransportError,) if method in IDEMPOTENT else NOT_SENT
        try:
            response = self._retrying(f"{method} {path}", retry_on)(
                self._http.request, method, path, **kwargs)
        except httpx.TransportError as error:
            raise self._unreachable(error) from None
        if response.is_error:
            raise APIError(response.status_code, _detail(response))
        return response

    # -- resources ---------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz").json()

    def backends(self) -> dict[str, Any]:
        return self._request("GET", "/v1/backends").json()

    def key(self) -> dict[str, Any]:
        """The record of the key this client uses (name, prefix, expiry)."""
        return self._request("GET", "/v1/keys").json()

    def revoke_key(self) -> dict[str, Any]:
        """Revoke the key this client uses; it gets 401 from now on."""
        return self._request("DELETE", "/v1/keys").json()

    def upload_file(self, path: str | Path) -> dict[str, Any]:
        path = Path(path)
        with path.open("rb") as handle:
            return self._request("POST", "/v1/files",
                                 files={"file": (path.name, handle, "application/jsonl")}).json()

    def create_job(self, config: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", "/v1/jobs", json=config).json()

    def submit(self, config: str | Path | dict[str, Any]) -> dict[str, Any]:
        """Create a job from a config file (or dict). ``train_file``/``eval_file`` that
        name local files are uploaded first; values that are file ids are kept."""
        if isinstance(config, dict):
            data = dict(config)
        else:
            data = yaml.safe_load(Path(config).read_text())
            if not isinstance(data, dict):
                raise ValueError(f"{config} is not a YAML mapping of config keys")
        data.pop("output_dir", None)  # CLI only; the server picks the job's folder
        for field in ("train_file", "eval_file"):
            value = data.get(field)
            if not value:
                continue
            if Path(value).is_file():
                data[field] = self.upload_file(value)["id"]
            elif not str(value).startswith("file-"):
                raise ValueError(f"{field}: {value!r} is neither a local file nor a file id")
        return self.create_job(data)

    def list_jobs(self, limit: int = 20, after: str | None = None,
                  status: str | None = None) -> dict[str, Any]:
        params = {key: value for key, value in
                  {"limit": limit, "after": after, "status": status}.items() if value}
        return self._request("GET", "/v1/jobs", params=params).json()

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def events(self, job_id: str, after: int = 0, limit: int = 100) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}/events",
                             params={"after": after, "limit": limit}).json()

    def stream_events(self, job_id: str, after: int = 0) -> Iterator[dict[str, Any]]:
        """Events as they happen (server-sent events), ending when the job ends.

        A dropped connection is reopened from the last event delivered, with backoff;
        after ``retries`` failed attempts in a row this raises ``APIError`` (status 0).
        """
        stream = _EventStream(self._http, job_id, after)
        try:
            while True:
                retrying = self._retrying(f"event stream of {job_id}", (httpx.TransportError,))
                try:
                    event = retrying(stream.next_event)
                except httpx.TransportError as error:
                    raise APIError(0, f"lost the event stream of {job_id} and could not get "
                                   f"it back in {self.retries + 1} attempts ({error}); the "
                                   f"job goes on on the server: `qpa jobs watch {job_id}` "
                                   "follows it again") from None
                if event is None:
                    return
                yield event
        finally:
            stream.close()

    def download_adapter(self, job_id: str, directory: str | Path = ".") -> Path:
        """Download and unpack the PEFT adapter; returns the folder PEFT loads from."""
        return self.download(job_id, directory, "peft")

    def download(self, job_id: str, directory: str | Path = ".",
                 export_format: str = "peft") -> Path:
        """Download a succeeded job's export into ``directory/<job id>/``; returns what to
        load: the ``adapter`` folder (peft), the ``merged`` folder, or ``adapter.gguf``."""
        target = Path(directory) / job_id
        with tempfile.TemporaryDirectory() as scratch:
            downloaded = Path(scratch) / ("adapter.gguf" if export_format == "gguf"
                                          else "download.tar")
            try:
                self._retrying(f"download of {job_id}'s {export_format} export",
                               (httpx.TransportError,))(
                    self._download, f"/v1/jobs/{job_id}/adapter", {"format": export_format},
                    downloaded)
            except httpx.TransportError as error:
                raise self._unreachable(error) from None
            # Only a downloaded export makes a folder (an error leaves nothing behind).
            target.mkdir(parents=True, exist_ok=True)
            if export_format == "gguf":
                path = target / "adapter.gguf"
                partial = path.with_name(path.name + ".part")
                try:  # scratch may be on another filesystem: never a half-copied file
                    shutil.move(downloaded, partial)
                    partial.replace(path)
                finally:
                    partial.unlink(missing_ok=True)
                return path
            with tarfile.open(downloaded) as tar:  # gzip (peft) or plain (merged), detected
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(target, filter="data")
                else:  # pragma: no cover - Python without PEP 706 filters
                    tar.extractall(target)  # noqa: S202
        return target / ("adapter" if export_format == "peft" else export_format)

    def loss_plot(self, job_id: str) -> bytes:
        """The job's loss curve as PNG bytes (404 until its first checkpoint)."""
        return self._request("GET", f"/v1/jobs/{job_id}/plot").content

    def _download(self, path: str, params: dict[str, str], destination: Path) -> None:
        with self._http.stream("GET", path, params=params) as response:
            if response.is_error:
                response.read()
                raise APIError(response.status_code, _detail(response))
            with destination.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)


class _EventStream:
    """One job's SSE connection, reopened from the last event id after a failure."""

    def __init__(self, http: httpx.Client, job_id: str, after: int):
        self.http = http
        self.job_id = job_id
        self.after = after
        self._open: contextlib.ExitStack | None = None
        self._events: Iterator[ServerSentEvent] | None = None

    def next_event(self) -> dict[str, Any] | None:
        """The next event, or None once the job ended. A transport error closes the
        connection (the next call opens a new one) and propagates."""
        try:
            if self._events is None:
                self._connect()
            assert self._events is not None
            for sse in self._events:
                if sse.event == "end":
                    return None
                if not sse.data:
                    continue
                event = sse.json()
                self.after = event["id"]
                return event
            raise httpx.RemoteProtocolError("the server closed the event stream before "
                                            "the job ended")
        except httpx.TransportError:
            self.close()
            raise

    def _connect(self) -> None:
        stack = contextlib.ExitStack()
        try:
            source = stack.enter_context(connect_sse(
                self.http, "GET", f"/v1/jobs/{self.job_id}/events",
                params={"stream": "true", "after": self.after},
                timeout=httpx.Timeout(10.0, read=None)))
            if source.response.is_error:
                source.response.read()
                raise APIError(source.response.status_code, _detail(source.response))
        except BaseException:
            stack.close()
            raise
        self._open, self._events = stack, source.iter_sse()

    def close(self) -> None:
        if self._open is not None:
            self._open.close()
        self._open = self._events = None


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text or response.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])
    return json.dumps(body)
