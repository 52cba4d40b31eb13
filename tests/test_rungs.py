"""ASHA's rungs: placed at chosen epochs through Tune's own scheduler, their warnings, their correlations."""

import math

import pytest

from refilled.errors import UserError
from refilled.schema.rungs import clock, rung_epochs, schedule_warnings, scheduler_args
from refilled.schema.search import parse_search
from refilled.store.rung_fidelity import correlation_lines, correlations, spearman
from support.configs import REPO, make_tiny_config


def _stopped_at(rungs, rf, max_t, curves):
    """Feed Tune's ASHAScheduler each trial's curve (epoch -> value), one trial after the
    other; return the epoch each trial was stopped at (max_t: ran to the end)."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import ASHAScheduler

    scheduler = ASHAScheduler(metric="val", mode="max", **scheduler_args(rungs, rf))
    out = []
    for curve in curves:
        trial = Trial("refilled_trial", stub=True)
        scheduler.on_trial_add(None, trial)
        for epoch in range(1, max_t + 1):
            action = scheduler.on_trial_result(None, trial, {"val": curve(epoch),
                                                             "rung_clock": clock(epoch, rungs, rf, max_t)})
            if action == "STOP":
                break
        out.append(epoch)
    return out


def test_asha_decides_exactly_at_the_placed_rungs():
    # trials worse than the first at every epoch: stopped at the first rung, never before
    worse = [lambda e, i=i: 1 - i / 10 for i in range(5)]
    assert _stopped_at([3, 7], 2.0, 10, worse) == [10, 3, 3, 3, 3]
    # equal up to epoch 6, then worse: rung 3 keeps them (ties), rung 7 stops them
    late = [lambda e, i=i: 0.5 if e < 7 else 1 - i / 10 for i in range(5)]
    assert _stopped_at([3, 7], 2.0, 10, late) == [10, 7, 7, 7, 7]
    # no rung before the end: nobody is stopped early
    assert _stopped_at([], 3.0, 10, worse) == [10] * 5


def test_rung_epochs_are_tunes_geometric_ones_unless_placed():
    assert rung_epochs(5, 3, 90) == [5, 15, 45]
    assert rung_epochs(10, 3, 240) == [10, 30, 90]
    assert rung_epochs(90, 3, 90) == []
    assert rung_epochs(5, 3, 90, [30, 60, 95]) == [30, 60]
    assert [clock(e, [30, 60], 3, 90) for e in (1, 29, 30, 59, 60, 89, 90)] == [0, 0, 1, 1, 3, 3, 9]


def test_search_settings_take_placed_rungs_and_refuse_bad_ones():
    base = make_tiny_config()
    s = parse_search({"asha": {"rungs": [3, 5], "reduction_factor": 2}}, base)
    assert (s.asha.rungs, s.asha.grace_period, s.asha.reduction_factor) == ([3, 5], 3, 2)
    assert s.rung_epochs(8) == [3, 5] and s.to_section()["asha"] == {"grace_period": 3, "rungs": [3, 5], "reduction_factor": 2}
    assert parse_search(s.to_section(), base).asha.rungs == [3, 5]  # experiment.yaml reads back the same
    for bad in ([], [5, 3], [0, 2], [2.5], "30", [True]):
        with pytest.raises(UserError, match="search.asha.rungs must be a list of increasing epochs"):
            parse_search({"asha": {"rungs": bad}}, base)
    with pytest.raises(UserError, match="grace_period 4 and rungs \\[3, 5\\] disagree"):
        parse_search({"asha": {"rungs": [3, 5], "grace_period": 4}}, base)
    with pytest.raises(UserError, match="search.asha takes grace_period, reduction_factor, rungs"):
        parse_search({"asha": {"milestones": [3]}}, base)


def test_warnings_name_rungs_in_stage1_after_few_steps_or_before_the_decay_on_running_statistics():
    common = dict(e1=30, e2=90, point=(60, 75))
    early = schedule_warnings([5, 15, 45], phase2=True, steps_per_epoch=1, bn_stats="running", **common)
    assert any("before stage 2's first learning-rate decay (epoch 60)" in w and "bn_stats: running" in w
               for w in early)
    assert any("after 5 optimizer steps" in w for w in early)
    assert all("search.asha.rungs: [67]" in w for w in early)  # a rung after the decay is suggested
    # precise statistics: a rung before the decay is fine once enough steps have been taken
    assert schedule_warnings([30], phase2=True, steps_per_epoch=1, bn_stats="precise", **common) == []
    assert len(schedule_warnings([5], phase2=True, steps_per_epoch=1, bn_stats="precise", **common)) == 1
    assert schedule_warnings([67], phase2=True, steps_per_epoch=1, bn_stats="running", **common) == []
    joint = schedule_warnings([10, 30], phase2=False, steps_per_epoch=100, bn_stats="precise", **common)
    assert len(joint) == 1 and "is in stage 1" in joint[0] and "search.asha.rungs: [97]" in joint[0]
    none = schedule_warnings([], phase2=True, steps_per_epoch=1, bn_stats="precise", **common)
    assert "no trial is stopped early" in none[0]


def test_a_search_over_a_whole_training_set_is_warned_without_a_step_count(capsys):
    """No `shots`: the training set's size is unknown before its data is read, so the
    steps before a rung are not judged (the CIFAR-100 files start, they did not: a TypeError)."""
    from refilled.schema.config import load_experiment
    from refilled.schema.search import parse_search
    from refilled.tune.search import warn_about_rungs

    cfg, data = load_experiment(REPO / "search_spaces" / "cifar100_crosstask.yaml")
    assert cfg.shots is None
    settings = parse_search({**data["search"], "asha": {"rungs": [110]}}, cfg)
    warn_about_rungs(cfg, settings, cfg.n_training_epochs1 + cfg.n_training_epochs2, phase2=False)
    out = capsys.readouterr()
    assert "ASHA rungs at 110" in out.out and "optimizer steps" not in out.err
    assert schedule_warnings([1], phase2=True, e1=0, e2=10, point=(), steps_per_epoch=None, bn_stats="precise") == []


def test_spearman_and_rung_correlations():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    assert math.isnan(spearman([1, 2], [1, 2])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    curves = {"a": {5: 0.1, 15: 0.5, 30: 0.9}, "b": {5: 0.2, 15: 0.4, 30: 0.8}, "c": {5: 0.3, 15: 0.3, 30: 0.7},
              "d": {5: 0.4}}
    rows = correlations(curves, [5, 15], 30, reeval={"a": 0.9, "b": 0.7, "c": 0.8})
    by = {(r["rung"], r["against"]): r for r in rows}
    assert by[(5, "epoch 15")]["trials"] == 3 and by[(5, "epoch 15")]["spearman"] == pytest.approx(-1)
    assert by[(5, "end")]["spearman"] == pytest.approx(-1) and by[(15, "end")]["spearman"] == pytest.approx(1)
    assert by[(15, "re-evaluated mean")]["spearman"] == pytest.approx(0.5)
    lines = correlation_lines(rows)
    assert all("too few to judge" in line for line in lines) and not any("<- weak" in line for line in lines)
    assert "rung at epoch 15 vs end: Spearman +1.00 over 3 trials" in lines[3]
    many = {"end": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4], "good": [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],
            "bad": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}
    curves = {f"t{i}": {10: many["good"][i], 20: many["bad"][i], 30: many["end"][i]} for i in range(6)}
    lines = correlation_lines(correlations(curves, [10, 20], 30), bn_stats="running")
    weak = [line for line in lines if "<- weak" in line]
    assert len(weak) == 2 and all("rung at epoch 20" in w or "vs epoch 20" in w for w in weak)
    assert all("set bn_stats: precise or move it later" in w for w in weak)
    assert "bn_stats" not in correlation_lines(correlations(curves, [20], 30))[0].split("<- weak")[1]


def test_a_rung_beyond_the_epochs_is_refused_for_a_new_search_only_where_it_was_given():
    from refilled.schema.search import check_rungs_within

    base = make_tiny_config()  # 2 + 3 epochs
    for section, needle in [({"asha": {"grace_period": 500}}, "search.asha: rung 500 is beyond the 5 epochs"),
                            ({"asha": {"rungs": [2, 9]}}, "rung 9 is beyond the 5 epochs")]:
        with pytest.raises(UserError, match=needle):
            check_rungs_within(parse_search(section, base), base)
    staged = {"space": {"tau1": {"loguniform": [0.5, 16]}, "tau2": {"loguniform": [0.5, 8]}},
              "asha": {"grace_period": 2}, "staged": {"asha": {"grace_period": 3}}}
    with pytest.raises(UserError, match="search.staged.asha: rung 3 is beyond the 2 stage-1 epochs"):
        check_rungs_within(parse_search(staged, base), base)
    check_rungs_within(parse_search({"asha": {"grace_period": 5}}, base), base)  # 5 of 5: every trial to the end
    check_rungs_within(parse_search({}, base), base)  # the default grace period (10) is not the user's
