"""experiment.yaml: the file that makes a folder an experiment, read and written here only.

It holds the resolved config (`config:`), the search settings (`search:`), and
what a search adds as it goes: a staged search's phase-1 choice
(`stage1_choice`), `stage1_only: true` in phase 1's own experiment.yaml, and
`trial_kind` where its trials were not REFILLED's: its sections are
refilled.schema.config.ExperimentFile's. `search` writes it, `--resume`, `retrain`
and the analysis scripts read it. No Ray here: the readers need none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from refilled.errors import UserError
from refilled.schema.config import Config, ExperimentFile, load_experiment
from refilled.store import storage
from refilled.store.layout import EXPERIMENT_FILE

# The first and last lines of the file as `write` makes it: a file that starts with HEADER
# and does not end with END was cut short (a full disk, a copy interrupted), even where
# what is left still parses as YAML (a search: section cut after `space:` would otherwise
# resume with default settings).
HEADER = "# tune-refilled experiment file, written by `search`: it ends with the line below"
END = "# end of experiment.yaml"
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
    check_whole(folder / EXPERIMENT_FILE, f"{location}/{EXPERIMENT_FILE}" if location else None)
    return load_experiment(folder / EXPERIMENT_FILE)


def check_whole(path: Path, shown: str | None = None) -> None:
    """Refuse an experiment file that was cut short. Files written before the end line
    existed (no HEADER) must at least hold both sections that `write` always writes."""
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise UserError(f"{shown or path} cannot be read ({e.strerror}): check its permissions") from None
    lines = text.rstrip("\n").splitlines()
    if lines and lines[0] == HEADER:
        whole = lines[-1] == END
    else:
        whole = all(any(line.startswith(f"{section}:") for line in lines) for section in ("config", "search"))
    if not whole:
        raise UserError(f"{shown or path} is cut short (a full disk, or an interrupted copy): restore it from a "
                        f"backup; its config is also in the experiment's best_config.yaml and trial_*/params.json")


def check(place: storage.Place, hint: str = SEARCH_HINT) -> None:
    """Refuse, in one line, what is not an experiment (a URI is asked, not mirrored)."""
    if place.uri:
        if not storage.exists(storage.join(place.uri, EXPERIMENT_FILE)):
            raise _missing(place.uri, hint)
    else:
        read(place.folder, hint=hint)


def write(place: storage.Place, cfg: Config, search: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write (or replace, atomically) the experiment file of `place` (kept at its URI too)."""
    data = {"config": cfg.to_dict(), "search": search, **(extra or {})}
    ExperimentFile.model_validate(data)  # what `read` would refuse is not written
    return place.write(EXPERIMENT_FILE, f"{HEADER}\n{yaml.safe_dump(data, sort_keys=False)}{END}\n")
