"""Where the experiment this driver process searches now is.

Tune pickles the searcher, its wrapper and the callbacks into the experiment's
state (tuner.pkl and its state files), and `--resume` runs the unpickled ones.
An experiment can be copied or moved (a folder `cp -a`'d, a bucket synced) and
resumed in its new place, so none of them keeps the experiment's location:
they ask here, and `SearchRun.run` says here where the experiment is for as long
as it runs. One driver process runs one search at a time (as the lease, which
refilled.tune.callbacks.LeaseGuard watches the same way).
"""

from __future__ import annotations

from refilled.store.storage import Place

_location: str | None = None


def set_location(location: str | None) -> None:
    """The experiment's location (Place.location: a folder or a URI) while its search runs; None after."""
    global _location
    _location = location


def location() -> str:
    if _location is None:
        raise RuntimeError("no search runs in this process: refilled.tune.current.set_location was not called")
    return _location


def place(sub: str = "") -> Place:
    """The experiment (or its part `sub`, a staged search's stage1_search) as this machine sees it:
    a folder, or a URI and this machine's mirror of it."""
    return Place.at(location(), sub)
