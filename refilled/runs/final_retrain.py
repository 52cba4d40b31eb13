"""The final, honestly tested model: retrain a configuration with flag_tuning off.

Each seed trains both stages on train + validation (or, with `val_per_class`,
on the same shots the search trained on) with the full epoch budget and the
experiment's teacher, and the model it ENDS with is tested once on the
test split: no epoch is selected on test. The student alone (cross-entropy,
same total epochs, same seeds) is trained beside it, so the gain is measured.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Callable

import yaml

from refilled.files.atomic import write_atomic, write_json
from refilled.schema.config import Config
from refilled.store.layout import RETRAIN_RESULTS, RETRAIN_SUMMARY, TEACHER_FILE

RUN_KINDS = ("refilled", "student_alone")


def student_alone(cfg: Config) -> Config:
    """The same student trained by cross-entropy alone with the same total epochs:
    no stage 1, lambd 0, the stage-2 schedule's decay points shifted by stage 1's length."""
    e1 = cfg.n_training_epochs1
    return cfg.replace(n_training_epochs1=0, lambd=0.0, n_training_epochs2=e1 + cfg.n_training_epochs2,
                       point=tuple(p + e1 for p in cfg.point))


def trained_on(cfg: Config) -> str:
    """What the final runs train on, in words (results.json, summary.md, the report)."""
    if cfg.val_per_class is not None:
        return (f"the same {cfg.shots} labelled images a class as the search, as tuned "
                "(its validation images are not trained on)")
    return "train + validation"


def run_one(cfg_dict: dict[str, Any], kind: str, seed: int, teacher_path: str, out: str,
            progress: bool = False, tuning: bool = False) -> dict[str, Any]:
    """One final run (a plain function, so it can also run as a Ray task); with `tuning`,
    a run on the tuning splits instead, judged on validation (the search's re-evaluation).
    Returns its accuracy on its split (test_accuracy or val_accuracy, of the model
    training ended with), its folder, and what it took (wall_s, device)."""
    import time

    import torch

    from refilled.runs.single_run import train_once
    from refilled.runtime import keep_freed_memory, resolve_device
    from refilled.schema.config import from_dict

    start = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    keep_freed_memory()  # also when this runs as a Ray task
    cfg = from_dict({"seed": seed, "flag_tuning": tuning}, from_dict(cfg_dict))
    if kind == "student_alone":
        cfg = student_alone(cfg)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "config.yaml", yaml.safe_dump({"config": cfg.to_dict()}, sort_keys=False))
    # a re-evaluation needs only where the run ends: validation after the last epoch, not every epoch
    summary = train_once(cfg, folder, teacher_path=teacher_path, progress=progress, every_epoch=not tuning)
    accuracy = "val_accuracy" if tuning else "test_accuracy"
    return {"kind": kind, "seed": seed, accuracy: summary[accuracy], "folder": str(folder),
            "wall_s": time.perf_counter() - start, "device": resolve_device(cfg.device).type}


def run_one_at_uri(cfg_dict: dict[str, Any], kind: str, seed: int, teacher_uri: str, out_uri: str,
                   tuning: bool = False) -> dict[str, Any]:
    """run_one on a node that sees only the URI: teacher down, run folder up."""
    import tempfile

    from refilled.store import storage

    with tempfile.TemporaryDirectory(prefix="tune-refilled-") as tmp:
        local = Path(tmp)
        storage.download_file(teacher_uri, local / TEACHER_FILE)
        result = run_one(cfg_dict, kind, seed, str(local / TEACHER_FILE), str(local / "run"), tuning=tuning)
        storage.upload(local / "run", out_uri, [p.name for p in (local / "run").iterdir()])
    return {**result, "folder": out_uri}


def plan(cfg: Config, seeds: int, baseline: bool, out: Path) -> list[tuple[str, int, Path]]:
    kinds = RUN_KINDS if baseline else RUN_KINDS[:1]
    return [(kind, seed, out / kind / f"seed{seed}") for kind in kinds for seed in range(cfg.seed, cfg.seed + seeds)]


def results_of_runs(runs: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    """results.json: accuracies as fractions, per seed, mean, std, and the gain."""
    out: dict[str, Any] = {}
    for kind in RUN_KINDS:
        accs = [r["test_accuracy"] for r in sorted(runs, key=lambda r: r["seed"]) if r["kind"] == kind]
        if accs:
            out[kind] = {"test_accuracy": accs, "seeds": sorted(r["seed"] for r in runs if r["kind"] == kind),
                         "mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
    if "student_alone" in out:
        out["gain"] = out["refilled"]["mean"] - out["student_alone"]["mean"]
        out.update(paired_gain(runs))
    out.update(extra)
    return out


def paired_gain(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Seed-by-seed differences (REFILLED - alone: both runs of a seed start from
    the same initial student), their standard error and the seeds won.
    The spread between seeds is large on small test sets, so the mean gain alone
    says little without its standard error."""
    acc = {(r["kind"], r["seed"]): r["test_accuracy"] for r in runs}
    seeds = [s for k, s in sorted(acc) if k == "refilled" and ("student_alone", s) in acc]
    diffs = [acc["refilled", s] - acc["student_alone", s] for s in seeds]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
    return {"gain_paired_seeds": len(diffs), "gain_se": se, "gain_seeds_won": sum(d > 0 for d in diffs),
            "gain_seeds_lost": sum(d < 0 for d in diffs)}


def markdown(results: dict[str, Any]) -> str:
    lines = ["| model | test accuracy per seed | mean ± std |", "|---|---|---|"]
    tuned = "trial_id" in results.get("source", {})  # not so for `retrain --config FILE`
    names = {"refilled": "REFILLED (tuned)" if tuned else "REFILLED", "student_alone": "student alone (cross-entropy)"}
    for kind in RUN_KINDS:
        if kind in results:
            r = results[kind]
            per_seed = ", ".join(f"{a:.2%}" for a in r["test_accuracy"])
            lines.append(f"| {names[kind]} | {per_seed} | {r['mean']:.2%} ± {r['std']:.2%} |")
    if "gain" in results:
        lines.append(f"\nGain of REFILLED over the student alone: **{results['gain'] * 100:+.2f} points** "
                     f"(mean over {_seeds(len(results['refilled']['test_accuracy']))}{_paired(results)}).")
    source = results.get("source", {})
    if source:
        lines.append(f"\nConfiguration: {source}. Each model is the one training ended with, tested once "
                     f"on the test split (trained on {results.get('trained_on', 'train + validation')}).")
    return "\n".join(lines) + "\n"


def _paired(results: dict[str, Any]) -> str:
    n, se = results.get("gain_paired_seeds", 0), results.get("gain_se")
    if not n:
        return ""
    text = f"; REFILLED ahead on {results['gain_seeds_won']} of {n} seeds, behind on {results['gain_seeds_lost']}"
    if se is None:
        return text + "; one seed: no standard error"
    text += f"; standard error of the paired difference {se * 100:.2f} points"
    if abs(results["gain"]) < 2 * se:
        text += ": within two standard errors of zero, more seeds (`--seeds`) would tell them apart"
    return text


def _seeds(n: int) -> str:
    return "1 seed" if n == 1 else f"{n} seeds"


def write_results(out: Path, results: dict[str, Any]) -> None:
    write_json(results, out / RETRAIN_RESULTS)
    write_atomic(out / RETRAIN_SUMMARY, "# Final retrain\n\n" + markdown(results))


def retrain_local(cfg: Config, teacher_path: Path, seeds: int, baseline: bool, out: Path,
                  on_done: Callable[[dict], None] = lambda r: None) -> list[dict[str, Any]]:
    runs = []
    for kind, seed, folder in plan(cfg, seeds, baseline, out):
        runs.append(run_one(cfg.to_dict(), kind, seed, str(teacher_path), str(folder)))
        on_done(runs[-1])
    return runs
