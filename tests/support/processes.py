"""Scripts of this repository run as a user runs them: a fresh Python process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support.configs import REPO


def run_python(*args: str, cwd: Path = REPO, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a script of this repo as a user would: a fresh Python process."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def tiny_search(base: Path, name: str, config: Path, extra: tuple[str, ...] = ()) -> Path:
    """A real search through the CLI into <base>/analysis_tiny_storage/<name>, made once
    per session and reused by every test module that asks for the same name."""
    storage = base / "analysis_tiny_storage"
    folder = storage / name
    if (folder / "trials.csv").is_file():
        return folder
    storage.mkdir(parents=True, exist_ok=True)
    result = run_python(str(REPO / "tune_refilled.py"), "search", "--config", str(config), "--storage", str(storage),
                        "--name", name, *extra, cwd=storage)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return folder
