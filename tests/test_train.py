"""refilled.method.train: the REFILLED loop epoch by epoch, determinism, resume, schedules, divergence."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from refilled.files import checkpoint
from refilled.method.bank import TeacherBank, teacher_embeddings
from refilled.method.train import (
    STAGE1,
    STAGE2,
    Diverged,
    Epoch,
    build_student,
    global_centers,
    refilled_epochs,
)
from refilled.runs import inputs as runs
from refilled.runs import single_run
from support.configs import make_tiny_config


@pytest.fixture(scope="module")
def world(teacher_path):
    """Student data (tuning and final splits), the tiny teacher and its banks."""
    out = {}
    for tuning in (False, True):
        cfg = make_tiny_config(flag_tuning=tuning)
        data = runs.student_data(cfg)
        teacher = runs.load_teacher(teacher_path, cfg, data)
        bank = TeacherBank.build(teacher, data, progress=False)
        out[tuning] = (data, teacher, bank, global_centers(teacher, bank, data))
    return out


_MEMO: dict = {}


def records(cfg, world, *, centers="global", student=None, resume=None, teacher="bank"):
    data, t, bank, c = world[cfg.flag_tuning]
    fn = None if teacher is None else teacher_embeddings(t, bank if teacher == "bank" else None)
    student = student if student is not None else build_student(cfg, data)
    return [(e.stage, e.epoch, e.step, dict(e.metrics))
            for e in refilled_epochs(cfg, data, student, fn, c if centers == "global" else None, resume)]


def plain(cfg, world, **kw):
    """records() of a fresh run, computed once per module (runs are deterministic, see below)."""
    key = (cfg.digest(), tuple(sorted(kw.items())))
    if key not in _MEMO:
        _MEMO[key] = records(cfg, world, **kw)
    return _MEMO[key]


# ----------------------------------------------------------------------------- epochs and metrics

@pytest.mark.parametrize("tuning", [False, True])
def test_epochs_stages_steps_and_metrics(world, tuning):
    cfg = make_tiny_config(flag_tuning=tuning)  # 2 + 3 epochs
    got = plain(cfg, world)
    assert [(s, e, k) for s, e, k, _ in got] == [(STAGE1, 1, 1), (STAGE1, 2, 2), (STAGE2, 1, 3), (STAGE2, 2, 4),
                                                (STAGE2, 3, 5)]
    for stage, epoch, _, m in got:
        losses = {k for k in m if k.startswith("loss/")}
        assert losses == ({"loss/relation"} if stage == STAGE1 else {"loss/ce", "loss/local_kd"})
        assert m["loss"] == pytest.approx(sum(m[k] for k in losses), rel=1e-6)
        assert all(math.isfinite(m[k]) for k in losses) and m["lr"] > 0
        evals = {k for k in m if "accuracy" in k}
        if tuning:
            assert evals == {"val_accuracy"}
        elif stage == STAGE1:
            assert evals == (set() if epoch < 2 else {"test_ncm_accuracy"})
        else:
            assert evals == (set() if epoch < 3 else {"test_accuracy"})
        for k in evals:
            assert 0.0 <= m[k] <= 1.0
    assert got[-1][3]["loss/ce"] > 0 and got[-1][3]["loss/local_kd"] >= 0


def test_epoch_objects_and_snapshot_contents(world):
    cfg = make_tiny_config(n_training_epochs2=1)
    data, t, bank, c = world[False]
    epochs = list(refilled_epochs(cfg, data, build_student(cfg, data), teacher_embeddings(t, bank), c))
    assert all(isinstance(e, Epoch) for e in epochs)
    snap = epochs[-1].snapshot()
    assert snap["stage"] == STAGE2 and snap["epoch"] == 1
    assert snap["config"] == cfg.to_dict() and snap["arch"]["name"] == "wide_resnet"
    assert set(snap) >= {"student", "optimizer"}


def test_same_seed_same_metrics_other_seed_differs(world):
    cfg = make_tiny_config(flag_tuning=True)
    a, b = records(cfg, world), records(cfg, world)  # two fresh runs
    assert a == b and a == plain(cfg, world)
    c = records(cfg.replace(seed=1), world)
    assert [m["loss"] for *_, m in c] != [m["loss"] for *_, m in a]


# ----------------------------------------------------------------------------- resume

RESUME_POINTS = [(STAGE1, 1), (STAGE1, 2), (STAGE2, 1), (STAGE2, 2)]


@pytest.fixture(scope="module")
def interrupted(world, tmp_path_factory):
    """One uninterrupted run; its snapshots at RESUME_POINTS saved the way a trial saves them."""
    cfg = make_tiny_config(flag_tuning=True)
    data, t, bank, c = world[True]
    folder = tmp_path_factory.mktemp("snapshots")
    full, paths = [], {}
    for e in refilled_epochs(cfg, data, build_student(cfg, data), teacher_embeddings(t, bank), c):
        full.append((e.stage, e.epoch, e.step, dict(e.metrics)))
        if (e.stage, e.epoch) in RESUME_POINTS:
            paths[e.stage, e.epoch] = checkpoint.save(e.snapshot(), folder / f"{e.stage}-{e.epoch}.pt")
    return cfg, full, paths


@pytest.mark.parametrize("stage,epoch", RESUME_POINTS)
def test_resume_continues_exactly(world, interrupted, stage, epoch):
    cfg, full, paths = interrupted
    snap = checkpoint.load(paths[stage, epoch])
    assert (snap["stage"], snap["epoch"]) == (stage, epoch)
    cut = next(i for i, r in enumerate(full) if (r[0], r[1]) == (stage, epoch)) + 1
    # a fresh student with another seed's weights: everything must come from the snapshot
    other = build_student(cfg.replace(seed=5), world[True][0])
    resumed = records(cfg, world, student=other, resume=snap)
    assert [r[:3] for r in resumed] == [r[:3] for r in full[cut:]]
    for (_, _, _, got), (_, _, _, want) in zip(resumed, full[cut:]):
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-6), k


# ----------------------------------------------------------------------------- what trains

def test_stage1_trains_only_the_feature_extractor(world):
    cfg = make_tiny_config()
    data, t, bank, c = world[False]
    student = build_student(cfg, data)
    classifier = {k: v.detach().clone() for k, v in student.fc.state_dict().items()}
    features = [p.detach().clone() for p in student.feature_parameters()]
    seen_stage2 = False
    for e in refilled_epochs(cfg, data, student, teacher_embeddings(t, bank), c):
        now = student.fc.state_dict()
        if e.stage == STAGE1:
            for k in classifier:
                assert torch.equal(now[k], classifier[k]), "stage 1 changed the classifier"
            assert any(not torch.equal(p, q) for p, q in zip(student.feature_parameters(), features))
        else:
            seen_stage2 = True
            assert not torch.equal(now["weight"], classifier["weight"]), "stage 2 must train the classifier"
            break
    assert seen_stage2


def test_student_alone_without_teacher(world):
    cfg = make_tiny_config(n_training_epochs1=0, lambd=0.0)
    got = records(cfg, world, teacher=None)
    assert [(s, e, k) for s, e, k, _ in got] == [(STAGE2, 1, 1), (STAGE2, 2, 2), (STAGE2, 3, 3)]
    assert all({k for k in m if k.startswith("loss/")} == {"loss/ce"} for *_, m in got)
    assert "test_accuracy" in got[-1][3]


def test_lambd_zero_skips_the_distillation_term(world):
    got = records(make_tiny_config(lambd=0.0, n_training_epochs2=1), world)
    assert {k for k in got[-1][3] if k.startswith("loss/")} == {"loss/ce"}
    assert {k for k in got[0][3] if k.startswith("loss/")} == {"loss/relation"}


def test_tuple_variant_runs(world):
    got = records(make_tiny_config(flag_merge=True), world)
    assert len(got) == 5 and all(math.isfinite(m["loss"]) for *_, m in got)
    base = plain(make_tiny_config(), world)
    assert [m["loss"] for *_, m in got][:2] != [m["loss"] for *_, m in base][:2]


def test_stage1_loss_is_at_the_authors_scale_of_each_form(world):
    """The tuple form at 1000 x its mean, the triplet form at 500 x (Config.stage1_scale): with a
    learning rate too small to move the student, the logged stage-1 loss is the scale times one loss."""
    def relation(**kw):  # the first epoch's, the run stopped there
        cfg = make_tiny_config(lr1=1e-12, **kw)
        data, teacher, bank, centres = world[cfg.flag_tuning]
        epochs = refilled_epochs(cfg, data, build_student(cfg, data), teacher_embeddings(teacher, bank), centres, None)
        return next(epochs).metrics["loss/relation"]

    assert relation(flag_merge=True) == pytest.approx(2 * relation(flag_merge=True, loss_scale1=500), rel=1e-5)
    assert relation() == pytest.approx(relation(loss_scale1=500), rel=1e-6)
    assert relation(flag_merge=True, tuple_negatives="smallest") != pytest.approx(relation(flag_merge=True), rel=1e-3)


def test_local_centres_run(world):
    got = records(make_tiny_config(centers="local"), world, centers=None)
    assert len(got) == 5 and all(math.isfinite(m["loss"]) for *_, m in got)
    glob = plain(make_tiny_config(), world)
    assert got[2][3]["loss/local_kd"] != glob[2][3]["loss/local_kd"]


def test_teacher_forward_gives_the_same_run_as_the_bank(world):
    cfg = make_tiny_config(n_training_epochs1=1, n_training_epochs2=1)
    a = records(cfg, world, teacher="bank")
    b = records(cfg, world, teacher="forward")
    for (_, _, _, x), (_, _, _, y) in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=5e-2)


# ----------------------------------------------------------------------------- transfer set

@pytest.fixture(scope="module")
def transfer_world(teacher_path):
    """The tuning split with a transfer set (the images of digits 5-9 outside the shots)."""
    cfg = make_tiny_config(flag_tuning=True, transfer_set=True)
    data = runs.student_data(cfg)
    teacher = runs.load_teacher(teacher_path, cfg, data)
    bank = TeacherBank.build(teacher, data, progress=False)
    return cfg, data, teacher, bank, global_centers(teacher, bank, data)


def transfer_epochs(cfg, transfer_world, student=None, resume=None):
    _, data, teacher, bank, centers = transfer_world
    student = student if student is not None else build_student(cfg, data)
    return refilled_epochs(cfg, data, student, teacher_embeddings(teacher, bank), centers, resume,
                           runs.transfer_teacher(data, teacher))


def test_batches_carry_transfer_images_and_keep_the_labelled_stream(transfer_world):
    _, data, *_ = transfer_world
    assert data.unlabelled_x is not None and len(data.unlabelled_x) > data.n_train
    without = list(data.train_batches(torch.Generator().manual_seed(3), 16))
    with_u = list(data.train_batches(torch.Generator().manual_seed(3), 16, unlabelled=True))
    assert len(with_u) == len(without)
    for a, b in zip(without, with_u):
        assert torch.equal(a.idx, b.idx) and torch.equal(a.params, b.params) and torch.equal(a.x, b.x)
        assert a.unlabelled is None and b.unlabelled.y is None
        assert len(b.unlabelled.x) == 16 and b.unlabelled.x.shape[1:] == b.x.shape[1:]
        assert int(b.unlabelled.idx.max()) < len(data.unlabelled_x)


def test_transfer_set_adds_a_named_stage2_term_and_leaves_stage1_alone(transfer_world, world):
    cfg = transfer_world[0]
    got = [(e.stage, e.epoch, e.step, dict(e.metrics)) for e in transfer_epochs(cfg, transfer_world)]
    for stage, _, _, m in got:
        losses = {k for k in m if k.startswith("loss/")}
        assert losses == ({"loss/relation"} if stage == STAGE1 else {"loss/ce", "loss/local_kd", "loss/transfer_kd"})
        assert m["loss"] == pytest.approx(sum(m[k] for k in losses), rel=1e-6) and math.isfinite(m["loss"])
    assert all(m["loss/transfer_kd"] > 0 for s, *_, m in got if s == STAGE2)
    without = plain(make_tiny_config(flag_tuning=True), world)
    assert got[:2] == without[:2]  # the same shots, the same stage 1
    assert got[2][3]["loss/ce"] != without[2][3]["loss/ce"]


def test_transfer_set_with_lambd_zero_is_the_student_alone(transfer_world):
    cfg = transfer_world[0].replace(n_training_epochs1=0, lambd=0.0)
    got = [dict(e.metrics) for e in transfer_epochs(cfg, transfer_world)]
    assert all({k for k in m if k.startswith("loss/")} == {"loss/ce"} for m in got)


def test_transfer_set_run_resumes_exactly(transfer_world):
    cfg, data = transfer_world[:2]
    full, snap = [], None
    for e in transfer_epochs(cfg, transfer_world):
        full.append((e.stage, e.epoch, e.step, dict(e.metrics)))
        if (e.stage, e.epoch) == (STAGE2, 1):
            snap = copy.deepcopy(e.snapshot())
    resumed = [(e.stage, e.epoch, e.step, dict(e.metrics))
               for e in transfer_epochs(cfg, transfer_world, build_student(cfg.replace(seed=5), data), snap)]
    assert [r[:3] for r in resumed] == [r[:3] for r in full[3:]]
    for (*_, got), (*_, want) in zip(resumed, full[3:]):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6)


# ----------------------------------------------------------------------------- divergence

def test_nan_in_stage1_raises_diverged(world):
    cfg = make_tiny_config(lr1=1e30)
    with pytest.raises(Diverged) as e:
        records(cfg, world)
    assert "stage 1" in str(e.value) and "epoch 1" in str(e.value)


def test_nan_in_stage2_raises_diverged(world, monkeypatch):
    import refilled.method.stages as method

    real = method.LocalClassifierDistillation.__call__
    calls = {"n": 0}

    def poisoned(self, b):
        out, losses = real(self, b)
        calls["n"] += 1
        if calls["n"] > 4:  # from stage 2's second epoch on (4 batches an epoch)
            losses["ce"] = losses["ce"] * float("nan")
        return out, losses

    monkeypatch.setattr(method.LocalClassifierDistillation, "__call__", poisoned)
    with pytest.raises(Diverged) as e:
        records(make_tiny_config(), world)
    assert "stage 2" in str(e.value) and "epoch 2" in str(e.value)


def test_huge_lr2_diverges_in_stage2(world):
    with pytest.raises(Diverged) as e:
        records(make_tiny_config(n_training_epochs1=0, lambd=0.0, lr2=1e30), world, teacher=None)
    assert "stage 2 diverged at epoch 1" in str(e.value)


# ----------------------------------------------------------------------------- schedules

def _torch_schedule(make, lr, n):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make(opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_learning_rate_schedules(world):
    cfg = make_tiny_config(n_training_epochs1=4, n_training_epochs2=5, point=(2, 4), gamma=0.2,
                           lr1=0.03, lr2=0.07)
    got = records(cfg, world)
    lr1 = [m["lr"] for s, _, _, m in got if s == STAGE1]
    lr2 = [m["lr"] for s, _, _, m in got if s == STAGE2]
    # stage 1: cosine from lr1 towards 0.1 * lr1, one value an epoch, like PyTorch's CosineAnnealingLR
    want1 = _torch_schedule(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4, eta_min=0.003), 0.03, 4)
    assert lr1 == pytest.approx(want1, rel=1e-9)
    assert lr1[0] == pytest.approx(0.03) and all(a > b for a, b in zip(lr1, lr1[1:])) and min(lr1) > 0.003
    # stage 2: multi-step at `point` by gamma, like PyTorch's MultiStepLR
    want2 = _torch_schedule(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2, 4], gamma=0.2), 0.07, 5)
    assert lr2 == pytest.approx(want2, rel=1e-9)
    assert lr2 == pytest.approx([0.07, 0.07, 0.014, 0.014, 0.0028])


def test_teacher_pretraining_is_the_authors_recipe_with_the_epoch_chosen_on_validation():
    """pretrain.py's schedule (multi-step at teacher_point by teacher_gamma), every epoch judged on
    the validation part, the best one's weights kept; the test part is not read while training."""
    from refilled.method import evaluate
    from refilled.method.train import build_teacher, pretrain_teacher

    # lr 0.5: the best validation epoch is not the last (0.95 at epoch 4, 0.92 at 5)
    cfg = make_tiny_config(teacher_epochs=5, teacher_point=(2, 4), teacher_gamma=0.2, teacher_lr=0.5)
    data = runs.teacher_data(cfg)
    assert data.task.eval_split == "validation" and data.test_x is not None
    val, train = set(map(tuple, data.eval_x.flatten(1).tolist())), set(map(tuple, data.train_x.flatten(1).tolist()))
    assert not val & train  # the validation part is carved out of the training images
    teacher = build_teacher(cfg, data)
    read_test = []
    real_views = type(data).views
    data.views = lambda split, *a: read_test.append(split == "test") or real_views(data, split, *a)
    epochs = list(pretrain_teacher(cfg, data, teacher))
    assert not any(read_test)
    want = _torch_schedule(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2, 4], gamma=0.2), 0.5, 5)
    assert [e.metrics["lr"] for e in epochs] == pytest.approx(want, rel=1e-9)
    accs = [e.metrics["val_accuracy"] for e in epochs]
    chosen = epochs[-1].metrics["chosen_epoch"]
    assert chosen == accs.index(max(accs)) + 1 < 5 and epochs[-1].metrics["chosen_val_accuracy"] == max(accs)
    assert evaluate.accuracy(teacher, data) == max(accs)  # the chosen epoch's weights are the teacher's now


def test_evaluated_only_at_the_end_of_each_stage_when_asked(world):
    """every_epoch off (the search's re-evaluation): validation after the last epoch of each
    stage only, and the same run: evaluating changes nothing the training does."""
    cfg = make_tiny_config(flag_tuning=True)
    data, t, bank, c = world[True]
    ends = [(e.stage, e.epoch, dict(e.metrics)) for e in refilled_epochs(
        cfg, data, build_student(cfg, data), teacher_embeddings(t, bank), c, every_epoch=False)]
    every = plain(cfg, world)
    assert [(s, e) for s, e, m in ends if "val_accuracy" in m] == [(STAGE1, 2), (STAGE2, 3)]
    assert ends[-1][2]["val_accuracy"] == every[-1][3]["val_accuracy"]
    assert [m["loss"] for *_, m in ends] == [m["loss"] for *_, m in every]


# ----------------------------------------------------------------------------- batch-norm statistics

def _bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


@pytest.mark.parametrize("tuning", [False, True])
def test_precise_bn_changes_evaluation_only(world, tuning):
    """bn_stats precise: the same losses and weights bit for bit (training is untouched), other
    evaluation numbers (the statistics of the current weights, not the trailing averages)."""
    cfg = make_tiny_config(flag_tuning=tuning)
    data = world[tuning][0]
    runs = {}
    for mode in ("running", "precise"):
        student = build_student(cfg, data)
        rows = records(cfg.replace(bn_stats=mode), world, student=student)
        runs[mode] = (rows, student.state_dict())
    (a, sa), (b, sb) = runs["running"], runs["precise"]
    assert [r[3]["loss"] for r in a] == [r[3]["loss"] for r in b]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    acc = [k for k in a[-1][3] if "accuracy" in k]
    assert acc and any(a[i][3][k] != b[i][3][k] for i in range(len(a)) for k in acc if k in a[i][3])


def test_precise_bn_statistics_are_those_of_the_training_images_and_put_back(world):
    from refilled.method import evaluate

    cfg = make_tiny_config(flag_tuning=True)
    data = world[True][0]
    student = build_student(cfg, data)
    before = _bn_buffers(student)
    bn = next(m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = {}
    with evaluate.statistics(student, data, "precise"):
        seen["mean"] = bn.running_mean.clone()
        x = torch.cat([x for x, _ in data.views("train")])
        student.eval()
        inputs = []
        hook = bn.register_forward_hook(lambda m, i, o: inputs.append(i[0]))
        student(x)
        hook.remove()
    after = _bn_buffers(student)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the training statistics are back
    # the first BN's statistics are the channel means of what it sees on the training images
    assert torch.allclose(seen["mean"], inputs[0].mean(dim=(0, 2, 3)), atol=1e-5)
    assert not torch.allclose(seen["mean"], before[next(k for k in before if k.endswith("running_mean"))])
    with evaluate.statistics(student, data, "running"):
        assert all(torch.equal(before[k], v) for k, v in _bn_buffers(student).items())


def test_final_student_keeps_the_statistics_it_was_tested_with(teacher_path, tmp_path):
    cfg = make_tiny_config(bn_stats="precise")
    single_run.train_once(cfg, tmp_path, teacher_path=teacher_path, progress=False)
    saved = checkpoint.load(tmp_path / "student.pt", "student")["student"]
    data = runs.student_data(cfg)
    student = build_student(cfg, data)
    student.load_state_dict(saved)
    from refilled.method import evaluate

    tested = evaluate.accuracy(student, data, "eval")
    metrics = checkpoint.load(tmp_path / "student.pt", "student")
    assert 0 <= tested <= 1
    with evaluate.statistics(student, data, "precise"):  # recomputing them again changes nothing
        assert evaluate.accuracy(student, data, "eval") == tested
    assert metrics["stage"] == 2
