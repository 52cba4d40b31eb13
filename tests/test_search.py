"""`tune_refilled.py search` for real: local Ray, Optuna, ASHA, files on disk.

Every search runs the CLI as a subprocess, as users run it, on the tiny
experiment in tests/search_tiny.yaml (digits, WRN-10-1, 2 + 4 epochs): those
tests are marked `slow`. Bad input that is refused before Ray starts runs the
CLI's main() in this process (the fast tier). Each
run gets its own Ray temp dir (RAY_TMPDIR) and a marker in its environment
that every Ray process it starts inherits, so a test can end exactly the Ray
processes of its own run (by pid) without `ray stop`, which would end every
Ray on the machine.

One finished search (`experiment`, module scope) is shared by the end-to-end
checks; the other searches take search_tiny.yaml's teacher, pretrained once per
session (conftest.search_teacher), with `--teacher`. The tests that kill a driver
and resume are in tests/test_resume.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "search_tiny.yaml"
MARKER = "TUNE_REFILLED_TEST_RUN"
CRASH_ENV = "TUNE_REFILLED_CRASH_ONCE_AT_STEP"
CRASH_MARKERS_ENV = "TUNE_REFILLED_CRASH_MARKERS"
SEARCHED = ["tau1", "tau2", "lambd", "lr1", "lr2", "flag_merge"]
TOTAL_STEPS = 6  # n_training_epochs1 + n_training_epochs2 of search_tiny.yaml
SEARCH_TIMEOUT = 420
# Every driver a test starts holds its lease with this timeout (refilled.lease): a driver
# these tests kill is taken over by a resume this many seconds later, not 120
LEASE_TIMEOUT = 3.0
LEASE_ENV = "TUNE_REFILLED_LEASE_TIMEOUT"


# ----------------------------------------------------------------------------- processes

def _marked_pids(marker: str) -> list[int]:
    """Pids of the live processes whose environment carries MARKER=marker."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(entry))
    return pids


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def kill_marked(marker: str, timeout: float = 30.0) -> None:
    """SIGKILL every process of one run (found by its marker), and wait until they are gone."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in _marked_pids(marker) if not _is_zombie(p)]
        if not alive:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"processes of test run {marker} survive SIGKILL: {alive}")
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


class RayRun:
    """The environment of one Ray-using command: its own Ray temp dir and a marker."""

    def __init__(self, **extra_env: str):
        self.marker = uuid.uuid4().hex
        # short: Ray puts unix sockets under it (at most 107 characters)
        self.tmp = tempfile.mkdtemp(prefix="trt-", dir="/tmp")
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", CRASH_ENV, CRASH_MARKERS_ENV)}
        env.update({MARKER: self.marker, "RAY_TMPDIR": self.tmp, "PYTHONUNBUFFERED": "1",
                    "RAY_USAGE_STATS_ENABLED": "0", LEASE_ENV: str(LEASE_TIMEOUT)})
        env.update(extra_env)
        self.env = env

    def popen(self, args: list[str]) -> subprocess.Popen:
        return subprocess.Popen(args, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)

    def run(self, args: list[str], timeout: float = SEARCH_TIMEOUT) -> SimpleNamespace:
        """Run to the end (its whole process group is killed if it overruns), then end
        whatever Ray processes of this run are left."""
        proc = self.popen(args)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            self.cleanup()
            raise AssertionError(f"{' '.join(args[1:4])} did not end within {timeout}s; stderr tail:\n{err[-3000:]}")
        self.cleanup()
        return SimpleNamespace(returncode=proc.returncode, stdout=out, stderr=err)

    def cleanup(self) -> None:
        kill_marked(self.marker)
        shutil.rmtree(self.tmp, ignore_errors=True)


def kill_when(run: RayRun, args: list[str], ready, what: str, settle: float = 0.0,
              wait_stale: bool = True) -> SimpleNamespace:
    """Start a search and SIGKILL its driver (and its process group) once ready() holds
    and `settle` seconds more have passed; end the run's Ray processes too, and (unless
    `wait_stale` is False) wait until the lease the driver could not release is stale
    (LEASE_TIMEOUT). Returns the driver's exit status and pid, and `killed_at`, when it was
    killed (time.monotonic()). `settle`: at a URI, ready() sees files that Tune's upload of its
    state brought, and a kill in the middle of that upload leaves a truncated state that
    Tune cannot resume from (README, "If the driver dies"): the upload is given time to end."""
    driver = run.popen(args)
    try:
        deadline = time.monotonic() + SEARCH_TIMEOUT
        while not ready():
            assert driver.poll() is None, f"the search ended before it could be killed: {driver.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, f"{what} did not happen in time"
            time.sleep(0.5)
        time.sleep(settle)
        os.killpg(driver.pid, signal.SIGKILL)
        killed = time.monotonic()
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.communicate()
        run.cleanup()
    if wait_stale:
        time.sleep(max(0.0, killed + LEASE_TIMEOUT + 0.5 - time.monotonic()))
    return SimpleNamespace(returncode=driver.returncode, pid=driver.pid, killed_at=killed)


def cli(*args: str) -> list[str]:
    return [sys.executable, "tune_refilled.py", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def explain(result: SimpleNamespace) -> str:
    return f"exit {result.returncode}\n--- stdout tail\n{result.stdout[-3000:]}\n--- stderr tail\n{result.stderr[-5000:]}"


# ----------------------------------------------------------------------------- experiment files

def tiny_experiment(tmp: Path, name: str, config: dict | None = None, search: dict | None = None) -> Path:
    """search_tiny.yaml with changes to its config and search sections, as `<tmp>/<name>.yaml`."""
    data = yaml.safe_load(TINY.read_text())
    data["config"].update(config or {})
    for key, value in (search or {}).items():
        if isinstance(value, dict) and isinstance(data["search"].get(key), dict) and key != "space":
            data["search"][key].update(value)
        else:
            data["search"][key] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def trial_folders(folder: Path) -> list[Path]:
    return sorted(p.parent for p in folder.glob("*/params.json"))


def record(trial_folder: Path) -> dict:
    """The trial's own record (refilled.trial_records), as the search wrote it."""
    return json.loads((trial_folder / "trial_record.json").read_text())


def trial_number(trial_folder: Path) -> int:
    """The order Tune created the trial in, from 1 (its record's number)."""
    assert trial_folder.name == f"trial_{record(trial_folder)['trial_id']}", trial_folder.name  # named by us
    return record(trial_folder)["number"]


def results(trial_folder: Path) -> list[dict]:
    path = trial_folder / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def params(trial_folder: Path) -> dict:
    return json.loads((trial_folder / "params.json").read_text())


def same_params(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k] == b[k] if isinstance(a[k], (bool, str)) or isinstance(b[k], (bool, str))
        else math.isclose(a[k], b[k], rel_tol=1e-9) for k in a)


def finished(trial_folder: Path) -> bool:
    rows = results(trial_folder)
    return bool(rows) and not rows[-1].get("diverged") and rows[-1]["step"] == rows[-1]["total_steps"]


def saved_state(folder: Path) -> tuple[dict[str, str], dict[str, str]]:
    """What Tune's last saved experiment state holds, as the trials' records note it at
    each save: {trial folder: status} and {trial folder: the checkpoint a resume starts it
    from}. A trial created after that save has no such note."""
    saved, resumable = {}, {}
    for tf in trial_folders(folder):
        at_save = record(tf).get("at_last_save") if (tf / "trial_record.json").is_file() else None
        if at_save:
            saved[tf.name] = at_save["status"]
            if at_save.get("checkpoint"):
                resumable[tf.name] = at_save["checkpoint"]
    return saved, resumable


def check_run_again_from_saved_state(folder: Path, before: dict[str, list[dict]], saved: dict[str, str],
                                     resumable: dict[str, str]) -> None:
    """After a kill and a resume: Ray saves its experiment state every 10 s or more, and a
    resume goes on from that state. The trials it has as ended were not run again; the
    others (running, or finished after that save) ran again from the checkpoint it knew
    (a result names the checkpoint saved with it), and each epoch run twice reported the
    same both times (the checkpoint holds every random state); a trial it did not know was
    set aside and its configuration run anew. `before`: each trial's results at the kill."""
    def measured(row: dict) -> tuple:
        return row["step"], row["val_accuracy"], row["loss"]

    for name, rows in before.items():
        if name not in saved:
            assert (folder / "interrupted_trials" / name).is_dir() and not (folder / name).exists(), name
            assert any(same_params(params(tf), rows[-1]["config"]) for tf in trial_folders(folder)), name
            continue
        now = results(folder / name)
        assert now[-1]["trial_id"] == rows[-1]["trial_id"], name
        assert [measured(r) for r in now[:len(rows)]] == [measured(r) for r in rows], name
        again = now[len(rows):]
        if saved[name] in ("finished", "stopped", "diverged", "errored"):
            assert not again, name
            continue
        restart = 1
        if name in resumable:
            saved_at = [r["step"] for r in rows if r.get("checkpoint_dir_name") == resumable[name]]
            assert saved_at, (name, resumable[name], "is not among the results stored before the kill")
            restart = saved_at[0] + 1
        assert [r["step"] for r in again] == list(range(restart, rows[-1]["total_steps"] + 1)), (name, resumable.get(name))
        twice = [r for r in again if r["step"] <= len(rows)]
        assert [measured(r) for r in twice] == [measured(rows[r["step"] - 1]) for r in twice], name


def study(folder: Path):
    import optuna

    return optuna.load_study(study_name=folder.name, storage=f"sqlite:///{folder / 'optuna.db'}")


def optuna_trial_for(trials, values: dict):
    matches = [t for t in trials if same_params(t.params, values)]
    assert len(matches) == 1, f"{len(matches)} Optuna trials have params {values}"
    return matches[0]


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under a folder with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- the shared search

@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> SimpleNamespace:
    """search_tiny.yaml searched to the end: 8 trials, 2 at a time, ASHA and Optuna."""
    storage = tmp_path_factory.mktemp("storage")
    run = RayRun()
    result = run.run(cli("search", "--config", str(TINY), "--storage", str(storage), "--name", "tiny"))
    assert result.returncode == 0, explain(result)
    folder = storage / "tiny"
    return SimpleNamespace(folder=folder, storage=storage, result=result, teacher=folder / "teacher.pt")


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT + 120)
def test_search_end_to_end(experiment):
    folder, out = experiment.folder, experiment.result.stdout
    cfg = yaml.safe_load(TINY.read_text())["config"]
    n = yaml.safe_load(TINY.read_text())["search"]["num_samples"]

    # trials.csv: one row per trial; ASHA stopped some at a rung, others ran every epoch
    table = pd.read_csv(folder / "trials.csv")
    assert len(table) == n
    assert set(table["status"]) <= {"finished", "stopped"}, table["status"].tolist()
    statuses = table["status"].value_counts().to_dict()
    assert statuses.get("stopped", 0) >= 1 and statuses.get("finished", 0) >= 1, statuses
    assert set(table.loc[table["status"] == "stopped", "epochs"]) <= {2, 4}  # ASHA's rungs (grace 2, factor 2)
    assert (table.loc[table["status"] == "finished", "epochs"] == TOTAL_STEPS).all()

    # the trial folders agree with the table, and each holds its record
    folders = trial_folders(folder)
    assert len(folders) == n
    assert sorted(trial_number(tf) for tf in folders) == list(range(1, n + 1))
    for tf in folders:
        rows = results(tf)
        assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
        row = table[table["trial_id"] == rows[-1]["trial_id"]].iloc[0]
        assert row["status"] == ("finished" if rows[-1]["step"] == TOTAL_STEPS else "stopped")
        rec = record(tf)
        assert rec["trial_id"] == rows[-1]["trial_id"] and rec["status"] == row["status"], rec
        assert rec["step"] == rows[-1]["step"] and rec["total_steps"] == TOTAL_STEPS
        assert rec["stopped_at"] == (rows[-1]["step"] if row["status"] == "stopped" else None)
        assert rec["checkpoint"] == rows[-1]["checkpoint_dir_name"] and (tf / rec["checkpoint"]).is_dir()
        assert rec["at_last_save"] == {"status": row["status"], "checkpoint": rec["checkpoint"]}
        # the last keep_checkpoints (2) checkpoints are kept, the newest (last epoch) among them
        kept = sorted(p.name for p in tf.glob("checkpoint_*"))
        assert len(kept) == min(2, len(rows)) and kept[-1] == f"checkpoint_{len(rows) - 1:06d}", (tf.name, kept)

    # the Optuna study: pruned for the stopped trials, complete for the finished ones
    import optuna

    ot_trials = study(folder).trials
    assert len(ot_trials) == n
    states = [t.state for t in ot_trials]
    assert states.count(optuna.trial.TrialState.PRUNED) == statuses["stopped"]
    assert states.count(optuna.trial.TrialState.COMPLETE) == statuses["finished"]
    for tf in folders:
        ot = optuna_trial_for(ot_trials, params(tf))
        want = optuna.trial.TrialState.COMPLETE if finished(tf) else optuna.trial.TrialState.PRUNED
        assert ot.state == want, (tf.name, ot.state)
        if want == optuna.trial.TrialState.COMPLETE:  # told the last stage-2 validation accuracy
            assert ot.value == pytest.approx(results(tf)[-1]["val_accuracy"])

    # start_with: config: the first trial is the config's own values
    first = min(folders, key=trial_number)
    assert trial_number(first) == 1
    assert same_params(params(first), {k: cfg[k] for k in SEARCHED})
    assert ot_trials[0].number == 0 and same_params(ot_trials[0].params, {k: cfg[k] for k in SEARCHED})

    # the best config: best stage-2 validation accuracy among trials that reached stage 2
    def rank(tf):
        rows = results(tf)
        s1 = [r["val_accuracy"] for r in rows if r.get("stage") == "stage1"]
        s2 = [r["val_accuracy"] for r in rows if r.get("stage") == "stage2"]
        return (max(s2), s2[-1], max(s1)) if s2 else None

    ranked = {tf: rank(tf) for tf in folders if rank(tf) is not None}
    assert ranked and len(ranked) < n  # some trials were stopped in stage 1 and cannot be chosen
    top = max(ranked.values())
    best_folders = [tf for tf, r in ranked.items() if r == top]
    from refilled.config import load_experiment

    best_cfg, _ = load_experiment(folder / "best_config.yaml")
    chosen = {k: getattr(best_cfg, k) for k in SEARCHED}
    assert any(same_params(chosen, params(tf)) for tf in best_folders), (chosen, [params(t) for t in best_folders])
    assert best_cfg.n_training_epochs2 == cfg["n_training_epochs2"] and best_cfg.target_classes == cfg["target_classes"]
    header = (folder / "best_config.yaml").read_text().splitlines()[0]
    assert f"{top[0]:.4f}" in header

    # TensorBoard: an event file per trial with a scalar per reported epoch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for tf in folders:
        events = list(tf.glob("events.out.tfevents.*"))
        assert events, f"no TensorBoard events in {tf.name}"
        acc = EventAccumulator(str(tf))
        acc.Reload()
        scalars = acc.Tags()["scalars"]
        assert "ray/tune/val_accuracy" in scalars and "ray/tune/loss" in scalars, scalars
        steps = [e.step for e in acc.Scalars("ray/tune/val_accuracy")]
        assert steps == list(range(1, len(results(tf)) + 1))

    # what the user sees at the end
    assert "trials, best stage-2 validation accuracy first" in out
    assert "chosen config (" in out and str(folder / "best_config.yaml") in out
    lines = out[out.index("best stage-2 validation accuracy first"):out.index("chosen config (")].splitlines()
    header = next(i for i, line in enumerate(lines) if "best_val_accuracy_stage2" in line)
    rows = [line.split() for line in lines[header + 1:] if line.strip()]
    assert len(rows) == n and all(r[-1] in ("finished", "stopped") for r in rows), rows
    shown = [r[-3] for r in rows]  # best_val_accuracy_stage2, then epochs and status
    numbers = [float(v) for v in shown if v != "-"]
    assert numbers and numbers == sorted(numbers, reverse=True), shown
    assert shown[len(numbers):] == ["-"] * (len(shown) - len(numbers)), shown


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT + 120)
def test_search_says_where_its_rungs_are_and_how_well_they_ranked(experiment):
    folder, out = experiment.folder, experiment.result.stdout
    assert "ASHA rungs at 2, 4 (epochs of both stages, of 6; keeps 1 in 2 at each)" in out
    # the rung is in stage 1 (NCM), which the start-up warning says, with a later rung to use
    assert "warning: the first ASHA rung (epoch 2) is in stage 1" in experiment.result.stderr
    # every report carries the clock that places ASHA's decisions at the rungs
    from refilled.tune.rungs import clock, correlations, experiment_curves

    for tf in trial_folders(folder):
        assert [r["rung_clock"] for r in results(tf)] == [clock(r["step"], [2, 4], 2, 6) for r in results(tf)]
    # the summary's correlations are those of the trials' own reports
    shown = out[out.index("ASHA's rungs, rank-correlated"):].splitlines()[1:]
    curves, rungs, end = experiment_curves(folder)
    assert rungs == [2, 4] and end == 6 and len(curves) == 8
    rows = correlations(curves, rungs, end)
    assert len(rows) == 3 and [r["trials"] for r in rows][0] == len(values_reaching(curves, 4))
    for row, line in zip(rows, shown):
        assert f"rung at epoch {row['rung']} vs {row['against']}:" in line and f"over {row['trials']} trials" in line


def values_reaching(curves, epoch):
    return [t for t, c in curves.items() if epoch in c]


@pytest.mark.slow
@pytest.mark.timeout(2 * SEARCH_TIMEOUT)
def test_reused_worker_processes_give_the_same_trials(experiment, tmp_path):
    """search.reuse_actors (on by default, as in the shared search) starts each trial in the
    worker process of one that ended; the same search with a fresh process per trial
    gives the same trials, losses and accuracies (its first 4 trials, to save time)."""
    config = tiny_experiment(tmp_path, "fresh", search={"reuse_actors": False, "num_samples": 4})
    storage = tmp_path / "storage"
    result = RayRun().run(cli("search", "--config", str(config), "--storage", str(storage),
                              "--teacher", str(experiment.teacher)))
    assert result.returncode == 0, explain(result)
    # ASHA's stops depend on which trial reaches a rung first, so compare each trial's
    # epochs: the same configuration reports the same losses and accuracies
    def curves(folder: Path) -> dict[tuple, list]:
        return {tuple(sorted(params(tf).items())): [(r["step"], r["val_accuracy"], r["loss"]) for r in results(tf)]
                for tf in trial_folders(folder)}

    reused, fresh = curves(experiment.folder), curves(storage / "fresh")
    # the same TPE proposals (its first ones are seeded draws): the first 4 of the shared 8
    assert len(fresh) == 4 and fresh.keys() <= reused.keys()
    for config, rows in fresh.items():
        common = min(len(rows), len(reused[config]))
        assert common >= 2 and rows[:common] == reused[config][:common], config
    pids = {tf.name: {r["pid"] for r in results(tf)} for tf in trial_folders(experiment.folder)}
    assert len(set().union(*pids.values())) < len(pids), pids  # the shared search did reuse processes


# ----------------------------------------------------------------------------- faults: a crash, a NaN

@pytest.fixture(scope="module")
def faults(search_teacher, tmp_path_factory) -> SimpleNamespace:
    """3 trials, each crashing once while at step 4 (max_failures 1), with a checkpoint
    every 2 steps. The first (start_with: config) has lr2 = 1e6: its stage-2 loss becomes NaN."""
    tmp = tmp_path_factory.mktemp("faults")
    config = tiny_experiment(
        tmp, "faults", config={"lr2": 1.0e6},
        search={"num_samples": 3, "max_concurrent": 2, "max_failures": 1, "asha": {"grace_period": TOTAL_STEPS},
                "checkpoint_every": 2,
                # seed 1 draws lr2 = 0.05 for trials 2 and 3 (the sampler is random for its first trials)
                "seed": 1, "space": {"tau1": {"loguniform": [0.5, 16]}, "lr2": {"choice": [0.05, 1.0e6]}}})
    storage = tmp / "storage"
    markers = tmp / "crash_markers"
    markers.mkdir()
    result = RayRun(**{CRASH_ENV: "4", CRASH_MARKERS_ENV: str(markers)}).run(
        cli("search", "--config", str(config), "--storage", str(storage), "--teacher", str(search_teacher)))
    assert result.returncode == 0, explain(result)
    folder = storage / "faults"
    folders = trial_folders(folder)
    first = min(folders, key=trial_number)
    assert params(first)["lr2"] == 1.0e6
    return SimpleNamespace(folder=folder, result=result, first=first, others=[f for f in folders if f != first],
                           table=pd.read_csv(folder / "trials.csv"), markers=markers)


@pytest.mark.slow
@pytest.mark.timeout(2 * SEARCH_TIMEOUT)
def test_crashed_trial_resumes_from_its_checkpoint(faults):
    assert len(faults.others) == 2
    sane = [tf for tf in faults.others if params(tf)["lr2"] != 1.0e6]
    assert sane, "the seeded sampler gave every trial the absurd lr2; change the seed"
    for tf in sane:
        assert (faults.markers / results(tf)[-1]["trial_id"]).exists(), tf.name
        rows = results(tf)
        steps = [r["step"] for r in rows]
        # crashed after computing step 4, before reporting it; retried from the step-2 checkpoint
        # (step 3 saved none): step 3 (stage 2's first epoch) ran twice and reported the
        # same both times, as the checkpoint holds every random state (data order, augmentation,
        # the transfer set's draws, dropout)
        assert steps == [1, 2, 3, 3, 4, 5, 6], steps
        assert [r["training_iteration"] for r in rows] == steps
        measured = ("stage", "stage_epoch", "lr", "loss", "loss/ce", "loss/local_kd", "loss/transfer_kd",
                    "val_accuracy", "best_val_accuracy_stage2")
        first, again = ({k: r[k] for k in measured} for r in rows if r["step"] == 3)
        assert first == again and first["stage"] == "stage2", (first, again)
        assert rows[1]["checkpoint_dir_name"] and rows[2]["checkpoint_dir_name"] is None
        assert finished(tf)
        row = faults.table[faults.table["trial_id"] == rows[-1]["trial_id"]].iloc[0]
        assert row["status"] == "finished" and row["epochs"] == TOTAL_STEPS
        assert record(tf)["retries"] == 1 and record(tf)["status"] == "finished", record(tf)
        # the injected crash happened there: Ray Tune recorded it (error.txt), then retried the trial
        assert any("injected crash at step 4" in p.read_text(errors="replace") for p in tf.glob("error*.txt")), \
            sorted(p.name for p in tf.iterdir())


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT)
def test_a_retried_trial_keeps_the_results_it_reported_before_its_crash(tmp_path):
    """Ray's loggers restart a retried trial's result.json from the storage copy, which
    may be behind (Tune copies it there now and then): the last results before the crash
    went missing. The script leaves the storage copy at step 1 when the trial restarts;
    result.json must still hold every step the trial reported."""
    script = str(REPO / "tests" / "retried_trial_logs.py")
    fixed = RayRun(PYTHONPATH=str(REPO)).run([sys.executable, script, str(tmp_path / "with")])
    assert "STEPS [1, 2, 3, 4]" in fixed.stdout, explain(fixed)


@pytest.mark.slow
@pytest.mark.timeout(2 * SEARCH_TIMEOUT)
def test_nan_trial_ends_as_diverged_and_the_search_goes_on(faults):
    import optuna

    table = faults.table
    first_row = table[table["trial_id"] == results(faults.first)[-1]["trial_id"]].iloc[0]
    assert first_row["status"] == "diverged"
    reason = str(first_row["diverged_reason"])
    assert "diverged" in reason and re.search(r"\b(nan|inf)\b", reason), reason
    last = results(faults.first)[-1]
    assert last["diverged"] == 1 and last["step"] < TOTAL_STEPS
    assert record(faults.first)["status"] == "diverged" and record(faults.first)["reason"] == reason

    ot_trials = study(faults.folder).trials
    assert len(ot_trials) == len(table) == 3
    assert optuna_trial_for(ot_trials, params(faults.first)).state == optuna.trial.TrialState.FAIL
    others = [tf for tf in faults.others if params(tf)["lr2"] != 1.0e6]
    for tf in others:  # the search went on: the other trials finished and count for Optuna
        assert finished(tf)
        assert optuna_trial_for(ot_trials, params(tf)).state == optuna.trial.TrialState.COMPLETE
    # the diverged trial is never the best config
    assert "diverged" not in (faults.folder / "best_config.yaml").read_text().splitlines()[0]
    assert "chosen config (" in faults.result.stdout


# ----------------------------------------------------------------------------- bad input

def assert_one_line_error(result: SimpleNamespace, *needles: str) -> str:
    assert result.returncode == 2, explain(result)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, explain(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, explain(result)
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def main_error(capsys, *args: str) -> str:
    """Run the CLI's main() in this process on input it must refuse before Ray starts:
    exit code 2 and one line on stderr; returns that line."""
    import tune_refilled

    code = tune_refilled.main(list(args))
    out, err = capsys.readouterr()
    return assert_one_line_error(SimpleNamespace(returncode=code, stdout=out, stderr=err))


@pytest.mark.parametrize("name, space, needles", [
    ("unknown_key", {"tau3": {"loguniform": [0.5, 16]}}, ["search.space.tau3", "unknown config key"]),
    ("low_above_high", {"tau1": {"loguniform": [16, 0.5]}}, ["search.space.tau1", "low must be below high"]),
    ("low_equals_high", {"tau2": {"uniform": [2, 2]}}, ["search.space.tau2", "low must be below high"]),
    ("log_of_zero", {"lr1": {"loguniform": [0, 0.1]}}, ["search.space.lr1", "> 0"]),
    ("negative_lambd", {"lambd": {"uniform": [-1, 1]}}, ["search.space.lambd", "-1"]),
])
def test_bad_search_space(tmp_path, capsys, name, space, needles):
    config = tiny_experiment(tmp_path, name, search={"space": space})
    storage = tmp_path / "storage"
    line = main_error(capsys, "search", "--config", str(config), "--storage", str(storage))
    assert all(needle in line for needle in needles), line
    assert not storage.exists()


def test_existing_experiment_needs_resume(tmp_path, capsys):
    storage = tmp_path / "storage"
    (storage / "tiny").mkdir(parents=True)
    shutil.copy(TINY, storage / "tiny" / "experiment.yaml")
    before = tree(storage)
    line = main_error(capsys, "search", "--config", str(TINY), "--storage", str(storage), "--name", "tiny")
    assert "already exists" in line and "--resume" in line, line
    assert tree(storage) == before


def test_a_warm_start_from_a_missing_experiment_is_refused_before_anything_is_written(tmp_path, capsys):
    config = tiny_experiment(tmp_path, "warm", search={"start_with": str(tmp_path / "no_such_experiment")})
    storage = tmp_path / "storage"
    line = main_error(capsys, "search", "--config", str(config), "--storage", str(storage))
    assert "no_such_experiment" in line, line
    assert not (storage / "warm").exists()


def test_resume_of_a_folder_that_is_no_experiment(tmp_path, capsys):
    storage = tmp_path / "storage"
    (storage / "notes").mkdir(parents=True)
    (storage / "notes" / "readme.txt").write_text("not an experiment")
    before = tree(storage)
    for name in ("notes", "missing"):
        line = main_error(capsys, "search", "--resume", "--name", name, "--storage", str(storage))
        assert "is not a tune-refilled experiment" in line and name in line, line
    assert tree(storage) == before and not (storage / "missing").exists()


def test_unreachable_address(tmp_path, capsys):
    storage = tmp_path / "storage"
    start = time.monotonic()
    line = main_error(capsys, "search", "--config", str(TINY), "--storage", str(storage),
                      "--address", f"127.0.0.1:{free_port()}")
    assert "cannot connect to the Ray cluster" in line and "--address 127.0.0.1:" in line, line
    assert time.monotonic() - start < 60
    assert not storage.exists()


@pytest.mark.parametrize("ray_address", ["", "127.0.0.1:{port}"])
def test_address_auto_without_a_cluster(tmp_path, capsys, monkeypatch, ray_address):
    """--address auto joins the cluster `ray start` runs here (or RAY_ADDRESS names): with none,
    one line at once. Ray keeps what `ray start` left under RAY_TMPDIR: an empty one here."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "ray"))
    if ray_address:
        monkeypatch.setenv("RAY_ADDRESS", ray_address.format(port=free_port()))
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    storage = tmp_path / "storage"
    start = time.monotonic()
    line = main_error(capsys, "search", "--config", str(TINY), "--storage", str(storage), "--address", "auto")
    assert "cannot connect to the Ray cluster at --address auto" in line, line
    assert time.monotonic() - start < 60
    assert not storage.exists()


def test_more_gpus_per_trial_than_this_machine_has(tmp_path, capsys):
    import torch

    storage = tmp_path / "storage"
    line = main_error(capsys, "search", "--config", str(TINY), "--storage", str(storage),
                      "--gpus-per-trial", "4096")
    assert "4096.0 GPU" in line and f"this machine has {torch.cuda.device_count()}" in line, line
    assert not storage.exists()


@pytest.mark.slow
@pytest.mark.timeout(2 * SEARCH_TIMEOUT)
def test_stage1_cache_is_shared_by_trials_with_equal_stage1_settings(search_teacher, tmp_path):
    """Only stage-2 keys are searched, so every trial's stage 1 is the same: the first
    trial computes and stores it, the others replay it (same stage-1 reports), and
    their stage-2 results still differ with lambd."""
    config = tiny_experiment(tmp_path, "cached", search={
        "num_samples": 3, "max_concurrent": 1, "asha": {"grace_period": TOTAL_STEPS},
        "space": {"lambd": {"loguniform": [0.1, 100]}}})
    storage = tmp_path / "storage"
    result = RayRun().run(cli("search", "--config", str(config), "--storage", str(storage),
                              "--teacher", str(search_teacher)))
    assert result.returncode == 0, explain(result)
    folders = sorted(trial_folders(storage / "cached"), key=trial_number)
    marks = [{r.get("stage1_cache") for r in results(tf) if r.get("stage") == "stage1"} for tf in folders]
    assert marks == [{"miss"}, {"hit"}, {"hit"}]
    stage1 = [[r["val_accuracy"] for r in results(tf) if r.get("stage") == "stage1"] for tf in folders]
    assert stage1[0] == stage1[1] == stage1[2] and len(stage1[0]) == 2
    assert all(results(tf)[-1]["step"] == TOTAL_STEPS for tf in folders)
    assert len(list((storage / "cached" / "stage1_cache").glob("*.pt"))) == 1


# ----------------------------------------------------------------------------- staged search

STAGED = {"staged": {"num_samples": 3, "asha": {"grace_period": 1, "reduction_factor": 2}}}
STAGE1_SEARCHED = ["tau1", "lr1", "flag_merge"]  # the stage-1-only keys of search_tiny.yaml's space


def check_staged(folder: Path, n: int, n1: int = 3) -> None:
    """What a finished staged search of search_tiny.yaml (n1 phase-1 and n phase-2 trials) must hold."""
    import optuna
    import torch

    from refilled import checkpoint
    from refilled.experiments import load_trials

    e1 = 2
    phase1 = folder / "stage1_search"
    firsts = trial_folders(phase1)
    assert len(firsts) == n1
    for tf in firsts:  # stage-1-only trials over the stage-1 keys
        assert sorted(params(tf)) == sorted(STAGE1_SEARCHED), params(tf)
        rows = results(tf)
        assert {r["stage"] for r in rows} == {"stage1"} and all(r["total_steps"] == e1 for r in rows)
    ranked = sorted((tf for tf in firsts if finished(tf)),
                    key=lambda tf: (results(tf)[-1]["val_accuracy"], max(r["val_accuracy"] for r in results(tf))),
                    reverse=True)
    chosen = ranked[0]
    data = yaml.safe_load((folder / "experiment.yaml").read_text())
    choice = data["stage1_choice"]
    assert choice["trial_id"] == results(chosen)[-1]["trial_id"]
    assert same_params(choice["values"], params(chosen))
    assert math.isclose(choice["val_ncm_accuracy"], results(chosen)[-1]["val_accuracy"], rel_tol=1e-6)
    # phase 2 starts from exactly that trial's end-of-stage-1 student (its newest checkpoint)
    assert record(chosen)["checkpoint"] == results(chosen)[-1]["checkpoint_dir_name"]
    newest = chosen / record(chosen)["checkpoint"]
    end_of_stage1 = checkpoint.load(newest / "state.pt", "checkpoint")
    start = checkpoint.load(folder / "stage1_choice.pt", "choice")["snapshot"]
    assert start["stage"] == end_of_stage1["stage"] == 1 and start["epoch"] == e1
    assert all(torch.equal(start["student"][k], end_of_stage1["student"][k]) for k in end_of_stage1["student"])

    seconds = trial_folders(folder)
    assert len(seconds) == n
    for tf in seconds:  # stage 2 only, from the chosen stage-1 values, steps going on from stage 1
        p = params(tf)
        assert same_params({k: p[k] for k in STAGE1_SEARCHED}, choice["values"])
        rows = results(tf)
        assert {r["stage"] for r in rows} == {"stage2"}
        assert [r["step"] for r in rows] == list(range(e1 + 1, e1 + 1 + len(rows)))
        assert [r["training_iteration"] for r in rows] == list(range(1, len(rows) + 1))
    table = load_trials(folder)
    assert (table["epochs_run"] == table["epochs"] - e1).all()
    best = yaml.safe_load((folder / "best_config.yaml").read_text())["config"]
    assert same_params({k: best[k] for k in STAGE1_SEARCHED}, choice["values"])
    # one Optuna study per phase, each over its own keys
    first_study = optuna.load_study(study_name=f"{folder.name}-stage1", storage=f"sqlite:///{phase1 / 'optuna.db'}")
    assert len(first_study.trials) == n1 and all(sorted(t.params) == sorted(STAGE1_SEARCHED) for t in first_study.trials)
    second = study(folder).trials
    assert len(second) == n and all(sorted(t.params) == ["lambd", "lr2", "tau2"] for t in second)


@pytest.mark.slow
@pytest.mark.timeout(3 * SEARCH_TIMEOUT)
def test_staged_search(search_teacher, tmp_path):
    """Phase 1 chooses tau1/lr1/flag_merge by NCM with stage-1-only trials; phase 2
    searches tau2/lambd/lr2, every trial starting stage 2 from that choice."""
    config = tiny_experiment(tmp_path, "staged", search={"num_samples": 4, **STAGED})
    storage = tmp_path / "storage"
    result = RayRun().run(cli("search", "--config", str(config), "--storage", str(storage),
                              "--teacher", str(search_teacher)))
    assert result.returncode == 0, explain(result)
    assert "phase 1 of 2" in result.stdout and "phase 1 chose tau1=" in result.stdout
    folder = storage / "staged"
    check_staged(folder, 4)

    # the analysis counts what the search computed: phase 1, then phase 2's stage-2 epochs
    from analysis.common import open_experiments
    from analysis.plot_trials import efficiency

    exp, = open_experiments([folder])
    phase1 = sum(len(results(tf)) for tf in trial_folders(folder / "stage1_search"))
    phase2 = sum(len(results(tf)) for tf in trial_folders(folder))
    assert exp.stage1_search_epochs == phase1
    assert efficiency([exp])["cumulative_epochs"].iloc[-1] == phase1 + phase2
    assert sorted(exp.searched) == ["lambd", "lr2", "tau2"]  # the stage-1 keys are constants in phase 2
    # the rungs drawn are the steps where ASHA stopped phase-2 trials (their records): grace 2,
    # factor 2 over its 4 stage-2 epochs, after stage 1's 2, leaves one rung to stop at
    stops = {record(tf)["stopped_at"] for tf in trial_folders(folder) if record(tf)["status"] == "stopped"}
    assert exp.asha_rungs() == sorted(stops) and set(stops) <= {2 + 2}
    assert len(exp.stage1_trials()) == 3
    from analysis.plot_trials import plot_curves

    plotted = plot_curves([exp], tmp_path / "curves.png")  # phase 1 drawn in the stage-1 part
    assert set(plotted["stage"]) == {"stage2"} and (tmp_path / "curves.png").stat().st_size > 0

    # the retrain runs both stages from scratch with phase 1's values and the best phase-2 trial's
    retrained = RayRun().run(cli("retrain", "--experiment", str(folder), "--seeds", "1", "--no-baseline"))
    assert retrained.returncode == 0, explain(retrained)
    used = json.loads((folder / "retrain" / "results.json").read_text())["config"]
    best = yaml.safe_load((folder / "best_config.yaml").read_text())["config"]
    choice = yaml.safe_load((folder / "experiment.yaml").read_text())["stage1_choice"]["values"]
    assert same_params({k: used[k] for k in choice}, choice)
    assert same_params({k: used[k] for k in ("tau2", "lambd", "lr2")}, {k: best[k] for k in ("tau2", "lambd", "lr2")})
