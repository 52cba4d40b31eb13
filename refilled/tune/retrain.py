"""`retrain`: the best configuration of an experiment, retrained and tested.

Reads the experiment's best trial (or `--trial`, or `--config`), then runs the
final seeds (refilled.final) as Ray tasks on a cluster (`--address`) or one
after another on this machine, with a progress bar either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm import tqdm

from refilled.config import Config, load_experiment
from refilled.errors import UserError
from refilled.experiments import best_trial, experiment_config, load_trials, trial_config
from refilled.final import plan, retrain_local, run_one, summarise, write_results


def choose_config(folder: Path, trial_id: str | None, config_file: str | None) -> tuple[Config, dict[str, Any]]:
    """The configuration to retrain and where it came from."""
    if config_file:
        cfg, _ = load_experiment(config_file)
        return cfg, {"config_file": str(config_file)}
    trials = load_trials(folder)
    if trials.empty:
        raise UserError(f"experiment {folder} has no trial results yet: run or resume its search first")
    if trial_id:
        match = trials[trials["trial_id"].astype(str).str.startswith(trial_id)]
        if len(match) != 1:
            raise UserError(f"--trial {trial_id} matches {len(match)} trials of {folder.name}; "
                            f"known ids: {', '.join(trials['trial_id'].astype(str))}")
        row = match.iloc[0]
    else:
        row = best_trial(trials)
    source = {"experiment": folder.name, "trial_id": str(row["trial_id"]),
              "val_accuracy_stage2": round(float(row["best_val_accuracy_stage2"]), 4)}
    return trial_config(folder, row), source


def retrain(experiment: str, *, seeds: int, out: str | None, trial: str | None, config: str | None,
            baseline: bool, force: bool, address: str | None) -> dict[str, Any]:
    folder = Path(experiment).expanduser().resolve()
    experiment_config(folder)  # refuses a folder that is not an experiment
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    teacher = folder / "teacher.pt"
    if not teacher.is_file():
        raise UserError(f"the experiment's teacher {teacher} is missing: resume the search or copy the teacher there")
    out_dir = Path(out).expanduser().resolve() if out else folder / "retrain"
    if (out_dir / "results.json").exists() and not force:
        raise UserError(f"{out_dir} already holds results: pass --force to replace them or --out for another folder")
    cfg, source = choose_config(folder, trial, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = plan(cfg, seeds, baseline, out_dir)
    bar = tqdm(total=len(runs), desc="final runs", unit="run")

    def done(r: dict) -> None:
        bar.set_postfix_str(f"{r['kind']} seed {r['seed']}: test {r['test_accuracy']:.4f}")
        bar.update()

    if address:
        results = _retrain_on_cluster(cfg, teacher, runs, address, done)
    else:
        results = retrain_local(cfg, teacher, seeds, baseline, out_dir, done)
    bar.close()
    summary = summarise(results, {"source": source, "config": cfg.to_dict(),
                                  "epochs": cfg.n_training_epochs1 + cfg.n_training_epochs2,
                                  "eval_split": "test", "trained_on": "train+validation"})
    write_results(out_dir, summary)
    return summary


def _retrain_on_cluster(cfg: Config, teacher: Path, runs, address: str, done) -> list[dict]:
    """Each seed is a Ray task; the experiment folder must be on storage all nodes see."""
    import ray

    from refilled.tune.search import connect, read_experiment

    connect(address)
    _, settings, _ = read_experiment(teacher.parent)
    task = ray.remote(num_cpus=settings.cpu, num_gpus=settings.gpu)(run_one)
    pending = [task.remote(cfg.to_dict(), kind, seed, str(teacher), str(folder)) for kind, seed, folder in runs]
    results = []
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        results.append(ray.get(ready[0]))
        done(results[-1])
    return results
