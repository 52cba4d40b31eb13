"""Checkpoints: written atomically, read with `weights_only=True`.

A checkpoint is a dict of tensors and plain Python values. It records the
config (and the network architecture) that made it, so a teacher can be
checked against the run that wants to use it.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable

from refilled.errors import UserError

# torch is imported where a checkpoint is written or read: the readers of an experiment
# (analysis/, trials.csv) import this module and need not pay torch's start-up (seconds)


def save(obj: dict[str, Any], path: str | Path) -> Path:
    """Write to a temp file in the same folder, then rename: never a half file."""
    from refilled.files.atomic import write_atomic

    return write_atomic(path, writer(obj))


def writer(obj: dict[str, Any]) -> Callable[[BinaryIO], None]:
    """What writes `obj` into an open file: for an atomic write elsewhere (a place that keeps it at a URI too)."""
    import torch

    return lambda f: torch.save(obj, f)


def load(path: str | Path, what: str = "checkpoint", *, shown: str | None = None,
         remedy: str = "recreate it") -> dict[str, Any]:
    """Load with weights_only=True; anything that is not such a file is a UserError.
    `shown`: the name the user knows the file by (its URI, for a downloaded copy);
    `remedy`: what to do about a damaged one."""
    path = Path(path)
    shown = shown or str(path)
    if not path.is_file():
        raise UserError(f"{what} {shown} not found: check the path (or run `tune_refilled.py pretrain` to make a teacher)")
    import torch

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing: the error says it
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{what} {shown} is not a plain weights file and was refused ({_refusal(e)}): "
                        "load only checkpoints that tune_refilled.py wrote") from None
    except Exception as e:  # damaged bytes surface as many types (KeyError, IndexError, RuntimeError, ...)
        raise UserError(f"{what} {shown} is corrupt or not a PyTorch file ({type(e).__name__}): {remedy}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} {shown} holds a {type(obj).__name__}, not a tune-refilled checkpoint")
    return obj


def _refusal(error: Exception) -> str:
    """The reason in torch's weights_only refusal ("Unsupported global: GLOBAL os.system ...",
    "Unsupported operand 149"), without the paragraphs of advice around it."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    found = re.search(r"WeightsUnpickler error:(.*?)(?:Please use|Check the documentation|$)", text, re.S)
    if found and found.group(1).strip():
        reason = found.group(1)
    else:  # other versions: the reason is the one paragraph that is not advice
        advice = ("Weights only load failed", "Please file an issue", "Check the documentation")
        reason = " ".join(p for p in re.split(r"\n\s*\n", text) if p.strip() and not p.strip().startswith(advice))
    return " ".join(reason.split())[:160] or "unsupported content"
