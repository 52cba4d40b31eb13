"""The search's Tune searcher: an Optuna study (TPE), driven through its ask-and-tell interface.

The study lives in the experiment folder (refilled.store.study: an Optuna
journal, or the SQLite file of an experiment made before it); for an
experiment at a URI, in the local mirror, uploaded to the URI whenever Tune
saves its state (`save`, just before Tune uploads its own), so that a resume
from another machine finds the study as that state knew it. Where the experiment
is, the searcher asks refilled.tune.current (never its pickled self): a copied
or moved experiment is resumed in its new place.

Each Tune trial gets one Optuna trial: asked (`study.ask`; the first may be a
given point, `study.enqueue_trial`), its validation accuracy reported at each
ASHA rung it reaches and at its end (`Trial.report`: TPE learns from a pruned
trial through its last reported value, the one ASHA stopped it on), and told
once how it ended: COMPLETE (every step), PRUNED (ASHA stopped it short of its
steps) or FAIL (diverged, errored). Every epoch's value is in the trial's
result.json; one SQLite write per epoch was the largest part of the driver's
time per result at cluster scale (benchmarks/README.md, "Scale"). Tune saves
only which Optuna trial each Tune trial is; everything else is in the study.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune import Experiment
from ray.tune.search import ConcurrencyLimiter, Searcher, SearchGenerator

from refilled.errors import UserError
from refilled.schema.rungs import CLOCK
from refilled.schema.search import Distribution, distributions
from refilled.store import storage, trial_records
from refilled.store import study as study_store
from refilled.tune import current, saved_state
from refilled.tune.trial_plan import METRIC


def outcome(result: dict | None, error: bool, metric: str) -> tuple[TrialState, float | None]:
    """How a trial that ended is told to Optuna, and with what value."""
    value = None if result is None else result.get(metric)
    if error or result is None or value is None or not math.isfinite(value):
        return TrialState.FAIL, None
    ending = trial_records.ending(result)
    if ending == "diverged":
        return TrialState.FAIL, None
    if ending == "stopped":
        return TrialState.PRUNED, None
    return TrialState.COMPLETE, float(value)


def study_seed(seed: int, size: int) -> int:
    """The sampler's seed for a study that already holds `size` trials: a new driver's
    sampler starts its random stream again, and with the search's own seed it would
    draw the points the first driver drew."""
    return seed if size == 0 else seed * 1_000_003 + size


@dataclass(frozen=True)
class StudyPlan:
    """The study a searcher asks and tells: its search space, its name, where it is in the
    experiment (for a staged search's phase 1, its part `sub`; the experiment itself is the
    one refilled.tune.current names), the sampler's seed, the points queued first, and the
    device hours after which no trial starts."""

    space: dict[str, Distribution]
    study_name: str
    sub: str = ""
    seed: int = 0
    first: tuple[dict[str, Any], ...] = ()
    budget_hours: float | None = None
    sampler: str = "tpe"  # or "random"


class StudySearcher(Searcher):
    """Optuna's TPE behind Tune's Searcher interface, over a study of our own (`plan`).
    Tune pickles this object into its experiment, so a resumed driver, perhaps on another
    machine or with the experiment in another place, finds the study through the
    experiment it runs (refilled.tune.current): its folder, or its URI's mirror there."""

    def __init__(self, plan: StudyPlan, metric: str = METRIC):
        super().__init__(metric=metric, mode="max")
        self.space, self.study_name, self.sub = plan.space, plan.study_name, plan.sub
        self.seed, self.first, self.budget_hours = plan.seed, list(plan.first), plan.budget_hours
        self.sampler = plan.sampler
        self._numbers: dict[str, int] = {}  # Tune trial id -> Optuna trial number: all that Tune saves
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._study: optuna.Study | None = None
        self._asked: dict[str, optuna.trial.Trial] = {}  # asked by this driver, not yet told: report() needs them
        self._reported: dict[str, int] = {}  # Tune trial id -> last step reported to Optuna
        self._clock: dict[str, float] = {}  # Tune trial id -> its rung clock at that report
        self._unclaimed: list[tuple[int, dict]] = []  # asked by a killed driver after Tune's last save
        self._spent_s: float | None = None  # device seconds spent: the ledger's, then each result's
        self._counted: dict[str, int] = {}  # Tune trial id -> step of the last result added to _spent_s
        self._said_spent = False

    def __getstate__(self):  # Tune pickles the searcher into its experiment: no open study in it
        state = self.__dict__.copy()
        for name in ("_study", "_asked", "_reported", "_clock", "_unclaimed", "_spent_s", "_counted", "_said_spent"):
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        state.pop("experiment", None)  # where an earlier version's searcher was made: not where it runs now
        self.__dict__.update(state)
        self._init_runtime()

    # ----------------------------------------------------------------------------- the study

    @property
    def place(self) -> storage.Place:
        return current.place(self.sub)

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            self._study = self._open()
        return self._study

    def _open(self) -> optuna.Study:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        folder = self.place.folder
        folder.mkdir(parents=True, exist_ok=True)
        store = study_store.storage(folder)
        size = 0
        if self.study_name in optuna.get_all_study_names(storage=store):
            size = len(optuna.load_study(study_name=self.study_name, storage=store).get_trials(deepcopy=False))
        study = optuna.create_study(study_name=self.study_name, storage=store, direction="maximize",
                                    sampler=self._sampler(study_seed(self.seed, size)),
                                    load_if_exists=True)
        if size == 0:
            for point in self.first:  # the first asks get them, in order
                study.enqueue_trial(point)
        return study

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        if getattr(self, "sampler", "tpe") == "random":  # an earlier version's pickled searcher has no sampler: TPE
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed)

    def budget_spent(self) -> bool:
        """Whether search.budget_hours is spent: the experiment's ledger when this driver
        started (teacher, bank, phase 1, the trials of an interrupted run), plus what the
        trials have reported since."""
        if self.budget_hours is None:
            return False
        if self._spent_s is None:
            from refilled.store.cost import device_seconds

            self._spent_s = device_seconds(current.place().folder)
        return self._spent_s >= self.budget_hours * 3600

    # ----------------------------------------------------------------------------- Tune's Searcher

    def suggest(self, trial_id: str) -> dict | None:
        if self.budget_spent():
            if not self._said_spent:
                print(f"search.budget_hours spent ({self._spent_s / 3600:.3g} of {self.budget_hours:.3g} device "
                      "hours): no new trial starts; the running ones finish")
                self._said_spent = True
            return Searcher.FINISHED
        if self._unclaimed:
            number, params = self._unclaimed.pop(0)
        else:
            trial = self.study.ask(distributions(self.space))
            self._asked[trial_id] = trial
            number, params = trial.number, trial.params
        self._numbers[trial_id] = number
        return dict(params)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._count(trial_id, result)
        if result.get(CLOCK, 0.0) > self._clock.get(trial_id, 0.0):  # a rung reached (or the end)
            self._report(trial_id, result)

    def _count(self, trial_id: str, result: dict) -> None:
        """Add a result's device seconds to the budget's tally, once: a finished trial's last
        result reaches on_trial_result and on_trial_complete both (a retried trial's repeated
        epochs count again, as in the ledger)."""
        step = result.get("step")
        if self._spent_s is None or (step is not None and self._counted.get(trial_id) == step):
            return
        self._spent_s += float(result.get("cost_device_s") or 0.0)
        if step is not None:
            self._counted[trial_id] = step

    def _report(self, trial_id: str, result: dict) -> None:
        # Trials asked before a resume have no Trial object in this driver (Optuna hands
        # one out at ask only): they keep the values reported before, and are told their end.
        trial = self._asked.get(trial_id)
        value, step = result.get(self.metric), result.get("step")
        if trial is None or value is None or step is None or result.get("diverged") or not math.isfinite(value):
            return
        if step <= self._reported.get(trial_id, -1):
            return  # a retried trial reports its epochs after the checkpoint again: Optuna has them
        trial.report(float(value), int(step))
        self._reported[trial_id] = int(step)
        self._clock[trial_id] = result.get(CLOCK, 0.0)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        number = self._numbers.get(trial_id)
        if number is None:
            return
        if result and not error:  # Tune hands the result ASHA stopped the trial on here, not to on_trial_result
            self._count(trial_id, result)
            self._report(trial_id, result)
        state, value = outcome(result, error, self.metric)
        # skip_if_finished: after --resume, a trial told just before the driver was killed ends again
        self.study.tell(number, value, state=state, skip_if_finished=True)
        self._asked.pop(trial_id, None)
        self._reported.pop(trial_id, None)
        self._clock.pop(trial_id, None)
        self._counted.pop(trial_id, None)

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps({"trials": self._numbers}))
        place = self.place
        path = study_store.study_file(place.folder)
        if place.uri and path.is_file():
            place.push(path.name)  # before Tune uploads the state that names these trials

    def restore(self, checkpoint_path: str) -> None:
        """--resume: Tune saves its state every 10 s or more, so a driver killed in
        between leaves Optuna trials asked after the last save, which the restored map
        does not know (still RUNNING in the study). They are handed to the next trials
        Tune asks for (same parameters) instead of asking Optuna anew, so the study
        holds each trial once; one with incomplete parameters is told FAIL."""
        self._numbers = saved_trials(checkpoint_path)
        known = set(self._numbers.values())
        self._unclaimed = []
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.number in known:
                continue
            if set(trial.params) == set(self.space):
                self._unclaimed.append((trial.number, dict(trial.params)))
            else:
                self.study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)


def saved_trials(checkpoint_path: str) -> dict[str, int]:
    """Which Optuna trial each Tune trial is, as `StudySearcher.save` wrote it."""
    return {k: int(v) for k, v in json.loads(Path(checkpoint_path).read_text())["trials"].items()}


class SavedTrials(Searcher):
    """A StudySearcher's saved state, read and thrown away: the searcher that
    refilled.tune.saved_state restores (Searcher.restore_from_dir) to check it before a resume."""

    def restore(self, checkpoint_path: str) -> None:
        saved_trials(checkpoint_path)


class StudySearch(SearchGenerator):
    """Tune's SearchGenerator around the StudySearcher (and Tune's ConcurrencyLimiter with
    `max_concurrent`), as Tune would wrap it, but with new trials made where the experiment
    is now.

    Tune saves this wrapper's state with its own, and that state holds the experiment as
    Tune described it when the search began (a `tune.Experiment`), with its storage: the
    place new trials are created in. `Tuner.restore` re-points the trials it restores at the
    place it restores from, not that description, so a copied or moved experiment, resumed,
    would create its new trials in the old place. The state handed to `set_state` is
    re-pointed first (`moved_to`).

    And Tune, when it cannot restore its saved state, starts the search over: an unpickled
    wrapper (Tuner.restore's) that Tune hands a new run instead of its state refuses it."""

    @classmethod
    def around(cls, searcher: StudySearcher, max_concurrent: int) -> StudySearch:
        wrapper = cls(ConcurrencyLimiter(searcher, max_concurrent=max_concurrent) if max_concurrent else searcher)
        wrapper.sub = searcher.sub  # the Tune experiment is the experiment's part `sub` (a staged search's phase 1)
        return wrapper

    def __setstate__(self, state: dict) -> None:  # unpickled: Tuner.restore read it from Tune's saved state
        self.__dict__.update(state, unpickled=True)

    def set_state(self, state: dict) -> None:
        saved = state["experiment"]  # what SearchGenerator.get_state saved (None before its first run)
        if saved is not None:
            state = {**state, "experiment": moved_to(saved, current.place(self.sub))}
        super().set_state(state)

    def add_configurations(self, experiments) -> None:
        """Tune's call for a new run. Made to the wrapper Tuner.restore unpickled, it means that
        Tune could not restore its saved state, at whatever step, and starts the search over (it
        logs why): refused if that state held trials (their records say so), which would run again."""
        place = current.place(self.sub) if getattr(self, "unpickled", False) else None
        if place is not None and trial_records.saved_by_tune(place.folder):
            raise UserError(f"Ray Tune could not restore its saved state of {place.location} (its log above says "
                            f"why) and would start the search over: {saved_state.remedy(current.place(), 'no trial ran')}")
        super().add_configurations(experiments)


def moved_to(saved: Experiment, place: storage.Place) -> Experiment:
    """The Tune experiment `saved` describes, its storage at `place`: the three fields of Ray's
    StorageContext (a developer API) that Tune re-points in the trials it restores, the rest
    kept (its driver staging folder among them, which the restored run goes on using)."""
    where = copy.copy(saved.storage)
    where.storage_filesystem, path = storage.filesystem_of(place.storage_path)
    where.storage_fs_path = Path(path).as_posix()
    where.experiment_dir_name = place.name
    experiment = copy.copy(saved)
    experiment.spec = {**saved.spec, "storage": where}
    experiment.storage = where
    return experiment
