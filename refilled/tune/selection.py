"""Re-evaluating the search's top trials before choosing the winner.

A search keeps the maximum of many noisy validation scores, so the winner's
score is optimistic and, on a small validation set, the winner partly luck.
After the search, the `search.select.top_k` best trials run again on the tuning
splits with `search.select.seeds` other seeds (never the search's own), as Ray
tasks with the search's per-trial resources; the winner is the best mean of the
validation accuracy each run ends with. Each run's result is written to
`selection/<trial_id>-seed<S>.json` as it arrives, so `--resume` after a kill
runs only what is missing. `selection.csv`:

    trial_id, <the searched values>, val_accuracy_search, val_accuracy_reeval_mean,
    val_accuracy_reeval_std, seeds
"""

from __future__ import annotations

import json
import statistics
from typing import Any

import pandas as pd

from refilled.schema.config import Config
from refilled.schema.search import SearchSettings
from refilled.store.cost import device_units
from refilled.store.experiments import ranked, reeval_results, trial_config
from refilled.store.layout import SELECTION_DIR, SELECTION_FILE
from refilled.tune.trial_inputs import METHOD, TrialKind
from refilled.tune.trial_plan import TrialInputs


def candidates(trials: pd.DataFrame, top_k: int) -> pd.DataFrame:
    """The `top_k` trials the search ranks first (among those that reached stage 2)."""
    return ranked(trials).head(top_k)


def reeval_seeds(cfg: Config, n: int) -> list[int]:
    """The seeds of the re-evaluation: the n after the search's own."""
    return [cfg.seed + 1 + i for i in range(n)]


def reevaluate(trials: pd.DataFrame, settings: SearchSettings, inputs: TrialInputs,
               kind: TrialKind = METHOD) -> pd.DataFrame:
    """Run what is missing of the re-evaluation (Ray must be connected; each run is
    the trial kind's, refilled.tune.trial_inputs), write selection.csv, return it
    (best mean first)."""
    import ray
    from tqdm import tqdm

    place = inputs.place
    folder = place.folder
    top = candidates(trials, settings.select.top_k)
    done = {(r["trial_id"], r["seed"]) for r in reeval_results(folder)}
    trial_of, pending = {}, []
    resources = {"num_cpus": settings.resources.cpu, "num_gpus": settings.resources.gpu}
    for _, row in top.iterrows():
        trial_id = str(row["trial_id"])
        cfg = trial_config(folder, row)
        for seed in reeval_seeds(cfg, settings.select.seeds):
            if (trial_id, seed) in done:
                continue
            ref = kind.reevaluation(inputs, cfg, seed, f"{SELECTION_DIR}/{trial_id}/seed{seed}", resources)
            pending.append(ref)
            trial_of[ref] = (trial_id, cfg.n_training_epochs1 + cfg.n_training_epochs2)
    if pending:
        print(f"re-evaluation: the {len(top)} best trials again with {settings.select.seeds} other seeds each on "
              f"the tuning splits ({len(pending)} runs to go); the best mean wins")
    bar = tqdm(total=len(pending), desc="re-evaluation", unit="run", disable=not pending)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        result = ray.get(ready[0])
        units = device_units(result["device"], settings.resources.cpu, settings.resources.gpu)
        trial_id, epochs = trial_of[ready[0]]
        record = {"trial_id": trial_id, "seed": result["seed"], "val_accuracy": result["val_accuracy"],
                  "epochs": epochs, "wall_s": result["wall_s"], "device": result["device"],
                  "device_s": result["wall_s"] * units}
        # kept (at the URI too) as soon as it is known
        place.write(f"{SELECTION_DIR}/{trial_id}-seed{record['seed']}.json", json.dumps(record, indent=1))
        bar.set_postfix_str(f"{record['trial_id']} seed {record['seed']}: {record['val_accuracy']:.4f}")
        bar.update()
    bar.close()
    table = selection_table(top, reeval_results(folder), settings)
    place.write(SELECTION_FILE, table.to_csv(index=False))
    return table


def selection_table(top: pd.DataFrame, results: list[dict[str, Any]], settings: SearchSettings) -> pd.DataFrame:
    """selection.csv's rows, best re-evaluated mean first (ties: the better search score)."""
    rows = []
    for _, row in top.iterrows():
        trial_id = str(row["trial_id"])
        mine = sorted((r for r in results if r["trial_id"] == trial_id), key=lambda r: r["seed"])
        accs = [r["val_accuracy"] for r in mine]
        rows.append({"trial_id": trial_id,
                     **{k.removeprefix("config/"): row[k] for k in row.index
                        if k.startswith("config/") and k.removeprefix("config/") in settings.space},
                     "val_accuracy_search": float(row["best_val_accuracy_stage2"]),
                     "val_accuracy_reeval_mean": statistics.fmean(accs) if accs else float("nan"),
                     "val_accuracy_reeval_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "seeds": " ".join(str(r["seed"]) for r in mine)})
    table = pd.DataFrame(rows)
    return table.sort_values(["val_accuracy_reeval_mean", "val_accuracy_search"], ascending=False,
                             kind="stable").reset_index(drop=True)
