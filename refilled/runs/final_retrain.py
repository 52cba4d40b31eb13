"""The final, honestly tested model: retrain a configuration with flag_tuning off.

Each seed trains both stages on train + validation (or, with `val_per_class`,
on the same shots the search trained on) with the full epoch budget and the
experiment's teacher, and the model it ENDS with is tested once on the
test split: no epoch is selected on test. Beside it, with the same seeds, shots, epochs and
evaluation: REFILLED at the experiment's own config values, untuned (what the search
bought), and the student alone (cross-entropy, same total epochs: what REFILLED bought).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Callable

import yaml

from refilled.files.atomic import write_atomic, write_json
from refilled.schema.config import Config
from refilled.store.layout import RETRAIN_RESULTS, RETRAIN_SUMMARY, TEACHER_FILE

RUN_KINDS = ("refilled", "refilled_untuned", "student_alone")  # the arms of a retrain, in results.json's keys
# (key in results.json, the better arm, the arm it is compared with): each a paired gain over seeds
GAINS = (("gain", "refilled", "student_alone"), ("search_gain", "refilled", "refilled_untuned"))


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


def plan(seeds: range, arms: tuple[str, ...], out: Path) -> list[tuple[str, int, Path]]:
    """(arm, seed, its folder) of every final run."""
    return [(arm, seed, out / arm / f"seed{seed}") for arm in RUN_KINDS if arm in arms for seed in seeds]


def results_of_runs(runs: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    """results.json: each arm's accuracies as fractions, per seed, mean, std; each gain of
    GAINS whose two arms ran, paired by seed."""
    out: dict[str, Any] = {}
    for kind in RUN_KINDS:
        accs = [r["test_accuracy"] for r in sorted(runs, key=lambda r: r["seed"]) if r["kind"] == kind]
        if accs:
            out[kind] = {"test_accuracy": accs, "seeds": sorted(r["seed"] for r in runs if r["kind"] == kind),
                         "mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
    for name, better, other in GAINS:
        if better in out and other in out:
            out[name] = out[better]["mean"] - out[other]["mean"]
            out.update({f"{name}_{k}": v for k, v in paired_gain(runs, better, other).items()})
    out.update(extra)
    return out


def paired_gain(runs: list[dict[str, Any]], better: str = "refilled", other: str = "student_alone") -> dict[str, Any]:
    """Seed-by-seed differences (`better` - `other`: both runs of a seed start from the same
    initial student), their standard error and the seeds won. The spread between seeds is
    large on small test sets, so the mean gain alone says little without its standard error."""
    acc = {(r["kind"], r["seed"]): r["test_accuracy"] for r in runs}
    seeds = [s for k, s in sorted(acc) if k == better and (other, s) in acc]
    diffs = [acc[better, s] - acc[other, s] for s in seeds]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
    return {"paired_seeds": len(diffs), "se": se, "seeds_won": sum(d > 0 for d in diffs),
            "seeds_lost": sum(d < 0 for d in diffs)}


def markdown(results: dict[str, Any]) -> str:
    lines = ["| model | test accuracy per seed | mean ± std |", "|---|---|---|"]
    tuned = "trial_id" in results.get("source", {})  # not so for `retrain --config FILE`
    names = {"refilled": "REFILLED (tuned)" if tuned else "REFILLED", "student_alone": "student alone (cross-entropy)",
             "refilled_untuned": "REFILLED (untuned: the experiment's config values)"}
    for kind in RUN_KINDS:
        if kind in results:
            r = results[kind]
            per_seed = ", ".join(f"{a:.2%}" for a in r["test_accuracy"])
            lines.append(f"| {names[kind]} | {per_seed} | {r['mean']:.2%} ± {r['std']:.2%} |")
    said = {"gain": ("Gain of REFILLED over the student alone (what REFILLED bought)", "REFILLED"),
            "search_gain": ("Gain of the tuned over the untuned REFILLED (what the search bought)", "the tuned one")}
    for name, better, _ in GAINS:
        if name in results:
            text, who = said[name]
            lines.append(f"\n{text}: **{results[name] * 100:+.2f} points** (mean over "
                         f"{_seeds(len(results[better]['test_accuracy']))}{_paired(results, name, who)}).")
    source = results.get("source", {})
    if source:
        lines.append(f"\nConfiguration: {source}. Each model is the one training ended with, tested once "
                     f"on the test split (trained on {results.get('trained_on', 'train + validation')}).")
    return "\n".join(lines) + "\n"


def _paired(results: dict[str, Any], name: str, who: str) -> str:
    n, se = results.get(f"{name}_paired_seeds", 0), results.get(f"{name}_se")
    if not n:
        return ""
    text = f"; {who} ahead on {results[f'{name}_seeds_won']} of {n} seeds, behind on {results[f'{name}_seeds_lost']}"
    if se is None:
        return text + "; one seed: no standard error"
    text += f"; standard error of the paired difference {se * 100:.2f} points"
    if abs(results[name]) < 2 * se:
        text += ": within two standard errors of zero, more seeds (`--seeds`) would tell them apart"
    return text


def _seeds(n: int) -> str:
    return "1 seed" if n == 1 else f"{n} seeds"


def write_results(out: Path, results: dict[str, Any]) -> None:
    write_json(results, out / RETRAIN_RESULTS)
    write_atomic(out / RETRAIN_SUMMARY, "# Final retrain\n\n" + markdown(results))


def retrain_local(arms: dict[str, Config], teacher_path: Path, seeds: range, out: Path,
                  on_done: Callable[[dict], None] = lambda r: None) -> list[dict[str, Any]]:
    """Every arm's runs (`arms`: each arm's config) one after another on this machine."""
    runs = []
    for kind, seed, folder in plan(seeds, tuple(arms), out):
        runs.append(run_one(arms[kind].to_dict(), kind, seed, str(teacher_path), str(folder)))
        on_done(runs[-1])
    return runs
