"""What every trial of a search gets: the teacher, its embedding bank, the class centres.

The driver trains (or copies) the teacher into the experiment once, computes the
bank and the centres once as a Ray task, and binds them to the trial function
through Ray's object store (`tune.with_parameters`), with the per-trial resources.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from refilled.files import checkpoint
from refilled.files.arrays import read_array
from refilled.runtime import keep_freed_memory, resolve_device
from refilled.schema.config import Config, from_dict
from refilled.store.cost import add_driver_cost, device_units
from refilled.store.layout import BANK_FILE, CENTERS_FILE, STAGE1_CACHE, TEACHER_FILE
from refilled.store.storage import Place
from refilled.tune.trial_plan import Phase, Shared, TrialInputs, TrialPlan


def file_digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()[:16]


def _build_bank_task(teacher_state: dict, cfg_dict: dict) -> tuple[np.ndarray | None, np.ndarray | None, float, str]:
    """Runs as a Ray task (on a GPU when trials get one): the teacher's embedding bank
    of the tuning split and the global class centres, the seconds it took and the device."""
    import time

    import torch

    from refilled.method.bank import TeacherBank
    from refilled.method.train import global_centers
    from refilled.runs.inputs import bank_wanted, load_teacher_state, student_data

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


def prepare_teacher(cfg: Config, place: Place, teacher: str | None) -> Path:
    """Copy the given (or default) teacher into the experiment (an authors' checkpoint
    in our format), or pretrain it there."""
    from refilled.runs.inputs import default_teacher_path, load_teacher_state, read_teacher, student_data
    from refilled.runs.single_run import pretrain

    target = place.folder / TEACHER_FILE
    if target.exists():
        return target
    given = teacher or cfg.teacher_weights  # --teacher, or a torchvision teacher's weights (a file or a name)
    source = given or default_teacher_path(cfg)
    if given or Path(source).is_file():
        state = read_teacher(source, cfg)
        load_teacher_state(state, cfg, student_data(cfg.replace(device="cpu")), source)  # refuse a wrong one early
        place.write(TEACHER_FILE, checkpoint.writer(state))
        print(f"teacher: {source} (copied into the experiment)")
    else:
        import time

        import torch

        print("teacher: none for this config yet, pretraining it (once for the whole search)")
        start = time.perf_counter()
        pretrain(cfg, target)
        place.push(TEACHER_FILE)
        device = resolve_device(cfg.device).type
        add_driver_cost(place, "teacher", "pretrain", time.perf_counter() - start, device,
                        device_units(device, torch.get_num_threads(), 1))
    return target


def trainable_for(inputs: TrialInputs, phase: Phase, trial: Callable | None = None):
    """The trial function (`trial`, by default refilled.tune.trainable.refilled_trial) with
    the teacher, its bank and the centres bound through Ray's object store
    (tune.with_parameters), and the per-trial resources.
    `phase.stage1`: the end-of-stage-1 snapshot every trial starts stage 2 from (phase 2 of
    a staged search), also handed out through the object store."""
    import ray
    from ray import tune

    from refilled.tune.trainable import refilled_trial

    cfg, place, settings = inputs.cfg, inputs.place, phase.settings
    folder = place.folder
    teacher_state = checkpoint.load(inputs.teacher_path, "teacher checkpoint")
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
        if bank is not None:
            place.write(BANK_FILE, lambda f: np.save(f, bank))
            print(f"teacher bank: {bank.shape[0]} images x {bank.shape[1]} augmentations computed once "
                  f"({bank.nbytes / 2**20:.1f} MiB, {bank_file.name})")
        else:
            print(f"teacher bank: off ({cfg.data_name} augmentation is not a finite set, or teacher_bank=off): "
                  "trials run the teacher")
        if centers is not None:
            place.write(CENTERS_FILE, lambda f: np.save(f, centers))
        add_driver_cost(place, "teacher_bank", "bank", wall_s, device,
                        device_units(device, settings.resources.cpu, settings.resources.gpu))
    # the stage-1 cache needs a folder every trial can lock; an object store has no locks
    # (a staged search needs none: phase 1 searches stage 1, phase 2 starts from its choice)
    staged = phase.stage1 is not None or phase.stage1_only
    cache_dir = None if place.uri or staged else str(folder / STAGE1_CACHE)
    if place.uri and not staged:
        print("stage-1 cache: off (storage is a URI; trials with equal stage-1 settings each run stage 1)")
    shared = Shared(base=cfg.to_dict(), teacher=teacher_state, bank=None if bank is None else np.ascontiguousarray(bank),
                    centers=centers, cache_dir=cache_dir)
    fn = tune.with_parameters(trial or refilled_trial, shared=shared,
                              plan=TrialPlan.of(phase, settings, file_digest(inputs.teacher_path),
                                                inputs.place.location))
    return tune.with_resources(fn, {"cpu": settings.resources.cpu, "gpu": settings.resources.gpu})


class TrialKind(Protocol):
    """What the driver runs as trials: REFILLED (METHOD), or another kind (the benchmarks'
    simulated trials that measure the driver at scale, benchmarks/simulated_trials.py)."""

    def note(self) -> dict[str, Any]: ...  # what experiment.yaml says of the kind: {} for the method,
    # else {"trial_kind": {"name": ..., ...}} (refilled.schema.config.ExperimentFile)

    def check(self, cfg: Config, teacher: str | None = None) -> None: ...  # refuse, before anything is written,
    # what cannot run (`teacher`: --teacher)

    def prepare_teacher(self, cfg: Config, place: Place, teacher: str | None) -> Path | None: ...

    def trainable_for(self, inputs: TrialInputs, phase: Phase): ...

    def reevaluation(self, inputs: TrialInputs, cfg: Config, seed: int, run_folder: str,
                     resources: dict[str, float]): ...  # one re-evaluation run started as a Ray task: its ObjectRef


class MethodTrials:
    """Trials that train REFILLED: the kind of every search a user runs."""

    trial: Callable | None = None  # the trial function: refilled.tune.trainable.refilled_trial unless set

    def note(self) -> dict[str, Any]:
        return {}

    def check(self, cfg: Config, teacher: str | None = None) -> None:
        from refilled.runs.inputs import check_inputs

        check_inputs(cfg, teacher)

    def prepare_teacher(self, cfg: Config, place: Place, teacher: str | None) -> Path:
        return prepare_teacher(cfg, place, teacher)

    def trainable_for(self, inputs: TrialInputs, phase: Phase):
        return trainable_for(inputs, phase, self.trial)

    def reevaluation(self, inputs: TrialInputs, cfg: Config, seed: int, run_folder: str,
                     resources: dict[str, float]):
        import ray

        from refilled.runs.final_retrain import run_one, run_one_at_uri
        from refilled.store import storage

        place, teacher = inputs.place, inputs.teacher_path
        if place.uri:
            return ray.remote(**resources)(run_one_at_uri).remote(
                cfg.to_dict(), "refilled", seed, storage.join(place.uri, teacher.name),
                storage.join(place.uri, run_folder), tuning=True)
        return ray.remote(**resources)(run_one).remote(
            cfg.to_dict(), "refilled", seed, str(teacher), str(place.folder / run_folder), tuning=True)


METHOD = MethodTrials()
