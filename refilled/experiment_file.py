"""experiment.yaml: the file that makes a folder an experiment, read and written here only.

It holds the resolved config (`config:`), the search settings (`search:`), and
what a search adds as it goes: a staged search's phase-1 choice
(`stage1_choice`), and `stage1_only: true` in phase 1's own experiment.yaml.
`search` writes it, `--resume`, `retrain` and the analysis scripts read it.
No Ray here: the readers need none.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from refilled import storage
from refilled.config import Config, load_experiment
from refilled.errors import UserError

EXPERIMENT_FILE = "experiment.yaml"
# what the user should check, by command: the search names experiments by --name/--storage
SEARCH_HINT = "check --name/--storage"
READ_HINT = "pass the folder (or URI) `search` made, e.g. experiments/digits"


def exists(folder: str | Path) -> bool:
    return (Path(folder) / EXPERIMENT_FILE).is_file()


def _missing(location: str | Path, hint: str) -> UserError:
    return UserError(f"{location} is not a tune-refilled experiment (no {EXPERIMENT_FILE}): {hint}")


def read(folder: str | Path, location: str | None = None, hint: str = READ_HINT) -> tuple[Config, dict[str, Any]]:
    """The experiment's config and the whole file; `location` names it in the error
    (the URI of an experiment read from its local mirror)."""
    folder = Path(folder)
    if not exists(folder):
        raise _missing(location or folder, hint)
    return load_experiment(folder / EXPERIMENT_FILE)


def check(place: storage.Place, hint: str = SEARCH_HINT) -> None:
    """Refuse, in one line, what is not an experiment (a URI is asked, not mirrored)."""
    if place.uri:
        if not storage.exists(storage.join(place.uri, EXPERIMENT_FILE)):
            raise _missing(place.uri, hint)
    else:
        read(place.folder, hint=hint)


def write(folder: Path, cfg: Config, search: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write (or replace, atomically) the experiment file of `folder`."""
    data = {"config": cfg.to_dict(), "search": search, **(extra or {})}
    tmp = folder / f".{EXPERIMENT_FILE}.tmp"
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, folder / EXPERIMENT_FILE)
    return folder / EXPERIMENT_FILE
