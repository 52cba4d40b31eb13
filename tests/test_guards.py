"""The guards every command shares (issue 30): the paths a user gives (refilled.store.paths),
what a failed command leaves, one writer per experiment, the operating system's refusals and
every message as one line (refilled.errors).

Every refusal here: exit code 2, one line on stderr, no traceback, nothing changed outside the
command's output. All of it in this process and without Ray (a search's Ray start is replaced),
so these run in the fast tier; the retrains that run train the tiny config (a second each).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import tune_refilled
from refilled.errors import UserError, one_line, os_error_line
from refilled.store import experiment_file, paths
from refilled.store.layout import LEASE_FILE, LOCK_FILE
from refilled.store.lease import lease_at
from refilled.store.storage import Place
from support.configs import REPO, make_tiny_config
from support.searches import LEASE_ENV, LEASE_TIMEOUT, TINY, main_error, tree


@pytest.fixture(autouse=True)
def ray_never_starts(monkeypatch):
    """A search that should have been refused fails here at once instead of running."""
    from refilled.tune import search

    def connect(*args, **kwargs):
        raise AssertionError("a search went on to start Ray")

    monkeypatch.setattr(search, "connect", connect)


@pytest.fixture(scope="module")
def made(tmp_path_factory, teacher_path) -> Path:
    """An experiment whose one trial ended (both stages), as a search leaves it."""
    folder = tmp_path_factory.mktemp("guards") / "exp"
    folder.mkdir()
    experiment_file.write(Place(folder), make_tiny_config(), {"num_samples": 1, "space": {"tau1": {"loguniform": [0.5, 16]}}})
    shutil.copyfile(teacher_path, folder / "teacher.pt")
    trial = folder / "trial_abc"
    trial.mkdir()
    (trial / "params.json").write_text(json.dumps({"tau1": 2.0}))
    rows = [{"step": s, "total_steps": 5, "stage": "stage1" if s <= 2 else "stage2", "val_accuracy": 0.1 * s,
             "trial_id": "abc"} for s in range(1, 6)]
    (trial / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (trial / "trial_record.json").write_text(json.dumps({"trial_id": "abc", "number": 1, "status": "finished",
                                                         "step": 5, "total_steps": 5}))
    return folder


@pytest.fixture
def exp(made, tmp_path) -> Path:
    target = tmp_path / "storage" / made.name
    shutil.copytree(made, target)
    return target


def search_args(storage: Path, name: str, *more: str) -> list[str]:
    return ["search", "--config", str(TINY), "--storage", str(storage), "--name", name, *more]


def analysis(script: str, *args: str) -> int:
    import importlib

    from analysis.common import run_cli

    return run_cli(importlib.import_module(f"analysis.{script}").main, list(args))


def one_error_line(capsys, code: int, *needles: str) -> str:
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, out, err)
    assert "Traceback" not in out + err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- 3: --name, --out

@pytest.mark.parametrize("name,why", [
    ("..", "names a folder above"), (".", "names a folder above"), ("", "is empty"), ("/abs", "holds a '/'"),
    ("a/b", "holds a '/'"), ("two\nlines", "control character"), ("tab\there", "control character"),
    ("é" * 200, "400 bytes long"),
])
def test_a_name_is_one_folder_name(tmp_path, capsys, name, why):
    storage = tmp_path / "NEW" / "inner"
    line = main_error(capsys, *search_args(storage, name))
    assert "--name" in line and why in line, line
    assert not (tmp_path / "NEW").exists()  # `--name ..` wrote into NEW before
    assert not Path("/abs").exists()


def test_out_is_never_the_repository_or_its_code(exp, capsys, tiny_yaml, teacher_path):
    train = ["train", "--config", str(tiny_yaml), "--teacher", str(teacher_path)]
    before = sorted(p.name for p in REPO.iterdir())
    for out, said in [(REPO, "the repository itself"), (REPO / "refilled", "refilled/ folder"),
                      (REPO / "analysis" / "x", "analysis/ folder"), (REPO.parent, "holds the repository")]:
        for force in ([], ["--force"]):
            main_error(capsys, *train, "--out", str(out), *force)
            one_error_line(capsys, analysis("report", str(exp), "--out", str(out), *force), said)
    main_error(capsys, "pretrain", "--config", str(tiny_yaml), "--out", str(REPO / "teacher.pt"), "--force")
    main_error(capsys, "pretrain", "--config", str(tiny_yaml), "--out", str(REPO / "tests" / "t.pt"))
    assert sorted(p.name for p in REPO.iterdir()) == before and not (REPO / "analysis" / "x").exists()


def test_retrain_never_writes_into_the_experiment_it_reads(exp, tmp_path, capsys):
    before = tree(exp.parent)
    for out in (exp, exp / "trial_abc", exp / "trial_abc" / "deeper"):
        for force in ([], ["--force"]):
            line = main_error(capsys, "retrain", "--experiment", str(exp), "--seeds", "1", "--out", str(out), *force)
            assert "experiment" in line and "--force does not change this" in line, line
    for script in ("report", "plot_trials", "compare_trials", "selection_cost"):
        one_error_line(capsys, analysis(script, str(exp), "--out", str(exp)), "is the experiment")
        one_error_line(capsys, analysis(script, str(exp), "--out", str(exp / "trial_abc"), "--force"),
                       "which is the experiment's own")
    assert tree(exp.parent) == before
    # a new folder inside it is not the experiment's (the README's `--out experiments/digits/report`)
    assert analysis("compare_trials", str(exp), "--out", str(exp / "report")) == 0
    assert analysis("compare_trials", str(exp), "--out", str(exp / "report")) == 0  # its own, again
    assert {k: v for k, v in tree(exp.parent).items() if "/report/" not in f"/{k}"} == before
    capsys.readouterr()


def test_retrain_out_of_the_user_is_refused_without_force_and_its_own_is_written_again(exp, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.md").write_text("my summary")
    args = ["retrain", "--experiment", str(exp), "--seeds", "1", "--no-baseline"]
    main_error(capsys, *args, "--out", str(mine))
    assert [p.name for p in mine.iterdir()] == ["summary.md"] and (mine / "summary.md").read_text() == "my summary"
    out = tmp_path / "deeper" / "retrained"
    assert tune_refilled.main([*args, "--out", str(out)]) == 0
    assert (out / "results.json").is_file() and paths.is_ours(out)
    capsys.readouterr()
    main_error(capsys, *args, "--out", str(out))  # its own results: replaced only with --force
    assert tune_refilled.main([*args, "--out", str(out), "--force"]) == 0
    capsys.readouterr()


def test_a_train_rerun_writes_into_its_own_folder(tmp_path, capsys, monkeypatch, tiny_yaml, teacher_path):
    from refilled.runs import single_run

    def trained(cfg, out, **kw):
        (out / "metrics.json").write_text("{}")
        return {"test_accuracy": 0.5}

    monkeypatch.setattr(single_run, "train_once", trained)
    out = tmp_path / "run"
    args = ["train", "--config", str(tiny_yaml), "--teacher", str(teacher_path), "--out", str(out)]
    assert tune_refilled.main(args) == 0 and tune_refilled.main(args) == 0  # no --force: the folder is its own
    assert sorted(p.name for p in out.iterdir()) == [paths.MARK, "metrics.json"]
    assert "tensorboard --logdir" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 4: what a failure leaves

def test_a_teacher_of_another_architecture_is_refused_before_anything_is_written(tmp_path, capsys, search_teacher):
    line = main_error(capsys, *search_args(tmp_path / "s", "x", "--teacher", str(search_teacher), "--teacher_depth", "16"))
    assert "depth=16" in line and not (tmp_path / "s").exists()


@pytest.fixture
def no_ray(monkeypatch):
    """A search's run() without Ray: no connection, no resource checks."""
    from refilled.tune import search

    for name in ("connect", "check_resources", "check_local_gpus"):
        monkeypatch.setattr(search, name, lambda *a, **k: None)


def full_disk(cfg, place, teacher):
    """The teacher written into the experiment on a disk that is full: the operating system's
    own ENOSPC (from /dev/full), met where the atomic write writes."""
    place.write("teacher.pt", lambda f: Path("/dev/full").write_bytes(b"a teacher"))


@pytest.mark.parametrize("at", ["folder", "uri"])
def test_a_new_search_that_fails_before_its_first_trial_leaves_no_experiment(tmp_path, capsys, monkeypatch, no_ray,
                                                                            at, search_teacher):
    from refilled.tune import trial_inputs

    monkeypatch.setattr(trial_inputs, "prepare_teacher", full_disk)
    monkeypatch.setenv("TUNE_REFILLED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(LEASE_ENV, str(LEASE_TIMEOUT))  # a lease at a URI settles a tenth of it before it is held
    storage = str(tmp_path / "s") if at == "folder" else f"file://{tmp_path / 's'}"
    for _ in range(2):  # the rerun meets the same error, not "already exists: pass --resume"
        line = main_error(capsys, *search_args(storage, "exp", "--teacher", str(search_teacher)))
        assert "exp/teacher.pt: no space left on the device" in line, line
        assert not Place.named(storage, "exp").exists() and not (tmp_path / "s" / "exp").exists()


@pytest.mark.parametrize("trial_began", [True, False])
def test_a_search_whose_first_trial_began_keeps_its_experiment(tmp_path, capsys, monkeypatch, no_ray, search_teacher,
                                                               trial_began):
    """Once a trial has begun the experiment is kept whatever happens (`--resume` continues it);
    a Tune run that fails before any trial began leaves nothing, as a failed set-up does."""
    from refilled.tune import search

    folder = tmp_path / "s" / "exp"

    class Failing:
        def fit(self):
            if trial_began:
                (folder / "trial_abc").mkdir()
                (folder / "trial_abc" / "params.json").write_text("{}")
            raise RuntimeError("Ray failed")

    monkeypatch.setattr(search.SearchRun, "_tuner", lambda *a: Failing())
    monkeypatch.setattr(search.METHOD.__class__, "trainable_for", lambda *a: None)
    with pytest.raises(RuntimeError, match="Ray failed"):
        tune_refilled.main(search_args(tmp_path / "s", "exp", "--teacher", str(search_teacher)))
    if trial_began:
        assert (folder / "experiment.yaml").is_file() and (folder / "teacher.pt").is_file()
        assert not (folder / LEASE_FILE).exists() and not (folder / LOCK_FILE).exists()
    else:
        assert not (tmp_path / "s").exists()
    capsys.readouterr()


def test_a_killed_analysis_script_leaves_nothing_that_blocks_the_rerun(exp, tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process that is gone
    (out / f"{paths.PARTIAL}{gone.pid}-abc").mkdir()
    (out / f"{paths.PARTIAL}{gone.pid}-abc" / "trials.csv").write_text("half")
    (out / ".partial-x1y2z3").mkdir()  # an earlier version's, which names no process
    live = out / f"{paths.PARTIAL}{os.getpid()}-live"  # a script running now: left alone
    live.mkdir()
    assert analysis("compare_trials", str(exp), "--out", str(out)) == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir() if p.name.startswith(".")} == {paths.MARK, live.name}
    assert (out / "trials.csv").is_file()
    capsys.readouterr()


# ----------------------------------------------------------------------------- 5: one writer per experiment

def test_retrain_into_the_experiment_holds_its_lease(exp, tmp_path, capsys, monkeypatch):
    from refilled.tune import retrain_runner

    args = ["retrain", "--experiment", str(exp), "--seeds", "1", "--no-baseline"]
    other = lease_at(str(exp), timeout=30, command="retrain")  # another retrain, now
    other.acquire()
    try:
        before = tree(exp)
        line = main_error(capsys, *args)
        assert "in use by a retrain writing into it" in line and tree(exp) == before
        line = main_error(capsys, "search", "--resume", "--name", exp.name, "--storage", str(exp.parent))
        assert "in use by a retrain writing into it" in line
    finally:
        other.release()
    seen = []

    def runs(arms, teacher, seeds, out_dir, done):
        seen.append(json.loads((exp / LEASE_FILE).read_text())["command"])
        raise KeyboardInterrupt

    monkeypatch.setattr(retrain_runner, "retrain_local", runs)
    assert tune_refilled.main(args) == 130  # Ctrl-C: the lease is released
    assert seen == ["retrain"] and not (exp / LEASE_FILE).exists() and not (exp / LOCK_FILE).exists()
    capsys.readouterr()


# ----------------------------------------------------------------------------- 6: the operating system's refusals

def real_errors(tmp_path: Path) -> dict[int, OSError]:
    """Real OSErrors of real file operations (as root, permissions are not denied: /sys is)."""
    found = {}
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    tries = [lambda: (tmp_path / "a" / "x").mkdir(parents=True), lambda: (tmp_path / ("n" * 300)).mkdir(),
             lambda: Path("/dev/full").write_bytes(b"x"), lambda: Path("/sys/x").write_text("x"),
             lambda: os.mkdir("/sys/x")]
    for attempt in tries:
        try:
            attempt()
        except OSError as e:
            found[e.errno] = e
    found[errno.EROFS] = OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/x")
    return found


def test_every_refusal_of_the_operating_system_is_one_line(tmp_path):
    found = real_errors(tmp_path)
    said = {errno.ELOOP: "symbolic links", errno.ENAMETOOLONG: "file name too long", errno.ENOSPC: "no space left",
            errno.EACCES: "permission denied", errno.EPERM: "not permitted", errno.EROFS: "read-only file system"}
    assert set(said) <= set(found), found
    for number, words in said.items():
        line = os_error_line(found[number])
        assert line is not None and words in line and "\n" not in line, line
        if found[number].filename:
            assert line.startswith(one_line(str(found[number].filename))[:100])
    assert os_error_line(OSError(errno.ECONNREFUSED, "refused")) is None  # not the file system's: a bug, traced


@pytest.mark.parametrize("case", ["loop", "long"])
def test_a_refusal_of_the_operating_system_ends_every_command_in_one_line(tmp_path, capsys, case, exp, tiny_yaml,
                                                                          teacher_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    out = tmp_path / "a" / "out" if case == "loop" else tmp_path / ("n" * 300)
    words = "symbolic links" if case == "loop" else "file name too long"
    before = tree(exp.parent)
    main_error(capsys, "train", "--config", str(tiny_yaml), "--teacher", str(teacher_path), "--out", str(out))
    line = main_error(capsys, "retrain", "--experiment", str(exp), "--seeds", "1", "--out", str(out))
    assert words in line and "…" in line or case == "loop", line
    main_error(capsys, "pretrain", "--config", str(tiny_yaml), "--out", str(out / "t.pt"))
    for script in ("report", "plot_trials", "compare_trials", "selection_cost"):
        one_error_line(capsys, analysis(script, str(exp), "--out", str(out)), words)
    one_error_line(capsys, analysis("report", str(exp), "--out", "/sys/x"), "/sys/x")
    assert tree(exp.parent) == before


def test_a_search_on_a_storage_it_cannot_reach_is_refused_before_ray_starts(tmp_path, capsys):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    line = main_error(capsys, *search_args(tmp_path / "a" / "s", "x"))
    assert f"{tmp_path}/a/s/x: too many levels of symbolic links" in line
    line = main_error(capsys, *search_args(tmp_path / "s", "n" * 255 + "é"))
    assert "257 bytes long" in line and "…" in line


def test_a_full_disk_names_the_output_it_was_writing(tmp_path, capsys, monkeypatch, tiny_yaml, teacher_path):
    """A write that fails on a full disk names no file (the operating system's ENOSPC from
    /dev/full): the command says which output it was writing, and leaves nothing there."""
    from refilled.runs import single_run

    monkeypatch.setattr(single_run, "train_once", lambda cfg, out, **kw: Path("/dev/full").write_bytes(b"events"))
    out = tmp_path / "run"
    line = main_error(capsys, "train", "--config", str(tiny_yaml), "--teacher", str(teacher_path), "--out", str(out))
    assert f"{out}: no space left on the device" in line and not out.exists()


def test_a_usage_error_of_an_analysis_script_is_one_line(capsys):
    from analysis.report import main

    with pytest.raises(SystemExit) as ended:
        main(["exp", "--bogus\nvalue"])
    out, err = capsys.readouterr()
    assert ended.value.code == 2 and err.splitlines() == [err.strip()] and "--bogus\\nvalue" in err, err


def test_sizes_are_refused_by_meaning_before_anything_is_made(exp, tmp_path, capsys):
    main_error(capsys, "retrain", "--experiment", str(exp), "--seeds", "1000000000")
    main_error(capsys, "retrain", "--experiment", str(exp), "--seeds", "0")
    line = main_error(capsys, *search_args(tmp_path / "s", "x", "--num-samples", "1000000000"))
    assert "num_samples must be <= 100000" in line
    line = main_error(capsys, *search_args(tmp_path / "s", "x", "--n_training_epochs2", "1000000000"))
    assert "<= 10000" in line
    assert not (exp / "retrain").exists() and not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------- 8: messages

def test_a_message_is_one_line_whatever_the_values_hold(tmp_path, capsys, monkeypatch):
    long = "x" * 5000
    line = one_line(f"bad value 'a\nb\r\x1b[31m\u2028' and {long}")
    assert line.splitlines() == [line] and "a\\nb\\r\\x1b[31m\\u2028" in line
    assert len(line) < 300 and "…" in line
    # through the command line: the error of a command whose message holds them
    from refilled.tune import commands

    def refuses(args):
        raise UserError(f"--name 'ëxp\nüber' {long}")

    monkeypatch.setattr(commands, "cmd_retrain", refuses)
    line = main_error(capsys, "retrain", "--experiment", "x")
    assert "ëxp\\nüber" in line and "…" in line and len(line) < 300


def test_a_suggested_command_is_shell_quoted(tmp_path):
    from refilled.store.lease import Lease
    from refilled.tune.search import SearchRun

    run = SearchRun(make_tiny_config(), None, Place.named(str(tmp_path / "my storage"), "ëxp über"), Lease.__new__(Lease))
    assert run.resume_command().endswith(f"--resume --name 'ëxp über' --storage '{tmp_path}/my storage'")


def test_the_ledger_says_its_note_once(exp, capsys):
    from refilled.store import cost

    (exp / "trial_abc" / "result.json").write_bytes(np.random.default_rng(0).bytes(300))
    for _ in range(3):
        cost.ledger(exp)
    notes = [line for line in capsys.readouterr().err.splitlines() if "left out of the ledger" in line]
    assert len(notes) == 1, notes


def test_no_font_warning_on_stderr(made, tmp_path, capsys):
    odd = tmp_path / "中文实验 ✓"  # glyphs matplotlib's default font lacks
    shutil.copytree(made, odd)
    assert analysis("plot_trials", str(odd), "--out", str(tmp_path / "plots")) == 0
    err = capsys.readouterr().err
    assert "Glyph" not in err and "findfont" not in err and "Warning" not in err, err
