"""Checkpoints: written atomically, read with `weights_only=True`.

A checkpoint is a dict of tensors and plain Python values. It records the
config (and the network architecture) that made it, so a teacher can be
checked against the run that wants to use it.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from refilled.errors import UserError


def save(obj: dict[str, Any], path: str | Path) -> Path:
    """Write to a temp file in the same folder, then rename: never a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """Load with weights_only=True; anything that is not such a file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found: check the path (or run `tune_refilled.py pretrain` to make a teacher)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported content"
        raise UserError(f"{what} {path} is not a plain weights file and was refused ({first[:120]})") from None
    except Exception as e:  # damaged bytes surface as many types (KeyError, IndexError, RuntimeError, ...)
        raise UserError(f"{what} {path} is corrupt or not a PyTorch file ({type(e).__name__}): "
                        "recreate it") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} holds a {type(obj).__name__}, not a tune-refilled checkpoint")
    return obj
