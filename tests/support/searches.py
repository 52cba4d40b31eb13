"""Helpers of the tests that run searches for real: Ray runs with their own temp dir and
marker, kills, the CLI as a subprocess, and readers of an experiment's files."""

from __future__ import annotations

import json
import math
import os
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

import yaml

from refilled.store import study as study_store
from support.configs import REPO

TINY = REPO / "tests" / "search_tiny.yaml"
MARKER = "TUNE_REFILLED_TEST_RUN"
SEARCHED = ["tau1", "tau2", "lambd", "lr1", "lr2", "flag_merge"]
TOTAL_STEPS = 6  # n_training_epochs1 + n_training_epochs2 of search_tiny.yaml
SEARCH_TIMEOUT = 420
# Every driver a test starts holds its lease with this timeout (refilled.store.lease): a driver
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
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
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
    --resume refuses (docs/reliability.md, "If the driver dies"): the upload is given time to end."""
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
    """The trial's own record (refilled.store.trial_records), as the search wrote it."""
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


ENDED = ("finished", "stopped", "diverged", "errored")  # a trial record's statuses of a trial that ended


def ended_unsaved(folder: Path, saved: dict[str, str]) -> list[str]:
    """The trials a killed driver's last saved state did not know that had ended all the same:
    a resume keeps them (more trials than num_samples by as many)."""
    return [tf.name for tf in trial_folders(folder) if tf.name not in saved and (tf / "trial_record.json").is_file()
            and record(tf)["status"] in ENDED]


def saved_state(folder: Path) -> tuple[dict[str, str], dict[str, int]]:
    """What Tune's last saved experiment state holds, as the trials' records note it at
    each save: {trial folder: status} and {trial folder: the step of the checkpoint a resume
    starts it from}. A trial created after that save has no such note."""
    from refilled.files import checkpoint

    saved, resumable = {}, {}
    for tf in trial_folders(folder):
        at_save = record(tf).get("at_last_save") if (tf / "trial_record.json").is_file() else None
        if at_save:
            saved[tf.name] = at_save["status"]
            if at_save.get("checkpoint"):
                state = checkpoint.load(tf / at_save["checkpoint"] / "state.pt", "checkpoint")
                resumable[tf.name] = state["epoch"] + (state["config"]["n_training_epochs1"] if state["stage"] == 2
                                                       else 0)
    return saved, resumable


def check_run_again_from_saved_state(folder: Path, before: dict[str, list[dict]], saved: dict[str, str],
                                     resumable: dict[str, int]) -> None:
    """After a kill and a resume: Ray saves its experiment state every 10 s or more, and a
    resume goes on from that state. The trials it has as ended were not run again; the
    others (running, or finished after that save) ran again from the checkpoint it knew,
    their files rewound to it (refilled.store.epoch_files): each step once, to the end, and
    each epoch run again reported what it had reported before the kill (the checkpoint holds
    every random state); a trial it did not know was set aside and its configuration run
    anew, unless it had ended (its record says so): it stayed, not run again. `before`: each
    trial's results at the kill; `resumable`: the step of the checkpoint each resumes from."""
    def measured(row: dict) -> tuple:
        return row["step"], row["val_accuracy"], row["loss"]

    for name, rows in before.items():
        if name not in saved:
            if (folder / name).is_dir():  # its curve as it was (at a URI its record may lag Tune's saved state)
                assert record(folder / name)["status"] in ENDED, name
                assert [measured(r) for r in results(folder / name)] == [measured(r) for r in rows], name
                continue
            aside = folder / "interrupted_trials" / name
            assert aside.is_dir(), name
            assert any(same_params(params(tf), params(aside)) for tf in trial_folders(folder)), name
            continue
        now = results(folder / name)
        assert now[-1]["trial_id"] == rows[-1]["trial_id"], name
        if saved[name] in ("finished", "stopped", "diverged", "errored"):
            assert [measured(r) for r in now] == [measured(r) for r in rows], name
            continue
        first = rows[0]["step"]  # a phase 2 starts after stage 1
        assert [r["step"] for r in now] == list(range(first, rows[-1]["total_steps"] + 1)), (name, resumable.get(name))
        if name in resumable:  # the checkpoint it resumed from was written with its epoch, before the kill
            assert any(r["step"] == resumable[name] and r.get("checkpointed") for r in rows), (name, resumable[name])
        at_kill = {r["step"]: r for r in rows}
        assert [measured(r) for r in now if r["step"] in at_kill] == [measured(at_kill[r["step"]]) for r in now
                                                                       if r["step"] in at_kill], name


def study(folder: Path):

    return study_store.load(folder, folder.name)


def optuna_trial_for(trials, values: dict):
    matches = [t for t in trials if same_params(t.params, values)]
    assert len(matches) == 1, f"{len(matches)} Optuna trials have params {values}"
    return matches[0]


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under a folder with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


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


STAGED = {"staged": {"num_samples": 3, "asha": {"grace_period": 1, "reduction_factor": 2}}}
STAGE1_SEARCHED = ["tau1", "lr1", "flag_merge"]  # the stage-1-only keys of search_tiny.yaml's space


def check_staged(folder: Path, n: int, n1: int = 3, killed_in_phase2: bool = False) -> None:
    """What a finished staged search of search_tiny.yaml (n1 phase-1 and n phase-2 trials) must hold.
    killed_in_phase2: a phase-2 trial may have run epochs again from its checkpoint after a
    resume (check_run_again_from_saved_state says which and how)."""
    import torch

    from refilled.files import checkpoint
    from refilled.store.experiments import load_trials

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
    # phase 2 starts from exactly that trial's end-of-stage-1 student (its newest checkpoint, written with its end)
    assert results(chosen)[-1].get("checkpointed")
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
        steps = [r["step"] for r in rows]
        if killed_in_phase2:  # each run from a checkpoint goes on by one step; the last reaches the end
            steps = [s for i, s in enumerate(steps) if not any(later <= s for later in steps[i + 1:])]
        assert steps == list(range(e1 + 1, e1 + 1 + len(steps)))
        if not killed_in_phase2:
            assert [r["training_iteration"] for r in rows] == list(range(1, len(rows) + 1))
    table = load_trials(folder)
    if killed_in_phase2:  # epochs run again are computed again
        assert (table["epochs_run"] >= table["epochs"] - e1).all()
    else:
        assert (table["epochs_run"] == table["epochs"] - e1).all()
    best = yaml.safe_load((folder / "best_config.yaml").read_text())["config"]
    assert same_params({k: best[k] for k in STAGE1_SEARCHED}, choice["values"])
    # one Optuna study per phase, each over its own keys
    first_study = study_store.load(phase1, f"{folder.name}-stage1")
    assert len(first_study.trials) == n1 and all(sorted(t.params) == sorted(STAGE1_SEARCHED) for t in first_study.trials)
    second = study(folder).trials
    assert len(second) == n and all(sorted(t.params) == ["lambd", "lr2", "tau2"] for t in second)
