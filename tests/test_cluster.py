"""Searches on a real two-node Ray cluster on this machine: `ray start --head` and
`ray start --address`, one CPU each, started once for this module.

Each node is started with its own marker in its environment (tests/test_search.py's
RayRun), which every process `ray start` spawns for it inherits (its raylet, its
agents, the workers that run trials), so a test can end exactly one node's
processes by pid: `ray stop` would end every Ray on the machine. The test that
loses the worker node runs last; a test that finds the worker gone starts another.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from types import SimpleNamespace

import pandas as pd
import pytest

from support.searches import (
    REPO,
    SEARCH_TIMEOUT,
    RayRun,
    _is_zombie,
    _marked_pids,
    assert_one_line_error,
    cli,
    explain,
    finished,
    free_port,
    optuna_trial_for,
    params,
    record,
    results,
    study,
    tiny_experiment,
    trial_folders,
)


class Cluster:
    """A head and a worker node, each a RayRun of its own (marker, temp dir)."""

    def __init__(self):
        # Ray's token authentication, explicit: the head would take ~/.ray/auth_token if there is one,
        # and a worker node joins only with RAY_AUTH_MODE=token and the same token
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex}
        self.head, self.workers = RayRun(**self.auth), []
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self._start(self.head, "--head", f"--port={port}", "--include-dashboard=false")
        self.add_worker()

    def _start(self, run: RayRun, *args: str) -> None:
        args = ("start", *args, "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats")
        started = subprocess.run([shutil.which("ray") or "ray", *args], cwd=REPO, env=run.env,
                                 capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, f"ray {' '.join(args)}\n{started.stdout[-2000:]}\n{started.stderr[-2000:]}"

    @property
    def worker(self) -> RayRun:
        return self.workers[-1]

    def add_worker(self) -> None:
        self.workers.append(RayRun(**self.auth))
        self._start(self.worker, f"--address={self.address}")

    def worker_alive(self) -> bool:
        return any(not _is_zombie(p) for p in _marked_pids(self.worker.marker))

    def kill_worker(self) -> list[int]:
        """SIGKILL every process of the worker node (found by its marker); returns their pids."""
        pids = [p for p in _marked_pids(self.worker.marker) if not _is_zombie(p)]
        self.worker.cleanup()
        return pids

    def driver(self, **env: str) -> RayRun:
        """A driver's environment of its own: it must find the cluster by --address alone."""
        return RayRun(**self.auth, **env)

    def close(self) -> None:
        for run in (*self.workers, self.head):
            run.cleanup()


@pytest.fixture(scope="module")
def cluster():
    nodes = Cluster()
    try:
        yield nodes
    finally:
        nodes.close()  # by pid: `ray stop` would end every Ray here
        assert not any(_marked_pids(run.marker) for run in (*nodes.workers, nodes.head))


@pytest.fixture
def two_nodes(cluster) -> Cluster:
    if not cluster.worker_alive():  # the node-loss test ran before this one
        cluster.add_worker()
    return cluster


def search(nodes: Cluster, config, storage, teacher, *extra: str, **env: str) -> SimpleNamespace:
    return nodes.driver(**env).run(cli("search", "--config", str(config), "--storage", str(storage),
                                       "--teacher", str(teacher), "--address", nodes.address, *extra))


LOAD = 64


@pytest.fixture(scope="module")
def load(cluster, search_teacher, tmp_path_factory) -> SimpleNamespace:
    """A search of 64 short trials on the two nodes: more trials asked for at once (8) than
    the 2 CPUs run, each worker process reused. Shared by the load checks and the retrain."""
    if not cluster.worker_alive():
        cluster.add_worker()
    tmp = tmp_path_factory.mktemp("load")
    config = tiny_experiment(tmp, "load", config={"n_training_epochs1": 1, "n_training_epochs2": 1, "point": [1]},
                             search={"num_samples": LOAD, "max_concurrent": 8, "reuse_actors": True,
                                     "checkpoint_every": 2,  # a checkpoint at the last step only
                                     "asha": {"grace_period": 1, "reduction_factor": 2}})
    storage = tmp / "storage"
    start = time.monotonic()
    result = search(cluster, config, storage, search_teacher)
    took = time.monotonic() - start
    assert result.returncode == 0, explain(result)
    print(f"\n{LOAD} trials on two 1-CPU nodes: {took:.0f} s for the search")
    return SimpleNamespace(config=config, storage=storage, folder=storage / "load")


@pytest.mark.slow
@pytest.mark.timeout(2 * SEARCH_TIMEOUT)
def test_64_short_trials_on_two_nodes(two_nodes, load, tmp_path):
    """Every trial is in the study once, has its folder and its row in the report; both
    nodes ran trials, and a trial stays on its node."""
    folder = load.folder
    folders = trial_folders(folder)
    assert len(folders) == LOAD
    for tf in folders:
        rows = results(tf)
        assert rows and [r["step"] for r in rows] == list(range(1, len(rows) + 1)), tf.name
        assert record(tf)["status"] in ("finished", "stopped") and record(tf)["step"] == rows[-1]["step"]
        assert {r["node_id"] for r in rows} == {record(tf)["node_id"]}  # as its record says
    assert len({r["node_id"] for tf in folders for r in results(tf)}) == 2  # both nodes ran trials
    assert len(pd.read_csv(folder / "trials.csv")) == LOAD and (folder / "best_config.yaml").is_file()

    import optuna

    ot_trials = study(folder).trials
    assert sorted(t.number for t in ot_trials) == list(range(LOAD))
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in ot_trials)
    told = {optuna_trial_for(ot_trials, params(tf)).number for tf in folders}  # each folder: exactly one
    assert len(told) == LOAD
    for tf in folders:  # told how it ended: complete with its last accuracy, or pruned by ASHA
        ot, rows = optuna_trial_for(ot_trials, params(tf)), results(tf)
        if finished(tf):
            assert ot.state == optuna.trial.TrialState.COMPLETE and ot.value == pytest.approx(rows[-1]["val_accuracy"])
        else:
            assert ot.state == optuna.trial.TrialState.PRUNED, tf.name

    report = two_nodes.driver().run([sys.executable, "analysis/report.py", str(folder), "--out", str(tmp_path / "report")],
                                    timeout=300)
    assert report.returncode == 0, explain(report)
    board = pd.read_csv(tmp_path / "report" / "trials.csv")
    assert len(board) == LOAD and set(board["trial_id"].astype(str)) == {record(tf)["trial_id"] for tf in folders}


@pytest.mark.slow
@pytest.mark.timeout(2 * SEARCH_TIMEOUT)
def test_a_retrain_on_two_nodes_and_a_refusal(two_nodes, load, tmp_path):
    # more GPUs per trial than the cluster has: refused once connected, before anything is written
    storage = load.storage
    refused = two_nodes.driver().run(cli("search", "--config", str(load.config), "--storage", str(storage),
                                         "--name", "gpus", "--address", two_nodes.address, "--gpus-per-trial", "1"),
                                     timeout=180)
    assert_one_line_error(refused, "1.0 GPU", "the Ray cluster has 0")
    assert not (storage / "gpus").exists()

    # a retrain of an experiment at a URI, as Ray tasks: each reads the teacher there and uploads its run
    bucket = tmp_path / "bucket"
    shutil.copytree(load.folder, bucket / "tiny", ignore=shutil.ignore_patterns("checkpoint_*", "retrain"))
    retrained = two_nodes.driver(TUNE_REFILLED_CACHE=str(tmp_path / "cache")).run(
        cli("retrain", "--experiment", f"file://{bucket}/tiny", "--seeds", "2", "--no-baseline",
            "--address", two_nodes.address))
    assert retrained.returncode == 0, explain(retrained)
    final = bucket / "tiny" / "retrain"
    assert json.loads((final / "results.json").read_text())["refilled"]["seeds"] == [0, 1]
    for seed in (0, 1):
        assert (final / "refilled" / f"seed{seed}" / "config.yaml").is_file(), sorted(final.rglob("*"))


@pytest.mark.slow
@pytest.mark.timeout(3 * SEARCH_TIMEOUT)
def test_a_worker_node_lost_mid_search(two_nodes, search_teacher, tmp_path):
    """The worker node's processes are killed while it runs a trial: once Ray finds the
    node dead, Tune retries that trial on the head from its last checkpoint (max_failures),
    and the search ends with every trial once, in its folder and in the study."""
    steps = 12
    config = tiny_experiment(tmp_path, "lost", config={"n_training_epochs2": steps - 2, "point": [6]},
                             search={"num_samples": 2, "max_concurrent": 2, "max_failures": 2,
                                     "checkpoint_every": 1, "asha": {"grace_period": steps}})
    storage = tmp_path / "storage"
    folder = storage / "lost"
    run = two_nodes.driver()
    driver = run.popen(cli("search", "--config", str(config), "--storage", str(storage), "--teacher", str(search_teacher),
                           "--address", two_nodes.address))

    def newest(tf):  # trials write their checkpoints into the storage themselves, at once
        return max((int(p.name.rsplit("_", 1)[1]) for p in tf.glob("checkpoint_*")), default=-1)

    try:
        deadline = time.monotonic() + SEARCH_TIMEOUT
        # both trials running (one on each 1-CPU node), each past its second checkpoint (step 2)
        while sum(newest(tf) >= 1 for tf in folder.glob("trial_*")) < 2:
            assert driver.poll() is None, driver.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the two trials did not start"
            time.sleep(0.2)
        killed = two_nodes.kill_worker()
        assert killed and not two_nodes.worker_alive()
        out, err = driver.communicate(timeout=2 * SEARCH_TIMEOUT)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
        run.cleanup()
    assert driver.returncode == 0, f"exit {driver.returncode}\n{out[-3000:]}\n{err[-5000:]}"

    folders = trial_folders(folder)
    assert len(folders) == 2 and all(finished(tf) for tf in folders)
    moved = [tf for tf in folders if len({r["node_id"] for r in results(tf)}) == 2]
    assert len(moved) == 1, [(tf.name, [r["node_id"][:8] for r in results(tf)]) for tf in folders]
    lost, = moved
    stayed, = [tf for tf in folders if tf != lost]
    head = record(stayed)["node_id"]
    rows = results(lost)
    nodes = [r["node_id"] for r in rows]
    at = nodes.index(head)  # the first result on the head: the retry
    assert set(nodes[:at]) == {nodes[0]} != {head} and set(nodes[at:]) == {head}, nodes
    # it resumed from a checkpoint it had reported on the lost node, not from step 1
    restart = rows[at]["step"]
    saved = [r["step"] for r in rows[:at] if r.get("checkpointed")]
    assert restart > 1 and restart - 1 in saved, ([r["step"] for r in rows], saved)
    assert [r["step"] for r in rows[at:]] == list(range(restart, steps + 1))
    assert {r["step"] for r in rows} == set(range(1, steps + 1))
    rec = record(lost)
    assert rec["retries"] >= 1 and rec["node_id"] == head and rec["status"] == "finished", rec

    # nothing lost, nothing told twice: the study holds the two trials, each complete once,
    # with the accuracy its trial ended with
    import optuna

    ot_trials = study(folder).trials
    assert len(ot_trials) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in ot_trials), ot_trials
    for tf in folders:
        assert optuna_trial_for(ot_trials, params(tf)).value == pytest.approx(results(tf)[-1]["val_accuracy"])
    table = pd.read_csv(folder / "trials.csv")
    assert len(table) == 2 and (table["status"] == "finished").all()
