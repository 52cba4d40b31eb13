"""Ray Tune's saved state of an experiment, read before `search --resume` hands it to Tune.

When Tune cannot restore its saved state it starts the search over as if it had never run
(its controller catches the error and logs it), and every trial it then did not know would
go aside. So `--resume` first reads that state with Ray's own
readers, into objects it throws away: the trials (`tune.ExperimentAnalysis`), the search
algorithm's state (`SearchGenerator.restore_from_dir`) and the callbacks'
(`CallbackList.restore_from_dir`). The tuner itself is read by `Tuner.restore`, whose
unpickling error refilled.tune.search refuses the same way; and should Tune start over all the same,
the search refuses to (refilled.tune.searcher.StudySearch). What the files are called and
how they are written stays Ray's.
"""

from __future__ import annotations

from refilled.errors import UserError
from refilled.store import integrity, storage, trial_records


def refuse(experiment: storage.Place, what: str, error: BaseException, done: str = "nothing was changed") -> UserError:
    """The one line for Ray Tune's state of `experiment` that `what` could not read (`done`: what
    the refused command did)."""
    cause = (str(error).strip().splitlines() or [""])[0][:200]
    return UserError(f"Ray's state of {experiment.location} is damaged ({what} cannot be read: "
                     f"{type(error).__name__}{': ' + cause if cause else ''}): --resume would start the search "
                     f"over; {remedy(experiment, done)}")


def remedy(experiment: storage.Place, done: str) -> str:
    """What to do with an experiment whose Tune state a resume cannot restore, and what the refused
    command did (`done`)."""
    return (f"restore it from a backup, or `retrain` and analysis/report.py still work on the "
            f"{integrity.ended_trials(experiment)} trials that ended; {done}")


def check(place: storage.Place, experiment: storage.Place) -> None:
    """Read Ray Tune's saved state of `place` (the experiment, or a staged search's phase 1 in
    it; at a URI, its pulled mirror) as a restore will, or refuse in one line."""
    from ray import tune

    folder = str(place.folder)
    if not tune.Tuner.can_restore(folder) or not trial_records.saved_by_tune(folder):
        return  # no state, or none with a trial in it: starting over loses nothing (Tune does)
    for what, read in (("its trials", tune.ExperimentAnalysis), ("its search's state", _search_state),
                       ("its callbacks' state", _callbacks_state)):
        try:
            read(folder)
        except Exception as error:  # whatever Ray's reader raises: not a state Tune can restore
            raise refuse(experiment, f"{what} in {place.location}", error) from None


def _search_state(folder: str) -> None:
    from ray.tune.search import SearchGenerator

    from refilled.tune.searcher import SavedTrials

    search = SearchGenerator(SavedTrials())
    if search.has_checkpoint(folder):  # as Tune restores it: only if it saved one
        search.restore_from_dir(folder)


def _callbacks_state(folder: str) -> None:
    from ray.tune.callback import CallbackList

    callbacks = CallbackList([])
    if callbacks.can_restore(folder):
        callbacks.restore_from_dir(folder)
