"""Whole runs outside a search: the teacher's pre-training (the authors' pretrain.py)
and one REFILLED run (their main.py), each with its progress bar."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from refilled.data.device import DeviceTask
from refilled.errors import UserError
from refilled.files import checkpoint
from refilled.method import evaluate
from refilled.method.bank import TeacherBank
from refilled.method.networks import Network
from refilled.method.torchvision_nets import is_torchvision
from refilled.method.train import build_student, build_teacher, pretrain_teacher, refilled_epochs
from refilled.runs.epoch_log import RunLog
from refilled.runs.inputs import (
    bank_wanted,
    default_teacher_path,
    load_teacher,
    student_data,
    teacher_checkpoint,
    teacher_data,
    teacher_inputs,
    transfer_teacher,
)
from refilled.schema.config import Config


def pretrain(cfg: Config, out: Path | None = None, *, force: bool = False, progress: bool = True
             ) -> tuple[Path, dict[str, float]]:
    """Train the teacher on the source task, keep the epoch best on its validation part,
    test that one once, save it atomically; return (path, metrics)."""
    out = Path(out) if out else default_teacher_path(cfg)
    if out.is_dir():
        raise UserError(f"{out} is a folder: --out names the teacher file to write, e.g. {out}/teacher.pt")
    if out.exists() and not force:
        raise UserError(f"{out} already exists: pass --force to overwrite it or --out for another path")
    data = teacher_data(cfg)
    teacher = build_teacher(cfg, data)
    bar = tqdm(total=cfg.teacher_epochs, desc="teacher", unit="epoch", disable=not progress)
    metrics: dict[str, float] = {}
    for epoch in pretrain_teacher(cfg, data, teacher):  # ends with the chosen epoch's weights loaded
        metrics = epoch.metrics
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", val=f"{metrics['val_accuracy']:.3f}")
        bar.update()
    bar.close()
    metrics["test_accuracy"] = evaluate.accuracy(teacher, data, "test")
    checkpoint.save(teacher_checkpoint(cfg, data, teacher, metrics), out)
    return out, metrics


def ensure_teacher(cfg: Config, path: str | Path | None, *, progress: bool = True) -> Path | str:
    """An explicit teacher (--teacher, or a torchvision teacher's teacher_weights) must exist;
    the default one is pretrained when missing."""
    path = path if path is not None else cfg.teacher_weights
    if path is not None:
        if not Path(path).is_file() and not (is_torchvision(cfg.teacher_network_name) and "_Weights." in str(path)):
            raise UserError(f"teacher checkpoint {path} not found: check --teacher (or teacher_weights), or leave it "
                            "out to pretrain one")
        return path if not Path(path).is_file() else Path(path)
    path = default_teacher_path(cfg)
    if not path.is_file():
        print(f"no teacher for this config yet: pretraining one into {path}", file=sys.stderr)
        pretrain(cfg, path, progress=progress)
    return path


_BANKS: dict[tuple, TeacherBank] = {}


def _bank(teacher_path: Path, cfg: Config, teacher: Network, data: DeviceTask, progress: bool) -> TeacherBank:
    """The teacher bank of `data`, built once per process for a teacher file and a
    student split: the seeds of a final retrain share it (the seed changes neither)."""
    stamp = Path(teacher_path).stat().st_mtime_ns if Path(teacher_path).is_file() else 0  # a weights name: none
    key = (str(Path(teacher_path).resolve()), stamp,
           cfg.replace(seed=0).digest(), str(data.device))
    if key not in _BANKS:
        _BANKS.clear()  # one at a time: a bank can be large
        _BANKS[key] = TeacherBank.build(teacher, data, progress=progress)
    return _BANKS[key]


def train_once(cfg: Config, out: Path, teacher_path: str | Path | None = None, progress: bool = True,
               every_epoch: bool = True) -> dict[str, Any]:
    """One REFILLED run (the authors' main.py): TensorBoard, metrics.json and student.pt in `out`.
    `every_epoch` off: a tuning run evaluated on validation after the last epoch of each stage only."""
    data = student_data(cfg)
    needs_teacher = cfg.n_training_epochs1 > 0 or cfg.lambd > 0
    inputs: tuple = (None, None)
    transfer = None
    if needs_teacher:
        path = ensure_teacher(cfg, teacher_path, progress=progress)
        teacher = load_teacher(path, cfg, data)
        bank = _bank(path, cfg, teacher, data, progress) if bank_wanted(cfg, data) else None
        inputs = teacher_inputs(cfg, data, teacher, bank)
        transfer = transfer_teacher(data, teacher)
    student = build_student(cfg, data)
    log = RunLog(out, cfg.to_dict())
    bar = tqdm(total=cfg.n_training_epochs1 + cfg.n_training_epochs2, unit="epoch", disable=not progress)
    last: dict[str, Any] = {}
    for epoch in refilled_epochs(cfg, data, student, *inputs, transfer=transfer, every_epoch=every_epoch):
        record = log.add(epoch)
        last.update({k: v for k, v in record.items() if "accuracy" in k})
        bar.set_description(record["stage"])
        bar.set_postfix({k: f"{v:.3f}" for k, v in epoch.metrics.items() if k in ("loss", "val_accuracy")})
        bar.update()
    bar.close()
    if cfg.bn_stats == "precise":  # the saved student is the network that was evaluated
        evaluate.recompute_bn_stats(student, data)
    checkpoint.save({"kind": "student", **epoch.snapshot()}, out / "student.pt")
    summary = {"eval_split": data.task.eval_split, **{k: v for k, v in last.items() if k != "stage"}}
    log.close(summary)
    return summary
