"""`search`: the driver. Optuna (TPE) samples, ASHA stops, Ray runs the trials, locally or on a cluster.

The experiment (`<storage>/<name>/`) holds everything a search makes: its files and
folders are named in refilled.store.layout (docs/experiments.md shows them as a table).

`--storage` is a folder (local, or a mount every node shares) or a URI pyarrow
understands (s3://, gs://, ...). With a URI, Ray Tune writes the trials there
itself, and our files are made in a local mirror (refilled.store.storage) and copied
up; the Optuna study is copied up whenever Tune saves its state (refilled.tune.searcher).

A staged search (`search.staged`) runs two Ray Tune experiments: phase 1 in
stage1_search/ searches the keys that act only on stage 1 (tau1, lr1, ...),
ranked by validation NCM accuracy; phase 2, in the experiment itself, searches
the others from the chosen end-of-stage-1 student, handed to every trial
through the object store. Every trial of a joint search pays for a whole
stage 1; a staged search pays for stage 1 once per phase-1 trial.

The pieces: refilled.tune.searcher (the Optuna study behind Tune's Searcher),
refilled.tune.cluster (connecting to Ray, resource checks),
refilled.tune.trial_inputs (teacher, bank, the trial function),
refilled.tune.callbacks (trial records, checkpoint pruning),
refilled.store.experiment_file (experiment.yaml).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from refilled.files import checkpoint
from refilled.store.layout import COST_FILE
from refilled.store import cost, integrity, experiment_file, storage, trial_records
from refilled.schema.config import CLASS_COUNT, Config
from refilled.errors import UserError
from refilled.store.layout import EXPERIMENT_FILE
from refilled.store.layout import DRIVER_FILE
from refilled.store.experiments import first_points, load_trials, plain_value, write_best_config
from refilled.store.layout import SELECTION_FILE, STAGE1_SEARCH
from refilled.store.lease import lease_at
from refilled.store.layout import LEASE_FILE
from refilled.store.storage import Place, experiment_place
from refilled.tune.cluster import check_local_gpus, check_resources, connect
from refilled.schema.rungs import counted_epochs, schedule_warnings, scheduler_args
from refilled.store.rung_fidelity import correlation_lines, experiment_correlations
from refilled.tune.searcher import StudySearcher
from refilled.store.study import STUDY_FILES, study_file
from refilled.tune.selection import reevaluate
from refilled.schema.search import SearchSettings, check_rungs_within, parse_search
from refilled.tune.trial_inputs import METHOD, TrialKind
from refilled.store.layout import STAGE1_CHOICE
from refilled.store.layout import BEST_CONFIG, INTERRUPTED_TRIALS, TRIALS_FILE
from refilled.files.atomic import write_atomic

METRIC = "val_accuracy"


def read_experiment(folder: Path, location: str | None = None) -> tuple[Config, SearchSettings, dict]:
    """The experiment's config, its search settings, and the whole experiment.yaml."""
    cfg, data = experiment_file.read(folder, location, hint=experiment_file.SEARCH_HINT)
    return cfg, parse_search(data.get("search"), cfg), data


def trial_folder_name(trial) -> str:
    """Tune's trial_dirname_creator: trial folders are named by the project (trial_<id>)."""
    return trial_records.folder_name(trial.trial_id)


# ----------------------------------------------------------------------------- results

def summarise(folder: Path) -> pd.DataFrame:
    """Write trials.csv; print the sorted table."""
    trials = load_trials(folder)
    if trials.empty or not (trials["epochs"] > 0).any():
        raise UserError(f"the search in {folder} reported no epoch: see the trial errors above")
    write_atomic(folder / TRIALS_FILE, trials.to_csv(index=False))
    with pd.option_context("display.max_rows", 200, "display.width", 200, "display.float_format", "{:.4g}".format):
        print(f"\n{len(trials)} trials, best stage-2 validation accuracy first "
              f"({', '.join(f'{n} {s}' for s, n in trials['status'].value_counts().items())}):")
        print(_shown(trials, ["best_val_accuracy_stage2", "epochs", "status"]).to_string(index=False, na_rep="-"))
    return trials


def _shown(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    searched = [c for c in table.columns if c.startswith("config/")]
    return table[searched + columns].rename(columns=lambda c: c.removeprefix("config/"))


def choose(folder: Path, trials: pd.DataFrame, settings: SearchSettings, place: Place, teacher_path: Path | None,
           location: str | None = None, kind: TrialKind = METHOD) -> None:
    """Re-evaluate the top trials (search.select) and write the winner's best_config.yaml."""
    reeval = ""
    if settings.select.top_k:
        table = reevaluate(trials, settings, place, teacher_path, kind)
        with pd.option_context("display.width", 200, "display.float_format", "{:.4f}".format):
            print(f"\nre-evaluation ({SELECTION_FILE}), best mean first:")
            print(table.to_string(index=False))
        top = table.iloc[0]
        reeval = (f"re-evaluated over seeds {top['seeds']}: {top['val_accuracy_reeval_mean']:.4f} ± "
                  f"{top['val_accuracy_reeval_std']:.4f}, the best mean of the {len(table)} best trials")
    path, cfg, best = write_best_config(folder, trials, reeval)
    print(f"\nchosen config ({best['trial_id']}, stage-2 val accuracy {best['best_val_accuracy_stage2']:.4f} in the "
          f"search{'; ' + reeval if reeval else ''}) written to {f'{location}/{path.name}' if location else path}:")
    searched = [c for c in trials.columns if c.startswith("config/")]
    print("  " + ", ".join(f"{k.removeprefix('config/')}={best[k]:.4g}" if isinstance(best[k], float)
                           else f"{k.removeprefix('config/')}={best[k]}" for k in searched))


def warn_about_rungs(cfg: Config, settings: SearchSettings, max_t: int, phase2: bool) -> None:
    """Say where ASHA will compare trials, and each rung the schedule is expected not to support."""
    from refilled.data.splits import parse_positions

    rungs = settings.rung_epochs(max_t)
    unit = "stage-2 epochs" if phase2 else "epochs of both stages"
    print(f"ASHA rungs at {', '.join(map(str, rungs)) or 'none'} ({unit}, of {max_t}; keeps 1 in "
          f"{settings.asha.reduction_factor:g} at each)")
    steps = None
    if cfg.shots is not None:  # the training set is known without reading it: shots x classes
        n = cfg.shots * len(parse_positions(cfg.target_classes, CLASS_COUNT[cfg.data_name], "target_classes"))
        steps = -(-n // cfg.batch_size)
    for line in schedule_warnings(rungs, phase2=phase2, e1=cfg.n_training_epochs1, e2=cfg.n_training_epochs2,
                                  point=cfg.point, steps_per_epoch=steps, bn_stats=cfg.bn_stats):
        print(f"warning: {line}", file=sys.stderr)


def show_rung_fidelity(folder: Path, bn_stats: str) -> None:
    """Print how well each ASHA rung ranked this search's trials (refilled.schema.rungs)."""
    rows = experiment_correlations(folder)
    if rows:
        print("\nASHA's rungs, rank-correlated with what followed (a rung is only worth what it ranks):")
        print("\n".join(correlation_lines(rows, bn_stats)))


def write_cost(folder: Path) -> None:
    """cost.csv: what every trial, the teacher, the bank and the re-evaluation took."""
    table = cost.ledger(folder)
    write_atomic(folder / COST_FILE, table.to_csv(index=False))
    spent = cost.totals(table)
    by_device = ", ".join(f"{v:.3g} {k.removesuffix('_hours')} hours" for k, v in spent.items()
                          if k.endswith("_hours") and k not in ("wall_hours", "device_hours"))
    print(f"cost ({COST_FILE}): {by_device} of device time, {spent['wall_hours']:.3g} hours of run wall time")


# ----------------------------------------------------------------------------- the driver

def run_search(cfg: Config, search_section: dict, *, name: str, storage_location: str, address: str | None,
               resume: bool, teacher: str | None, kind: TrialKind = METHOD) -> Path:
    """Run (or resume) the search; returns the folder that holds its results (for a
    URI experiment, the local mirror: everything in it is also in the URI).
    `kind`: what runs as trials (refilled.tune.trial_inputs): REFILLED, or a simulation.

    One driver per experiment: a live lease (refilled.store.lease) is refused before anything
    else, the lease is taken before anything is written and held, with its heartbeat,
    until this function returns or raises (Ctrl-C included)."""
    from ray import tune

    place = experiment_place(storage_location, name)
    folder = place.folder
    lease = lease_at(place.location)
    lease.refuse_if_held()  # before Ray starts and before a URI's mirror is refreshed
    data: dict = {}
    if resume:
        place.pull()
        cfg, settings, data = read_experiment(folder, place.location)
        integrity.before_resume(place, data)
        # a staged search may have been interrupted in phase 1, before phase 2 had a state
        if not settings.staged and not tune.Tuner.can_restore(place.location):
            raise UserError(f"{place.location} has no Ray Tune state to resume: start a new search instead")
    else:
        settings = parse_search(search_section, cfg)
        check_rungs_within(settings, cfg)
        # a folder that holds only a lease (its driver was killed before it wrote) is no experiment
        if place.exists(ignore=lambda entry: LEASE_FILE in entry):
            raise UserError(f"experiment {place.location} already exists: pass --resume to continue it "
                            "or choose another --name")
        first_points(settings, cfg)  # a warm start's earlier experiment: a bad one refused before anything is written
    if not address:
        check_local_gpus(settings)  # before starting Ray: its start-up lines would bury the error
    connect(address)
    check_resources(settings)
    took = lease.acquire()
    if took is not None:
        print(f"note: took over the lease of {place.location} from a driver that is gone ({took.describe()}; "
              f"{took.gone})", file=sys.stderr)
    try:
        return _run(cfg, settings, data, place, name, resume, teacher, kind)
    finally:
        lease.release()


# TODO(lead): check lease.lost (set by the heartbeat, lease.lost_to: who holds it now) at safe points and
# stop writing: this driver was silent past the timeout (paused, cut off from the storage) and was taken over


def _run(cfg: Config, settings: SearchSettings, data: dict, place: Place, name: str, resume: bool,
         teacher: str | None, kind: TrialKind) -> Path:
    from ray import tune

    folder = place.folder
    if not resume:  # only now: a refused search leaves no half experiment behind
        if place.uri:
            shutil.rmtree(folder, ignore_errors=True)  # a mirror left by an earlier experiment at this URI
        folder.mkdir(parents=True, exist_ok=True)
        experiment_file.write(folder, cfg, settings.to_section(), kind.note())
        place.push(EXPERIMENT_FILE)
    teacher_path = kind.prepare_teacher(cfg, folder, teacher)
    place.push(*([teacher_path.name] if teacher_path else []), DRIVER_FILE)
    stage1, phase = None, settings
    if settings.staged:
        choice = data.get("stage1_choice") or run_stage1_phase(cfg, settings, place, name, teacher_path, resume, kind)
        stage1 = checkpoint.load(folder / STAGE1_CHOICE, "stage-1 choice",
                                 shown=f"{place.location}/{STAGE1_CHOICE}")["snapshot"]
        phase = settings.phase(2, choice["values"])
        resume = resume and tune.Tuner.can_restore(place.location)
    trainable = kind.trainable_for(cfg, phase, place, teacher_path, stage1=stage1)
    # phase 2 of a staged search starts at stage 2: ASHA's clock counts stage-2 epochs
    max_t = counted_epochs(cfg, from_stage1=stage1 is not None)
    warn_about_rungs(cfg, phase, max_t, phase2=stage1 is not None)
    fit(trainable, phase, cfg, place, name, max_t=max_t, resume=resume)
    trials = summarise(folder)
    place.push(TRIALS_FILE, study_file(folder).name)
    choose(folder, trials, settings, place, teacher_path, place.uri, kind)
    show_rung_fidelity(folder, cfg.bn_stats)
    write_cost(folder)
    place.push(BEST_CONFIG, COST_FILE)
    if place.uri:
        print(f"experiment: {place.uri} (local mirror: {folder})")
    return folder


def fit(trainable, settings: SearchSettings, cfg: Config, experiment: Place, study_name: str, *, max_t: int,
        resume: bool, sub: str = "") -> None:
    """One Ray Tune run (new, or restored), in the experiment or its part `sub` (a
    staged search's stage1_search): Optuna samples, ASHA stops, then the results
    are brought into the local folder."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from refilled.tune.callbacks import KeepLastCheckpoints, KeepLogsOfRetriedTrials, TrialRecords

    place = experiment.part(sub) if sub else experiment
    folder = place.folder
    if resume:
        tuner = tune.Tuner.restore(place.location, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        # a phase of a staged search killed before Ray saved any state starts again: its trials go aside
        set_aside_unknown_trials(place, set())
        # rungs at the epochs the settings name, through the clock every trial reports (refilled.schema.rungs)
        scheduler = ASHAScheduler(metric=METRIC, mode="max",
                                  **scheduler_args(settings.rung_epochs(max_t), settings.asha.reduction_factor))
        searcher = StudySearcher(settings.space, metric=METRIC, study_name=study_name,
                                 experiment=experiment.location, sub=sub, seed=settings.seed,
                                 first=first_points(settings, cfg), budget_hours=settings.budget_hours)
        tuner = tune.Tuner(
            trainable, param_space=settings.param_space(),
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                        num_samples=settings.num_samples,
                                        max_concurrent_trials=settings.max_concurrent or None,
                                        reuse_actors=settings.reuse_actors,
                                        trial_dirname_creator=trial_folder_name),
            run_config=tune.RunConfig(
                name=place.location.rstrip("/").rsplit("/", 1)[-1], storage_path=place.storage_path, verbose=1,
                failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                callbacks=[TrialRecords(), KeepLogsOfRetriedTrials(place.location),
                           KeepLastCheckpoints(place.location, settings.keep_checkpoints)],
                # Ray keeps every checkpoint; KeepLastCheckpoints deletes the old ones safely
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None)))
    grid = tuner.fit()
    if place.uri:  # the trials' results and records, next to our files in the mirror (whose study is current)
        storage.download(place.uri, folder, skip=lambda rel: storage.is_checkpoint(rel) or rel.endswith(STUDY_FILES))
    if resume:
        set_aside_unknown_trials(place, {Path(r.path).name for r in grid if r.path})
    # Tune ends fit() quietly on Ctrl-C (it saves its state, then marks the trials it stops as
    # terminated): stop here, or an interrupted phase 1 would choose from half its trials and
    # the table would pass for the search's result. The trials' records, which Tune's last
    # state save brought into the storage, say which trials really ended.
    ended = load_trials(folder)
    too_few = min(len(grid), len(ended)) < settings.num_samples
    if too_few and settings.budget_hours is not None:  # unless search.budget_hours stopped new trials
        too_few = cost.device_seconds(experiment.folder) < settings.budget_hours * 3600
    if too_few or (ended["status"] == "running").any():
        print(f"interrupted: Tune saved the search; `tune_refilled.py search --resume --name "
              f"{experiment.location.rstrip('/').rsplit('/', 1)[-1]} --storage {experiment.storage_path}` "
              "continues it", file=sys.stderr)
        raise KeyboardInterrupt


def run_stage1_phase(cfg: Config, settings: SearchSettings, place: Place, name: str, teacher_path: Path,
                     resume: bool, kind: TrialKind = METHOD) -> dict[str, Any]:
    """Phase 1 of a staged search: stage-1-only trials over the stage-1 keys, in
    <experiment>/stage1_search, ranked by their last validation NCM accuracy. The
    best one's end-of-stage-1 student is saved as stage1_choice.pt and its values
    in experiment.yaml (`stage1_choice`), so a resumed search skips this phase."""
    from ray import tune

    sub = place.part(STAGE1_SEARCH)
    phase = settings.phase(1)
    resume = resume and tune.Tuner.can_restore(sub.location)
    if resume:
        sub.pull()
    else:
        sub.folder.mkdir(parents=True, exist_ok=True)
        experiment_file.write(sub.folder, cfg, phase.to_section(), {"stage1_only": True})
        sub.push(EXPERIMENT_FILE)
    print(f"phase 1 of 2 (staged search): stage 1 only, {phase.num_samples} trials over "
          f"{', '.join(phase.space)}, ranked by validation NCM accuracy")
    trainable = kind.trainable_for(cfg, phase, place, teacher_path, stage1_only=True)
    fit(trainable, phase, cfg, place, f"{name}-stage1", max_t=counted_epochs(cfg, stage1_only=True), resume=resume,
        sub=STAGE1_SEARCH)
    sub.push(study_file(sub.folder).name)

    trials = load_trials(sub.folder)
    done = trials[trials["status"] == "finished"] if not trials.empty else trials
    if done.empty:
        raise UserError(f"no stage-1 trial of {sub.location} finished, so there is no embedding to start stage 2 "
                        "from: see the trial errors above, or raise search.staged.num_samples")
    best = done.sort_values(["last_val_ncm_stage1", "best_val_ncm_stage1"], ascending=False).iloc[0]
    values = {k: plain_value(best[f"config/{k}"]) for k in phase.space}
    state = _newest_checkpoint_state(sub, best)
    choice = {"trial_id": str(best["trial_id"]), "values": values,
              "val_ncm_accuracy": float(best["last_val_ncm_stage1"])}
    checkpoint.save({"kind": "stage1_choice", **choice, "snapshot": state}, place.folder / STAGE1_CHOICE)
    experiment_file.write(place.folder, cfg, settings.to_section(), {"stage1_choice": choice})
    place.push(STAGE1_CHOICE, EXPERIMENT_FILE)  # in this order: a stage1_choice in experiment.yaml has its file
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"phase 1 chose {shown} "
          f"(trial {choice['trial_id']}, validation NCM accuracy {choice['val_ncm_accuracy']:.4f}); "
          f"phase 2 of 2: stage 2 from that embedding")
    return choice


def _newest_checkpoint_state(place: Place, trial: pd.Series) -> dict:
    """The trial's state at its newest checkpoint, as its record names it (for a
    finished trial: its last epoch)."""
    from refilled.store.layout import STATE_FILE

    trial_dir, newest = Path(trial["folder"]).name, trial.get("checkpoint")
    if not isinstance(newest, str) or not newest:
        raise UserError(f"stage-1 trial {trial_dir} in {place.location} has no checkpoint to start stage 2 from: "
                        "run the search again")
    path = place.folder / trial_dir / newest / STATE_FILE
    if place.uri:
        storage.download_file(storage.join(place.uri, trial_dir, newest, STATE_FILE), path)
    return checkpoint.load(path, "stage-1 trial checkpoint", shown=f"{place.location}/{trial_dir}/{newest}/{STATE_FILE}",
                           remedy="restore it from a backup, or start a new search (--name OTHER)")


def set_aside_unknown_trials(place: Place, known: set[str]) -> None:
    """Trial folders that Tune's restored state does not know were started by a killed
    driver after its last state save; the resumed search ran their configurations
    again under new ids. They move to interrupted_trials/ so each trial counts once."""
    folder = place.folder
    for params in sorted(folder.glob("*/params.json")):
        trial = params.parent
        if trial.name not in known:
            (folder / INTERRUPTED_TRIALS).mkdir(exist_ok=True)
            shutil.move(str(trial), str(folder / INTERRUPTED_TRIALS / trial.name))
            if place.uri:
                storage.move(place.uri, trial.name, f"interrupted_trials/{trial.name}")
            print(f"set aside {trial.name}: started before the interruption, run again after it "
                  f"(now in {place.location}/interrupted_trials)")
