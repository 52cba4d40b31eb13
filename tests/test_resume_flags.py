"""`search --resume` continues an experiment as its experiment.yaml has it: a --config, a
config override (--tau1, --set) or a search flag (--num-samples, --max-concurrent,
--cpus-per-trial, --gpus-per-trial) that would change it is refused in one line, exit code 2,
nothing written; one that changes nothing is said to be not needed, and --teacher not used
where the experiment has its teacher. Fast: an experiment made file by file (Ray's state a
placeholder), every refusal before Ray starts, and the run itself replaced where accepted."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from refilled.schema.config import load_experiment
from refilled.schema.search import parse_search
from refilled.store import experiment_file
from refilled.store.storage import Place
from support.searches import TINY, main_error, tree

NAME = "exp"


@pytest.fixture
def storage(tmp_path) -> Path:
    """An experiment of tests/search_tiny.yaml as `search` writes it, with a Ray state to restore."""
    cfg, data = load_experiment(TINY)
    folder = tmp_path / "storage" / NAME
    folder.mkdir(parents=True)
    experiment_file.write(Place(folder), cfg, parse_search(data["search"], cfg).to_section())
    (folder / "tuner.pkl").write_bytes(b"\x80\x04N.")  # a whole pickle (None): Tune's state is there
    return folder.parent


@pytest.fixture
def ran(monkeypatch) -> list:
    """The search's run replaced: what reaches it was accepted."""
    from refilled.tune.search import Outcome, SearchRun

    runs = []

    def run(self, address=None, teacher=None):
        runs.append(self)
        return Outcome.FINISHED

    monkeypatch.setattr(SearchRun, "run", run)
    return runs


def resume(storage: Path, *flags: str) -> list[str]:
    return ["search", "--resume", "--name", NAME, "--storage", str(storage), *flags]


def changed(tmp_path: Path, **config) -> Path:
    data = yaml.safe_load(TINY.read_text())
    data["config"].update(config)
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("flags, blamed, shown", [
    (["--num-samples", "999"], "--num-samples", "search.num_samples 8 -> 999"),
    (["--max-concurrent", "1"], "--max-concurrent", "search.max_concurrent 2 -> 1"),
    (["--cpus-per-trial", "2"], "--cpus-per-trial", "search.resources.cpu 1 -> 2"),
    (["--gpus-per-trial", "0.5"], "--gpus-per-trial", "search.resources.gpu 0 -> 0.5"),
    (["--tau1", "3"], "--tau1", "tau1 4"),
    (["--set", "lr2=0.1"], "--set", "lr2 0.05 -> 0.1"),
    (["--tau1", "abc"], "--tau1", "tau1"),
])
def test_a_flag_that_would_change_the_experiment_is_refused(storage, ran, capsys, flags, blamed, shown):
    before = tree(storage)
    line = main_error(capsys, *resume(storage, *flags))
    assert line.startswith(f"error: --resume continues {storage / NAME} as it was written; {blamed} would change it")
    assert shown in line and "start a new search with --name OTHER" in line, line
    assert tree(storage) == before and not ran


def test_another_config_file_is_refused_naming_what_it_changes(storage, ran, capsys, tmp_path):
    other = changed(tmp_path, lr1=0.01)
    line = main_error(capsys, *resume(storage, "--config", str(other), "--tau1", "abc", "--num-samples", "999"))
    assert "--config/--tau1/--num-samples would change it" in line, line
    assert not ran
    line = main_error(capsys, *resume(storage, "--config", str(other)))
    assert "; --config would change it (lr1 0.05 -> 0.01)" in line, line
    searched = yaml.safe_load(TINY.read_text())
    searched["search"]["asha"]["grace_period"] = 3
    other.write_text(yaml.safe_dump(searched, sort_keys=False))
    line = main_error(capsys, *resume(storage, "--config", str(other)))
    assert "--config would change it (search.asha.grace_period 2 -> 3)" in line, line


def test_flags_that_change_nothing_are_accepted_and_said_to_be_not_needed(storage, ran, capsys, teacher_path):
    import tune_refilled
    from refilled.store.layout import TEACHER_FILE

    assert tune_refilled.main(resume(storage, "--config", str(TINY), "--tau1", "4", "--num-samples", "8",
                                     "--cpus-per-trial", "1")) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"note: --resume continues {storage / NAME} as it was written: --config, --tau1, --num-samples, "
                   "--cpus-per-trial are not needed (the same as its experiment.yaml)"], err
    assert len(ran) == 1

    # a plain --resume says nothing; --teacher is used only where the experiment has no teacher yet
    assert tune_refilled.main(resume(storage, "--teacher", str(teacher_path))) == 0
    assert capsys.readouterr().err == ""
    (storage / NAME / TEACHER_FILE).write_bytes(teacher_path.read_bytes())
    assert tune_refilled.main(resume(storage, "--teacher", str(teacher_path))) == 0
    assert capsys.readouterr().err.strip() == (f"note: --teacher is not used: {storage / NAME} has its teacher.pt, "
                                               "the teacher its trials were trained with")
