"""The search's Optuna searcher (refilled.tune.searcher) driven as Tune drives it, without a
Ray cluster: real Optuna studies in SQLite, Tune's trial ids made up, Tune's saved
state a file, a killed driver an object that is dropped.
"""

from __future__ import annotations

import json
import math
import pickle

import optuna
import pytest
from optuna.trial import TrialState

from refilled.schema.rungs import CLOCK, clock
from refilled.schema.search import distributions
from refilled.store import cost
from refilled.store import study as study_store
from refilled.store.layout import STUDY_FILE
from refilled.store.storage import Place
from refilled.tune import current
from refilled.tune.searcher import StudyPlan, StudySearch, StudySearcher

SPACE = {"tau1": {"loguniform": [0.5, 16.0]}, "lambd": {"uniform": [0.0, 10.0]},
         "flag_merge": {"choice": [False, True]}, "depth": {"randint": [10, 12]}}
FIRST = {"tau1": 4.0, "lambd": 1.0, "flag_merge": False, "depth": 10}
TOTAL = 6
RUNGS = [2, 4]  # ASHA's rungs: each result carries the clock that puts them there (refilled.schema.rungs)


@pytest.fixture(autouse=True)
def no_search_after():
    yield
    current.set_location(None)


def make(tmp_path, experiment=None, **changes) -> StudySearcher:
    """A searcher as `search` makes one, pickled as Tune pickles it into its experiment, in the
    experiment a driver runs (`experiment`, default tmp_path: refilled.tune.current)."""
    current.set_location(str(experiment or tmp_path))
    kwargs = dict(study_name="s", seed=0, first=(FIRST,))
    return pickle.loads(pickle.dumps(StudySearcher(StudyPlan(SPACE, **{**kwargs, **changes}))))


def report(searcher: StudySearcher, trial_id: str, steps: range, value=lambda step: step / 10) -> dict:
    """Tune's results for these steps; the last one is returned (Tune ends a trial with it)."""
    result = {}
    for step in steps:
        result = at(step, value(step))
        searcher.on_trial_result(trial_id, result)
    return result


def at(step: int, value: float, diverged: int = 0) -> dict:
    return {"val_accuracy": value, "step": step, "total_steps": TOTAL, "diverged": diverged,
            CLOCK: clock(step, RUNGS, 3, TOTAL)}


def study(tmp_path) -> optuna.Study:
    return study_store.load(tmp_path, "s")


def test_the_space_as_optuna_distributions():
    d = distributions(SPACE)
    assert d["tau1"] == optuna.distributions.FloatDistribution(0.5, 16.0, log=True)
    assert d["lambd"] == optuna.distributions.FloatDistribution(0.0, 10.0)
    assert d["flag_merge"] == optuna.distributions.CategoricalDistribution([False, True])
    assert d["depth"] == optuna.distributions.IntDistribution(10, 11)  # high excluded, as Ray's tune.randint


def test_each_trial_is_asked_reported_and_told_how_it_ended(tmp_path):
    searcher = make(tmp_path)
    ids = ["t1", "t2", "t3", "t4", "t5"]
    configs = {i: searcher.suggest(i) for i in ids}
    assert configs["t1"] == FIRST  # the given first point
    assert all(set(c) == set(SPACE) for c in configs.values())
    # ran every step; stopped by ASHA at step 4 (the result it stopped on goes to on_trial_complete);
    # diverged; errored; stopped with a NaN
    searcher.on_trial_complete("t1", report(searcher, "t1", range(1, TOTAL + 1)))
    report(searcher, "t2", range(1, 4))
    searcher.on_trial_complete("t2", at(4, 0.4))
    searcher.on_trial_complete("t3", at(3, 0.0, diverged=1))
    report(searcher, "t4", range(1, 3))
    searcher.on_trial_complete("t4", None, error=True)
    searcher.on_trial_complete("t5", at(2, math.nan))

    trials = study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL,
                                        TrialState.FAIL, TrialState.FAIL]
    assert trials[0].value == pytest.approx(0.6) and trials[0].params == FIRST
    # reported at each rung (not every epoch: an SQLite write each) and where ASHA stopped it: TPE learns from it
    assert trials[0].intermediate_values == {2: 0.2, 4: 0.4, 6: 0.6}
    assert trials[1].intermediate_values == {2: 0.2, 4: 0.4}
    assert [t.params for t in trials] == [configs[i] for i in ids]
    # told once: Tune telling again (a resumed driver) changes nothing
    searcher.on_trial_complete("t2", at(TOTAL, 0.9))
    assert study(tmp_path).trials[1].state == TrialState.PRUNED


def test_a_retried_trial_reports_each_step_once(tmp_path, recwarn):
    searcher = make(tmp_path)
    searcher.suggest("t1")
    report(searcher, "t1", range(1, 5))
    report(searcher, "t1", range(3, 5), value=lambda step: 0.99)  # the epochs after its checkpoint, again
    assert study(tmp_path).trials[0].intermediate_values == {2: 0.2, 4: 0.4}
    assert not [w for w in recwarn if "already reported" in str(w.message)]


def test_tune_saves_only_which_optuna_trial_each_tune_trial_is(tmp_path):
    searcher = make(tmp_path)
    searcher.suggest("t1")
    searcher.suggest("t2")
    searcher.save(str(tmp_path / "state"))
    assert json.loads((tmp_path / "state").read_text()) == {"trials": {"t1": 0, "t2": 1}}
    state = pickle.dumps(searcher)  # what Tune's tuner.pkl would hold: no open study
    assert b"sqlite" not in state and b"Trial" not in state


def test_a_resumed_driver_hands_out_the_trials_the_killed_one_asked_and_tells_each_once(tmp_path):
    first = make(tmp_path)
    known = {i: first.suggest(i) for i in ("t1", "t2", "t3")}
    first.on_trial_complete("t1", report(first, "t1", range(1, TOTAL + 1)))
    first.save(str(tmp_path / "state"))  # Tune's last state save before the kill
    first.on_trial_complete("t2", report(first, "t2", range(1, TOTAL + 1)))  # told after it
    unknown = [first.suggest(i) for i in ("t4", "t5")]  # asked after it: Tune's state has no t4, t5
    del first  # the driver is killed

    second = make(tmp_path)  # Tune's pickled searcher, restored from its last state
    second.restore(str(tmp_path / "state"))
    assert [second.suggest(i) for i in ("n1", "n2")] == unknown  # same parameters, same Optuna trials
    fresh = second.suggest("n3")
    assert fresh not in [*known.values(), *unknown]  # a new sampler seed: not the first driver's draws again
    # Tune resumes t2 and t3 from their checkpoints: t2 was told already, t3 not yet
    second.on_trial_complete("t2", report(second, "t2", range(4, TOTAL + 1), value=lambda step: 0.5))
    second.on_trial_complete("t3", report(second, "t3", range(1, TOTAL + 1)))
    for i in ("n1", "n2", "n3"):
        second.on_trial_complete(i, report(second, i, range(1, TOTAL + 1)))

    trials = study(tmp_path).trials
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    assert trials[1].value == pytest.approx(0.6)  # told once, by the first driver
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6


def test_a_copied_experiment_resumed_opens_its_own_study_not_the_originals(tmp_path):
    """The searcher Tune pickled names no place: a copy resumed (`cp -a`, then --resume in
    the new place) continues the copy's study, and the original's is left as it was."""
    import shutil

    original, copied = tmp_path / "exp", tmp_path / "elsewhere" / "exp"
    first = make(original)
    first.suggest("t1")
    first.on_trial_complete("t1", report(first, "t1", range(1, TOTAL + 1)))
    first.suggest("t2")
    first.save(str(original / "state"))
    pickled = pickle.dumps(first)
    del first  # the driver is killed
    shutil.copytree(original, copied)
    journal = (original / STUDY_FILE).read_bytes()

    current.set_location(str(copied))
    second = pickle.loads(pickled)
    second.restore(str(copied / "state"))
    second.on_trial_complete("t2", report(second, "t2", range(1, TOTAL + 1)))
    assert second.suggest("n1")
    second.on_trial_complete("n1", report(second, "n1", range(1, TOTAL + 1)))
    assert (original / STUDY_FILE).read_bytes() == journal
    assert [t.state for t in study_store.load(copied, "s").trials] == [TrialState.COMPLETE] * 3
    assert len(study_store.load(original, "s").trials) == 2


@pytest.mark.parametrize("sub", ["", "stage1_search"])
@pytest.mark.parametrize("at", ["folder", "uri"])
def test_a_resumed_search_makes_its_new_trials_where_the_experiment_is_now(tmp_path, sub, at):
    """Tune's saved state of the searcher's wrapper holds the experiment as Tune described it
    when the search began, with the storage new trials are made in: restored in another place,
    it names that place (for a staged search's phase 1, its part stage1_search there), and
    keeps the rest of the description."""
    from ray import cloudpickle  # as Tune saves it
    from ray.tune.experiment import Experiment

    def trainable(config):
        pass

    was = tmp_path / "was" / "exp" / sub if sub else tmp_path / "was" / "exp"
    described = Experiment(was.name, trainable, storage_path=str(was.parent), config={"epochs": 3}, max_failures=2,
                           trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}")
    state = cloudpickle.dumps({"counter": 1, "total_samples": 4, "finished": False, "experiment": described})
    searcher = make(tmp_path / "was" / "exp", sub=sub)
    wrapper = cloudpickle.loads(cloudpickle.dumps(StudySearch.around(searcher, 2)))  # as tuner.pkl holds it
    moved = tmp_path / "now" / "moved"
    current.set_location(str(moved) if at == "folder" else f"file://{moved}")
    wrapper.set_state(cloudpickle.loads(state))
    trial = wrapper.next_trial()
    now = moved / sub if sub else moved
    assert trial.storage.experiment_fs_path == str(now)  # its folder goes in there
    assert trial.max_failures == 2 and trial.config["epochs"] == 3 and "tau1" in trial.config
    assert described.storage.experiment_fs_path == str(was)  # the restored copy changed, not this


def test_an_unclaimed_trial_without_all_its_parameters_is_failed(tmp_path):
    first = make(tmp_path)
    first.suggest("t1")
    first.save(str(tmp_path / "state"))
    first.study.ask()  # a trial the killed driver created but never gave parameters
    second = make(tmp_path)
    second.restore(str(tmp_path / "state"))
    assert [t.state for t in study(tmp_path).trials] == [TrialState.RUNNING, TrialState.FAIL]
    assert second.suggest("n1")  # asked anew
    assert len(study(tmp_path).trials) == 3


def test_at_a_uri_the_study_goes_up_whenever_tune_saves(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNE_REFILLED_CACHE", str(tmp_path / "cache"))
    bucket = tmp_path / "bucket"
    uri = f"file://{bucket}/exp"
    searcher = make(tmp_path, experiment=uri, sub="stage1_search")
    assert uri not in str(pickle.dumps(searcher))
    searcher.suggest("t1")
    assert not (bucket / "exp" / "stage1_search" / STUDY_FILE).exists()
    searcher.save(str(tmp_path / "state"))
    uploaded = study_store.load(bucket / "exp" / "stage1_search", "s")
    assert [t.params for t in uploaded.trials] == [FIRST]
    assert list((tmp_path / "cache").rglob(STUDY_FILE))  # made in the mirror


def test_several_first_points_run_first_in_order(tmp_path):
    """A warm start (search.start_with: an earlier experiment) queues its top trials."""
    second = {**FIRST, "tau1": 8.0, "depth": 11}
    searcher = make(tmp_path, first=(FIRST, second))
    assert [searcher.suggest("a"), searcher.suggest("b")] == [FIRST, second]
    assert set(searcher.suggest("c")) == set(SPACE)


def test_no_new_trial_once_the_budget_is_spent(tmp_path, capsys):
    """search.budget_hours: what the experiment's ledger holds when the driver starts (here a
    teacher bank of 30 device seconds), plus every result's cost_device_s since."""
    from ray.tune.search import Searcher

    cost.add_driver_cost(Place(tmp_path), "teacher_bank", "bank", 30.0, "cpu", 1.0)
    searcher = make(tmp_path, budget_hours=60 / 3600)  # one device minute
    assert searcher.suggest("a") is not None
    for step in (1, 2):
        searcher.on_trial_result("a", {"val_accuracy": 0.5, "step": step, "total_steps": TOTAL, "diverged": 0,
                                       "cost_device_s": 10.0})
    assert searcher.suggest("b") is not None  # 50 s of 60
    searcher.on_trial_result("a", {"val_accuracy": 0.5, "step": 3, "total_steps": TOTAL, "diverged": 0,
                                   "cost_device_s": 10.0})
    assert searcher.suggest("c") == Searcher.FINISHED and searcher.suggest("d") == Searcher.FINISHED
    assert capsys.readouterr().out.count("search.budget_hours spent (0.0167 of 0.0167 device hours)") == 1
    # a resumed driver counts the ledger again: the results the trials wrote are in it
    assert make(tmp_path, budget_hours=1.0).suggest("e") is not None


def test_the_budget_counts_each_result_once_the_one_asha_stops_on_included(tmp_path, capsys):
    """Tune hands the result ASHA stops a trial on to on_trial_complete alone, and a finished
    trial's last result to both methods: each is counted once."""
    from ray.tune.search import Searcher

    searcher = make(tmp_path, budget_hours=40 / 3600)
    assert searcher.suggest("a") is not None and searcher.suggest("b") is not None
    result = {"val_accuracy": 0.5, "total_steps": TOTAL, "diverged": 0, "cost_device_s": 10.0}
    searcher.on_trial_result("a", {**result, "step": 1})
    searcher.on_trial_complete("a", {**result, "step": 2})  # stopped by ASHA on step 2: 20 s
    searcher.on_trial_result("b", {**result, "step": 1})
    searcher.on_trial_complete("b", {**result, "step": 1})  # finished: the same last result, 10 s
    assert searcher.suggest("c") is not None  # 30 s of 40
    searcher.on_trial_result("c", {**result, "step": 1})
    assert searcher.suggest("d") == Searcher.FINISHED  # 40 s


@pytest.mark.parametrize("saved", [True, False])
def test_tune_starting_a_restored_search_over_is_refused_when_it_had_saved_trials(tmp_path, saved):
    """Tune hands a new run (add_configurations) to the wrapper Tuner.restore unpickled only when it
    could not restore its saved state (at whatever step: after the search's own state too):
    refused if the trials' records say that state held them (they would run again), let through
    if it held none (nothing is lost), and never for a wrapper made for a new search."""
    from ray import cloudpickle
    from ray.tune.experiment import Experiment

    from refilled.errors import UserError
    from refilled.store import trial_records

    def trainable(config):
        pass

    def described():
        return Experiment("exp", trainable, storage_path=str(tmp_path))

    trial = tmp_path / "trial_a"
    trial.mkdir()
    (trial / "params.json").write_text("{}")
    record = {"trial_id": "a", "number": 1, "status": "finished"}
    trial_records.write(trial, {**record, "at_last_save": {"status": "running", "checkpoint": None}} if saved else record)
    fresh = StudySearch.around(make(tmp_path), 2)
    unpickled = cloudpickle.loads(cloudpickle.dumps(fresh))  # as Tuner.restore reads it from tuner.pkl
    restored = cloudpickle.loads(cloudpickle.dumps(fresh))
    restored.set_state({"counter": 1, "total_samples": 4, "finished": False, "experiment": described()})

    fresh.add_configurations([described()])
    assert restored.next_trial() is not None  # its state restored: Tune goes on with it
    for wrapper in (unpickled, restored):  # Tune gave up before restoring the search, or after
        if saved:
            with pytest.raises(UserError, match=f"could not restore its saved state of {tmp_path} .* the 1 trials"):
                wrapper.add_configurations([described()])
    if not saved:
        unpickled.add_configurations([described()])
        assert unpickled.next_trial() is not None  # started over: nothing of it was saved
