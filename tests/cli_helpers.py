"""Running the real `trainctl` command from tests: in a subprocess, with this checkout on
PYTHONPATH and W&B quiet (its mode comes from the job file, not from the caller's shell)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher.cli", *args]


def env(**extra: str) -> dict[str, str]:
    out = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_SILENT": "true", **extra}
    out.pop("WANDB_MODE", None)
    return out


def trainctl(*args: str, cwd, timeout: float = 420, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), cwd=cwd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)
