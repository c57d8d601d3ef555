"""The web dashboard: one HTML page and its static assets at ``/ui/``, no key needed.

The page holds no data. Its JavaScript signs in with an API key (kept in the tab's
sessionStorage) and calls the same public REST API as every other client, so a key sees
exactly what it sees over REST. The assets live in ``api/ui/`` and ship with the package;
nothing is built and nothing is fetched from elsewhere at run time.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().parent.parent / "ui"

# Scripts and styles from this origin only, no inline code: text from jobs (error
# messages, configs, model cards) can never run as script even if a bug rendered it as HTML.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/ui")
def ui_redirect() -> RedirectResponse:
    # Relative, so that the page also works behind a proxy that adds a path prefix.
    return RedirectResponse("ui/", status_code=307)


@router.get("/ui/")
def ui_page() -> FileResponse:
    return FileResponse(UI_DIR / "index.html", media_type="text/html",
                        headers=SECURITY_HEADERS)


def static_files() -> StaticFiles:
    """The page's scripts, styles and vendored libraries, mounted at /ui/static."""
    return StaticFiles(directory=UI_DIR, check_dir=True)
