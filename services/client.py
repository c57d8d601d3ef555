"""A small Python client for the QPA REST API (what ``qpa jobs ...`` uses).

    client = QPAClient()                       # QPA_API_URL, QPA_API_KEY
    job = client.submit("examples/quickstart.yaml")   # uploads local data files first
    for event in client.stream_events(job["id"]):     # server-sent events until it ends
        print(event["type"], event["data"])
    client.download_adapter(job["id"], "adapters/")
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

DEFAULT_API_URL = "http://127.0.0.1:8000"


class APIError(Exception):
    """The server answered with an error; ``detail`` is its explanation."""

    def __init__(self, status_code: int, detail: str):
        self.status_code = status_code
        self.detail = detail
        super().__init__(f"HTTP {status_code}: {detail}")


class QPAClient:
    def __init__(self, base_url: str | None = None, api_key: str | None = None,
                 timeout: float = 60.0):
        self.base_url = (base_url or os.environ.get("QPA_API_URL") or DEFAULT_API_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("QPA_API_KEY")
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> QPAClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise APIError(0, f"cannot reach {self.base_url} ({error}); is `qpa serve` "
                           "running and QPA_API_URL right?") from None
        if response.is_error:
            raise APIError(response.status_code, _detail(response))
        return response

    # -- resources ---------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz").json()

    def backends(self) -> dict[str, Any]:
        return self._request("GET", "/v1/backends").json()

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

        Reconnects from the last event id if the connection drops.
        """
        while True:
            try:
                with self._http.stream(
                    "GET", f"/v1/jobs/{job_id}/events",
                    params={"stream": "true", "after": after},
                    headers={"Accept": "text/event-stream"},
                    timeout=httpx.Timeout(10.0, read=None),
                ) as response:
                    if response.is_error:
                        response.read()
                        raise APIError(response.status_code, _detail(response))
                    for kind, data in _parse_sse(response.iter_lines()):
                        if kind == "end":
                            return
                        event = json.loads(data)
                        after = event["id"]
                        yield event
                return
            except httpx.TransportError:
                continue

    def download_adapter(self, job_id: str, directory: str | Path = ".") -> Path:
        """Download and unpack the adapter; returns the folder PEFT loads from."""
        target = Path(directory) / job_id
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as scratch:
            archive = Path(scratch) / "adapter.tar.gz"
            with self._http.stream("GET", f"/v1/jobs/{job_id}/adapter") as response:
                if response.is_error:
                    response.read()
                    raise APIError(response.status_code, _detail(response))
                with archive.open("wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
            with tarfile.open(archive) as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(target, filter="data")
                else:  # pragma: no cover - Python without PEP 706 filters
                    tar.extractall(target)  # noqa: S202
        return target / "adapter"


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text or response.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])
    return json.dumps(body)


def _parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    kind, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield kind, "\n".join(data)
            kind, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
