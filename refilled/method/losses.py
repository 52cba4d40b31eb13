"""REFILLED losses and the NCM metric, usable from any training loop.

REFILLED distils a fixed teacher into a student in two stages, using only the
teacher's *embedding* (penultimate feature), so the teacher's classes need not
match the student's.

Stage 1 -- relationship matching on the embedding
    :func:`relation_loss` mines semi-hard triplets on the student's normalised
    embedding and matches, triplet by triplet, the teacher's and the student's
    probability that the anchor is closer to the positive than to the negative
    (KL from teacher to student). With ``tuples=True`` the triplets sharing an
    (anchor, positive) pair are merged into one softmax over
    ``[positive, negative_1, ..., negative_K]`` (the authors' ``flag_merge``).
    The loss is returned *unscaled* (mean over triplets or groups); the large
    constant the authors multiply it by belongs to the training loop.
    Stage 1 is judged with :func:`ncm_accuracy`.

Stage 2 -- local classifier distillation
    :func:`class_centers` gives per-class centres of the teacher's embedding;
    :func:`local_classifier_loss` turns them into teacher logits over the
    classes present in the batch and matches them with the student's logits
    on those classes. The full stage-2 loss is
    ``cross_entropy(student_logits, labels) + lambd * local_classifier_loss(...)``.
    "Global" centres are ``class_centers`` over the whole training split,
    computed once; "local" centres are ``class_centers(teacher_emb, labels,
    n_classes)`` on the mini-batch itself.

Mixed precision: every function does its arithmetic in float32 with autocast
disabled, so it is safe to call inside ``torch.autocast(..., dtype=bfloat16)``;
the returned loss is a float32 tensor.

Example (stage 1)::

    with torch.no_grad():
        t_emb = teacher.embed(x)
    s_emb = student.embed(x)
    loss = scale * relation_loss(s_emb, t_emb, y, tau=4.0, tuples=False)
    loss.backward()

Example (stage 2, global centres)::

    centers = class_centers(all_teacher_train_emb, all_train_labels, n_classes)
    ...
    logits = student(x)
    loss = F.cross_entropy(logits, y) + lambd * local_classifier_loss(
        logits, t_emb, y, centers, tau=2.0)
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "relation_loss",
    "relation_loss_on_triplets",
    "mine_semihard_triplets",
    "group_triplets",
    "class_centers",
    "local_classifier_loss",
    "ncm_accuracy",
]


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def _fp32(device: torch.device) -> Iterator[None]:
    """Disable autocast for ``device`` so that the math below stays float32."""
    dev = device.type if device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
    try:
        ctx = torch.autocast(device_type=dev, enabled=False)
    except RuntimeError:  # an autocast-less backend: nothing to disable
        ctx = contextlib.nullcontext()
    with ctx:
        yield


def _check_tau(tau: float) -> None:
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau!r}")


def _check_batch(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name_a} has {a.shape[0]} rows but {name_b} has {b.shape[0]}"
        )


def _pairwise_dist(x: Tensor) -> Tensor:
    """Euclidean distance matrix of the rows of ``x`` (N, N).

    Uses ``torch.cdist`` like pytorch-metric-learning's ``LpDistance``, so the
    distances match the ones the miner saw.
    """
    return torch.cdist(x, x, p=2)


# ----------------------------------------------------------------------------
# stage 1: triplet mining and grouping
# ----------------------------------------------------------------------------


def mine_semihard_triplets(
    student_emb: Tensor, labels: Tensor, margin: float = 0.2
) -> tuple[Tensor, Tensor, Tensor]:
    """Semi-hard triplets of the student's L2-normalised embedding.

    Uses pytorch-metric-learning's
    ``TripletMarginMiner(margin=margin, type_of_triplets="semihard")`` with its
    default Euclidean distance: a triplet (a, p, n) with ``labels[a] ==
    labels[p]``, ``a != p``, ``labels[n] != labels[a]`` is kept when
    ``0 < d(a, n) - d(a, p) <= margin``. Runs without gradient.

    Returns:
        ``(anchors, positives, negatives)``, three int64 tensors of the same
        length (possibly zero), indexing rows of ``student_emb``.
    """
    from pytorch_metric_learning.miners import TripletMarginMiner

    _check_batch("student_emb", student_emb, "labels", labels)
    with torch.no_grad(), _fp32(student_emb.device):
        z = F.normalize(student_emb.detach().float(), dim=1)
        miner = TripletMarginMiner(margin=margin, type_of_triplets="semihard")
        a, p, n = miner(z, labels)
    return a.long(), p.long(), n.long()


def group_triplets(
    anchors: Tensor, positives: Tensor, negatives: Tensor, n_samples: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Group triplets by their (anchor, positive) pair, vectorised.

    Args:
        anchors, positives, negatives: 1-D integer tensors of length T.
        n_samples: a bound on the indices (the batch size), if known: saves
            reading their maximum back from the device.

    Returns:
        ``(group_anchor, group_positive, negatives_padded, mask)`` where, with
        G the number of distinct (anchor, positive) pairs and Kmax the largest
        number of negatives in a group:

        - ``group_anchor``, ``group_positive``: (G,) int64, the pair of each
          group, sorted by (anchor, positive);
        - ``negatives_padded``: (G, Kmax) int64, the negatives of each group in
          their order of appearance in the input, padded with ``-1``;
        - ``mask``: (G, Kmax) bool, True where ``negatives_padded`` holds a
          real negative.

        With T == 0 all four are empty (G = Kmax = 0).

    No Python loop over triplets: ``torch.unique`` on a combined key gives each
    triplet its group, a stable sort plus the group start offsets gives its
    rank inside the group, and one scatter fills the padded table.
    """
    if not (anchors.shape == positives.shape == negatives.shape) or anchors.dim() != 1:
        raise ValueError("anchors, positives and negatives must be 1-D and of equal length")
    device = anchors.device
    a, p, n = anchors.long(), positives.long(), negatives.long()
    t = a.numel()
    if t == 0:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return (
            empty,
            empty.clone(),
            torch.empty(0, 0, dtype=torch.long, device=device),
            torch.empty(0, 0, dtype=torch.bool, device=device),
        )
    base = n_samples if n_samples is not None else int(torch.maximum(a.max(), p.max()).item()) + 1
    key = a * base + p
    uniq, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
    g = uniq.numel()
    kmax = int(counts.max().item())
    order = torch.argsort(inverse, stable=True)
    grp = inverse[order]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(t, device=device) - starts[grp]
    negatives_padded = torch.full((g, kmax), -1, dtype=torch.long, device=device)
    negatives_padded[grp, rank] = n[order]
    mask = torch.zeros((g, kmax), dtype=torch.bool, device=device)
    mask[grp, rank] = True
    return uniq // base, uniq % base, negatives_padded, mask


def _group_triplets_loop(
    anchors: Tensor, positives: Tensor, negatives: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference grouping with a Python dict, as the authors' code does.

    Slow (one Python step per triplet); kept only so that tests and benchmarks
    can check :func:`group_triplets` against it. Same return format, groups in
    order of first appearance.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for a, p, n in zip(anchors.tolist(), positives.tolist(), negatives.tolist()):
        groups.setdefault((a, p), []).append(n)
    device = anchors.device
    g = len(groups)
    kmax = max((len(v) for v in groups.values()), default=0)
    ga = torch.tensor([k[0] for k in groups], dtype=torch.long, device=device)
    gp = torch.tensor([k[1] for k in groups], dtype=torch.long, device=device)
    padded = torch.full((g, kmax), -1, dtype=torch.long)
    mask = torch.zeros((g, kmax), dtype=torch.bool)
    for i, negs in enumerate(groups.values()):
        padded[i, : len(negs)] = torch.tensor(negs, dtype=torch.long)
        mask[i, : len(negs)] = True
    return ga, gp, padded.to(device), mask.to(device)


# ----------------------------------------------------------------------------
# stage 1: the losses
# ----------------------------------------------------------------------------


def _triplet_kl(ds: Tensor, dt: Tensor, a: Tensor, p: Tensor, n: Tensor, tau: float) -> Tensor:
    """Mean over triplets of KL([pT, 1-pT] || [pS, 1-pS])."""
    zs = (ds[a, n] - ds[a, p]) / tau
    zt = (dt[a, n] - dt[a, p]) / tau
    log_ps, log_qs = F.logsigmoid(zs), F.logsigmoid(-zs)  # log pS, log(1 - pS)
    log_pt, log_qt = F.logsigmoid(zt), F.logsigmoid(-zt)
    pt = torch.sigmoid(zt)
    kl = pt * (log_pt - log_ps) + (1.0 - pt) * (log_qt - log_qs)
    return kl.mean()


def _tuple_kl(ds: Tensor, dt: Tensor, a: Tensor, p: Tensor, n: Tensor, tau: float,
              smallest: bool = False) -> Tensor:
    """Mean over (anchor, positive) groups of KL(softmax_T || softmax_S). `smallest`:
    every group keeps only its first K negatives (mining order), K the smallest group's."""
    ga, gp, negs, mask = group_triplets(a, p, n, n_samples=ds.shape[0])
    if smallest:
        k = int(mask.sum(dim=1).min().item())
        negs, mask = negs[:, :k], mask[:, :k]
    negs = negs.clamp_min(0)  # padding -> a valid index; masked out below
    full_mask = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)

    def log_probs(d: Tensor) -> Tensor:
        logits = torch.cat([-d[ga, gp].unsqueeze(1), -d[ga.unsqueeze(1), negs]], dim=1) / tau
        return torch.log_softmax(logits.masked_fill(~full_mask, float("-inf")), dim=1)

    log_s, log_t = log_probs(ds), log_probs(dt)
    # 0 * log 0 := 0 on the padding; where() also keeps (-inf) - (-inf) out.
    diff = torch.where(full_mask, log_t - log_s, torch.zeros_like(log_s))
    kl = (log_t.exp() * diff).sum(dim=1)
    return kl.mean()


def relation_loss_on_triplets(
    student_emb: Tensor,
    teacher_emb: Tensor,
    anchors: Tensor,
    positives: Tensor,
    negatives: Tensor,
    tau: float,
    *,
    tuples: bool = False,
    smallest: bool = False,
) -> Tensor:
    """Stage-1 relationship-matching loss on given triplets.

    Same as :func:`relation_loss` but with the triplets supplied by the caller
    (e.g. from another miner). Both embeddings are L2-normalised here; they may
    have different dimensions. See :func:`relation_loss` for the two forms.
    """
    _check_tau(tau)
    _check_batch("student_emb", student_emb, "teacher_emb", teacher_emb)
    with _fp32(student_emb.device):
        if anchors.numel() == 0:
            return student_emb.float().sum() * 0.0
        zs = F.normalize(student_emb.float(), dim=1)
        ds = _pairwise_dist(zs)
        with torch.no_grad():
            zt = F.normalize(teacher_emb.detach().float(), dim=1)
            dt = _pairwise_dist(zt)
        a, p, n = anchors.long(), positives.long(), negatives.long()
        if tuples:
            return _tuple_kl(ds, dt, a, p, n, tau, smallest)
        return _triplet_kl(ds, dt, a, p, n, tau)


def relation_loss(
    student_emb: Tensor,
    teacher_emb: Tensor,
    labels: Tensor,
    tau: float,
    *,
    tuples: bool = False,
    smallest: bool = False,
    margin: float = 0.2,
) -> Tensor:
    """REFILLED stage-1 loss: match the teacher's triplet relations.

    Args:
        student_emb: (N, Ds) student embeddings (gradient flows here).
        teacher_emb: (N, Dt) teacher embeddings; Dt may differ from Ds. Treated
            as constant (no gradient).
        labels: (N,) integer class labels of the batch.
        tau: temperature ``tau1`` (> 0).
        tuples: False for the triplet form, True for the tuple form (the
            authors' ``flag_merge``).
        smallest: tuple form only: cut every group to the batch's smallest
            number of negatives K, keeping each group's first K in mining
            order (the journal code, njulus/GKD); False pads and masks the
            groups, so every mined negative counts (the CVPR code).
        margin: semi-hard mining margin.

    Both embeddings are L2-normalised here. Semi-hard triplets are mined on the
    student's normalised embedding (see :func:`mine_semihard_triplets`); d is
    the Euclidean distance between normalised embeddings.

    Triplet form: for each triplet and each model,
    ``p = sigmoid((d(a, n) - d(a, p)) / tau)``; the loss is the mean over
    triplets of ``KL([p_T, 1 - p_T] || [p_S, 1 - p_S])``.

    Tuple form: triplets are grouped by (a, p) (:func:`group_triplets`); a
    group with negatives n_1..n_K gives, in each model,
    ``softmax([-d(a, p), -d(a, n_1), ..., -d(a, n_K)] / tau)``; the loss is the
    mean over groups of the KL from the teacher's to the student's
    distribution (summed over the K + 1 entries). With K == 1 everywhere it
    equals the triplet form.

    Returns:
        A float32 scalar, the *unscaled* mean (multiply it by the stage-1 loss
        scale yourself: the authors' is 500 for the triplet form, 1000 for the
        tuple form, ``Config.stage1_scale``). If no triplet is mined it is 0 but still connected to
        ``student_emb``, so ``backward()`` works.
    """
    _check_batch("student_emb", student_emb, "labels", labels)
    a, p, n = mine_semihard_triplets(student_emb, labels, margin)
    return relation_loss_on_triplets(
        student_emb, teacher_emb, a, p, n, tau, tuples=tuples, smallest=smallest
    )


# ----------------------------------------------------------------------------
# stage 2
# ----------------------------------------------------------------------------


def class_centers(teacher_emb: Tensor, labels: Tensor, n_classes: int) -> Tensor:
    """Per-class mean of ``teacher_emb``, L2-normalised.

    Args:
        teacher_emb: (N, D) embeddings, used as given (not normalised first).
        labels: (N,) integer labels in ``[0, n_classes)``.
        n_classes: number of classes C.

    Returns:
        (C, D) float32 tensor, no gradient. Row c is the normalised mean of the
        rows of class c; a class with no sample gets a **zero row** (so its
        dot product with any embedding is 0).

    For "global" stage-2 centres call it once on the teacher embeddings of the
    whole training split; for "local" centres call it on each mini-batch.
    """
    _check_batch("teacher_emb", teacher_emb, "labels", labels)
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes})")
    with torch.no_grad(), _fp32(teacher_emb.device):
        x = teacher_emb.detach().float()
        sums = x.new_zeros(n_classes, x.shape[1]).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=n_classes).to(x.dtype)
        means = sums / counts.clamp_min(1.0).unsqueeze(1)
        return F.normalize(means, dim=1)  # zero rows stay zero


def local_classifier_loss(
    student_logits: Tensor,
    teacher_emb: Tensor,
    labels: Tensor | None,
    centers: Tensor,
    tau: float,
) -> Tensor:
    """REFILLED stage-2 distillation term (not weighted by ``lambd``).

    Only the classes present in the batch take part: ``present =
    labels.unique()`` (sorted). Teacher logits are ``teacher_emb @
    centers[present].T`` (``teacher_emb`` unnormalised, no gradient); the loss
    is the batch mean of
    ``KL(softmax(teacher_logits / tau) || softmax(student_logits[:, present] / tau))``
    with the KL summed over the present classes. No ``tau**2`` factor.
    ``labels=None`` (images without labels: a transfer set) lets every class
    take part.

    Args:
        student_logits: (N, C) student logits over all C classes.
        teacher_emb: (N, D) teacher embeddings.
        labels: (N,) labels in ``[0, C)``, or None for all C classes.
        centers: (C, D) class centres, e.g. global ones from
            :func:`class_centers` on the training split, or local ones from
            ``class_centers(teacher_emb, labels, C)`` on this batch.
        tau: temperature ``tau2`` (> 0).

    Returns:
        A float32 scalar.
    """
    _check_tau(tau)
    _check_batch("student_logits", student_logits, "teacher_emb", teacher_emb)
    if labels is not None:
        _check_batch("student_logits", student_logits, "labels", labels)
    if centers.shape[0] != student_logits.shape[1]:
        raise ValueError(
            f"centers has {centers.shape[0]} rows but student_logits has "
            f"{student_logits.shape[1]} classes"
        )
    with _fp32(student_logits.device):
        # the present classes as a mask over all C, not labels.unique(): no host sync on CUDA
        n_classes = student_logits.shape[1]
        if labels is None:
            present = torch.ones(n_classes, dtype=torch.bool, device=student_logits.device)
        else:
            present = torch.zeros(n_classes, dtype=torch.bool, device=labels.device)
            present[labels.long()] = True
        absent = ~present
        with torch.no_grad():
            t_logits = teacher_emb.detach().float() @ centers.detach().float().T
            log_t = torch.log_softmax((t_logits / tau).masked_fill(absent, float("-inf")), dim=1)
        log_s = torch.log_softmax((student_logits.float() / tau).masked_fill(absent, float("-inf")), dim=1)
        # KL over the present classes: absent ones have teacher probability 0, and their
        # -inf log-probabilities become 0 first so that no inf - inf makes a NaN
        log_t, log_s = log_t.masked_fill(absent, 0.0), log_s.masked_fill(absent, 0.0)
        return (log_t.exp().masked_fill(absent, 0.0) * (log_t - log_s)).sum() / student_logits.shape[0]


# ----------------------------------------------------------------------------
# metric
# ----------------------------------------------------------------------------


def ncm_accuracy(
    train_emb: Tensor,
    train_labels: Tensor,
    eval_emb: Tensor,
    eval_labels: Tensor,
    n_classes: int,
) -> float:
    """Nearest-class-mean accuracy with cosine similarity (stage-1 metric).

    Class means are taken over the L2-normalised ``train_emb`` and normalised
    again; each row of ``eval_emb`` is assigned the class whose mean has the
    largest cosine similarity. Classes without a training sample are never
    predicted.

    Returns:
        The fraction of ``eval_labels`` predicted correctly, in [0, 1].
    """
    _check_batch("train_emb", train_emb, "train_labels", train_labels)
    _check_batch("eval_emb", eval_emb, "eval_labels", eval_labels)
    if eval_emb.shape[0] == 0:
        raise ValueError("ncm_accuracy needs at least one evaluation sample")
    with torch.no_grad(), _fp32(eval_emb.device):
        train = F.normalize(train_emb.detach().float(), dim=1)
        centers = class_centers(train, train_labels, n_classes).to(eval_emb.device)
        has_train = torch.bincount(train_labels.long(), minlength=n_classes) > 0
        sims = F.normalize(eval_emb.detach().float(), dim=1) @ centers.T
        sims = sims.masked_fill(~has_train.to(sims.device), float("-inf"))
        pred = sims.argmax(dim=1)
        return (pred == eval_labels.to(pred.device).long()).float().mean().item()
