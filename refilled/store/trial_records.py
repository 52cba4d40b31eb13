"""One small JSON record per trial: what the project knows about it, in its own words.

The search's driver writes `trial_<id>/trial_record.json` from Tune's callback
hooks (refilled.tune.callbacks.TrialRecords); the readers (experiments,
analysis, a resumed search) need no Ray. Fields:

    trial_id       Tune's trial id
    number         the order Tune created the trial in, from 1
    status         running, finished, stopped (by ASHA), diverged, errored
    reason         why it ended, in words
    step           the last step (epoch across both stages) it reported when the
                   record was written last (at its start, each checkpoint and
                   its end)
    total_steps    the steps it was to run
    stopped_at     the step ASHA stopped it at (a rung), or null
    checkpoint     its newest checkpoint folder
    retries        how often it was restarted after a crash
    node, node_id  where it ran last (IP address; Ray's node id)
    at_last_save   status and checkpoint at Tune's last saved experiment state:
                   where `--resume` continues it from (a trial that ended
                   after that save runs its last epochs again)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from refilled.files.atomic import write_atomic
from refilled.store.layout import RECORD_FILE

ENDED = ("finished", "stopped", "diverged", "errored")


def folder_name(trial_id: str) -> str:
    """The trial's folder in the experiment (Tune's trial_dirname_creator)."""
    return f"trial_{trial_id}"


def ending(last: dict[str, Any] | None) -> str:
    """How a trial that returned ended, from its last report: diverged, finished, or
    stopped (short of its steps: ASHA stopped it)."""
    last = last or {}
    if last.get("diverged"):
        return "diverged"
    if last.get("step", 0) >= last.get("total_steps", math.inf):
        return "finished"
    return "stopped"


def write(folder: str | Path, record: dict[str, Any]) -> None:
    """Replace the record atomically: a copy made meanwhile sees the old or the new one."""
    write_atomic(Path(folder) / RECORD_FILE, json.dumps(record, indent=1, sort_keys=True))


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _saved(value: Any) -> bool:
    return isinstance(value, dict) and _text(value.get("status")) and _text(value.get("checkpoint"))


# what each field holds (the driver writes null where it knows nothing yet); a record that says
# anything else was not written by it
FITS = {"trial_id": lambda v: isinstance(v, str), "number": _whole, "status": _text, "reason": _text,
        "step": lambda v: v is None or _whole(v), "total_steps": lambda v: v is None or _whole(v),
        "stopped_at": lambda v: v is None or _whole(v), "checkpoint": _text, "retries": _whole, "node": _text,
        "node_id": _text, "at_last_save": _saved}


def read(folder: str | Path) -> dict[str, Any]:
    """The trial's record; {} for a folder without one (or a damaged one: not JSON, not a
    mapping, or a field of another kind than the driver writes, FITS)."""
    try:
        record = json.loads((Path(folder) / RECORD_FILE).read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return {}
    if not isinstance(record, dict) or not all(fits(record[k]) for k, fits in FITS.items() if k in record):
        return {}
    return record


def saved_by_tune(folder: str | Path) -> bool:
    """Whether Ray Tune's saved state of the Tune experiment in `folder` holds a trial, as the trials'
    own records say (`at_last_save`): a resume that cannot restore that state would start them over."""
    return any("at_last_save" in read(params.parent) for params in Path(folder).glob("*/params.json"))
