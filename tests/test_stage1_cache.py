"""Tests of refilled.store.stage1_cache: equal stage-1 settings share one stage 1.

Digits, a WRN-10-1 student and a randomly initialised WRN-10-1 teacher (the
cache does not care how good the teacher is), 2 + 2 epochs: a few seconds.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch

from refilled.method.train import STAGE1, STAGE2, build_student, build_teacher, refilled_epochs
from refilled.runs.inputs import student_data, teacher_inputs
from refilled.schema.config import Config
from refilled.store.stage1_cache import STAGE1_KEYS, Stage1Cache, stage1_key

TEACHER_ID = "teacher-digest-0"

TINY = dict(data_name="digits", source_classes="0-4", target_classes="5-9", shots=10, val_fraction=0.3,
            flag_tuning=True, teacher_network_name="wide_resnet", teacher_depth=10, teacher_width=1,
            student_network_name="wide_resnet", depth=10, width=1, n_training_epochs1=2, n_training_epochs2=2,
            point=(2,), batch_size=16, lr1=0.05, lr2=0.05, tau1=4.0, tau2=2.0, lambd=1.0, device="cpu")


def tiny(**changes) -> Config:
    return Config(**TINY).replace(**changes)


def setup(cfg: Config):
    """Student data, the teacher's embedding function and global centres (no bank)."""
    data = student_data(cfg, torch.device("cpu"))
    teacher = build_teacher(cfg, data).eval()  # random but deterministic (seeded by cfg.seed)
    fn, centers = teacher_inputs(cfg, data, teacher, None)
    return data, fn, centers


def run_stage1(cfg: Config, data, fn, centers):
    """Stage 1 of a fresh student: (snapshot of its last epoch, per-epoch metrics)."""
    history = []
    for epoch in refilled_epochs(cfg, data, build_student(cfg, data), fn, centers):
        history.append(epoch.metrics)
        if epoch.epoch == cfg.n_training_epochs1:
            return epoch.snapshot(), history
    raise AssertionError("stage 1 did not end")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Networks this small run fastest on one thread (and two threads crawl when
    another process holds a core of this 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def first_trial(tmp_path_factory, one_thread):
    """Trial A: one uninterrupted run that stores its stage 1 on the way."""
    cfg = tiny()
    data, fn, centers = setup(cfg)
    folder = tmp_path_factory.mktemp("exp") / "stage1_cache"
    cache, key = Stage1Cache(folder), stage1_key(cfg, TEACHER_ID)
    assert cache.lookup(key) is None
    student = build_student(cfg, data)
    stage1, stage2 = [], []
    for epoch in refilled_epochs(cfg, data, student, fn, centers):
        if epoch.stage == STAGE1:
            stage1.append(epoch.metrics)
            if epoch.epoch == cfg.n_training_epochs1:
                cache.store(key, epoch.snapshot(), stage1)
        else:
            stage2.append(epoch.metrics)
    return dict(cfg=cfg, data=data, fn=fn, centers=centers, folder=folder, key=key, stage1=stage1,
                stage2=stage2, final={k: v.clone() for k, v in student.state_dict().items()})


def test_equal_settings_hit_and_resume_into_the_same_stage2(first_trial):
    cfg = tiny()  # trial B: a new Config object with the same settings
    key = stage1_key(cfg, TEACHER_ID)
    assert key == first_trial["key"]
    hit = Stage1Cache(first_trial["folder"]).lookup(key)
    assert hit is not None
    assert hit["history"] == first_trial["stage1"]
    assert hit["snapshot"]["stage"] == STAGE1 and hit["snapshot"]["epoch"] == cfg.n_training_epochs1

    student = build_student(cfg, first_trial["data"])
    epochs = list(refilled_epochs(cfg, first_trial["data"], student, first_trial["fn"], first_trial["centers"],
                                  resume=hit["snapshot"]))
    assert [(e.stage, e.epoch, e.step) for e in epochs] == [(STAGE2, 1, 3), (STAGE2, 2, 4)]
    assert [e.metrics for e in epochs] == first_trial["stage2"]  # same stage 2 as the uninterrupted run
    for name, value in student.state_dict().items():
        assert torch.equal(value, first_trial["final"][name]), name


def test_a_different_tau1_misses(first_trial):
    key = stage1_key(tiny(tau1=2.0), TEACHER_ID)
    assert key != first_trial["key"]
    assert Stage1Cache(first_trial["folder"]).lookup(key) is None


def test_another_teacher_misses(first_trial):
    key = stage1_key(tiny(), "teacher-digest-1")
    assert key != first_trial["key"]
    assert Stage1Cache(first_trial["folder"]).lookup(key) is None


def test_key_ignores_stage2_settings():
    base = stage1_key(tiny(), TEACHER_ID)
    for changes in [dict(tau2=1.0), dict(lambd=5.0), dict(lr2=0.2), dict(point=(1,)), dict(gamma=0.5),
                    dict(n_training_epochs2=7), dict(centers="local"), dict(teacher_bank="off"),
                    dict(data_root="elsewhere"), dict(tau2=1.0, lambd=0.0, lr2=0.01)]:
        assert stage1_key(tiny(**changes), TEACHER_ID) == base, changes


# One different valid value for every stage-1 key, on the authors' defaults
# (CIFAR-100, so that class_order cifar_fs is valid).
ALTERNATIVES = dict(
    data_name="digits", image_size=32, class_order="cifar_fs", target_classes="50-99", shots=10, val_per_class=5,
    val_fraction=0.2, split_seed=1, flag_tuning=True, student_network_name="mobile_net", depth=28, width=2, ca=0.5,
    dropout_rate=0.0, tau1=2.0, lr1=0.05, n_training_epochs1=100, batch_size=64, seed=1, flag_merge=True,
    loss_scale1=100.0, tuple_negatives="smallest", margin=0.1, wd=1e-4, mo=0.0, bn_stats="precise",
    augmentation="resized_crop", skip_bad_images=True, folder_test_fraction=0.2, student_weights="student.pt",
)
# keys that are valid only beside another: compared on a base that has it
NEEDS = {"val_per_class": dict(shots=10), "folder_test_fraction": dict(data_name="folder"),
         "student_weights": dict(student_network_name="torchvision:resnet18")}


def test_key_depends_on_every_stage1_key():
    assert set(ALTERNATIVES) == set(STAGE1_KEYS)  # a new stage-1 key needs a line here
    keys = set()
    for name, value in ALTERNATIVES.items():
        base_cfg = Config().replace(**NEEDS.get(name, {}))
        assert getattr(base_cfg, name) != value, name
        base = stage1_key(base_cfg, TEACHER_ID)
        key = stage1_key(base_cfg.replace(**{name: value}), TEACHER_ID)
        assert key != base, name
        keys.add(key)
    assert len(keys) == len(STAGE1_KEYS)


def test_key_from_a_mapping_equals_key_from_a_config():
    cfg = tiny()
    assert stage1_key(cfg.to_dict(), TEACHER_ID) == stage1_key(cfg, TEACHER_ID)
    assert stage1_key({"tau1": 4}, TEACHER_ID) == stage1_key({"tau1": 4.0}, TEACHER_ID) == stage1_key(Config(), TEACHER_ID)


def test_get_or_compute_computes_once(tmp_path):
    cache = Stage1Cache(tmp_path / "cache")
    key = stage1_key(tiny(), TEACHER_ID)
    calls = []

    def compute():
        calls.append(1)
        return {"stage": STAGE1, "epoch": 2, "student": {"w": torch.ones(3)}}, [{"loss": 1.0}, {"loss": 0.5}]

    first, computed = cache.get_or_compute(key, compute)
    second, computed_again = cache.get_or_compute(key, compute)
    assert (computed, computed_again, len(calls)) == (True, False, 1)
    assert second["history"] == first["history"] == [{"loss": 1.0}, {"loss": 0.5}]
    assert torch.equal(second["snapshot"]["student"]["w"], torch.ones(3))


def test_unreadable_entry_is_a_miss_with_a_warning(tmp_path):
    cache = Stage1Cache(tmp_path)
    key = stage1_key(tiny(), TEACHER_ID)
    (tmp_path / f"{key}.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="stage-1 cache"):
        assert cache.lookup(key) is None


def test_keys_cannot_leave_the_folder(tmp_path):
    with pytest.raises(ValueError):
        Stage1Cache(tmp_path).lookup("../elsewhere")


# ----------------------------------------------------------------------------- two processes

def _trial_process(folder: str, key: str, barrier, out: str) -> None:
    """A trial in its own process: the usual lookup / lock / re-check / compute pattern."""
    torch.set_num_threads(1)
    cfg = tiny()
    data, fn, centers = setup(cfg)  # the slow part (imports, data) before the start line
    cache = Stage1Cache(folder)
    barrier.wait()
    first = cache.lookup(key)
    computed = False
    entry = first
    if entry is None:
        with cache.computing(key):
            entry = cache.lookup(key)
            if entry is None:
                Path(folder, f"computed-by-{os.getpid()}").touch()  # count computations
                snapshot, history = run_stage1(cfg, data, fn, centers)
                time.sleep(0.5)  # hold the lock a while: the other process must be waiting by now
                cache.store(key, snapshot, history)
                entry = cache.lookup(key)
                computed = True
    Path(out).write_text(json.dumps({"first_lookup_missed": first is None, "computed": computed,
                                     "history": entry["history"]}))


@pytest.mark.slow  # two trial processes, each starting torch and its data: ~17 s on two cores
def test_two_processes_compute_a_key_once(tmp_path):
    folder = tmp_path / "stage1_cache"
    key = stage1_key(tiny(), TEACHER_ID)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    procs = [ctx.Process(target=_trial_process, args=(str(folder), key, barrier, str(o))) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    results = [json.loads(o.read_text()) for o in outs]
    assert len(list(folder.glob("computed-by-*"))) == 1
    assert sorted(r["computed"] for r in results) == [False, True]
    assert all(r["first_lookup_missed"] for r in results)  # the one that did not compute waited on the lock
    assert results[0]["history"] == results[1]["history"]
    assert len(results[0]["history"]) == 2


def _hold_lock(folder: str, key: str, held) -> None:
    with Stage1Cache(folder).computing(key):
        held.set()
        time.sleep(600)  # killed by the test long before


def _lock_is_free(path: Path) -> bool:
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return True


def test_a_dead_holder_releases_the_lock(tmp_path):
    key = stage1_key(tiny(), TEACHER_ID)
    ctx = multiprocessing.get_context("fork")  # the holder only locks and sleeps: no fresh interpreter needed
    held = ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(str(tmp_path), key, held))
    proc.start()
    try:
        assert held.wait(timeout=60)
        lock = tmp_path / f"{key}.lock"
        assert not _lock_is_free(lock)
    finally:
        proc.kill()
        proc.join(timeout=30)
    assert _lock_is_free(lock)
    with Stage1Cache(tmp_path).computing(key):  # and the context manager gets it at once
        pass
