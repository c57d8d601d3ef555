"""Where QPA keeps things on disk: ``QPA_HOME`` when nothing else is configured, and the
names in a job folder that other processes (the service's artifact store) look for."""

from __future__ import annotations

import os
from pathlib import Path

#: The training checkpoint inside a job's ``state/`` folder.
CHECKPOINT = "checkpoint.pt"


def qpa_home() -> Path:
    """``$QPA_HOME`` or ``~/.qpa``; created on first use."""
    home = Path(os.environ.get("QPA_HOME") or Path.home() / ".qpa").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home
