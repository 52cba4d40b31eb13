"""The report's figures drawn but not rendered: for tests of what a report says and refuses,
not of its pixels (layout and PNG encoding are most of a report's time)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator
from unittest import mock


def fake_png(self, path, *args, **kwargs) -> None:
    Path(path).write_bytes(b"\x89PNG drawn, not rendered")


@contextlib.contextmanager
def unrendered() -> Iterator[None]:
    """Inside it, matplotlib's figures are drawn (every plot call runs) and written as a stand-in PNG."""
    import matplotlib.figure

    with mock.patch.object(matplotlib.figure.Figure, "savefig", fake_png), \
            mock.patch.object(matplotlib.figure.Figure, "tight_layout", lambda self, *a, **k: None):
        yield
