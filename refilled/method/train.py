"""The training loops: teacher pre-training, stage 1, stage 2.

Each loop is a generator of `Epoch`s, so its caller (the CLI, a Ray Tune
trial, the final retrain) decides what to do with every epoch: print it, log
it, report it, checkpoint it (`epoch.snapshot()`), or stop.

Learning rates are functions of the epoch, and every epoch's randomness comes
from (seed, stage, epoch) alone, so a run resumed from a snapshot continues
exactly where it stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from refilled.data.device import DeviceTask
from refilled.errors import Diverged  # noqa: F401  (raised here, imported from here by callers)
from refilled.method import evaluate
from refilled.method.bank import TeacherBank, TeacherEmbeddings
from refilled.method.losses import class_centers
from refilled.method.networks import Network, build_network
from refilled.method.stages import CrossEntropy, LocalClassifierDistillation, RelationMatching
from refilled.method.torchvision_nets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TorchvisionNetwork,
    is_torchvision,
    load_all_but_the_head,
    read_weights,
    torchvision_arch,
)
from refilled.runtime import autocast, epoch_generator, prepare_model
from refilled.schema.config import Config

TEACHER, STAGE1, STAGE2 = 0, 1, 2


@dataclass
class Epoch:
    stage: int  # TEACHER, STAGE1 or STAGE2
    epoch: int  # 1-based, within the stage
    step: int  # 1-based across stage 1 and stage 2: the clock ASHA compares trials on
    metrics: dict[str, float]
    snapshot: Callable[[], dict[str, Any]]  # state to resume after this epoch


# ----------------------------------------------------------------------------- models

def _image_shape(data: DeviceTask) -> tuple[int, int]:
    channels, side = data.train_x.shape[1], data.train_x.shape[-1]
    return channels, (data.aug.out_size or side)


def build_student(cfg: Config, data: DeviceTask) -> Network:
    channels, side = _image_shape(data)
    torch.manual_seed(cfg.seed)  # same initial student for the same seed
    if is_torchvision(cfg.student_network_name):  # from scratch at the data's own normalisation, or student_weights
        state, said = read_weights(cfg.student_weights, cfg.student_network_name) if cfg.student_weights else ({}, {})
        net = TorchvisionNetwork(torchvision_arch(cfg.student_network_name, data.n_classes, data=data.task_norm,
                                                  image_size=side, **said))
        load_all_but_the_head(net, state, cfg.student_weights)
    else:
        net = build_network(cfg.student_network_name, data.n_classes, depth=cfg.depth, width=cfg.width, ca=cfg.ca,
                            dropout_rate=cfg.dropout_rate, in_channels=channels, image_size=side)
    return prepare_model(net, data.device)


def build_teacher(cfg: Config, data: DeviceTask, n_classes: int | None = None, arch: dict | None = None) -> Network:
    """The teacher for images like `data`'s; n_classes defaults to data's (the
    source task when pretraining; a loaded teacher's own count otherwise). `arch`: a
    torchvision teacher's as its checkpoint records it (its input size and normalisation)."""
    channels, side = _image_shape(data)
    torch.manual_seed(cfg.seed)
    if is_torchvision(cfg.teacher_network_name):
        if arch is None:  # to pretrain: torchvision's input convention unless the config says otherwise
            arch = torchvision_arch(cfg.teacher_network_name, n_classes or data.n_classes, data=data.task_norm,
                                    image_size=side, input_size=cfg.teacher_input_size,
                                    input_norm=(cfg.teacher_mean or IMAGENET_MEAN, cfg.teacher_std or IMAGENET_STD))
        net = TorchvisionNetwork({**arch, "data_mean": list(data.task_norm[0]), "data_std": list(data.task_norm[1])})
    else:
        net = build_network(cfg.teacher_network_name, n_classes or data.n_classes, depth=cfg.teacher_depth,
                            width=cfg.teacher_width, ca=cfg.teacher_ca, dropout_rate=cfg.teacher_dropout_rate,
                            in_channels=channels, image_size=side)
    return prepare_model(net, data.device)


# ----------------------------------------------------------------------------- schedules

def cosine(lr: float, final: float, n_epochs: int) -> Callable[[int], float]:
    return lambda e: final + (lr - final) * (1 + math.cos(math.pi * e / max(n_epochs, 1))) / 2


def multistep(lr: float, points: tuple[int, ...], gamma: float) -> Callable[[int], float]:
    return lambda e: lr * gamma ** sum(e >= p for p in points)


# ----------------------------------------------------------------------------- the loop

def _sgd(params, cfg: Config, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=cfg.mo, weight_decay=cfg.wd, nesterov=cfg.mo > 0)


def train_epochs(method, optimizer: torch.optim.Optimizer, lr_at: Callable[[int], float], data: DeviceTask,
                 *, n_epochs: int, batch_size: int, seed: int, stage: int, start: int = 0,
                 unlabelled: bool = False) -> Iterator[tuple[int, dict[str, float]]]:
    """The one training loop every stage shares. Yields (epoch, metrics).
    `unlabelled`: batches carry transfer-set images too (DeviceTask.train_batches)."""
    for epoch in range(start, n_epochs):
        lr = lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        generator = epoch_generator(seed, stage, epoch, data.device)
        sums: dict[str, torch.Tensor] = {}
        for batch in data.train_batches(generator, batch_size, unlabelled):
            with autocast(data.device):
                _, losses = method(batch)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for name, value in losses.items():  # stays on the device: no sync per batch
                sums[name] = sums.get(name, 0) + value.detach().float() * len(batch.y)
        means = (torch.stack(list(sums.values())) / data.n_train).tolist()  # one sync per epoch
        metrics = {f"loss/{name}": v for name, v in zip(sums, means)}
        metrics["loss"] = sum(means)
        metrics["lr"] = lr
        if not math.isfinite(metrics["loss"]):
            label = {TEACHER: "teacher pre-training", STAGE1: "stage 1", STAGE2: "stage 2"}[stage]
            raise Diverged(f"{label} diverged at epoch {epoch + 1}: training loss is {metrics['loss']}")
        yield epoch + 1, metrics


def pretrain_teacher(cfg: Config, data: DeviceTask, teacher: Network) -> Iterator[Epoch]:
    """Supervised teacher training on the source task, as the authors' pretrain.py:
    SGD Nesterov from teacher_lr, multi-step decay at teacher_point by teacher_gamma.

    Every epoch is evaluated on the validation part (`val_accuracy`); the epoch
    with the highest (the first of equals, as theirs) is kept: once the last
    epoch has been yielded, its weights are loaded back into `teacher`, and the
    last Epoch's metrics name it (`chosen_epoch`, `chosen_val_accuracy`). The
    authors choose it on the test part; the test part is not read here."""
    optimizer = _sgd(teacher.parameters(), cfg, cfg.teacher_lr)
    teacher.train()
    best, best_state, best_epoch = -1.0, None, 0
    for epoch, metrics in train_epochs(CrossEntropy(teacher), optimizer,
                                       multistep(cfg.teacher_lr, cfg.teacher_point, cfg.teacher_gamma),
                                       data, n_epochs=cfg.teacher_epochs, batch_size=cfg.teacher_batch_size,
                                       seed=cfg.seed, stage=TEACHER):
        metrics["val_accuracy"] = evaluate.accuracy(teacher, data)
        if metrics["val_accuracy"] > best:
            best, best_epoch = metrics["val_accuracy"], epoch
            best_state = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
        if epoch == cfg.teacher_epochs:
            metrics.update(chosen_epoch=best_epoch, chosen_val_accuracy=best)
        yield Epoch(TEACHER, epoch, epoch, metrics, lambda: {"model": teacher.state_dict()})
    if best_state is not None:
        teacher.load_state_dict(best_state)


def global_centers(teacher: Network, bank: TeacherBank | None, data: DeviceTask) -> torch.Tensor:
    """Class centres of the teacher's embedding over the student's whole training split."""
    if bank is not None and data.aug.identity_variant is not None:
        emb, labels = bank.unaugmented(data.aug.identity_variant).to(data.device), data.train_y
    else:
        emb, labels = evaluate.embed_all(teacher, data, "train")
    return class_centers(emb, labels, data.n_classes)


def refilled_epochs(cfg: Config, data: DeviceTask, student: Network, teacher: TeacherEmbeddings | None,
                    centers: torch.Tensor | None = None, resume: dict[str, Any] | None = None,
                    transfer: TeacherEmbeddings | None = None, every_epoch: bool = True) -> Iterator[Epoch]:
    """Stage 1 then stage 2 of one REFILLED run, an Epoch at a time.

    With flag_tuning on, every epoch is evaluated on the validation split
    (`val_accuracy`: NCM in stage 1, the classifier in stage 2); with
    `every_epoch` off only the last of each stage (a run that only needs where it
    ends: the search's re-evaluation). With flag_tuning off, nothing is selected
    on test: the test split is read once, after the last epoch of each stage
    (`test_ncm_accuracy`, `test_accuracy`).

    `teacher` gives teacher embeddings of a batch (refilled.method.bank); it may be None
    when nothing needs it (no stage 1, lambd 0: the student trained alone).
    `centers`: global class centres, or None for local (per-batch) centres.
    `resume`: a snapshot from an earlier Epoch of this run.
    `transfer`: teacher embeddings of transfer-set batches (a teacher forward, no
    bank), given when `cfg.transfer_set` is on; stage 2 then distils on them too.
    """
    e1, e2 = cfg.n_training_epochs1, cfg.n_training_epochs2
    tuning = data.task.eval_split == "validation"
    stage, start = STAGE1, 0
    if resume is not None:
        student.load_state_dict(resume["student"])
        stage, start = resume["stage"], resume["epoch"]
        if stage == STAGE1 and start >= e1:
            stage, start, resume = STAGE2, 0, None  # stage 1 done: stage 2 starts fresh

    def snapshot(stage_: int, epoch_: int, optimizer: torch.optim.Optimizer) -> Callable[[], dict]:
        return lambda: {"stage": stage_, "epoch": epoch_, "student": student.state_dict(),
                        "optimizer": optimizer.state_dict(), "config": cfg.to_dict(), "arch": student.arch}

    if stage == STAGE1 and e1 > 0:
        method = RelationMatching(student, teacher, cfg.tau1, cfg.stage1_scale, cfg.flag_merge, cfg.margin,
                                  smallest=cfg.tuple_negatives == "smallest")
        optimizer = _sgd(student.feature_parameters(), cfg, cfg.lr1)
        if resume is not None:
            optimizer.load_state_dict(resume["optimizer"])
        student.train()
        for epoch, metrics in train_epochs(method, optimizer, cosine(cfg.lr1, 0.1 * cfg.lr1, e1), data,
                                           n_epochs=e1, batch_size=cfg.batch_size, seed=cfg.seed,
                                           stage=STAGE1, start=start):
            if (tuning and every_epoch) or epoch == e1:
                with evaluate.statistics(student, data, cfg.bn_stats):
                    metrics["val_accuracy" if tuning else "test_ncm_accuracy"] = evaluate.ncm(student, data)
            yield Epoch(STAGE1, epoch, epoch, metrics, snapshot(STAGE1, epoch, optimizer))
        stage, start, resume = STAGE2, 0, None

    # the method distils on the transfer set only when batches carry it; lambd 0: the student alone
    with_transfer = transfer is not None and cfg.lambd > 0
    method = LocalClassifierDistillation(student, teacher, centers, data.n_classes, cfg.tau2, cfg.lambd, transfer)
    optimizer = _sgd(student.parameters(), cfg, cfg.lr2)
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
    student.train()
    for epoch, metrics in train_epochs(method, optimizer, multistep(cfg.lr2, cfg.point, cfg.gamma), data,
                                       n_epochs=e2, batch_size=cfg.batch_size, seed=cfg.seed,
                                       stage=STAGE2, start=start, unlabelled=with_transfer):
        if (tuning and every_epoch) or epoch == e2:
            with evaluate.statistics(student, data, cfg.bn_stats):
                metrics["val_accuracy" if tuning else "test_accuracy"] = evaluate.accuracy(student, data)
        yield Epoch(STAGE2, epoch, e1 + epoch, metrics, snapshot(STAGE2, epoch, optimizer))
