"""Finding (or installing) the Chromium that the browser test drives with Playwright.

Playwright's own browser download does not work on these machines (no internet beyond
the package registries), so the test uses a system Chromium: ``QPA_CHROMIUM`` if set, else
the first of ``chromium``, ``chromium-browser``, ``google-chrome`` on PATH, else Debian's
``chromium`` package installed with apt-get (as root). When none of that works the test
fails with a message that says what is missing; it never skips.

``python -m tests.service.browser`` does the same from a shell and prints the path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
APT_PACKAGE = "chromium"

# Flags this closed network needs: without the background-networking ones Chromium keeps
# dialling Google's hosts and gets refused. Playwright adds --headless and --no-sandbox.
LAUNCH_ARGS = [
    "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]


class ChromiumMissing(RuntimeError):
    """No Chromium is installed and none could be installed; the message says why."""


def find_chromium() -> str | None:
    configured = os.environ.get("QPA_CHROMIUM")
    if configured:
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            raise ChromiumMissing(f"QPA_CHROMIUM={configured!r} is not an executable file")
        return configured
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _apt_get(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", "-q", *args], capture_output=True, text=True, env=env,
                          timeout=900)


def install_chromium() -> str:
    """Install Debian's chromium package with apt-get; return the browser's path."""
    how = (f"install Debian's {APT_PACKAGE!r} package (apt-get install {APT_PACKAGE}) or set "
           "QPA_CHROMIUM to a Chromium or Chrome executable")
    if shutil.which("apt-get") is None:
        raise ChromiumMissing(f"no Chromium on PATH ({', '.join(CANDIDATES)}) and no apt-get "
                              f"to install one: {how}")
    if os.geteuid() != 0:
        raise ChromiumMissing(f"no Chromium on PATH ({', '.join(CANDIDATES)}), and installing "
                              f"it with apt-get needs root: {how}")
    print(f"browser test: installing Debian's {APT_PACKAGE} with apt-get ...", file=sys.stderr)
    result = _apt_get("install", "-y", "--no-install-recommends", APT_PACKAGE)
    if result.returncode != 0:
        # A fresh machine may have no package lists yet.
        update = _apt_get("update")
        if update.returncode != 0:
            raise ChromiumMissing(f"apt-get update failed ({update.stderr.strip()[-800:]}): "
                                  f"{how}")
        result = _apt_get("install", "-y", "--no-install-recommends", APT_PACKAGE)
    if result.returncode != 0:
        raise ChromiumMissing(f"apt-get install {APT_PACKAGE} failed "
                              f"({result.stderr.strip()[-800:]}): {how}")
    path = find_chromium()
    if path is None:
        raise ChromiumMissing(f"apt-get installed {APT_PACKAGE} but no {CANDIDATES[0]} is on "
                              f"PATH: {how}")
    return path


def chromium_path() -> str:
    """A Chromium executable: found, or installed now. Raises ChromiumMissing."""
    return find_chromium() or install_chromium()


if __name__ == "__main__":
    try:
        print(chromium_path())
    except ChromiumMissing as error:
        sys.exit(f"error: {error}")
