"""What every trial of a search gets: the teacher, its embedding bank, the class centres.

The driver trains (or copies) the teacher into the experiment once, computes the
bank and the centres once as a Ray task, and binds them to the trial function
through Ray's object store (`tune.with_parameters`), with the per-trial resources.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from refilled.files import checkpoint
from refilled.files.arrays import read_array
from refilled.schema.config import Config, from_dict
from refilled.schema.rungs import counted_epochs
from refilled.store.cost import add_driver_cost, device_units
from refilled.store.layout import DRIVER_FILE
from refilled.runtime import keep_freed_memory, resolve_device
from refilled.store.storage import Place
from refilled.schema.search import SearchSettings
from refilled.store.layout import BANK_FILE, CENTERS_FILE, STAGE1_CACHE, TEACHER_FILE
from refilled.files.atomic import write_atomic


def file_digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()[:16]


def _build_bank_task(teacher_state: dict, cfg_dict: dict) -> tuple[np.ndarray | None, np.ndarray | None, float, str]:
    """Runs as a Ray task (on a GPU when trials get one): the teacher's embedding bank
    of the tuning split and the global class centres, the seconds it took and the device."""
    import time

    import torch

    from refilled.method.bank import TeacherBank
    from refilled.runs.inputs import bank_wanted, load_teacher_state, student_data
    from refilled.method.train import global_centers

    start = time.perf_counter()
    keep_freed_memory()
    cfg = from_dict(cfg_dict)
    data = student_data(cfg, resolve_device("auto"))
    teacher = load_teacher_state(teacher_state, cfg, data)
    bank = TeacherBank.build(teacher, data, progress=False) if bank_wanted(cfg, data) else None
    centers = global_centers(teacher, bank.to(data.device) if bank else None, data) if cfg.centers == "global" else None

    def as_np(t):
        return None if t is None else t.detach().cpu().numpy()

    return (None if bank is None else np.asarray(bank.embeddings.cpu() if torch.is_tensor(bank.embeddings)
                                                 else bank.embeddings)), as_np(centers), \
        time.perf_counter() - start, data.device.type


def prepare_teacher(cfg: Config, folder: Path, teacher: str | None) -> Path:
    """Copy the given (or default) teacher into the experiment (an authors' checkpoint
    in our format), or pretrain it there."""
    from refilled.runs.inputs import default_teacher_path, load_teacher_state, read_teacher, student_data
    from refilled.runs.single_run import pretrain

    target = folder / TEACHER_FILE
    if target.exists():
        return target
    source = Path(teacher) if teacher else default_teacher_path(cfg)
    if teacher or source.is_file():
        state = read_teacher(source, cfg)
        load_teacher_state(state, cfg, student_data(cfg.replace(device="cpu")), source)  # refuse a wrong one early
        checkpoint.save(state, target)
        print(f"teacher: {source} (copied into the experiment)")
    else:
        import time

        import torch

        print("teacher: none for this config yet, pretraining it (once for the whole search)")
        start = time.perf_counter()
        pretrain(cfg, target)
        device = resolve_device(cfg.device).type
        add_driver_cost(folder, "teacher", "pretrain", time.perf_counter() - start, device,
                        device_units(device, torch.get_num_threads(), 1))
    return target


def trainable_for(cfg: Config, settings: SearchSettings, place: Place, teacher_path: Path, *,
                  stage1: dict | None = None, stage1_only: bool = False):
    """The trial function with the teacher, its bank and the centres bound through
    Ray's object store (tune.with_parameters), and the per-trial resources.
    `stage1`: the end-of-stage-1 snapshot every trial starts stage 2 from (phase 2 of
    a staged search), also handed out through the object store."""
    import ray
    from ray import tune

    from refilled.tune.trainable import refilled_trial

    folder = place.folder
    # the epochs ASHA counts: stage 1 alone (phase 1), stage 2 from phase 1's choice (phase 2), or both
    max_t = counted_epochs(cfg, stage1_only=stage1_only, from_stage1=stage1 is not None)
    teacher_state = checkpoint.load(teacher_path, "teacher checkpoint")
    bank_file, centers_file = folder / BANK_FILE, folder / CENTERS_FILE
    tuning_cfg = cfg.replace(flag_tuning=True)
    if bank_file.exists() or centers_file.exists():
        remedy = f"delete {bank_file.name} and {centers_file.name}: --resume computes both again from teacher.pt"
        bank = read_array(bank_file, "teacher bank file", shown=f"{place.location}/{bank_file.name}", mmap=True,
                          remedy=remedy) if bank_file.exists() else None
        centers = read_array(centers_file, "teacher bank file", shown=f"{place.location}/{centers_file.name}",
                             remedy=remedy) if centers_file.exists() else None
    else:
        task = ray.remote(num_cpus=settings.resources.cpu, num_gpus=settings.resources.gpu)(_build_bank_task)
        bank, centers, wall_s, device = ray.get(task.remote(teacher_state, tuning_cfg.to_dict()))
        add_driver_cost(folder, "teacher_bank", "bank", wall_s, device,
                        device_units(device, settings.resources.cpu, settings.resources.gpu))
        if bank is not None:
            write_atomic(bank_file, lambda f: np.save(f, bank))
            print(f"teacher bank: {bank.shape[0]} images x {bank.shape[1]} augmentations computed once "
                  f"({bank.nbytes / 2**20:.1f} MiB, {bank_file.name})")
        else:
            print(f"teacher bank: off ({cfg.data_name} augmentation is not a finite set, or teacher_bank=off): "
                  "trials run the teacher")
        if centers is not None:
            write_atomic(centers_file, lambda f: np.save(f, centers))
        place.push(bank_file.name, centers_file.name, DRIVER_FILE)
    # the stage-1 cache needs a folder every trial can lock; an object store has no locks
    # (a staged search needs none: phase 1 searches stage 1, phase 2 starts from its choice)
    cache_dir = None if place.uri or stage1 is not None or stage1_only else str(folder / STAGE1_CACHE)
    if place.uri and stage1 is None and not stage1_only:
        print("stage-1 cache: off (storage is a URI; trials with equal stage-1 settings each run stage 1)")
    fn = tune.with_parameters(refilled_trial, base=cfg.to_dict(), teacher=teacher_state,
                              bank=None if bank is None else np.ascontiguousarray(bank), centers=centers,
                              cache_dir=cache_dir, stage1=stage1, stage1_only=stage1_only,
                              checkpoint_every=settings.checkpoint_every, teacher_id=file_digest(teacher_path),
                              rungs=settings.rung_epochs(max_t), reduction_factor=settings.asha.reduction_factor,
                              max_t=max_t)
    return tune.with_resources(fn, {"cpu": settings.resources.cpu, "gpu": settings.resources.gpu})


class TrialKind(Protocol):
    """What the driver runs as trials: REFILLED (METHOD), or a simulation of it
    (simulated_trials.SimulatedTrials) that measures the driver at scale."""

    def note(self) -> dict[str, Any]: ...  # what experiment.yaml says of the kind: {} for the method,
    # else {"trial_kind": {"name": ..., ...}} (refilled.schema.config.ExperimentFile)

    def prepare_teacher(self, cfg: Config, folder: Path, teacher: str | None) -> Path | None: ...

    def trainable_for(self, cfg: Config, settings: SearchSettings, place: Place, teacher_path: Path | None, *,
                      stage1: dict | None = None, stage1_only: bool = False): ...

    def reevaluation(self, cfg: Config, seed: int, place: Place, teacher_path: Path | None, run_folder: str,
                     resources: dict[str, float]): ...  # one re-evaluation run started as a Ray task: its ObjectRef


class MethodTrials:
    """Trials that train REFILLED: the kind of every search a user runs."""

    def note(self) -> dict[str, Any]:
        return {}

    def prepare_teacher(self, cfg: Config, folder: Path, teacher: str | None) -> Path:
        return prepare_teacher(cfg, folder, teacher)

    def trainable_for(self, cfg: Config, settings: SearchSettings, place: Place, teacher_path: Path, *,
                      stage1: dict | None = None, stage1_only: bool = False):
        return trainable_for(cfg, settings, place, teacher_path, stage1=stage1, stage1_only=stage1_only)

    def reevaluation(self, cfg: Config, seed: int, place: Place, teacher_path: Path, run_folder: str,
                     resources: dict[str, float]):
        import ray

        from refilled.runs.final_retrain import run_one, run_one_at_uri
        from refilled.store import storage

        if place.uri:
            return ray.remote(**resources)(run_one_at_uri).remote(
                cfg.to_dict(), "refilled", seed, storage.join(place.uri, teacher_path.name),
                storage.join(place.uri, run_folder), tuning=True)
        return ray.remote(**resources)(run_one).remote(
            cfg.to_dict(), "refilled", seed, str(teacher_path), str(place.folder / run_folder), tuning=True)


METHOD = MethodTrials()
