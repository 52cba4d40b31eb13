"""`search`: Optuna (TPE) samples, ASHA stops, Ray runs the trials, locally or on a cluster.

The experiment (`<storage>/<name>/`) holds everything a search makes:

    experiment.yaml     the resolved config and search settings (resume, retrain)
    teacher.pt          the teacher, trained or copied once before any trial
    optuna.db           the Optuna study (SQLite; `optuna-dashboard sqlite:///.../optuna.db`)
    stage1_cache/       stage-1 results shared by trials with equal stage-1 settings (folders only)
    stage1_search/      a staged search's phase 1 (search.staged): stage-1-only trials over the
                        stage-1 keys, with their own experiment.yaml and optuna.db
    stage1_choice.pt    the end-of-stage-1 student phase 1 chose; every phase-2 trial starts there
    trials.csv          one row per trial: config, best stage-2 val accuracy, epochs, status
    best_config.yaml    the full config of the best trial (stage-2 validation accuracy)
    <trial folders>     Ray Tune's: result.json, progress.csv, TensorBoard events, the last
                        keep_checkpoints checkpoints (callbacks.KeepLastCheckpoints)

`--storage` is a folder (local, or a mount every node shares) or a URI pyarrow
understands (s3://, gs://, ...). With a URI, Ray Tune writes the trials there
itself, and our files are made in a local mirror (refilled.storage) and copied
up; the Optuna study lives in the searcher's state, which Ray saves there, and
optuna.db is written from it at the end.

A staged search (`search.staged`) runs two Ray Tune experiments: phase 1 in
stage1_search/ searches the keys that act only on stage 1 (tau1, lr1, ...),
ranked by validation NCM accuracy; phase 2, in the experiment itself, searches
the others from the chosen end-of-stage-1 student, handed to every trial
through the object store. Every trial of a joint search pays for a whole
stage 1; a staged search pays for stage 1 once per phase-1 trial.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.fs
import yaml

from refilled import checkpoint, storage
from refilled.config import Config, from_dict, load_experiment
from refilled.errors import UserError
from refilled.experiments import EXPERIMENT_FILE, STAGE1_SEARCH, plain_value, load_trials, write_best_config
from refilled.runtime import keep_freed_memory, resolve_device
from refilled.storage import Place, experiment_place
from refilled.tune.settings import SearchSettings, parse_search

METRIC = "val_accuracy"
STAGE1_CHOICE = "stage1_choice.pt"  # phase 1's chosen end-of-stage-1 student, where phase 2 starts


# ----------------------------------------------------------------------------- experiment files

def check_is_experiment(place: Place) -> None:
    """Refuse, in one line, a --resume of something that is not an experiment."""
    if place.uri:
        if not storage.exists(storage.join(place.uri, EXPERIMENT_FILE)):
            raise UserError(f"{place.uri} is not a tune-refilled experiment (no {EXPERIMENT_FILE}): "
                            "check --name/--storage")
    else:
        read_experiment(place.folder)


def save_experiment(folder: Path, cfg: Config, search_section: dict, extra: dict | None = None) -> None:
    data = {"config": cfg.to_dict(), "search": search_section, **(extra or {})}
    tmp = folder / f".{EXPERIMENT_FILE}.tmp"
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, folder / EXPERIMENT_FILE)


def read_experiment(folder: Path, shown: str | None = None) -> tuple[Config, SearchSettings, dict]:
    path = folder / EXPERIMENT_FILE
    if not path.is_file():
        raise UserError(f"{shown or folder} is not a tune-refilled experiment (no {EXPERIMENT_FILE}): "
                        "check --name/--storage")
    cfg, data = load_experiment(path)
    return cfg, parse_search(data.get("search"), cfg), data


def file_digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- Optuna

def make_searcher(settings: SearchSettings, cfg: Config, folder: Path, name: str, in_memory: bool = False):
    """In `folder`/optuna.db; or, for a URI experiment, in memory: then the study is
    saved inside the searcher's state, which Ray writes to the URI with its own
    (so a resumed search finds both as they were), and export_study writes optuna.db."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class OptunaSearchWithPruned(OptunaSearch):
        """Ray's OptunaSearch tells Optuna every ended trial as COMPLETE. Trials ASHA
        stopped early are PRUNED here, and diverged or errored ones FAILED, so TPE
        learns from each what it should."""

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            ot_trial = self._ot_trials[trial_id]
            value = None if result is None else result.get(self.metric)
            # skip_if_finished: after --resume, a trial told just before the driver was killed ends again
            if error or result is None or result.get("diverged") or value is None or not math.isfinite(value):
                self._ot_study.tell(ot_trial, None, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            elif result.get("step", 0) < result.get("total_steps", 0):
                self._ot_study.tell(ot_trial, None, state=optuna.trial.TrialState.PRUNED, skip_if_finished=True)
            else:
                self._ot_study.tell(ot_trial, value, skip_if_finished=True)
            self._completed_trials.add(trial_id)

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            try:
                super().on_trial_result(trial_id, result)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # resumed: Tune re-ran epochs after the last state it saved; Optuna has the trial's end

        def restore(self, checkpoint_path: str) -> None:
            """--resume: Tune saves its state (and this searcher's) every few seconds, so a
            driver killed in between leaves Optuna trials asked after the last save, which
            the restored searcher does not know. They are handed to the next trials Tune
            asks for (same parameters) instead of asking Optuna anew, so the study holds
            each trial once; one with incomplete parameters is marked failed. The sampler's
            random state was saved before those asks and would draw their parameters again:
            it is reseeded from the seed and the study's size (reproducible, no repeats)."""
            super().restore(checkpoint_path)
            known = {t._trial_id for t in self._ot_trials.values()}
            self._orphans = []
            for t in self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                if t._trial_id in known:
                    continue
                if not callable(self._space) and set(t.params) == set(self._space):
                    self._orphans.append(t._trial_id)
                else:
                    self._ot_study.tell(t.number, None, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            if self._orphans:
                size = len(self._ot_study.get_trials(deepcopy=False))
                self._sampler = optuna.samplers.TPESampler(seed=settings.seed * 1_000_003 + size)
                self._ot_study.sampler = self._sampler

        def suggest(self, trial_id: str) -> dict | None:
            orphans = getattr(self, "_orphans", None)
            if orphans and trial_id not in self._ot_trials:
                self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, orphans.pop(0))
            return super().suggest(trial_id)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_storage = None if in_memory else optuna.storages.RDBStorage(f"sqlite:///{folder / 'optuna.db'}")
    first = settings.first_point(cfg)
    return OptunaSearchWithPruned(
        metric=METRIC, mode="max", sampler=optuna.samplers.TPESampler(seed=settings.seed),
        storage=study_storage, study_name=name, points_to_evaluate=[first] if first else None)


def export_study(folder: Path, name: str) -> None:
    """optuna.db from the in-memory study in Ray's latest saved searcher state."""
    import pickle

    import optuna

    states = sorted(folder.glob("searcher-state-*.pkl"))  # named by the run's start time: the last is the latest
    if not states:
        return
    with open(states[-1], "rb") as f:
        study = pickle.load(f)["_ot_study"]
    db = folder / "optuna.db"
    db.unlink(missing_ok=True)
    optuna.copy_study(from_study_name=study.study_name, from_storage=study._storage,
                      to_storage=f"sqlite:///{db}", to_study_name=name)


# ----------------------------------------------------------------------------- Ray

def connect(address: str | None, cpus: int | None = None) -> None:
    """Start a local Ray, or join a running cluster (`auto`, `host:port`)."""
    import ray

    env = {"env_vars": {"PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}}
    if address:
        import refilled
        env = {"py_modules": [refilled]}  # ship this package to the cluster's workers
        _check_reachable(address)
    try:
        # "local": always a new Ray on this machine, never a cluster that `ray start` left running
        ray.init(address=address or "local", num_cpus=None if address else cpus, runtime_env=env,
                 include_dashboard=False, log_to_driver=True, configure_logging=True, logging_level="WARNING")
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot connect to the Ray cluster at --address {address}: {first}; "
                        "start it with `ray start --head` or check the address") from None


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast on a cluster address nothing listens on: ray.init retries such an
    address for ever. Resolves `auto` the way Ray does (RAY_ADDRESS, then the
    cluster `ray start` recorded) and opens a TCP connection to the GCS port."""
    import socket

    from ray._private.services import canonicalize_bootstrap_address

    if address.startswith("ray://"):  # Ray Client: ray.init reports its own errors
        return
    try:
        resolved = canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot connect to the Ray cluster at --address {address}: {first}; "
                        "start it with `ray start --head` or check the address") from None
    if not resolved:
        return
    host, _, port = resolved.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise UserError(f"cannot connect to the Ray cluster at --address {address} ({resolved}: {reason}); "
                        "start it with `ray start --head` or check the address") from None


def check_local_gpus(settings: SearchSettings) -> None:
    """A local Ray has the GPUs CUDA shows this process (CUDA_VISIBLE_DEVICES applies)."""
    if settings.gpu > 0:
        import torch

        have = torch.cuda.device_count()
        if settings.gpu > have:
            raise UserError(f"each trial asks for {settings.gpu} GPU but this machine has {have} (CUDA): "
                            "lower search.resources.gpu (or --gpus-per-trial), e.g. 0 for CPU trials, "
                            "or pass --address of a cluster with GPUs")


def check_resources(settings: SearchSettings) -> None:
    import ray

    have = ray.cluster_resources()
    if settings.gpu > have.get("GPU", 0):
        raise UserError(f"each trial asks for {settings.gpu} GPU but the Ray cluster has {have.get('GPU', 0):g}: "
                        "lower search.resources.gpu (or --gpus-per-trial), e.g. 0 for CPU trials")
    if settings.cpu > have.get("CPU", 0):
        raise UserError(f"each trial asks for {settings.cpu} CPUs but the Ray cluster has {have.get('CPU', 0):g}: "
                        "lower search.resources.cpu (or --cpus-per-trial)")


def _build_bank_task(teacher_state: dict, cfg_dict: dict) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Runs as a Ray task (on a GPU when trials get one): the teacher's embedding bank
    of the tuning split and the global class centres."""
    import torch

    from refilled.bank import TeacherBank
    from refilled.run import bank_wanted, load_teacher_state, student_data
    from refilled.train import global_centers

    keep_freed_memory()
    cfg = from_dict(cfg_dict)
    data = student_data(cfg, resolve_device("auto"))
    teacher = load_teacher_state(teacher_state, cfg, data)
    bank = TeacherBank.build(teacher, data, progress=False) if bank_wanted(cfg, data) else None
    centers = global_centers(teacher, bank.to(data.device) if bank else None, data) if cfg.centers == "global" else None
    as_np = (lambda t: None if t is None else t.detach().cpu().numpy())
    return (None if bank is None else np.asarray(bank.embeddings.cpu() if torch.is_tensor(bank.embeddings)
                                                 else bank.embeddings)), as_np(centers)


def prepare_teacher(cfg: Config, folder: Path, teacher: str | None) -> Path:
    """Copy the given (or default) teacher into the experiment (an authors' checkpoint
    in our format), or pretrain it there."""
    from refilled.run import default_teacher_path, load_teacher_state, pretrain, read_teacher, student_data

    target = folder / "teacher.pt"
    if target.exists():
        return target
    source = Path(teacher) if teacher else default_teacher_path(cfg)
    if teacher or source.is_file():
        state = read_teacher(source, cfg)
        load_teacher_state(state, cfg, student_data(cfg.replace(device="cpu")), source)  # refuse a wrong one early
        checkpoint.save(state, target)
        print(f"teacher: {source} (copied into the experiment)")
    else:
        print("teacher: none for this config yet, pretraining it (once for the whole search)")
        pretrain(cfg, target)
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
    teacher_state = checkpoint.load(teacher_path, "teacher checkpoint")
    bank_file, centers_file = folder / "bank-tuning.npy", folder / "centers-tuning.npy"
    tuning_cfg = cfg.replace(flag_tuning=True)
    if bank_file.exists() or centers_file.exists():
        bank = np.load(bank_file, mmap_mode="r") if bank_file.exists() else None
        centers = np.load(centers_file) if centers_file.exists() else None
    else:
        task = ray.remote(num_cpus=settings.cpu, num_gpus=settings.gpu)(_build_bank_task)
        bank, centers = ray.get(task.remote(teacher_state, tuning_cfg.to_dict()))
        if bank is not None:
            np.save(bank_file, bank)
            print(f"teacher bank: {bank.shape[0]} images x {bank.shape[1]} augmentations computed once "
                  f"({bank.nbytes / 2**20:.1f} MiB, {bank_file.name})")
        else:
            print(f"teacher bank: off ({cfg.data_name} augmentation is not a finite set, or teacher_bank=off): "
                  "trials run the teacher")
        if centers is not None:
            np.save(centers_file, centers)
        place.push(bank_file.name, centers_file.name)
    # the stage-1 cache needs a folder every trial can lock; an object store has no locks
    # (a staged search needs none: phase 1 searches stage 1, phase 2 starts from its choice)
    cache_dir = None if place.uri or stage1 is not None or stage1_only else str(folder / "stage1_cache")
    if place.uri and stage1 is None and not stage1_only:
        print("stage-1 cache: off (storage is a URI; trials with equal stage-1 settings each run stage 1)")
    fn = tune.with_parameters(refilled_trial, base=cfg.to_dict(), teacher=teacher_state,
                              bank=None if bank is None else np.ascontiguousarray(bank), centers=centers,
                              cache_dir=cache_dir, stage1=stage1, stage1_only=stage1_only,
                              checkpoint_every=settings.checkpoint_every, teacher_id=file_digest(teacher_path))
    return tune.with_resources(fn, {"cpu": settings.cpu, "gpu": settings.gpu})


# ----------------------------------------------------------------------------- results

def summarise(folder: Path, location: str | None = None) -> pd.DataFrame:
    """Write trials.csv and best_config.yaml; print the sorted table and the best config."""
    trials = load_trials(folder)
    if trials.empty or not (trials["epochs"] > 0).any():
        raise UserError(f"the search in {folder} reported no epoch: see the trial errors above")
    trials.to_csv(folder / "trials.csv", index=False)
    searched = [c for c in trials.columns if c.startswith("config/")]
    shown = trials[searched + ["best_val_accuracy_stage2", "epochs", "status"]].rename(
        columns=lambda c: c.removeprefix("config/"))
    with pd.option_context("display.max_rows", 200, "display.width", 200, "display.float_format", "{:.4g}".format):
        print(f"\n{len(trials)} trials, best stage-2 validation accuracy first "
              f"({', '.join(f'{n} {s}' for s, n in trials['status'].value_counts().items())}):")
        print(shown.to_string(index=False, na_rep="-"))
    path, cfg, best = write_best_config(folder, trials)
    print(f"\nbest config ({best['trial_id']}, stage-2 val accuracy {best['best_val_accuracy_stage2']:.4f}) "
          f"written to {f'{location}/{path.name}' if location else path}:")
    print("  " + ", ".join(f"{k.removeprefix('config/')}={best[k]:.4g}" if isinstance(best[k], float)
                           else f"{k.removeprefix('config/')}={best[k]}" for k in searched))
    return trials


def run_search(cfg: Config, search_section: dict, *, name: str, storage_location: str, address: str | None,
               resume: bool, teacher: str | None) -> Path:
    """Run (or resume) the search; returns the folder that holds its results (for a
    URI experiment, the local mirror: everything in it is also in the URI)."""
    from ray import tune

    place = experiment_place(storage_location, name)
    folder = place.folder
    data: dict = {}
    if resume:
        place.pull()
        cfg, settings, data = read_experiment(folder, place.location)
        # a staged search may have been interrupted in phase 1, before phase 2 had a state
        if not settings.staged and not tune.Tuner.can_restore(place.location):
            raise UserError(f"{place.location} has no Ray Tune state to resume: start a new search instead")
    else:
        settings = parse_search(search_section, cfg)
        if place.exists():
            raise UserError(f"experiment {place.location} already exists: pass --resume to continue it "
                            "or choose another --name")
    if not address:
        check_local_gpus(settings)  # before starting Ray: its start-up lines would bury the error
    connect(address)
    check_resources(settings)
    if not resume:  # only now: a refused search leaves no half experiment behind
        if place.uri:
            shutil.rmtree(folder, ignore_errors=True)  # a mirror left by an earlier experiment at this URI
        folder.mkdir(parents=True, exist_ok=True)
        save_experiment(folder, cfg, search_section_of(settings))
        place.push(EXPERIMENT_FILE)
    teacher_path = prepare_teacher(cfg, folder, teacher)
    place.push(teacher_path.name)
    stage1, phase = None, settings
    if settings.staged:
        choice = data.get("stage1_choice") or run_stage1_phase(cfg, settings, place, name, teacher_path, resume)
        stage1 = checkpoint.load(folder / STAGE1_CHOICE, "stage-1 choice")["snapshot"]
        phase = settings.phase(2, choice["values"])
        resume = resume and tune.Tuner.can_restore(place.location)
    trainable = trainable_for(cfg, phase, place, teacher_path, stage1=stage1)
    # phase 2 of a staged search starts at stage 2: ASHA's clock counts stage-2 epochs
    max_t = cfg.n_training_epochs2 if stage1 is not None else cfg.n_training_epochs1 + cfg.n_training_epochs2
    fit(trainable, phase, cfg, place, name, max_t=max_t, resume=resume)
    summarise(folder, place.uri)
    place.push("trials.csv", "best_config.yaml", "optuna.db")
    if place.uri:
        print(f"experiment: {place.uri} (local mirror: {folder})")
    return folder


def fit(trainable, settings: SearchSettings, cfg: Config, place: Place, study_name: str, *, max_t: int,
        resume: bool) -> None:
    """One Ray Tune run (new, or restored from `place`): Optuna samples, ASHA stops,
    then the results are brought into the local folder and old checkpoints pruned."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from refilled.tune.callbacks import KeepLastCheckpoints, KeepLogsOfRetriedTrials, prune_checkpoints

    folder = place.folder
    if resume:
        tuner = tune.Tuner.restore(place.location, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        # a phase of a staged search killed before Ray saved any state starts again: its trials go aside
        set_aside_unknown_trials(place, set())
        scheduler = ASHAScheduler(time_attr="training_iteration", metric=METRIC, mode="max", max_t=max_t,
                                  grace_period=min(settings.grace_period, max_t),
                                  reduction_factor=settings.reduction_factor)
        searcher = make_searcher(settings, cfg, folder, study_name, in_memory=bool(place.uri))
        tuner = tune.Tuner(
            trainable, param_space=settings.param_space(),
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                        num_samples=settings.num_samples,
                                        max_concurrent_trials=settings.max_concurrent or None,
                                        reuse_actors=settings.reuse_actors),
            run_config=tune.RunConfig(
                name=place.location.rstrip("/").rsplit("/", 1)[-1], storage_path=place.storage_path, verbose=1,
                failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                callbacks=[KeepLogsOfRetriedTrials(), KeepLastCheckpoints(settings.keep_checkpoints)],
                # Ray keeps every checkpoint; KeepLastCheckpoints deletes the old ones safely
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None)))
    grid = tuner.fit()
    if place.uri:  # the trials' results and the searcher's state, next to our files in the mirror
        storage.download(place.uri, folder, skip=storage.is_checkpoint)
        export_study(folder, study_name)
    if resume:
        set_aside_unknown_trials(place, {Path(r.path).name for r in grid if r.path})
    fs, root = storage.filesystem(place.uri) if place.uri else (pyarrow.fs.LocalFileSystem(), str(folder))
    prune_checkpoints(fs, root, [p.parent.name for p in folder.glob("*/params.json")], settings.keep_checkpoints)


def run_stage1_phase(cfg: Config, settings: SearchSettings, place: Place, name: str, teacher_path: Path,
                     resume: bool) -> dict[str, Any]:
    """Phase 1 of a staged search: stage-1-only trials over the stage-1 keys, in
    <experiment>/stage1_search, ranked by their last validation NCM accuracy. The
    best one's end-of-stage-1 student is saved as stage1_choice.pt and its values
    in experiment.yaml (`stage1_choice`), so a resumed search skips this phase."""
    from ray import tune

    sub = Place(place.folder / STAGE1_SEARCH, storage.join(place.uri, STAGE1_SEARCH) if place.uri else None)
    phase = settings.phase(1)
    resume = resume and tune.Tuner.can_restore(sub.location)
    if resume:
        sub.pull()
    else:
        sub.folder.mkdir(parents=True, exist_ok=True)
        save_experiment(sub.folder, cfg, search_section_of(phase), {"stage1_only": True})
        sub.push(EXPERIMENT_FILE)
    print(f"phase 1 of 2 (staged search): stage 1 only, {phase.num_samples} trials over "
          f"{', '.join(phase.space)}, ranked by validation NCM accuracy")
    trainable = trainable_for(cfg, phase, place, teacher_path, stage1_only=True)
    fit(trainable, phase, cfg, sub, f"{name}-stage1", max_t=cfg.n_training_epochs1, resume=resume)
    sub.push("optuna.db")

    trials = load_trials(sub.folder)
    done = trials[trials["status"] == "finished"] if not trials.empty else trials
    if done.empty:
        raise UserError(f"no stage-1 trial of {sub.location} finished, so there is no embedding to start stage 2 "
                        "from: see the trial errors above, or raise search.staged.num_samples")
    best = done.sort_values(["last_val_ncm_stage1", "best_val_ncm_stage1"], ascending=False).iloc[0]
    values = {k: plain_value(best[f"config/{k}"]) for k in phase.space}
    trial_dir = Path(best["folder"]).name
    state = _last_checkpoint_state(sub, trial_dir)
    choice = {"trial_id": str(best["trial_id"]), "values": values,
              "val_ncm_accuracy": float(best["last_val_ncm_stage1"])}
    checkpoint.save({"kind": "stage1_choice", **choice, "snapshot": state}, place.folder / STAGE1_CHOICE)
    save_experiment(place.folder, cfg, search_section_of(settings), {"stage1_choice": choice})
    place.push(STAGE1_CHOICE, EXPERIMENT_FILE)  # in this order: a stage1_choice in experiment.yaml has its file
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"phase 1 chose {shown} "
          f"(trial {choice['trial_id']}, validation NCM accuracy {choice['val_ncm_accuracy']:.4f}); "
          f"phase 2 of 2: stage 2 from that embedding")
    return choice


def _last_checkpoint_state(place: Place, trial_dir: str) -> dict:
    """The trial's state at its newest checkpoint (for a finished trial: its last epoch)."""
    from refilled.tune.callbacks import CHECKPOINT_DIR
    from refilled.tune.trainable import STATE_FILE

    if place.uri:
        names = {rel.split("/")[0] for rel in storage.list_files(storage.join(place.uri, trial_dir))}
    else:
        names = {p.name for p in (place.folder / trial_dir).iterdir()}
    newest = max((n for n in names if CHECKPOINT_DIR.match(n)), key=lambda n: int(CHECKPOINT_DIR.match(n)[1]),
                 default=None)
    if newest is None:
        raise UserError(f"stage-1 trial {trial_dir} in {place.location} has no checkpoint to start stage 2 from: "
                        "run the search again")
    path = place.folder / trial_dir / newest / STATE_FILE
    if place.uri:
        storage.download_file(storage.join(place.uri, trial_dir, newest, STATE_FILE), path)
    return checkpoint.load(path, "stage-1 trial checkpoint")


def set_aside_unknown_trials(place: Place, known: set[str]) -> None:
    """Trial folders that Tune's restored state does not know were started by a killed
    driver after its last state save; the resumed search ran their configurations
    again under new ids. They move to interrupted_trials/ so each trial counts once."""
    folder = place.folder
    for params in sorted(folder.glob("*/params.json")):
        trial = params.parent
        if trial.name not in known:
            (folder / "interrupted_trials").mkdir(exist_ok=True)
            shutil.move(str(trial), str(folder / "interrupted_trials" / trial.name))
            if place.uri:
                storage.move(place.uri, trial.name, f"interrupted_trials/{trial.name}")
            print(f"set aside {trial.name}: started before the interruption, run again after it "
                  f"(now in {place.location}/interrupted_trials)")


def search_section_of(settings: SearchSettings) -> dict[str, Any]:
    return {"space": settings.space, "num_samples": settings.num_samples, "start_with": settings.start_with,
            "asha": {"grace_period": settings.grace_period, "reduction_factor": settings.reduction_factor},
            "resources": {"cpu": settings.cpu, "gpu": settings.gpu}, "max_concurrent": settings.max_concurrent,
            "max_failures": settings.max_failures, "checkpoint_every": settings.checkpoint_every,
            "keep_checkpoints": settings.keep_checkpoints, "reuse_actors": settings.reuse_actors,
            "seed": settings.seed,
            **({"staged": {"num_samples": settings.staged.num_samples,
                           "asha": {"grace_period": settings.staged.grace_period,
                                    "reduction_factor": settings.staged.reduction_factor}}}
               if settings.staged else {})}
