"""Damaged files of an experiment, found before anything is written.

A full disk, an interrupted copy or a crash can leave a file cut short. What
`search --resume`, `retrain` and the analysis scripts read is checked here, by
reading only, and a damaged file is refused in one line that names it (its URI
for an experiment at a URI) and says what to do: the Optuna study,
the teacher, its embedding bank, a staged search's phase-1 choice and the trial
checkpoints a resume continues trials from. experiment.yaml is checked wherever
it is read (refilled.store.experiment_file). No Ray here: Ray Tune's saved state is
read with Ray's own readers (refilled.tune.saved_state), after `trusted` has said
that only the user resuming could have written it.
"""

from __future__ import annotations

import os
import shlex
import stat
import tempfile
from pathlib import Path

from refilled.errors import UserError
from refilled.files import checkpoint
from refilled.files.arrays import read_array
from refilled.store import storage, trial_records
from refilled.store.layout import BANK_FILES, LEASE_FILE, STAGE1_SEARCH, STATE_FILE, TEACHER_FILE

RESUME_STUDY = "restore it from a backup, or start a new search (--name OTHER); retrain and the analysis do not need it"


def _shown(place: storage.Place, rel: str) -> str:
    return storage.join(place.uri, rel) if place.uri else str(place.folder / rel)


def study(folder: Path, shown: str, remedy: str = RESUME_STUDY) -> None:
    """The experiment folder's Optuna study (refilled.store.study), checked whole, read only."""
    from refilled.store import study as study_store

    path = study_store.study_file(folder)
    study_store.check(path, f"{shown}/{path.name}", remedy)


def _checkpoint(place: storage.Place, rel: str, what: str, remedy: str) -> None:
    """Load a checkpoint of the experiment (a URI's is downloaded to a temporary file)."""
    shown = _shown(place, rel)
    if not place.uri:
        if (place.folder / rel).is_file():
            checkpoint.load(place.folder / rel, what, shown=shown, remedy=remedy)
        return
    if not storage.exists(shown):
        return
    with tempfile.TemporaryDirectory(prefix="tune-refilled-check-") as tmp:
        storage.download_file(shown, Path(tmp) / "state.pt")
        checkpoint.load(Path(tmp) / "state.pt", what, shown=shown, remedy=remedy)


def _trial_checkpoints(place: storage.Place, ended_too: bool) -> None:
    """The checkpoints a resume starts trials from: for each trial Tune's last saved
    state had not ended, the newest checkpoint at that save (its record's at_last_save);
    with `ended_too` also the newest checkpoint of each finished trial (phase 1 of a
    staged search chooses one of them to start stage 2 from)."""
    for params in sorted(place.folder.glob("*/params.json")):
        record = trial_records.read(params.parent)
        at_save = record.get("at_last_save") or {}
        wanted = []
        if at_save.get("checkpoint") and at_save.get("status") not in trial_records.ENDED:
            wanted.append((at_save["checkpoint"], "Tune's saved state resumes this trial from it"))
        if ended_too and record.get("status") == "finished" and record.get("checkpoint"):
            wanted.append((record["checkpoint"], "phase 1 may choose this trial's end-of-stage-1 student"))
        for folder, why in wanted:
            _checkpoint(place, f"{params.parent.name}/{folder}/{STATE_FILE}", "trial checkpoint",
                        f"restore it from a backup ({why}), or start a new search (--name OTHER)")


def ended_trials(place: storage.Place) -> int:
    """The trials whose own records say they ended (refilled.store.trial_records)."""
    return sum(trial_records.read(p.parent).get("status") in trial_records.ENDED
               for p in place.folder.glob("*/params.json"))


def trusted(place: storage.Place) -> None:
    """Refuse, in one line and without reading them, the files at the top of a folder experiment
    (and of its stage1_search/), where Ray Tune keeps the state a resume unpickles, when they or
    those folders belong to another user or others than their owner may write them: unpickling
    runs the code a file holds, as the user who resumes. The lease's own files (its lock, a
    lease being written) are the drivers', read as JSON if at all.
    (At a URI, the storage's access rules decide.)"""
    if place.uri:
        return
    me = os.geteuid()
    for folder in (place.folder, place.folder / STAGE1_SEARCH):
        if not folder.is_dir():
            continue
        files = sorted(p for p in folder.iterdir() if not p.name.startswith(LEASE_FILE) and p.is_file())
        for path in [folder, *files]:
            info = path.stat()
            shown = _shown(place, str(path.relative_to(place.folder))) if path != place.folder else place.location
            what = "folder" if stat.S_ISDIR(info.st_mode) else "file"
            if info.st_uid != me:
                raise UserError(f"{what} {shown} belongs to another user (uid {info.st_uid}): `search --resume` "
                                "unpickles Ray Tune's state, which runs the code it holds as you; resume only "
                                "experiments you trust, as the user who owns them")
            if info.st_mode & 0o022:
                raise UserError(f"{what} {shown} may be written by others than its owner (mode "
                                f"{stat.S_IMODE(info.st_mode):o}): `search --resume` unpickles Ray Tune's state, "
                                "which runs the code it holds as you; if you trust this experiment, "
                                f"`chmod -R go-w {shlex.quote(str(place.folder))}` and resume")


def before_resume(place: storage.Place, data: dict) -> None:
    """Everything of ours that `search --resume` will read, checked before it writes anything
    (first whether Ray Tune's pickled state can be trusted: `trusted`).
    `place`: the experiment (for a URI, its freshly pulled mirror); `data`: experiment.yaml."""
    trusted(place)
    teacher = TEACHER_FILE
    _checkpoint(place, teacher, "teacher checkpoint", "restore it from a backup (the search's bank and "
                "trials were made with it)")
    if (place.folder / BANK_FILES[0]).is_file() or (place.folder / BANK_FILES[1]).is_file():
        for name in BANK_FILES:
            if (place.folder / name).is_file():
                read_array(place.folder / name, "teacher bank file", shown=_shown(place, name), mmap=True,
                           remedy=f"delete {' and '.join(BANK_FILES)}: --resume computes both again from teacher.pt")
    study(place.folder, place.location)
    if data.get("stage1_choice"):
        _checkpoint(place, "stage1_choice.pt", "stage-1 choice", "restore it from a backup: every phase-2 trial "
                    "starts from it")
    elif (data.get("search") or {}).get("staged"):  # phase 1 goes on, then chooses
        phase1 = place.part(STAGE1_SEARCH)
        study(phase1.folder, _shown(place, STAGE1_SEARCH))
        _trial_checkpoints(phase1, ended_too=True)
    _trial_checkpoints(place, ended_too=False)
