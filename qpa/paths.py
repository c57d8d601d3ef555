"""Where QPA keeps state on disk when nothing else is configured (``QPA_HOME``)."""

from __future__ import annotations

import os
from pathlib import Path


def qpa_home() -> Path:
    """``$QPA_HOME`` or ``~/.qpa``; created on first use."""
    home = Path(os.environ.get("QPA_HOME") or Path.home() / ".qpa").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home
