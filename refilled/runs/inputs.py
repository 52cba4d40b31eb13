"""From a Config to the pieces of a run: tasks on the device, the teacher, its bank.

The CLI, a Ray Tune trial and the final retrain all start from here, so they
build data, load teachers and choose the bank the same way.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from refilled.data import augment
from refilled.data.device import DeviceTask, to_device
from refilled.data.sources import FolderOptions, Source, load_source
from refilled.data.splits import student_task, task_classes, teacher_task
from refilled.errors import UserError
from refilled.files import checkpoint
from refilled.method.bank import TeacherBank, TeacherEmbeddings, teacher_embeddings
from refilled.method.networks import FAMILY_ARGS, Network, authors_state_dict, load_weights
from refilled.method.torchvision_nets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TorchvisionNetwork,
    classes_in,
    is_torchvision,
    model_name,
    read_weights,
    torchvision_arch,
)
from refilled.method.train import build_teacher, global_centers
from refilled.runtime import resolve_device

# The settings that decide which teacher a config needs: a group of the schema's fields
from refilled.schema.config import (
    TEACHER_KEYS,  # noqa: E402
    Config,
)


@lru_cache(maxsize=2)
def _source(data_name: str, root: str, download: bool, image_size: int | None, folder: FolderOptions) -> Source:
    return load_source(data_name, root, download, image_size, folder)


def source_for(cfg: Config) -> Source:
    folder = FolderOptions(cache=cfg.folder_cache, test_fraction=cfg.folder_test_fraction,
                           skip_bad_images=cfg.skip_bad_images)
    return _source(cfg.data_name, str(cfg.data_root), cfg.download, cfg.image_size, folder)


def check_inputs(cfg: Config, teacher: str | None = None) -> None:
    """Refuse, in one line and before anything is written, what the data set, its classes and
    the networks make impossible: a bad image folder, a class name it lacks, a torchvision
    name torchvision does not build, teacher weights that do not fit (`teacher`: --teacher)."""
    source = source_for(cfg)
    teacher_task(source, cfg)  # its classes; the student's classes, shots and validation images
    student_task(source, cfg)
    if is_torchvision(cfg.student_network_name):
        model_name(cfg.student_network_name)
        if cfg.student_weights:
            classes_in(cfg.student_network_name, read_weights(cfg.student_weights, cfg.student_network_name)[0],
                       f"the weights {cfg.student_weights}")
    if is_torchvision(cfg.teacher_network_name):
        model_name(cfg.teacher_network_name)
        if teacher or cfg.teacher_weights:
            read_teacher(teacher or cfg.teacher_weights, cfg)
    elif teacher:  # a checkpoint of another architecture or other classes: refused now, not after the set-up
        load_teacher_state(read_teacher(teacher, cfg), cfg, student_data(cfg.replace(device="cpu")), teacher)


def augmentation(cfg: Config) -> augment.Augmentation:
    return augment.for_data(cfg.data_name, cfg.image_size, cfg.augmentation)


def teacher_data(cfg: Config, device: torch.device | None = None) -> DeviceTask:
    device = device or resolve_device(cfg.device)
    return to_device(teacher_task(source_for(cfg), cfg), augmentation(cfg), device)


def student_data(cfg: Config, device: torch.device | None = None) -> DeviceTask:
    device = device or resolve_device(cfg.device)
    return to_device(student_task(source_for(cfg), cfg), augmentation(cfg), device)


# ----------------------------------------------------------------------------- teachers

def teacher_checkpoint(cfg: Config, data: DeviceTask, teacher: Network, metrics: dict[str, float]) -> dict[str, Any]:
    return {"kind": "teacher", "model": teacher.state_dict(), "arch": teacher.arch, "classes": data.task.classes,
            "data_name": cfg.data_name, "config": cfg.to_dict(), "metrics": metrics}


def _expected_arch(cfg: Config) -> dict[str, Any]:
    """The config's teacher architecture, as Network.arch names it (the family's arguments)."""
    name = cfg.teacher_network_name
    return {"name": name, **{k: getattr(cfg, "teacher_" + k) for k in FAMILY_ARGS.get(name, ())}}


def read_teacher(path: str | Path, cfg: Config) -> dict[str, Any]:
    """A teacher checkpoint: one `pretrain` wrote, one of the authors' released networks
    ({"state_dict", "validating_accuracy", "epoch"}), or for a torchvision:NAME teacher its
    weights (a state-dict file or a torchvision weights name), taken as the teacher the
    config describes and returned in our format."""
    if is_torchvision(cfg.teacher_network_name) and not Path(path).is_file():
        return torchvision_teacher(str(path), cfg)  # a torchvision weights name
    ckpt = checkpoint.load(path, "teacher checkpoint")
    if "kind" in ckpt:
        return ckpt
    if is_torchvision(cfg.teacher_network_name):
        return torchvision_teacher(str(path), cfg)
    if "state_dict" not in ckpt:
        return ckpt
    classes = task_classes(source_for(cfg), cfg, "source_classes")
    return {"kind": "teacher", "model": authors_state_dict(ckpt, path), "arch": _expected_arch(cfg),
            "classes": classes, "data_name": cfg.data_name, "origin": f"the authors' checkpoint {path}",
            "metrics": {"authors_validating_accuracy": ckpt.get("validating_accuracy"),
                        "authors_epoch": ckpt.get("epoch")}}


def torchvision_teacher(spec: str, cfg: Config) -> dict[str, Any]:
    """A teacher fine-tuned elsewhere, as torchvision weights (a state-dict file or a weights
    name), in our format: built with the classes its weights hold, seeing the images at its
    input size and normalisation (the weights' own, or teacher_input_size / teacher_mean /
    teacher_std, defaulting to the student's image size and ImageNet's mean and std)."""
    name = cfg.teacher_network_name
    state, said = read_weights(spec, name)
    n_classes = classes_in(name, state, f"the weights {spec}")
    source = source_for(cfg)
    side = augmentation(cfg).out_size or source.train.images.shape[-1]
    norm = said.get("input_norm", (IMAGENET_MEAN, IMAGENET_STD))
    arch = torchvision_arch(name, n_classes, data=(source.mean, source.std), image_size=side,
                            input_size=cfg.teacher_input_size or said.get("input_size") or side,
                            input_norm=(cfg.teacher_mean or norm[0], cfg.teacher_std or norm[1]))
    net = TorchvisionNetwork(arch)
    load_weights(net, net.torchvision_state(state), spec)
    return {"kind": "teacher", "model": net.state_dict(), "arch": arch, "classes": None, "data_name": cfg.data_name,
            "origin": f"torchvision weights {spec}", "metrics": {}}


def load_teacher(path: str | Path, cfg: Config, data: DeviceTask) -> Network:
    """Load a teacher checkpoint (ours or the authors') and check it fits this config's
    teacher and source classes."""
    return load_teacher_state(read_teacher(path, cfg), cfg, data, path)


def load_teacher_state(ckpt: dict[str, Any], cfg: Config, data: DeviceTask, path: str | Path = "teacher") -> Network:
    """A frozen teacher, in eval mode, from a loaded teacher checkpoint (checked against cfg)."""
    if ckpt.get("kind") != "teacher" or "model" not in ckpt or "arch" not in ckpt:
        raise UserError(f"{path} is not a teacher checkpoint (make one with `tune_refilled.py pretrain`, "
                        "or give one of the authors' released .model files)")
    want, got = _expected_arch(cfg), ckpt["arch"]
    diff = [k for k in want if got.get(k) != want[k]]
    if diff:
        def show(a):
            return ", ".join(f"{k}={a.get(k)}" for k in want)
        raise UserError(f"teacher checkpoint {path} is a {show(got)} network but the config asks for "
                        f"{show(want)}: pretrain a teacher for this config or fix the teacher_* keys")
    source_classes = task_classes(source_for(cfg), cfg, "source_classes")  # ids only: no image copies
    external = ckpt.get("classes") is None  # trained elsewhere (torchvision weights): its classes are its own
    if not external and (ckpt.get("data_name") != cfg.data_name or list(ckpt.get("classes", [])) != source_classes):
        raise UserError(f"teacher checkpoint {path} was trained on {ckpt.get('data_name')} classes "
                        f"{_short(ckpt.get('classes', []))}, but the config's source classes are "
                        f"{cfg.data_name} {_short(source_classes)}: pretrain a teacher for this config")
    n_classes = ckpt["arch"]["n_classes"] if external else len(ckpt["classes"])
    arch = ckpt["arch"] if is_torchvision(ckpt["arch"]["name"]) else None
    teacher = load_weights(build_teacher(cfg, data, n_classes=n_classes, arch=arch), ckpt["model"], path)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _short(classes) -> str:
    classes = list(classes)
    return str(classes) if len(classes) <= 6 else f"[{classes[0]}, {classes[1]}, ..., {classes[-1]}] ({len(classes)})"


# ----------------------------------------------------------------------------- the bank

def bank_wanted(cfg: Config, data: DeviceTask) -> bool:
    """Use a bank when the augmentation is a finite set ('auto') or when told to."""
    finite = data.aug.n_variants is not None
    if cfg.teacher_bank == "on" and not finite:
        raise UserError(f"teacher_bank 'on' needs a finite augmentation; {cfg.data_name} uses "
                        f"{data.aug.kind}: use teacher_bank auto or off")
    return finite and cfg.teacher_bank != "off"


def teacher_inputs(cfg: Config, data: DeviceTask, teacher: Network, bank: TeacherBank | None,
                   counter: dict | None = None) -> tuple[TeacherEmbeddings, torch.Tensor | None]:
    """The student's view of the teacher: a batch -> embedding function, and
    global centres (None when cfg.centers is 'local')."""
    fn = teacher_embeddings(teacher, bank, counter)
    centers = global_centers(teacher, bank, data) if cfg.centers == "global" else None
    return fn, centers


def transfer_teacher(data: DeviceTask, teacher: Network) -> TeacherEmbeddings | None:
    """Teacher embeddings of transfer-set batches, None without a transfer set. A
    teacher forward: the bank holds the labelled training images only."""
    return None if data.unlabelled_x is None else teacher_embeddings(teacher, None)


def default_teacher_path(cfg: Config, folder: str | Path = "runs/teachers") -> Path:
    """Where a teacher for this config is kept by default: one per teacher setting."""
    network = cfg.teacher_network_name.replace(":", "-")  # torchvision:resnet18 -> torchvision-resnet18
    return Path(folder) / f"{cfg.data_name}-{network}-{cfg.digest(TEACHER_KEYS)}.pt"
