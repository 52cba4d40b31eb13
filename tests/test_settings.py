"""The `search:` section's settings and the checkpoint pruning rule, without starting Ray."""

import pytest

from refilled.errors import UserError
from refilled.schema.search import parse_search
from refilled.store.experiments import first_points
from support.configs import REPO, make_tiny_config


def test_reuse_actors_is_on_by_default_and_can_be_turned_off():
    base = make_tiny_config()
    assert parse_search({}, base).reuse_actors is True
    assert parse_search({"reuse_actors": False}, base).reuse_actors is False


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_reuse_actors_takes_only_true_or_false(value):
    with pytest.raises(UserError, match="search.reuse_actors must be true or false"):
        parse_search({"reuse_actors": value}, make_tiny_config())


def test_checkpoints_to_delete_keeps_the_newest_and_the_resumable_one():
    from refilled.tune.callbacks import checkpoints_to_delete

    known = [f"trial_a/checkpoint_{i:06d}" for i in (3, 4, 5, 6, 10)]  # in the order they were reported
    assert checkpoints_to_delete(known, 2, set()) == known[:3]
    # the ones Tune's last saved states would resume from stay, even when older
    assert checkpoints_to_delete(known, 2, {known[0], known[2]}) == [known[1]]
    assert checkpoints_to_delete(known[:1], 2, set()) == []


def test_the_progress_line_counts_trials_by_status_and_names_the_best_value_reported():
    from ray.tune.experiment import Trial

    from refilled.tune.callbacks import Progress, progress_line

    trials = [Trial("simulated_trial", stub=True, trial_id=f"t{i}") for i in range(6)]
    for trial, status in zip(trials, [Trial.TERMINATED, Trial.TERMINATED, Trial.RUNNING, Trial.ERROR,
                                      Trial.PENDING, Trial.PAUSED]):
        trial.set_status(status)
    progress = Progress(10, "val_accuracy")
    for trial, value in [(trials[0], 0.5), (trials[2], 0.8125), (trials[1], 0.75), (trials[2], 0.25), (trials[1], 1)]:
        progress.on_trial_result(0, trials, trial, {"val_accuracy": value})  # an int is no accuracy
    assert progress.best == (0.8125, "t2")  # the best reported, though t2 has reported less since
    assert progress_line(trials, 10, "val_accuracy", progress.best) == (
        "trials: 3 of 10 ended, 1 errored, 1 running, 2 waiting; best val_accuracy so far 0.8125 (t2)")
    assert progress_line(trials[3:5], 4, "val_accuracy", None) == "trials: 1 of 4 ended, 1 errored, 0 running, 1 waiting"


def test_staged_splits_the_space_into_stage1_and_stage2_keys():
    base = make_tiny_config()
    space = {"tau1": {"loguniform": [0.5, 16]}, "lr1": {"loguniform": [0.001, 0.1]},
             "tau2": {"loguniform": [0.5, 8]}, "lambd": {"loguniform": [0.1, 100]}}
    s = parse_search({"space": space, "num_samples": 6, "asha": {"grace_period": 4},
                      "staged": {"num_samples": 3, "asha": {"grace_period": 2, "reduction_factor": 2}}}, base)
    one, two = s.phase(1), s.phase(2, {"tau1": 2.0, "lr1": 0.01})
    assert sorted(one.space) == ["lr1", "tau1"] and sorted(two.space) == ["lambd", "tau2"]
    assert (one.num_samples, one.asha.grace_period, one.asha.reduction_factor) == (3, 2, 2)
    assert (two.num_samples, two.asha.grace_period) == (6, 4)
    assert one.staged is None and two.staged is None
    # phase 2's trials all get phase 1's choice as constants; the searcher draws the rest
    assert two.param_space() == {"tau1": 2.0, "lr1": 0.01} and one.param_space() == {}
    assert parse_search({"space": space, "staged": True}, base).staged.num_samples == 8
    assert parse_search({"space": space}, base).staged is None


@pytest.mark.parametrize("section, needle", [
    ({"space": {"tau1": {"loguniform": [0.5, 16]}, "wd": {"loguniform": [1e-5, 1e-3]},
                "tau2": {"loguniform": [0.5, 8]}}, "staged": True}, "wd act on both stages"),
    ({"space": {"tau2": {"loguniform": [0.5, 8]}}, "staged": True}, "needs keys of both phases"),
    ({"space": {"tau1": {"loguniform": [0.5, 16]}}, "staged": True}, "needs keys of both phases"),
    ({"staged": {"num_samples": 0}}, "search.staged.num_samples must be >= 1, got 0"),
    ({"staged": {"grace": 3}}, "search.staged: unknown setting 'grace' \\(search.staged takes num_samples, asha\\)"),
    ({"staged": {"asha": {"grace_period": "5"}}}, "search.staged.asha.grace_period must be a whole number, got '5'"),
    ({"num_samples": 1.5}, "search.num_samples must be a whole number, got 1.5"),
    ({"resources": {"gpu": 1.5}}, "search.resources.gpu may be a fraction only below 1"),
])
def test_bad_staged_settings_are_one_line_errors(section, needle):
    with pytest.raises(UserError, match=needle) as info:
        parse_search(section, make_tiny_config())
    assert "\n" not in str(info.value)


def test_split_seed_cannot_be_searched():
    # a search over image draws would pick the luckiest draw, not better settings
    with pytest.raises(UserError, match="'split_seed' cannot be searched") as info:
        parse_search({"space": {"split_seed": {"choice": [0, 1, 2]}}}, make_tiny_config())
    assert "\n" not in str(info.value)


def test_selection_and_budget_settings_read_back_as_written():
    s = parse_search({"select": {"top_k": 5, "seeds": 2}, "budget_hours": 1.5}, make_tiny_config())
    assert (s.select.top_k, s.select.seeds, s.budget_hours) == (5, 2, 1.5)
    again = parse_search(s.to_section(), make_tiny_config())
    assert (again.select.top_k, again.select.seeds, again.budget_hours) == (5, 2, 1.5)
    default = parse_search({}, make_tiny_config())
    assert (default.select.top_k, default.select.seeds, default.budget_hours) == (3, 3, None)
    assert parse_search({"select": {"top_k": 0}}, make_tiny_config()).select.top_k == 0  # the best single trial


@pytest.mark.parametrize("section,needle", [
    ({"select": {"top_k": -1}}, "search.select.top_k must be >= 0"),
    ({"select": {"seeds": 0}}, "search.select.seeds must be >= 1"),
    ({"select": {"k": 3}}, "search.select takes top_k, seeds"),
    ({"budget_hours": 0}, "budget_hours must be a number of device hours > 0"),
    ({"budget_hours": "lots"}, "budget_hours"),
    ({"start_with": 3}, "start_with must be authors, config, none or an experiment"),
])
def test_bad_selection_budget_or_start_are_one_line_errors(section, needle):
    with pytest.raises(UserError) as e:
        parse_search(section, make_tiny_config())
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_start_with_an_experiment_that_is_none_is_refused_when_read(tmp_path):
    s = parse_search({"start_with": str(tmp_path / "nowhere")}, make_tiny_config())  # read when the search starts
    with pytest.raises(UserError, match="not a tune-refilled experiment"):
        first_points(s, make_tiny_config())


@pytest.mark.parametrize("path", sorted((REPO / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_search_section_parses_and_reads_back_the_same(path):
    from refilled.schema.config import load_experiment

    cfg, data = load_experiment(path)
    settings = parse_search(data.get("search"), cfg)
    assert parse_search(settings.to_section(), cfg) == settings  # what experiment.yaml holds reads back
