"""A trial's own per-epoch files (refilled.store.epoch_files): what the readers read, in a
folder and at a URI, and a trial that starts again from a checkpoint rewinds them."""

import json
from pathlib import Path

import pytest

from refilled.store.epoch_files import EpochFiles
from refilled.store.experiments import read_results

PARAMS = {"tau1": 2.5, "lambd": 0.3, "flag_merge": True}


def epoch(step: int) -> dict:
    return {"step": step, "stage": "stage2", "val_accuracy": step / 10, "loss": 1.0 / step, "diverged": 0,
            "cost_wall_s": 1.0, "cost_device_s": 0.25}


def scalars(folder: Path, tag: str = "ray/tune/val_accuracy") -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]


@pytest.fixture(params=["folder", "uri"])
def location(request, tmp_path) -> tuple[str, Path]:
    """Where the experiment is (as Place.location gives it) and its folder on this machine."""
    folder = tmp_path / "exp"
    return (str(folder) if request.param == "folder" else folder.as_uri()), folder


def test_every_epoch_is_written_at_each_flush_in_what_the_readers_read(location):
    where, folder = location
    files = EpochFiles(where, "abc", PARAMS)
    files.start(0)
    trial = folder / "trial_abc"
    assert json.loads((trial / "params.json").read_text()) == PARAMS
    for step in (1, 2, 3):
        files.add(epoch(step), wall_s=0.5)
    assert read_results(trial) == []  # kept until the next flush
    files.flush()
    rows = read_results(trial)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["training_iteration"] for r in rows] == [1, 2, 3]
    assert [r["time_total_s"] for r in rows] == [0.5, 1.0, 1.5]
    assert all(r["trial_id"] == "abc" for r in rows)
    files.add(epoch(4), wall_s=0.5)
    files.flush()
    assert [r["step"] for r in read_results(trial)] == [1, 2, 3, 4]
    assert scalars(trial) == [(s, s / 10) for s in (1, 2, 3, 4)]


def test_a_trial_started_again_from_a_checkpoint_rewinds_to_it(location):
    """A trial that crashed after reporting step 5 restarts from its step-3 checkpoint: its
    files hold steps 1-3, then what the new run reports, each step once."""
    where, folder = location
    first = EpochFiles(where, "abc", PARAMS)
    first.start(0)
    for step in range(1, 6):
        first.add(epoch(step), wall_s=1.0)
    first.flush()
    trial = folder / "trial_abc"
    with open(trial / "result.json", "a") as f:
        f.write('{"step": 6, "val_acc')  # the line a crash cut off

    again = EpochFiles(where, "abc", PARAMS)
    again.start(3)
    assert [r["step"] for r in read_results(trial)] == [1, 2, 3]
    for step in (4, 5, 6):
        again.add(epoch(step), wall_s=2.0)
    again.flush()
    rows = read_results(trial)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["time_total_s"] for r in rows] == [1.0, 2.0, 3.0, 5.0, 7.0, 9.0]
    # steps 4 and 5 were computed twice: both runs cost (refilled.store.cost), the first's with step 4
    assert [r["cost_wall_s"] for r in rows] == [1.0, 1.0, 1.0, 3.0, 1.0, 1.0]
    assert sum(r["cost_device_s"] for r in rows) == 0.25 * 8
    assert len(list(trial.glob("events.out.tfevents.*"))) == 1  # the earlier run's is written anew
    assert scalars(trial) == [(s, s / 10) for s in range(1, 7)]


def test_tensorboard_lists_each_trial_in_its_hparams_tab_from_its_start(location):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    where, folder = location
    files = EpochFiles(where, "abc", PARAMS)
    files.start(0)
    files.flush()
    acc = EventAccumulator(str(folder / "trial_abc"))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    values = {k: v.number_value if v.HasField("number_value") else v.bool_value
              for k, v in start.session_start_info.hparams.items()}
    assert values == PARAMS
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {h.name for h in experiment.hparam_infos} == set(PARAMS)
    assert "ray/tune/val_accuracy" in {m.name.tag for m in experiment.metric_infos}
