"""Tests of refilled.method.losses against small hand-computed cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from refilled.method.losses import (
    _group_triplets_loop,
    class_centers,
    group_triplets,
    local_classifier_loss,
    mine_semihard_triplets,
    ncm_accuracy,
    relation_loss,
    relation_loss_on_triplets,
)

# ---------------------------------------------------------------------------
# small helpers for the hand computations (pure Python, math module)
# ---------------------------------------------------------------------------


def _norm(v):
    s = math.sqrt(sum(x * x for x in v))
    return [x / s for x in v]


def _dist(u, v):
    u, v = _norm(u), _norm(v)
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(u, v)))


def _sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _softmax(z):
    m = max(z)
    e = [math.exp(x - m) for x in z]
    s = sum(e)
    return [x / s for x in e]


def _polar(angles, radii):
    return [[r * math.cos(t), r * math.sin(t)] for t, r in zip(angles, radii)]


# Student: points on a circle (radii differ to check the normalisation).
# Angles 0, 0.3, 0.40, 0.45, labels 0, 0, 1, 1. Chord length 2 sin(dθ/2):
#   (0,1)=.2989 (0,2)=.3973 (0,3)=.4462 (1,2)=.0999 (1,3)=.1499 (2,3)=.0500
# Semi-hard (0 < d(a,n) - d(a,p) <= 0.2):
#   (0,1,2): .098 yes   (0,1,3): .147 yes   (1,0,2), (1,0,3): negative
#   (2,3,0): .347 no    (2,3,1): .050 yes   (3,2,0): .396 no   (3,2,1): .100 yes
STUDENT4 = _polar([0.0, 0.3, 0.40, 0.45], [2.0, 0.5, 3.0, 1.0])
LABELS4 = [0, 0, 1, 1]
TRIPLETS4 = {(0, 1, 2), (0, 1, 3), (2, 3, 1), (3, 2, 1)}
# Teacher: a different dimension (3-D), unnormalised.
TEACHER4 = [[1.0, 0.0, 0.0], [4.0, 3.0, 0.0], [0.2, 0.1, 0.7], [1.0, -1.0, 2.0]]


def _hand_triplet_loss(student, teacher, triplets, tau):
    total = 0.0
    for a, p, n in triplets:
        zs = (_dist(student[a], student[n]) - _dist(student[a], student[p])) / tau
        zt = (_dist(teacher[a], teacher[n]) - _dist(teacher[a], teacher[p])) / tau
        ps, pt = _sigmoid(zs), _sigmoid(zt)
        total += _kl([pt, 1 - pt], [ps, 1 - ps])
    return total / len(triplets)


def _hand_tuple_loss(student, teacher, triplets, tau):
    groups = {}
    for a, p, n in sorted(triplets):
        groups.setdefault((a, p), []).append(n)
    total = 0.0
    for (a, p), negs in groups.items():

        def probs(emb):
            return _softmax(
                [-_dist(emb[a], emb[p]) / tau] + [-_dist(emb[a], emb[n]) / tau for n in negs]
            )

        total += _kl(probs(teacher), probs(student))
    return total / len(groups)


def _t(x, **kw):
    return torch.tensor(x, dtype=torch.float32, **kw)


def _random_batch(seed, n=48, n_classes=6, ds=16, dt=24):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % n_classes
    centers = torch.randn(n_classes, ds, generator=g)
    s = centers[labels] + 0.9 * torch.randn(n, ds, generator=g)
    t = torch.randn(n, dt, generator=g)
    return s, t, labels


# ---------------------------------------------------------------------------
# stage 1
# ---------------------------------------------------------------------------


def test_miner_finds_the_hand_computed_semihard_triplets():
    a, p, n = mine_semihard_triplets(_t(STUDENT4), torch.tensor(LABELS4))
    assert set(zip(a.tolist(), p.tolist(), n.tolist())) == TRIPLETS4


@pytest.mark.parametrize("tau", [0.1, 1.0, 4.0])
def test_triplet_form_matches_hand_computation(tau):
    loss = relation_loss(_t(STUDENT4), _t(TEACHER4), torch.tensor(LABELS4), tau)
    expected = _hand_triplet_loss(STUDENT4, TEACHER4, TRIPLETS4, tau)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("tau", [0.1, 1.0, 4.0])
def test_tuple_form_matches_hand_computation(tau):
    # Groups: (0,1) -> [2, 3], (2,3) -> [1], (3,2) -> [1]: padding is exercised.
    loss = relation_loss(_t(STUDENT4), _t(TEACHER4), torch.tensor(LABELS4), tau, tuples=True)
    expected = _hand_tuple_loss(STUDENT4, TEACHER4, TRIPLETS4, tau)
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-9)


def test_tuple_form_cut_to_the_smallest_group_keeps_the_first_negatives():
    # Groups (0,1) -> [3, 2], (2,3) -> [1], (3,2) -> [1]: the smallest has K = 1, so the journal
    # code's form keeps (0,1) -> [3], the first in mining order; the padded form keeps both.
    a, p, n = (torch.tensor(v) for v in ([0, 0, 2, 3], [1, 1, 3, 2], [3, 2, 1, 1]))
    for tau in (0.5, 4.0):
        cut = relation_loss_on_triplets(_t(STUDENT4), _t(TEACHER4), a, p, n, tau, tuples=True, smallest=True)
        kept = {(0, 1, 3), (2, 3, 1), (3, 2, 1)}
        assert cut.item() == pytest.approx(_hand_tuple_loss(STUDENT4, TEACHER4, kept, tau), rel=1e-4)
        padded = relation_loss_on_triplets(_t(STUDENT4), _t(TEACHER4), a, p, n, tau, tuples=True)
        assert padded.item() == pytest.approx(_hand_tuple_loss(STUDENT4, TEACHER4, TRIPLETS4, tau), rel=1e-4)
        assert cut.item() != pytest.approx(padded.item(), rel=1e-3)


def test_tuple_form_cut_on_mined_batches_uses_every_group_once():
    s, t, labels = _random_batch(5)
    a, p, n = mine_semihard_triplets(s, labels)
    ga, gp, negs, mask = group_triplets(a, p, n)
    k = int(mask.sum(1).min())
    kept = {(x, y, z) for x, y, row in zip(ga.tolist(), gp.tolist(), negs[:, :k].tolist()) for z in row}
    cut = relation_loss(s, t, labels, 2.0, tuples=True, smallest=True)
    assert cut.item() == pytest.approx(_hand_tuple_loss(s.tolist(), t.tolist(), kept, 2.0), rel=1e-4)


def test_three_point_case_one_triplet():
    # a=(1,0), p at angle .3 (same label), n at angle .45: only (0,1,2) is semi-hard.
    student = _polar([0.0, 0.3, 0.45], [1.0, 2.0, 0.3])
    teacher = [[1.0, 0.0, 0.0], [4.0, 3.0, 0.0], [0.0, 0.0, 0.7]]
    labels = torch.tensor([0, 0, 1])
    tau = 0.5
    d_ap_s, d_an_s = 2 * math.sin(0.15), 2 * math.sin(0.225)
    d_ap_t, d_an_t = math.sqrt(0.4), math.sqrt(2.0)
    ps = _sigmoid((d_an_s - d_ap_s) / tau)
    pt = _sigmoid((d_an_t - d_ap_t) / tau)
    expected = pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))
    for tuples in (False, True):
        loss = relation_loss(_t(student), _t(teacher), labels, tau, tuples=tuples)
        assert loss.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("tuples", [False, True])
def test_zero_when_teacher_equals_student(tuples):
    s, _, labels = _random_batch(0)
    loss = relation_loss(s, s.clone(), labels, 4.0, tuples=tuples)
    assert abs(loss.item()) < 1e-6
    # a rescaled teacher is the same after L2 normalisation
    loss = relation_loss(s, 3.0 * s, labels, 0.5, tuples=tuples)
    assert abs(loss.item()) < 1e-6


def test_tuple_form_equals_triplet_form_with_one_negative_per_group():
    s, t, _ = _random_batch(1, n=30)
    g = torch.Generator().manual_seed(5)
    # every (anchor, positive) pair appears exactly once
    a = torch.arange(30)
    p = (a + 1 + torch.randint(0, 28, (30,), generator=g)) % 30
    p = torch.where(p == a, (a + 1) % 30, p)
    n = torch.randint(0, 30, (30,), generator=g)
    for tau in (0.2, 4.0):
        l_trip = relation_loss_on_triplets(s, t, a, p, n, tau)
        l_tup = relation_loss_on_triplets(s, t, a, p, n, tau, tuples=True)
        assert l_tup.item() == pytest.approx(l_trip.item(), rel=1e-4)


def _as_set(ga, gp, negs, mask):
    out = set()
    for i in range(ga.numel()):
        kept = negs[i][mask[i]].tolist()
        assert (negs[i][~mask[i]] == -1).all()
        out.add((int(ga[i]), int(gp[i]), tuple(sorted(kept))))
    return out


def test_vectorised_grouping_equals_loop():
    g = torch.Generator().manual_seed(0)
    t = 700
    a = torch.randint(0, 12, (t,), generator=g)
    p = torch.randint(0, 12, (t,), generator=g)
    n = torch.randint(0, 64, (t,), generator=g)
    fast = group_triplets(a, p, n)
    slow = _group_triplets_loop(a, p, n)
    assert fast[2].shape[1] == slow[2].shape[1]  # same Kmax
    assert fast[3].sum().item() == t
    assert _as_set(*fast) == _as_set(*slow)
    # negatives keep their order of appearance within a group
    for i in range(fast[0].numel()):
        sel = (a == fast[0][i]) & (p == fast[1][i])
        assert fast[2][i][fast[3][i]].tolist() == n[sel].tolist()


def test_vectorised_grouping_on_mined_triplets_and_empty():
    s, _, labels = _random_batch(2, n=64, n_classes=8)
    a, p, n = mine_semihard_triplets(s, labels)
    assert a.numel() > 100
    assert _as_set(*group_triplets(a, p, n)) == _as_set(*_group_triplets_loop(a, p, n))
    # the batch size as the index bound (no read-back of the maximum) groups the same
    assert _as_set(*group_triplets(a, p, n, n_samples=64)) == _as_set(*group_triplets(a, p, n))
    e = torch.empty(0, dtype=torch.long)
    ga, gp, negs, mask = group_triplets(e, e, e)
    assert ga.numel() == gp.numel() == negs.numel() == mask.numel() == 0


def test_tuple_form_matches_loop_reference_on_random_batch():
    s, t, labels = _random_batch(3)
    a, p, n = mine_semihard_triplets(s, labels)
    trip = set(zip(a.tolist(), p.tolist(), n.tolist()))
    s_l, t_l = s.tolist(), t.tolist()
    for tau in (0.5, 4.0):
        loss = relation_loss(s, t, labels, tau, tuples=True)
        assert loss.item() == pytest.approx(_hand_tuple_loss(s_l, t_l, trip, tau), rel=1e-4)
        loss = relation_loss(s, t, labels, tau)
        assert loss.item() == pytest.approx(_hand_triplet_loss(s_l, t_l, trip, tau), rel=1e-4)


@pytest.mark.parametrize("tuples", [False, True])
def test_gradient_reaches_student_only(tuples):
    s, t, labels = _random_batch(4)
    s.requires_grad_(True)
    t.requires_grad_(True)
    loss = relation_loss(s, t, labels, 1.0, tuples=tuples)
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("tuples", [False, True])
def test_nonnegative(tuples):
    for seed in range(5):
        s, t, labels = _random_batch(10 + seed)
        assert relation_loss(s, t, labels, 2.0, tuples=tuples).item() >= -1e-7


@pytest.mark.parametrize("tuples", [False, True])
def test_no_triplet_gives_zero_with_grad_path(tuples):
    s = torch.randn(5, 8, requires_grad=True)
    t = torch.randn(5, 3)
    labels = torch.arange(5)  # no positive pair -> nothing mined
    loss = relation_loss(s, t, labels, 4.0, tuples=tuples)
    assert loss.item() == 0.0
    loss.backward()
    assert s.grad is not None and (s.grad == 0).all()


def test_bf16_autocast_computes_in_float32():
    s, t, labels = _random_batch(6)
    s16, t16 = s.bfloat16(), t.bfloat16()
    for tuples in (False, True):
        ref = relation_loss(s16.float(), t16.float(), labels, 1.0, tuples=tuples)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = relation_loss(s16, t16, labels, 1.0, tuples=tuples)
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    logits = torch.randn(48, 6).bfloat16()
    centers = class_centers(t, labels, 6)
    ref = local_classifier_loss(logits.float(), t16.float(), labels, centers, 2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = local_classifier_loss(logits, t16, labels, centers, 2.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_bad_tau_rejected():
    with pytest.raises(ValueError):
        relation_loss(_t(STUDENT4), _t(TEACHER4), torch.tensor(LABELS4), 0.0)


# ---------------------------------------------------------------------------
# stage 2
# ---------------------------------------------------------------------------


def test_class_centers_hand_case_and_empty_class():
    emb = _t([[1.0, 2.0], [3.0, 0.0], [0.0, 5.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 2, 2])
    c = class_centers(emb, labels, 4)
    assert c.shape == (4, 2)
    r5 = math.sqrt(5.0)
    expected = [[2 / r5, 1 / r5], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
    assert torch.allclose(c, _t(expected), atol=1e-6)


def test_class_centers_unit_norm():
    emb = torch.randn(100, 7)
    labels = torch.randint(0, 5, (100,))
    labels[:5] = torch.arange(5)
    c = class_centers(emb, labels, 5)
    assert torch.allclose(c.norm(dim=1), torch.ones(5), atol=1e-6)
    for k in range(5):
        m = emb[labels == k].mean(0)
        assert torch.allclose(c[k], m / m.norm(), atol=1e-5)


def test_local_classifier_loss_hand_case():
    # 4 classes, batch labels {0, 2}: only classes 0 and 2 count.
    centers = _t([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    teacher = [[2.0, 1.0], [0.5, 3.0], [1.0, 1.0]]
    labels = torch.tensor([0, 2, 0])
    logits = [[1.0, 9.0, -1.0, 5.0], [0.0, -3.0, 2.0, 7.0], [0.5, 0.0, 0.5, 1.0]]
    tau = 2.0
    expected = 0.0
    for te, lo in zip(teacher, logits):
        pt = _softmax([te[0] / tau, te[1] / tau])  # dot with centres 0 and 2
        ps = _softmax([lo[0] / tau, lo[2] / tau])
        expected += _kl(pt, ps)
    expected /= 3
    student = _t(logits, requires_grad=True)
    loss = local_classifier_loss(student, _t(teacher), labels, centers, tau)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert (student.grad[:, [1, 3]] == 0).all()
    assert student.grad[:, [0, 2]].abs().sum() > 0


@pytest.mark.parametrize("n_classes, n", [(5, 8), (100, 128), (10, 2)])
def test_local_classifier_loss_equals_kl_over_the_present_classes(n_classes, n):
    """The masked form (no labels.unique(), so no host sync) against the subset
    form of the docstring: value and gradient."""
    g = torch.Generator().manual_seed(n_classes)
    logits = torch.randn(n, n_classes, generator=g, requires_grad=True)
    t = torch.randn(n, 16, generator=g)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    centers = class_centers(torch.randn(300, 16, generator=g), torch.randint(0, n_classes, (300,), generator=g),
                            n_classes)
    present = labels.unique()
    ref = F.kl_div(torch.log_softmax(logits[:, present] / 2.0, 1), torch.log_softmax(t @ centers[present].T / 2.0, 1),
                   reduction="batchmean", log_target=True)
    got = local_classifier_loss(logits, t, labels, centers, 2.0)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-7)
    (g_ref,), (g_got,) = torch.autograd.grad(ref, logits), torch.autograd.grad(got, logits)
    assert torch.isfinite(g_got).all() and torch.allclose(g_got, g_ref, atol=1e-6)
    absent = torch.ones(n_classes, dtype=torch.bool)
    absent[present] = False
    assert (g_got[:, absent] == 0).all()  # absent classes get no gradient


def test_local_classifier_loss_without_labels_takes_every_class():
    """labels=None (a transfer-set batch): the KL over all C classes, value and gradient."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 4, generator=g, requires_grad=True)
    t = torch.randn(6, 8, generator=g)
    centers = class_centers(torch.randn(40, 8, generator=g), torch.arange(40) % 4, 4)
    ref = F.kl_div(torch.log_softmax(logits / 2.0, 1), torch.log_softmax(t @ centers.T / 2.0, 1),
                   reduction="batchmean", log_target=True)
    got = local_classifier_loss(logits, t, None, centers, 2.0)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5) and got.item() > 0
    (g_got,) = torch.autograd.grad(got, logits)
    assert (g_got != 0).all()  # every class takes part
    # the same as a labelled batch in which every class is present
    assert got.item() == pytest.approx(local_classifier_loss(logits, t, torch.tensor([0, 1, 2, 3, 0, 1]),
                                                             centers, 2.0).item(), rel=1e-6)


def test_local_classifier_loss_ignores_absent_classes():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(16, 10, generator=g)
    labels = torch.tensor([0, 1, 3, 4] * 4)
    centers = class_centers(torch.randn(60, 10, generator=g), torch.arange(60) % 6, 6)
    logits = torch.randn(16, 6, generator=g)
    base = local_classifier_loss(logits, t, labels, centers, 2.0)
    changed = logits.clone()
    changed[:, [2, 5]] += torch.randn(16, 2, generator=g) * 10
    assert local_classifier_loss(changed, t, labels, centers, 2.0).item() == pytest.approx(
        base.item(), rel=1e-6
    )
    assert base.item() >= 0


def test_local_classifier_loss_with_batch_centers_and_teacher_no_grad():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(12, 5, generator=g, requires_grad=True)
    labels = torch.tensor([0, 2, 2, 4] * 3)
    logits = torch.randn(12, 5, generator=g, requires_grad=True)
    loss = local_classifier_loss(logits, t, labels, class_centers(t, labels, 5), 1.0)
    loss.backward()
    assert loss.item() >= 0
    assert t.grad is None and logits.grad is not None


def test_local_classifier_loss_zero_when_student_matches_teacher():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(8, 4, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    centers = class_centers(t, labels, 4)
    logits = t @ centers.T
    assert abs(local_classifier_loss(logits, t, labels, centers, 2.0).item()) < 1e-6


# ---------------------------------------------------------------------------
# NCM
# ---------------------------------------------------------------------------


def test_ncm_separable_is_perfect():
    g = torch.Generator().manual_seed(0)
    dirs = torch.eye(5, 16) * 10
    tr_lab = torch.arange(100) % 5
    ev_lab = torch.arange(40) % 5
    tr = dirs[tr_lab] + torch.randn(100, 16, generator=g)
    ev = dirs[ev_lab] + torch.randn(40, 16, generator=g)
    assert ncm_accuracy(tr, tr_lab, ev, ev_lab, 5) == 1.0


def test_ncm_hand_case():
    # class means: class 0 along (1, 0), class 1 along (0, 1); class 2 has no
    # training sample and must never be predicted.
    tr = _t([[3.0, 0.0], [1.0, 0.0], [0.0, 0.2]])
    tr_lab = torch.tensor([0, 0, 1])
    ev = _t([[2.0, 1.0], [1.0, 2.0], [0.0, 5.0], [1.0, 1.01], [-1.0, -1.0]])
    ev_lab = torch.tensor([0, 0, 1, 1, 2])
    # predictions: 0 (ok), 1 (wrong), 1 (ok), 1 (ok), not 2 (wrong) -> 3/5
    assert ncm_accuracy(tr, tr_lab, ev, ev_lab, 3) == pytest.approx(0.6)
