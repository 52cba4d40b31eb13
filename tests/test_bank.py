"""refilled.method.bank: looked-up teacher embeddings equal the teacher's own forward passes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from refilled.data import augment
from refilled.data.device import Batch
from refilled.method.bank import TeacherBank, teacher_embeddings
from refilled.method.losses import class_centers
from refilled.method.stages import LocalClassifierDistillation, RelationMatching
from refilled.method.train import build_student, global_centers
from refilled.runs import inputs as runs
from support.configs import make_tiny_config


@pytest.fixture(scope="module")
def setup(teacher_path):
    cfg = make_tiny_config()
    data = runs.student_data(cfg)
    teacher = runs.load_teacher(teacher_path, cfg, data)
    bank = TeacherBank.build(teacher, data, progress=False)
    return cfg, data, teacher, bank


def close_rows(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-2) -> None:
    """Row-wise agreement within fp16 precision, relative to each row's norm."""
    assert a.shape == b.shape
    err = (a - b).norm(dim=1)
    scale = b.norm(dim=1).clamp_min(1e-6)
    assert float((err / scale).max()) < rel, float((err / scale).max())


def some_batches(data, n=3, seed=0, batch_size=16):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in data.train_batches(g, batch_size):
        out.append(b)
        if len(out) == n:
            break
    return out


def test_bank_shape_and_dtype(setup):
    _, data, teacher, bank = setup
    assert bank.shape == (data.n_train, data.aug.n_variants, teacher.embedding_dim)
    assert bank.embeddings.dtype == torch.float16
    assert data.n_train == 50  # 10 shots x 5 classes


def test_lookups_equal_teacher_forwards(setup):
    _, data, teacher, bank = setup
    teacher.eval()
    for b in some_batches(data):
        looked_up = bank.lookup(b.idx, b.params)
        assert looked_up.dtype == torch.float32
        with torch.no_grad():
            forward = teacher.embed(augment.train_view(data.train_x[b.idx], data.aug, b.params, data.mean, data.std))
            also = teacher.embed(b.x)  # the batch's own view is the same images
        torch.testing.assert_close(also, forward)
        close_rows(looked_up, forward)
        torch.testing.assert_close(looked_up, forward, rtol=1e-2, atol=1e-2 * float(forward.abs().max()))


def test_every_variant_of_one_image(setup):
    _, data, teacher, bank = setup
    v = data.aug.n_variants
    idx = torch.full((v,), 7)
    variants = torch.arange(v)
    with torch.no_grad():
        forward = teacher.embed(augment.train_view(data.train_x[idx], data.aug, variants, data.mean, data.std))
    close_rows(bank.lookup(idx, variants), forward)
    # the variants really differ (else the test above would prove little)
    assert float((forward - forward[data.aug.identity_variant]).norm(dim=1).max()) > 1e-3


def test_global_centres_from_bank_equal_forward_centres(setup):
    _, data, teacher, bank = setup
    from_bank = global_centers(teacher, bank, data)
    from_forward = global_centers(teacher, None, data)
    assert from_bank.shape == (data.n_classes, teacher.embedding_dim)
    close_rows(from_bank, from_forward)
    # and those are the class centres of the teacher's embedding of the unaugmented images
    with torch.no_grad():
        emb = teacher.embed(augment.eval_view(data.train_x, data.aug, data.mean, data.std))
    torch.testing.assert_close(from_forward, class_centers(emb, data.train_y, data.n_classes), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_bank.norm(dim=1), torch.ones(data.n_classes), rtol=1e-4, atol=1e-4)


def test_unaugmented_is_the_identity_variant(setup):
    _, data, teacher, bank = setup
    with torch.no_grad():
        emb = teacher.embed(augment.eval_view(data.train_x, data.aug, data.mean, data.std))
    close_rows(bank.unaugmented(data.aug.identity_variant), emb)


@pytest.mark.parametrize("tuples", [False, True])
def test_stage1_loss_with_bank_equals_loss_with_teacher(setup, tuples):
    cfg, data, teacher, bank = setup
    student = build_student(cfg, data).eval()  # eval: no dropout, the same embedding twice
    with_bank = RelationMatching(student, teacher_embeddings(teacher, bank), cfg.tau1, cfg.stage1_scale, tuples)
    with_teacher = RelationMatching(student, teacher_embeddings(teacher, None), cfg.tau1, cfg.stage1_scale, tuples)
    nonzero = 0
    for b in some_batches(data, n=3, seed=1):
        _, la = with_bank(b)
        _, lb = with_teacher(b)
        a, t = la["relation"], lb["relation"]
        assert torch.isfinite(a)
        torch.testing.assert_close(a, t, rtol=2e-2, atol=1e-3)
        nonzero += t.item() > 0
    assert nonzero > 0


@pytest.mark.parametrize("local", [False, True])
def test_stage2_loss_with_bank_equals_loss_with_teacher(setup, local):
    cfg, data, teacher, bank = setup
    student = build_student(cfg, data).eval()
    centres_bank = None if local else global_centers(teacher, bank, data)
    centres_teacher = None if local else global_centers(teacher, None, data)
    with_bank = LocalClassifierDistillation(student, teacher_embeddings(teacher, bank), centres_bank,
                                            data.n_classes, cfg.tau2, 10.0)
    with_teacher = LocalClassifierDistillation(student, teacher_embeddings(teacher, None), centres_teacher,
                                               data.n_classes, cfg.tau2, 10.0)
    for b in some_batches(data, n=3, seed=2):
        _, la = with_bank(b)
        _, lb = with_teacher(b)
        assert set(la) == set(lb) == {"ce", "local_kd"}
        torch.testing.assert_close(la["ce"], lb["ce"])
        assert lb["local_kd"].item() > 0
        torch.testing.assert_close(la["local_kd"], lb["local_kd"], rtol=2e-2, atol=1e-4)


def test_save_load_round_trip_is_memory_mapped(setup, tmp_path):
    _, data, _, bank = setup
    path = bank.save(tmp_path / "sub" / "bank.npy")
    assert path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["bank.npy"]  # no temp file left
    loaded = TeacherBank.load(path)
    assert isinstance(loaded.embeddings, np.memmap)
    assert loaded.shape == bank.shape and loaded.embeddings.dtype == np.float16
    np.testing.assert_array_equal(np.asarray(loaded.embeddings), bank.embeddings.numpy())
    assert loaded.to(torch.device("cpu")) is loaded  # stays memory-mapped on the CPU
    b = some_batches(data, n=1, seed=3)[0]
    torch.testing.assert_close(loaded.lookup(b.idx, b.params), bank.lookup(b.idx, b.params), rtol=0, atol=0)
    torch.testing.assert_close(loaded.unaugmented(data.aug.identity_variant),
                               bank.unaugmented(data.aug.identity_variant), rtol=0, atol=0)
    # a second save over the first replaces it
    TeacherBank(bank.embeddings[:3].clone()).save(path)
    assert TeacherBank.load(path).shape[0] == 3


def test_teacher_embeddings_without_bank_counts_forwards(setup):
    _, data, teacher, _ = setup
    counter: dict = {}
    fn = teacher_embeddings(teacher, None, counter)
    batches = some_batches(data, n=3, seed=4)
    for b in batches:
        emb = fn(b)
        assert emb.shape == (len(b.y), teacher.embedding_dim) and not emb.requires_grad
    assert counter["teacher_forward_images"] == sum(len(b.y) for b in batches)
    # with a bank nothing is forwarded, so nothing is counted
    counter2: dict = {}
    fn = teacher_embeddings(teacher, TeacherBank(torch.zeros(data.n_train, data.aug.n_variants, 4)), counter2)
    b = batches[0]
    assert fn(b).shape == (len(b.y), 4)
    assert counter2 == {}


def test_bank_build_refuses_infinite_augmentation(setup):
    _, data, teacher, _ = setup
    no_variants = dataclasses.replace(data, aug=augment.Augmentation("resized_crop", flip=True, out_size=8))

    with pytest.raises(ValueError):
        TeacherBank.build(teacher, no_variants, progress=False)


def test_batch_dataclass_fields(setup):
    _, data, _, _ = setup
    b = some_batches(data, n=1)[0]
    assert isinstance(b, Batch)
    assert b.x.shape == (16, 1, 8, 8) and b.y.shape == (16,) and b.params.shape == (16,)
    assert torch.equal(b.y, data.train_y[b.idx])
