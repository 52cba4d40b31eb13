"""`retrain`: the best configuration of an experiment, retrained and tested.

Reads the experiment's best trial (or `--trial`, or `--config`), then runs the
final seeds (refilled.runs.final_retrain) as Ray tasks on a cluster (`--address`) or one
after another on this machine, with a progress bar either way. An experiment
at a URI is read from its local mirror, and its retrain folder is uploaded next
to it; on a cluster, each task fetches the teacher and uploads its run itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm import tqdm

from refilled.files import checkpoint
from refilled.store import storage
from refilled.schema.config import Config, load_experiment
from refilled.errors import UserError
from refilled.store.experiments import (chosen_trial, experiment_config, load_trials, read_selection, say_notes,
                                       trial_config)
from refilled.runs.final_retrain import plan, retrain_local, run_one, run_one_at_uri, summarise, trained_on, write_results
from refilled.store.lease import note_if_running
from refilled.store.layout import EXPERIMENT_FILE, RETRAIN_DIR, RETRAIN_RESULTS, TEACHER_FILE


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


def retrain(experiment: str, *, seeds: int, out: str | None, trial: str | None, config: str | None,
            baseline: bool, force: bool, address: str | None, teacher_file: str | None = None
            ) -> tuple[dict[str, Any], str]:
    """Returns results.json's content and where it was written (a folder or a URI)."""
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    if out and storage.is_uri(out):
        raise UserError(f"--out {out}: give a folder; without --out, a URI experiment's retrain is "
                        "written next to it (<experiment>/retrain)")
    place = storage.experiment_at(experiment)
    folder = place.folder
    _, data = experiment_config(folder, place.location)  # refuses what is not an experiment
    if data.get("trial_kind"):  # a driver's trials of another kind (benchmarks/simulated_trials.py)
        raise UserError(f"{place.location} holds {data['trial_kind'].get('name')} trials (trial_kind in its "
                        f"{EXPERIMENT_FILE}): they did not train REFILLED, so there is nothing to retrain; "
                        "run a real search")
    teacher = folder / TEACHER_FILE
    if not teacher.is_file():
        raise UserError(f"the experiment's teacher {place.location}/teacher.pt is missing: "
                        "resume the search or copy the teacher there")
    if not teacher_file:  # a damaged teacher is refused before anything is written
        checkpoint.load(teacher, "the experiment's teacher", shown=f"{place.location}/teacher.pt",
                        remedy="restore it from a backup, or pass --teacher FILE")
    note_if_running(place.location)  # a running search's best trial so far: said, not refused
    out_dir = Path(out).expanduser().resolve() if out else folder / RETRAIN_DIR
    upload_to = storage.join(place.uri, RETRAIN_DIR) if place.uri and not out else None
    shown = upload_to or str(out_dir)
    if (out_dir / RETRAIN_RESULTS).exists() and not force:
        raise UserError(f"{shown} already holds results: pass --force to replace them or --out for another folder")
    cfg, source = choose_config(folder, trial, config)
    if teacher_file:  # checked before anything is written
        from refilled.runs.inputs import load_teacher_state, read_teacher, student_data

        given = read_teacher(teacher_file, cfg)
        load_teacher_state(given, cfg, student_data(cfg.replace(device="cpu")), teacher_file)
    out_dir.mkdir(parents=True, exist_ok=True)
    if teacher_file:
        teacher = checkpoint.save(given, out_dir / TEACHER_FILE)  # ours or the authors', in our format
        source["teacher"] = str(teacher_file)
    runs = plan(cfg, seeds, baseline, out_dir)
    bar = tqdm(total=len(runs), desc="final runs", unit="run")

    def done(r: dict) -> None:
        bar.set_postfix_str(f"{r['kind']} seed {r['seed']}: test {r['test_accuracy']:.4f}")
        bar.update()

    if address:
        results = _retrain_on_cluster(cfg, place, runs, out_dir, upload_to, address, done, teacher)
    else:
        results = retrain_local(cfg, teacher, seeds, baseline, out_dir, done)
    bar.close()
    summary = summarise(results, {"source": source, "config": cfg.to_dict(),
                                  "epochs": cfg.n_training_epochs1 + cfg.n_training_epochs2,
                                  "eval_split": "test", "trained_on": trained_on(cfg)})
    write_results(out_dir, summary)
    if upload_to:
        place.push(RETRAIN_DIR)
    return summary, shown


def _retrain_on_cluster(cfg: Config, place: storage.Place, runs, out_dir: Path, upload_to: str | None,
                        address: str, done, teacher: Path) -> list[dict]:
    """Each seed is a Ray task. A folder experiment must be on storage all nodes see;
    with a URI experiment each task reads the teacher from it and uploads its run."""
    import ray

    from refilled.tune.cluster import connect
    from refilled.tune.search import read_experiment

    connect(address)
    _, settings, _ = read_experiment(place.folder)
    resources = {"num_cpus": settings.resources.cpu, "num_gpus": settings.resources.gpu}
    if upload_to:
        task = ray.remote(**resources)(run_one_at_uri)
        if teacher.parent == out_dir:  # --teacher: up beside the runs, where every task finds it
            place.push(RETRAIN_DIR)
            teacher_uri = storage.join(upload_to, TEACHER_FILE)
        else:
            teacher_uri = storage.join(place.uri, TEACHER_FILE)
        pending = [task.remote(cfg.to_dict(), kind, seed, teacher_uri,
                               storage.join(upload_to, folder.relative_to(out_dir).as_posix()))
                   for kind, seed, folder in runs]
    else:
        task = ray.remote(**resources)(run_one)
        pending = [task.remote(cfg.to_dict(), kind, seed, str(teacher), str(folder)) for kind, seed, folder in runs]
    results = []
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        results.append(ray.get(ready[0]))
        done(results[-1])
    return results
