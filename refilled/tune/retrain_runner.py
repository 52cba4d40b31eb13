"""`retrain`: the best configuration of an experiment, retrained and tested.

Reads the experiment's best trial (or `--trial`, or `--config`), then runs the
final seeds (refilled.runs.final_retrain) as Ray tasks on a cluster (`--address`) or one
after another on this machine, with a progress bar either way. An experiment
at a URI is read from its local mirror, and its retrain folder is uploaded next
to it; on a cluster, each task fetches the teacher and uploads its run itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from refilled.errors import UserError
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
from refilled.store import experiment_file, storage
from refilled.store.experiments import chosen_trial, experiment_config, load_trials, read_selection, say_notes, trial_config
from refilled.store.layout import EXPERIMENT_FILE, RETRAIN_DIR, RETRAIN_RESULTS, TEACHER_FILE
from refilled.store.lease import note_if_running


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


def retrain(request: RetrainRequest) -> tuple[dict[str, Any], str]:
    """Returns results.json's content and where it was written (a folder or a URI)."""
    if request.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {request.seeds}")
    if request.out and storage.is_uri(request.out):
        raise UserError(f"--out {request.out}: give a folder; without --out, a URI experiment's retrain is "
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
    note_if_running(place.location)  # a running search's best trial so far: said, not refused
    out_dir = Path(request.out).expanduser().resolve() if request.out else folder / RETRAIN_DIR
    upload_to = storage.join(place.uri, RETRAIN_DIR) if place.uri and not request.out else None
    shown = upload_to or str(out_dir)
    if (out_dir / RETRAIN_RESULTS).exists() and not request.force:
        raise UserError(f"{shown} already holds results: pass --force to replace them or --out for another folder")
    cfg, source = choose_config(folder, request.trial, request.config)
    if request.teacher:  # checked before anything is written
        from refilled.runs.inputs import load_teacher_state, read_teacher, student_data

        given = read_teacher(request.teacher, cfg)
        load_teacher_state(given, cfg, student_data(cfg.replace(device="cpu")), request.teacher)
    out_dir.mkdir(parents=True, exist_ok=True)
    if request.teacher:
        teacher = checkpoint.save(given, out_dir / TEACHER_FILE)  # ours or the authors', in our format
        source["teacher"] = str(request.teacher)
    # the untuned arm: the experiment's own config values, trained and tested as the tuned one
    arms = {"refilled": cfg, "refilled_untuned": untuned.replace(device=cfg.device), "student_alone": cfg}
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
    return summary, shown


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
