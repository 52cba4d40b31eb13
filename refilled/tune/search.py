"""`search`: the driver. Optuna (TPE) samples, ASHA stops, Ray runs the trials, locally or on a cluster.

One `SearchRun` is one search of one experiment (`<storage>/<name>/`, its files named in
refilled.store.layout): its config and settings, its place (a folder, or a URI and the
local mirror its files are made in, refilled.store.storage: every file written through the
place is kept at the URI too), its lease (one driver per experiment, refilled.store.lease)
and its phases. `run()` returns how it ended (`Outcome`): finished, interrupted (Tune saved
its state; `--resume` continues) or lease lost (another driver took the experiment over).

A staged search (`search.staged`) runs two Ray Tune experiments: phase 1 in stage1_search/
searches the keys that act only on stage 1 (tau1, lr1, ...), ranked by validation NCM
accuracy; phase 2, in the experiment itself, searches the others from the chosen
end-of-stage-1 student, handed to every trial through the object store.

The pieces: refilled.tune.searcher (the Optuna study behind Tune's Searcher),
refilled.tune.cluster (connecting to Ray, resource checks), refilled.tune.trial_inputs
(teacher, bank, the trial kinds), refilled.tune.callbacks (trial records, checkpoint
pruning, the lease guard), refilled.tune.selection (the re-evaluation of the best trials).
"""

from __future__ import annotations

import contextlib
import enum
import os
import pickle
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from refilled.errors import UserError
from refilled.files import checkpoint
from refilled.schema.config import CLASS_COUNT, Config
from refilled.schema.rungs import counted_epochs, schedule_warnings, scheduler_args
from refilled.schema.search import SearchSettings, check_rungs_within, parse_search
from refilled.store import cost, experiment_file, integrity, storage, trial_records
from refilled.store.experiments import first_points, load_trials, plain_value, stage1_choosable, write_best_config
from refilled.store.layout import (
    COST_FILE,
    INTERRUPTED_TRIALS,
    LEASE_FILE,
    LOCK_FILE,
    SELECTION_FILE,
    STAGE1_CHOICE,
    STAGE1_SEARCH,
    STATE_FILE,
    TRIALS_FILE,
)
from refilled.store.lease import Lease, lease_at
from refilled.store.paths import new_folders, remove_empty
from refilled.store.rung_fidelity import correlation_lines, experiment_correlations
from refilled.store.storage import Place
from refilled.store.study import STUDY_FILES, study_file
from refilled.tune import current, saved_state
from refilled.tune.cluster import check_local_gpus, check_resources, connect
from refilled.tune.selection import reevaluate
from refilled.tune.trial_inputs import METHOD, TrialKind
from refilled.tune.trial_plan import METRIC, Phase, TrialInputs


class Outcome(enum.Enum):
    """How a search ended, and the exit status the command line gives it."""

    FINISHED = 0
    INTERRUPTED = 130  # Tune saved its state: --resume continues
    LEASE_LOST = 2  # another driver took the experiment over: this one wrote nothing more


class LeaseLost(Exception):
    """Raised in Tune's loop (refilled.tune.callbacks.LeaseGuard) to end fit() at once."""


@dataclass
class SearchRun:
    """One search of one experiment, new or resumed. Make it with `new` or `resumed`."""

    cfg: Config
    settings: SearchSettings
    place: Place
    lease: Lease
    resume: bool = False
    stage1_choice: dict | None = None  # what a resumed staged search's phase 1 chose
    kind: TrialKind = field(default=METHOD)
    teacher: str | None = None  # --teacher, checked by `new`
    tuning: bool = False  # a Ray Tune run has started: the experiment is kept once a trial began (_before_first_trial)

    @classmethod
    def new(cls, cfg: Config, section: dict, place: Place, kind: TrialKind = METHOD,
            teacher: str | None = None) -> SearchRun:
        """A new search; refused in one line before anything is written (a live driver, an
        experiment already there, bad settings, a bad warm start, a `teacher` that does not fit)."""
        lease = lease_at(place.location)
        lease.refuse_if_held()
        settings = parse_search(section, cfg)
        check_rungs_within(settings, cfg)
        # a folder that holds only a lease (its driver was killed before it wrote) is no experiment
        if place.exists(ignore=lambda entry: LEASE_FILE in entry):
            raise UserError(f"experiment {place.location} already exists: pass --resume to continue it "
                            "or choose another --name")
        first_points(settings, cfg)  # a warm start's earlier experiment: a bad one refused now
        kind.check(cfg, teacher)  # the data set, its classes, the networks, the teacher: a bad one refused now
        return cls(cfg, settings, place, lease, kind=kind, teacher=teacher)

    @classmethod
    def resumed(cls, place: Place, kind: TrialKind = METHOD) -> SearchRun:
        """The experiment at `place`, to continue; a live driver or damaged files are refused."""
        from ray import tune

        lease = lease_at(place.location)
        lease.refuse_if_held()  # before a URI's mirror is refreshed
        experiment_file.check(place)  # what is not an experiment: refused before anything is downloaded
        place.pull()
        cfg, data = experiment_file.read(place.folder, place.location, hint=experiment_file.SEARCH_HINT)
        settings = parse_search(data.get("search"), cfg)
        integrity.before_resume(place, data)
        saved_state.check(place, place)
        if settings.staged and not data.get("stage1_choice"):  # phase 1 goes on
            saved_state.check(place.part(STAGE1_SEARCH), place)
        # a staged search may have been interrupted in phase 1, before phase 2 had a state
        if not settings.staged and not tune.Tuner.can_restore(place.location):
            raise UserError(f"{place.location} has no Ray Tune state to resume: start a new search instead")
        return cls(cfg, settings, place, lease, resume=True, stage1_choice=data.get("stage1_choice"), kind=kind)

    @property
    def name(self) -> str:
        return self.place.name

    def resume_command(self) -> str:
        return shlex.join(["tune_refilled.py", "search", "--resume", "--name", self.name,
                           "--storage", self.place.storage_path])

    def run(self, address: str | None = None, teacher: str | None = None) -> Outcome:
        """Connect to Ray, take the lease, run the phases, choose and cost the result. The
        lease is held until this returns or raises (Ctrl-C included). A new search that
        fails before its first Ray Tune run leaves no experiment behind (`_discard`)."""
        from refilled.tune.callbacks import LeaseGuard

        if not address:
            check_local_gpus(self.settings)  # before starting Ray: its start-up lines would bury the error
        connect(address)
        check_resources(self.settings)
        made = [] if self.resume or self.place.uri else new_folders(self.place.folder)
        took = self.lease.acquire()
        if took is not None:
            print(f"note: took over the lease of {self.place.location} from a driver that is gone "
                  f"({took.describe()}; {took.gone})", file=sys.stderr)
        LeaseGuard.watch(self.lease)
        current.set_location(self.place.location)  # where the searcher and the callbacks find the experiment
        discarded = False
        try:
            return self._phases(teacher or self.teacher)
        except BaseException:
            with contextlib.suppress(Exception):  # what cannot be looked at or removed is kept: the error is what matters
                if discarded := self._before_first_trial():
                    self._discard()
            raise
        finally:
            current.set_location(None)
            LeaseGuard.watch(None)
            self.lease.release()
            if discarded:  # the folders the lease made, once its files are gone
                remove_empty(made)
                if self.place.uri:
                    with contextlib.suppress(*storage.ERRORS):
                        storage.remove_if_empty(self.place.uri)

    def _before_first_trial(self) -> bool:
        """A new search that has no trial and no Ray Tune state to resume (it failed in its set-up,
        or as its first Tune run began)."""
        if self.resume:
            return False
        if not self.tuning:
            return True
        from ray import tune

        parts = [self.place, self.place.part(STAGE1_SEARCH)]
        files = storage.list_files(self.place.uri) if self.place.uri else \
            [p.relative_to(self.place.folder).as_posix() for p in self.place.folder.rglob("params.json")]
        return not any(rel.endswith("params.json") for rel in files) and \
            not any(tune.Tuner.can_restore(p.location) for p in parts)

    def _discard(self) -> None:
        """What a new search wrote before its first Ray Tune run (experiment.yaml, the teacher,
        the bank, a staged search's stage1_search/), removed: the rerun starts afresh rather
        than meeting an experiment that `--resume` cannot continue. The lease stays (its
        holder releases it), and an experiment that ran a trial is never discarded."""
        keep = (LEASE_FILE, LOCK_FILE)
        if self.place.uri:
            storage.remove(self.place.uri, keep)
            shutil.rmtree(self.place.folder, ignore_errors=True)
        elif self.place.folder.is_dir():
            for entry in self.place.folder.iterdir():
                if entry.name not in keep:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()

    def _phases(self, teacher: str | None) -> Outcome:
        if not self.resume:  # only now: a refused search leaves no half experiment behind
            if self.place.uri:
                shutil.rmtree(self.place.folder, ignore_errors=True)  # a mirror left by an earlier experiment
            self.place.folder.mkdir(parents=True, exist_ok=True)
            experiment_file.write(self.place, self.cfg, self.settings.to_section(), self.kind.note())
        inputs = TrialInputs(self.cfg, self.place, self.kind.prepare_teacher(self.cfg, self.place, teacher))
        stage1 = None
        if self.settings.staged:
            outcome = self._stage1_phase(inputs) if self.stage1_choice is None else Outcome.FINISHED
            if outcome is not Outcome.FINISHED:
                return outcome
            stage1 = checkpoint.load(self.place.folder / STAGE1_CHOICE, "stage-1 choice",
                                     shown=f"{self.place.location}/{STAGE1_CHOICE}")["snapshot"]
        # phase 2 of a staged search starts at stage 2: ASHA's clock counts stage-2 epochs
        phase = Phase(settings=self.settings.phase(2, self.stage1_choice["values"]) if stage1 else self.settings,
                      max_t=counted_epochs(self.cfg, from_stage1=stage1 is not None), study_name=self.name,
                      stage1=stage1)
        outcome = self._fit(inputs, phase)
        if outcome is not Outcome.FINISHED:
            return outcome
        self._conclude(inputs)
        return self._lost() if self.lease.lost.is_set() else Outcome.FINISHED

    # ------------------------------------------------------------------------- one Ray Tune run

    def _fit(self, inputs: TrialInputs, phase: Phase) -> Outcome:
        """One Ray Tune run (new, or restored), in the experiment or its part `phase.sub` (a
        staged search's stage1_search): Optuna samples, ASHA stops, then the results are
        brought into the local folder."""
        from ray import tune

        place = self.place.part(phase.sub) if phase.sub else self.place
        trainable = self.kind.trainable_for(inputs, phase)
        if not phase.stage1_only:
            warn_about_rungs(self.cfg, phase.settings, phase.max_t, phase2=phase.stage1 is not None)
        # Tune's JSON, CSV and TensorBoard loggers off, in a new run and a restored one alike: each
        # trial writes its epochs itself (refilled.store.epoch_files); Tune sees only what it decides on
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
        # Tune's console output off (it builds its status at every step of its loop, printed or not):
        # refilled.tune.callbacks.Progress prints a line every 30 s instead
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        resume = self.resume and tune.Tuner.can_restore(place.location)
        if resume:
            try:
                tuner = tune.Tuner.restore(place.location, trainable=trainable, resume_unfinished=True,
                                           resume_errored=True)
            except (pickle.UnpicklingError, EOFError) as error:  # the tuner Tune saved is cut short or garbled
                raise saved_state.refuse(self.place, f"its tuner in {place.location}", error, "no trial ran") from None
        else:
            # a phase of a staged search killed before Ray saved any state starts again: its trials go aside
            set_aside_unknown_trials(place, set())
            tuner = self._tuner(trainable, phase, place)
        self.tuning = True  # from here on the experiment holds Tune's state and trials: kept, --resume continues
        try:
            grid = tuner.fit()
        except Exception:
            if self.lease.lost.is_set():
                return self._lost()
            raise
        if self.lease.lost.is_set():
            return self._lost()
        if place.uri:  # the trials' results and records, next to our files in the mirror (whose study is current)
            storage.download(place.uri, place.folder,
                             skip=lambda rel: storage.is_checkpoint(rel) or rel.endswith(STUDY_FILES))
        if resume:
            set_aside_unknown_trials(place, {Path(r.path).name for r in grid if r.path})
        return self._ended_or_interrupted(place, phase, len(grid))

    def _tuner(self, trainable, phase: Phase, place: Place):
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler

        from refilled.tune.callbacks import KeepLastCheckpoints, LeaseGuard, Progress, TrialRecords
        from refilled.tune.searcher import StudyPlan, StudySearch, StudySearcher

        settings = phase.settings
        # rungs at the epochs the settings name, through the clock every trial reports (refilled.schema.rungs)
        scheduler = ASHAScheduler(metric=METRIC, mode="max",
                                  **scheduler_args(settings.rung_epochs(phase.max_t), settings.asha.reduction_factor))
        searcher = StudySearcher(StudyPlan(settings.space, phase.study_name, phase.sub, settings.seed,
                                           tuple(first_points(settings, self.cfg)), settings.budget_hours, settings.sampler))
        # wrapped here as Tune would wrap it (max_concurrent_trials), so that a resume re-points it (StudySearch)
        return tune.Tuner(
            trainable, param_space=settings.param_space(),
            tune_config=tune.TuneConfig(search_alg=StudySearch.around(searcher, settings.max_concurrent),
                                        scheduler=scheduler, num_samples=settings.num_samples,
                                        reuse_actors=settings.reuse_actors,
                                        trial_dirname_creator=trial_folder_name),
            run_config=tune.RunConfig(
                name=place.name, storage_path=place.storage_path, verbose=0,
                failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                # none of them keeps the experiment's location: refilled.tune.current says it
                callbacks=[LeaseGuard(), TrialRecords(), KeepLastCheckpoints(settings.keep_checkpoints, phase.sub),
                           Progress(settings.num_samples, METRIC)],
                # Ray keeps every checkpoint; KeepLastCheckpoints deletes the old ones safely
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None)))

    def _ended_or_interrupted(self, place: Place, phase: Phase, tune_trials: int) -> Outcome:
        """Tune ends fit() quietly on Ctrl-C (it saves its state, then marks the trials it stops
        as terminated): said here, or an interrupted phase 1 would choose from half its trials
        and the table would pass for the search's result. The trials' records, which Tune's
        last state save brought into the storage, say which trials really ended."""
        ended = load_trials(place.folder)
        too_few = min(tune_trials, len(ended)) < phase.settings.num_samples
        if too_few and phase.settings.budget_hours is not None:  # unless budget_hours stopped new trials
            too_few = cost.device_seconds(self.place.folder) < phase.settings.budget_hours * 3600
        if too_few or (ended["status"] == "running").any():
            print(f"interrupted: Tune saved the search; `{self.resume_command()}` continues it", file=sys.stderr)
            return Outcome.INTERRUPTED
        return Outcome.FINISHED

    def _lost(self) -> Outcome:
        holder = self.lease.lost_to
        who = holder.describe() if holder is not None else "nobody: the lease file was deleted"
        print(f"error: this driver lost the lease of {self.place.location} to another driver ({who}); it stopped "
              "without writing more: let that one run, or stop it and run --resume", file=sys.stderr, flush=True)
        return Outcome.LEASE_LOST

    # ------------------------------------------------------------------------- phase 1 of a staged search

    def _stage1_phase(self, inputs: TrialInputs) -> Outcome:
        """Phase 1 of a staged search: stage-1-only trials over the stage-1 keys, in
        <experiment>/stage1_search, ranked by their last validation NCM accuracy. The best
        one's end-of-stage-1 student is saved as stage1_choice.pt and its values in
        experiment.yaml (`stage1_choice`), so a resumed search skips this phase."""
        from ray import tune

        sub = self.place.part(STAGE1_SEARCH)
        settings = self.settings.phase(1)
        if self.resume and tune.Tuner.can_restore(sub.location):
            sub.pull()
        else:
            sub.folder.mkdir(parents=True, exist_ok=True)
            experiment_file.write(sub, self.cfg, settings.to_section(), {"stage1_only": True})
        print(f"phase 1 of 2 (staged search): stage 1 only, {settings.num_samples} trials over "
              f"{', '.join(settings.space)}, ranked by validation NCM accuracy")
        phase = Phase(settings=settings, max_t=counted_epochs(self.cfg, stage1_only=True),
                      study_name=f"{self.name}-stage1", sub=STAGE1_SEARCH, stage1_only=True)
        outcome = self._fit(inputs, phase)
        if outcome is not Outcome.FINISHED:
            return outcome
        sub.push(study_file(sub.folder).name)  # Optuna wrote it

        done = stage1_choosable(load_trials(sub.folder))
        if done.empty:
            raise UserError(f"no stage-1 trial of {sub.location} finished, so there is no embedding to start "
                            "stage 2 from: see the trial errors above, or raise search.staged.num_samples")
        best = done.iloc[0]
        values = {k: plain_value(best[f"config/{k}"]) for k in settings.space}
        choice = {"trial_id": str(best["trial_id"]), "values": values,
                  "val_ncm_accuracy": float(best["last_val_ncm_stage1"])}
        snapshot = _newest_checkpoint_state(sub, best)
        # in this order: a stage1_choice in experiment.yaml has its file
        self.place.write(STAGE1_CHOICE, checkpoint.writer({"kind": "stage1_choice", **choice, "snapshot": snapshot}))
        experiment_file.write(self.place, self.cfg, self.settings.to_section(), {"stage1_choice": choice})
        self.stage1_choice = choice
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        print(f"phase 1 chose {shown} (trial {choice['trial_id']}, validation NCM accuracy "
              f"{choice['val_ncm_accuracy']:.4f}); phase 2 of 2: stage 2 from that embedding")
        return Outcome.FINISHED

    # ------------------------------------------------------------------------- the result

    def _conclude(self, inputs: TrialInputs) -> None:
        """trials.csv, the re-evaluation and best_config.yaml, the rungs' fidelity, cost.csv."""
        trials = write_trials_table(self.place)
        self.place.push(study_file(self.place.folder).name)  # Optuna wrote it
        reeval = ""
        if self.settings.select.top_k:
            table = reevaluate(trials, self.settings, inputs, self.kind)
            with pd.option_context("display.width", 200, "display.float_format", "{:.4f}".format):
                print(f"\nre-evaluation ({SELECTION_FILE}), best mean first:")
                print(table.to_string(index=False))
            top = table.iloc[0]
            reeval = (f"re-evaluated over seeds {top['seeds']}: {top['val_accuracy_reeval_mean']:.4f} ± "
                      f"{top['val_accuracy_reeval_std']:.4f}, the best mean of the {len(table)} best trials")
        path, _, best = write_best_config(self.place, trials, reeval)
        shown = f"{self.place.uri}/{path.name}" if self.place.uri else path
        print(f"\nchosen config ({best['trial_id']}, stage-2 val accuracy {best['best_val_accuracy_stage2']:.4f} in "
              f"the search{'; ' + reeval if reeval else ''}) written to {shown}:")
        searched = [c for c in trials.columns if c.startswith("config/")]
        print("  " + ", ".join(f"{k.removeprefix('config/')}={best[k]:.4g}" if isinstance(best[k], float)
                               else f"{k.removeprefix('config/')}={best[k]}" for k in searched))
        rows = experiment_correlations(self.place.folder)
        if rows:
            print("\nASHA's rungs, rank-correlated with what followed (a rung is only worth what it ranks):")
            print("\n".join(correlation_lines(rows, self.cfg.bn_stats)))
        write_cost(self.place)
        if self.place.uri:
            print(f"experiment: {self.place.uri} (local mirror: {self.place.folder})")


def open_search(storage_location: str, name: str, cfg: Config | None = None, section: dict | None = None,
                kind: TrialKind = METHOD) -> SearchRun:
    """The search `name` in `storage_location` (a folder or a URI): a new one from `cfg` and
    its `search:` section, or, with no `cfg`, the experiment there to resume."""
    place = Place.named(storage_location, name)
    return SearchRun.resumed(place, kind) if cfg is None else SearchRun.new(cfg, section or {}, place, kind)


def trial_folder_name(trial) -> str:
    """Tune's trial_dirname_creator: trial folders are named by the project (trial_<id>)."""
    return trial_records.folder_name(trial.trial_id)


def write_trials_table(place: Place) -> pd.DataFrame:
    """Write trials.csv; print the sorted table."""
    trials = load_trials(place.folder)
    if trials.empty or not (trials["epochs"] > 0).any():
        raise UserError(f"the search in {place.location} reported no epoch: see the trial errors above")
    # the folder column as the experiment names it (trial_<id>): an experiment copied or moved elsewhere stays right
    place.write(TRIALS_FILE, trials.assign(folder=[Path(f).name for f in trials["folder"]]).to_csv(index=False))
    counts = ", ".join(f"{n} {s}" for s, n in trials["status"].value_counts().items())
    searched = [c for c in trials.columns if c.startswith("config/")]
    shown = trials[searched + ["best_val_accuracy_stage2", "epochs", "status"]]
    with pd.option_context("display.max_rows", 200, "display.width", 200, "display.float_format", "{:.4g}".format):
        print(f"\n{len(trials)} trials, best stage-2 validation accuracy first ({counts}):")
        print(shown.rename(columns=lambda c: c.removeprefix("config/")).to_string(index=False, na_rep="-"))
    return trials


def warn_about_rungs(cfg: Config, settings: SearchSettings, max_t: int, phase2: bool) -> None:
    """Say where ASHA will compare trials, and each rung the schedule is expected not to support."""
    from refilled.data.splits import parse_positions

    rungs = settings.rung_epochs(max_t)
    unit = "stage-2 epochs" if phase2 else "epochs of both stages"
    print(f"ASHA rungs at {', '.join(map(str, rungs)) or 'none'} ({unit}, of {max_t}; keeps 1 in "
          f"{settings.asha.reduction_factor:g} at each)")
    steps = None
    if cfg.shots is not None:  # the training set is known without reading it: shots x classes
        classes = cfg.target_classes
        if isinstance(classes, str):
            count = CLASS_COUNT.get(cfg.data_name)  # a folder's is known once it is read
            classes = parse_positions(classes, count, "target_classes") if count else None
        steps = -(-cfg.shots * len(classes) // cfg.batch_size) if classes else None
    for line in schedule_warnings(rungs, phase2=phase2, e1=cfg.n_training_epochs1, e2=cfg.n_training_epochs2,
                                  point=cfg.point, steps_per_epoch=steps, bn_stats=cfg.bn_stats):
        print(f"warning: {line}", file=sys.stderr)


def write_cost(place: Place) -> None:
    """cost.csv: what every trial, the teacher, the bank and the re-evaluation took."""
    table = cost.ledger(place.folder)
    place.write(COST_FILE, table.to_csv(index=False))
    spent = cost.totals(table)
    by_device = ", ".join(f"{v:.3g} {k.removesuffix('_hours')} hours" for k, v in spent.items()
                          if k.endswith("_hours") and k not in ("wall_hours", "device_hours"))
    print(f"cost ({COST_FILE}): {by_device} of device time, {spent['wall_hours']:.3g} hours of run wall time")


def _newest_checkpoint_state(place: Place, trial: pd.Series) -> dict:
    """The trial's state at its newest checkpoint, as its record names it (for a
    finished trial: its last epoch)."""
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
    again under new ids. They move to interrupted_trials/ so each trial counts once.
    A trial whose own record says it ended stays: the study was told its end (the searcher
    is told before the records are written), so its configuration did not run again."""
    folder = place.folder
    for params in sorted(folder.glob("*/params.json")):
        trial = params.parent
        if trial.name not in known and trial_records.read(trial).get("status") not in trial_records.ENDED:
            (folder / INTERRUPTED_TRIALS).mkdir(exist_ok=True)
            shutil.move(str(trial), str(folder / INTERRUPTED_TRIALS / trial.name))
            if place.uri:
                storage.move(place.uri, trial.name, f"{INTERRUPTED_TRIALS}/{trial.name}")
            print(f"set aside {trial.name}: started before the interruption, run again after it "
                  f"(now in {place.location}/{INTERRUPTED_TRIALS})")
