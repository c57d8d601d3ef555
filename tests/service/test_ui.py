"""The web dashboard in a real headless Chromium against the real stack (uvicorn API,
Celery worker, Redis): sign in with a key, submit a tiny job through the form, watch it
succeed with a loss chart that has points, download the adapter; a second key sees none
of it.

Every wait is on a state of the page (Playwright's expect polls the DOM), never a sleep.

``QPA_UI_SCREENSHOTS=docs/img pytest tests/service/test_ui.py`` writes the screenshots of
the README there, from a longer run (40 steps) and with a few more jobs in the list.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from playwright.sync_api import Browser, Page, expect, sync_playwright

from .browser import LAUNCH_ARGS, ChromiumMissing, chromium_path
from .helpers import ServiceStack, job_config, wait_for_status

SCREENSHOTS = os.environ.get("QPA_UI_SCREENSHOTS")
STEPS, EVAL_EVERY = (40, 5) if SCREENSHOTS else (6, 2)
JOB_TIMEOUT_MS = 180_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    try:
        executable = chromium_path()
    except ChromiumMissing as error:
        pytest.fail(f"the dashboard's browser test needs Chromium: {error}", pytrace=False)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=LAUNCH_ARGS)
        # Each expectation polls the page until it holds; the first call of a cold API
        # process (e.g. /v1/backends importing qiskit) can take seconds on 2 busy cores.
        expect.set_options(timeout=30_000)
        try:
            yield chromium
        finally:
            chromium.close()


class PageErrors:
    """Uncaught script errors and console errors other than failed requests (a 401 or
    404 answered on purpose): a CSP violation or a broken module shows up here."""

    def __init__(self, page: Page):
        self.errors: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        page.on("console", self._console)

    def _console(self, message) -> None:
        if message.type == "error" and "Failed to load resource" not in message.text:
            self.errors.append(f"console: {message.text}")


def screenshot(page: Page, path: Path, down_to: str) -> None:
    """The page from the top down to the bottom of the element ``down_to``."""
    box = page.locator(down_to).bounding_box()  # relative to the scrolled viewport
    assert box is not None, f"{down_to} is not on the page"
    bottom = page.evaluate("window.scrollY") + box["y"] + box["height"] + 24
    page.screenshot(path=str(path), full_page=True,
                    clip={"x": 0, "y": 0, "width": page.viewport_size["width"], "height": bottom})


def sign_in(page: Page, url: str, key: str) -> None:
    page.goto(f"{url}/ui")
    page.fill("#api-key", key)
    page.click("#sign-in button[type=submit]")
    expect(page.locator("#status-filter")).to_be_visible()


def more_jobs_for_the_list(stack: ServiceStack, key: str, model_dir: Path,
                           data: tuple[Path, Path]) -> None:
    """Screenshot mode only: a LoRA job, a job on a fake IBM device and a failed one."""
    with stack.client(key) as client:
        train_id = client.upload_file(data[0])["id"]
        jobs = [client.create_job(job_config(model_dir, train_id, method="lora", steps=20)),
                client.create_job(job_config(model_dir, train_id, steps=3,
                                             backend="ibm-fake:FakeManilaV2")),
                client.create_job(job_config(model_dir / "missing", train_id))]
        for job in jobs:
            wait_for_status(client, job["id"], timeout=300)


def test_dashboard_round_trip(stack: ServiceStack, browser: Browser, tiny_llama_dir: Path,
                              memorise_files: tuple[Path, Path], tmp_path: Path) -> None:
    shots = Path(SCREENSHOTS or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    alice, bob = stack.new_key("ui-alice"), stack.new_key("ui-bob")
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors = PageErrors(page)

    # A wrong key is refused with the API's own message; the right one signs in.
    page.goto(f"{stack.url}/ui")
    expect(page).to_have_url(f"{stack.url}/ui/")
    page.fill("#api-key", "not-a-key")
    page.click("#sign-in button[type=submit]")
    expect(page.get_by_role("alert")).to_contain_text("invalid API key")
    sign_in(page, stack.url, alice)
    expect(page.locator("#jobs-empty")).to_contain_text("No jobs yet")
    assert page.evaluate("localStorage.length") == 0  # the key is in sessionStorage only

    # Submit a tiny job through the form: two uploads, the fields, nested options as YAML.
    page.click("a.button.primary:has-text('New job')")
    expect(page.locator("#backend option[value=statevector]")).to_have_count(1)
    # Eight records evaluated on themselves: the tiny random model visibly learns them.
    train_file, eval_file = memorise_files
    page.set_input_files("#train-file", str(train_file))
    page.set_input_files("#eval-file", str(eval_file))
    page.fill("#base-model", str(tiny_llama_dir))
    page.fill("#method", "qpa")
    page.select_option("#backend", "statevector")
    page.fill("#steps", str(STEPS))
    nested = {key: value for key, value in job_config(tiny_llama_dir, "unused").items()
              if isinstance(value, dict)}
    nested["train"].update(lr=0.01, eval_every=EVAL_EVERY, checkpoint_every=3)
    page.fill("#options-yaml", yaml.safe_dump(nested))
    page.click("#new-job button[type=submit]")

    # The job page follows it live to the end.
    expect(page).to_have_url(re.compile(r"#/jobs/job-"), timeout=30_000)
    job_id = page.url.rsplit("/", 1)[-1]
    expect(page.locator("#job-status .badge")).to_have_text("succeeded", timeout=JOB_TIMEOUT_MS)
    chart = page.locator("#loss-chart svg")
    expect(chart).to_have_attribute("data-train-points", str(STEPS))
    expect(chart.locator("circle.train-point")).to_have_count(STEPS)
    expect(chart.locator("circle.eval-point")).to_have_count(STEPS // EVAL_EVERY + 1)  # 0, 2, 4, 6
    expect(page.locator("#job-summary")).to_contain_text(f"{STEPS} / {STEPS}")
    circuits = page.locator("#quantum-usage [data-field=circuits]").inner_text()
    assert int(circuits.replace(",", "")) > 0
    expect(page.locator("#job-config")).to_contain_text("backend: statevector")
    page.click("#model-card summary")
    expect(page.locator("#model-card pre")).to_contain_text("QPA adapter for")
    screenshot(page, shots / "dashboard-job.png", "#job-chart")

    # The download button hands over the same adapter archive as the REST API.
    with page.expect_download() as download_info:
        page.click("button.download[data-format=peft]")
    archive = tmp_path / "from-ui.tar.gz"
    download_info.value.save_as(archive)
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= names
    with stack.client(alice) as client:
        assert client.get_job(job_id)["status"] == "succeeded"  # the UI showed the truth

    # The jobs table lists it, and the status filter narrows the list.
    if SCREENSHOTS:
        more_jobs_for_the_list(stack, alice, tiny_llama_dir, memorise_files)
    page.click("nav a:has-text('Jobs')")
    row = page.locator(f"#jobs-table tr[data-job-id='{job_id}']")
    expect(row.locator(".badge")).to_have_text("succeeded")
    expect(row).to_contain_text(f"{STEPS} / {STEPS}")
    screenshot(page, shots / "dashboard-jobs.png", "#jobs-table")
    page.select_option("#status-filter", "cancelled")
    expect(page.locator("#jobs-empty")).to_contain_text("No cancelled jobs")

    # Another key sees none of it: not in its list, not by the job's address.
    page.click("#sign-out")
    sign_in(page, stack.url, bob)
    expect(page.locator("#jobs-empty")).to_contain_text("No jobs yet")
    expect(page.locator("#jobs-table tbody tr")).to_have_count(0)
    page.goto(f"{stack.url}/ui/#/jobs/{job_id}")
    expect(page.locator("#job-missing")).to_contain_text("no job")
    with stack.client(bob) as client:
        assert client.list_jobs()["data"] == []

    context.close()
    assert not errors.errors, errors.errors


def test_dashboard_page_is_public_and_locked_down(stack: ServiceStack) -> None:
    """The page and its assets need no key (they hold no data), come with a strict CSP,
    and stay out of the OpenAPI schema, which lists only the REST API."""
    import httpx

    with httpx.Client(base_url=stack.url) as http:
        redirect = http.get("/ui")
        assert redirect.status_code == 307 and redirect.headers["location"] == "ui/"
        page = http.get("/ui/")
        assert page.status_code == 200 and 'src="static/app.js"' in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        for asset in ("app.js", "api.js", "chart.js", "tar.js", "style.css",
                      "vendor/js-yaml.min.js"):
            response = http.get(f"/ui/static/{asset}")
            assert response.status_code == 200, asset
            kinds = ("text/css",) if asset.endswith(".css") else (
                "text/javascript", "application/javascript")  # by the platform's mime map
            assert response.headers["content-type"].startswith(kinds), asset
        assert http.get("/v1/jobs").status_code == 401  # the data still needs a key
        paths = http.get("/openapi.json").json()["paths"]
        assert not [path for path in paths if path.startswith("/ui")]


def test_dashboard_knows_the_servers_job_statuses() -> None:
    # The dashboard's status filter and its "finished" test are written in JavaScript; they
    # must name exactly the statuses services.status defines.
    from services.status import TERMINAL_STATUSES, JobStatus

    source = (Path(__file__).resolve().parents[2] / "api" / "ui" / "app.js").read_text()
    statuses = re.search(r"const STATUSES = \[([^\]]*)\]", source)
    terminal = re.search(r"const TERMINAL = new Set\(\[([^\]]*)\]\)", source)
    assert statuses and terminal
    assert re.findall(r'"(\w+)"', statuses.group(1)) == [status.value for status in JobStatus]
    assert set(re.findall(r'"(\w+)"', terminal.group(1))) == {s.value for s in TERMINAL_STATUSES}
