"""`retrain`: the best configuration of an experiment, retrained and tested.

Reads the experiment's best trial (or `--trial`, or `--config`), then runs the
final seeds (refilled.runs.final_retrain) as Ray tasks on a cluster (`--address`) or one
after another on this machine, with a progress bar either way. An experiment
at a URI is read from its local mirror, and its retrain folder is uploaded next
to it; on a cluster, each task fetches the teacher and uploads its run itself.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from refilled.errors import UserError, shown
from refilled.files import checkpoint
from refilled.runs.final_retrain import (
    RUN_KINDS,
    plan,
    results_of_runs,
    retrain_local,
    run_one,
    run_one_at_uri,
    trained_on,
    write_results,
)
from refilled.schema.config import Config, load_experiment
from refilled.schema.search import parse_search
from refilled.store import experiment_file, paths, storage
from refilled.store.experiments import chosen_trial, experiment_config, load_trials, read_selection, say_notes, trial_config
from refilled.store.layout import EXPERIMENT_FILE, RETRAIN_DIR, RETRAIN_RESULTS, TEACHER_FILE
from refilled.store.lease import lease_at, note_if_running


def choose_config(folder: Path, trial_id: str | None, config_file: str | None) -> tuple[Config, dict[str, Any]]:
    """The configuration to retrain and where it came from."""
    if config_file:
        cfg, _ = load_experiment(config_file)
        return cfg, {"config_file": str(config_file)}
    notes: dict[str, str] = {}
    trials = load_trials(folder, notes)
    if trials.empty:
        raise UserError(f"experiment {folder} has no trial results yet: run or resume its search first")
    if trial_id:
        match = trials[trials["trial_id"].astype(str).str.startswith(trial_id)]
        damaged = [t for t in notes if t.startswith(trial_id)]
        if match.empty and len(damaged) == 1:
            raise UserError(f"--trial {trial_id} of {folder.name} cannot be read: its {notes[damaged[0]]}")
        if len(match) != 1:
            raise UserError(f"--trial {trial_id} matches {len(match)} trials of {folder.name}; "
                            f"known ids: {', '.join(trials['trial_id'].astype(str))}")
        row = match.iloc[0]
    else:
        row = chosen_trial(folder, trials, notes)
    say_notes(folder, notes)  # not about the one retrained: said, and the retrain goes on
    source = {"experiment": folder.name, "trial_id": str(row["trial_id"]),
              "val_accuracy_stage2": round(float(row["best_val_accuracy_stage2"]), 4)}
    selection = read_selection(folder)
    if selection is not None:
        mine = selection[selection["trial_id"].astype(str) == str(row["trial_id"])]
        if not mine.empty:  # what the search saw against what more seeds gave: the optimism gap
            source["val_accuracy_reeval_mean"] = round(float(mine.iloc[0]["val_accuracy_reeval_mean"]), 4)
            source["reeval_seeds"] = str(mine.iloc[0]["seeds"])
    return trial_config(folder, row), source


@dataclass(frozen=True)
class RetrainRequest:
    """What `retrain` is asked: the experiment (a folder or a URI), how many seeds, where to
    write (default <experiment>/retrain), which configuration (the chosen one, `trial`'s, or
    a `config` file), which arms run (the tuned REFILLED, REFILLED at the experiment's own
    config values, the student alone: refilled.runs.final_retrain.RUN_KINDS), and where the seeds run."""

    experiment: str
    seeds: int = 3
    out: str | None = None
    trial: str | None = None
    config: str | None = None
    arms: tuple[str, ...] = RUN_KINDS
    force: bool = False
    address: str | None = None  # a Ray cluster: each seed a task
    teacher: str | None = None  # a teacher file to use instead of the experiment's


MOST_SEEDS = 1000  # seeds a retrain runs at most: each is a whole training, a few of them settle it


def retrain(request: RetrainRequest) -> tuple[dict[str, Any], str]:
    """Returns results.json's content and where it was written (a folder or a URI). Into the
    experiment (<experiment>/retrain) it writes as the experiment's one writer: it holds the
    experiment's lease (refilled.store.lease) as `search` does, refused while a search or
    another retrain holds it (so does a new --out folder inside the experiment); elsewhere
    it only reads the experiment."""
    if not 1 <= request.seeds <= MOST_SEEDS:
        raise UserError(f"--seeds must be between 1 and {MOST_SEEDS}, got {request.seeds}")
    if request.out and storage.is_uri(request.out):
        raise UserError(f"--out {shown(request.out)}: give a folder; without --out, a URI experiment's retrain is "
                        "written next to it (<experiment>/retrain)")
    place = storage.Place.mirrored(request.experiment)
    folder = place.folder
    untuned, data = experiment_config(folder, place.location)  # refuses what is not an experiment
    if data.get("trial_kind"):  # a driver's trials of another kind (benchmarks/simulated_trials.py)
        raise UserError(f"{place.location} holds {data['trial_kind'].get('name')} trials (trial_kind in its "
                        f"{EXPERIMENT_FILE}): they did not train REFILLED, so there is nothing to retrain; "
                        "run a real search")
    teacher = folder / TEACHER_FILE
    if not teacher.is_file():
        raise UserError(f"the experiment's teacher {place.location}/teacher.pt is missing: "
                        "resume the search or copy the teacher there")
    if not request.teacher:  # a damaged teacher is refused before anything is written
        checkpoint.load(teacher, "the experiment's teacher", shown=f"{place.location}/teacher.pt",
                        remedy="restore it from a backup, or pass --teacher FILE")
    out_dir = output_of(request, folder)
    into_experiment = out_dir.is_relative_to(folder)  # its retrain/, or a new folder beside it
    own = out_dir == folder / RETRAIN_DIR
    shown_out = storage.join(place.uri, RETRAIN_DIR) if place.uri and own else str(out_dir)
    if (out_dir / RETRAIN_RESULTS).exists() and not request.force:
        raise UserError(f"{shown_out} already holds results: pass --force to replace them or --out for another folder")
    if not into_experiment:
        note_if_running(place.location)  # a running search's best trial so far: said, not refused
    chosen = Chosen(*choose_config(folder, request.trial, request.config), untuned=untuned)  # before our lease
    if request.teacher:  # checked before anything is written
        from refilled.runs.inputs import load_teacher_state, read_teacher, student_data

        chosen.teacher = read_teacher(request.teacher, chosen.cfg)
        load_teacher_state(chosen.teacher, chosen.cfg, student_data(chosen.cfg.replace(device="cpu")), request.teacher)
    if not into_experiment:
        return _retrain(request, place, out_dir, None, chosen), shown_out
    lease = lease_at(place.location, command="retrain")
    took = lease.acquire()  # refused while a search or another retrain writes to the experiment
    if took is not None:
        print(f"note: took over the lease of {place.location} from a driver that is gone "
              f"({took.describe()}; {took.gone})", file=sys.stderr)
    try:
        return _retrain(request, place, out_dir, shown_out if place.uri and own else None, chosen), shown_out
    finally:
        lease.release()


@dataclass
class Chosen:
    """What a retrain runs: the configuration, where it came from, and --teacher's checkpoint (read)."""

    cfg: Config
    source: dict[str, Any]
    untuned: Config | None = None  # the experiment's own config values: the untuned arm
    teacher: dict[str, Any] | None = None


def output_of(request: RetrainRequest, folder: Path) -> Path:
    """Where the retrain writes: the experiment's own retrain folder (the default, or --out
    naming it), or --out checked as every command's output (refilled.store.paths: never the
    experiment's folder or its own entries)."""
    default = folder / RETRAIN_DIR
    if not request.out or paths.real(request.out) == paths.real(default):
        return default
    return paths.output_folder(request.out, request.force, experiments=[folder])


def _retrain(request: RetrainRequest, place: storage.Place, out_dir: Path, upload_to: str | None,
             chosen: Chosen) -> dict[str, Any]:
    """The final runs into `out_dir` (a folder of the experiment, or --out: made and marked,
    and removed again if this fails before it is done), then results.json and summary.md."""
    folder, teacher, cfg, source = place.folder, place.folder / TEACHER_FILE, chosen.cfg, chosen.source
    ours = out_dir != folder / RETRAIN_DIR and (not out_dir.exists() or not paths.theirs(out_dir))
    # --out is marked (a rerun may write there again); a folder this made leaves nothing behind if this fails
    with paths.filling(out_dir, ours, marked=out_dir != folder / RETRAIN_DIR):
        if chosen.teacher is not None:
            teacher = checkpoint.save(chosen.teacher, out_dir / TEACHER_FILE)  # ours or the authors', in our format
            source["teacher"] = str(request.teacher)
        # the untuned arm: the experiment's own config values, trained and tested as the tuned one
        arms = {"refilled": cfg, "refilled_untuned": chosen.untuned.replace(device=cfg.device), "student_alone": cfg}
        arms = {arm: c for arm, c in arms.items() if arm in request.arms}
        seeds = range(cfg.seed, cfg.seed + request.seeds)
        runs = plan(seeds, tuple(arms), out_dir)
        bar = tqdm(total=len(runs), desc="final runs", unit="run")

        def done(r: dict) -> None:
            bar.set_postfix_str(f"{r['kind']} seed {r['seed']}: test {r['test_accuracy']:.4f}")
            bar.update()

        if request.address:
            results = _on_cluster(FinalRuns(arms, place, runs, out_dir, upload_to, teacher), request.address, done)
        else:
            results = retrain_local(arms, teacher, seeds, out_dir, done)
        bar.close()
        summary = results_of_runs(results, {"source": source, "config": cfg.to_dict(),
                                            "epochs": cfg.n_training_epochs1 + cfg.n_training_epochs2,
                                            "eval_split": "test", "trained_on": trained_on(cfg)})
        write_results(out_dir, summary)
    if upload_to:
        place.push(RETRAIN_DIR)
    return summary


@dataclass(frozen=True)
class FinalRuns:
    """The final runs of one retrain: each arm's config, the experiment, each run's (kind, seed,
    folder), where they are written (and uploaded, for a URI experiment) and the teacher."""

    arms: dict[str, Config]  # each arm's config
    place: storage.Place
    runs: list[tuple[str, int, Path]]
    out_dir: Path
    upload_to: str | None
    teacher: Path


def _on_cluster(final: FinalRuns, address: str, done: Callable[[dict], None]) -> list[dict]:
    """Each seed is a Ray task. A folder experiment must be on storage all nodes see;
    with a URI experiment each task reads the teacher from it and uploads its run."""
    import ray

    from refilled.tune.cluster import connect

    connect(address)
    cfg, data = experiment_file.read(final.place.folder)
    settings = parse_search(data.get("search"), cfg)
    resources = {"num_cpus": settings.resources.cpu, "num_gpus": settings.resources.gpu}
    if final.upload_to:
        task = ray.remote(**resources)(run_one_at_uri)
        if final.teacher.parent == final.out_dir:  # --teacher: up beside the runs, where every task finds it
            final.place.push(RETRAIN_DIR)
            teacher_uri = storage.join(final.upload_to, TEACHER_FILE)
        else:
            teacher_uri = storage.join(final.place.uri, TEACHER_FILE)
        pending = [task.remote(final.arms[kind].to_dict(), kind, seed, teacher_uri,
                               storage.join(final.upload_to, folder.relative_to(final.out_dir).as_posix()))
                   for kind, seed, folder in final.runs]
    else:
        task = ray.remote(**resources)(run_one)
        pending = [task.remote(final.arms[kind].to_dict(), kind, seed, str(final.teacher), str(folder))
                   for kind, seed, folder in final.runs]
    results = []
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        results.append(ray.get(ready[0]))
        done(results[-1])
    return results
