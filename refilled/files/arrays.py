"""Arrays on disk: a .npy file read whole or memory-mapped, a damaged one refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from refilled.errors import UserError


def read_array(path: str | Path, what: str, *, shown: str | None = None, mmap: bool = False,
               remedy: str = "delete it: the search computes it again") -> np.ndarray:
    """A .npy file (memory-mapped with `mmap`); a damaged one (cut short: its header
    promises more bytes than it holds) is a one-line UserError naming it."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{what} {shown or path} not found: {remedy}") from None
    except (ValueError, OSError, EOFError) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise UserError(f"{what} {shown or path} is damaged ({reason}): {remedy}") from None
