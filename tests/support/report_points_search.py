"""One seeded search of simulated trials (benchmarks/simulated_trials.py: the real driver,
searcher, ASHA and callbacks; a synthetic curve instead of training), one trial at a
time, with the trials telling Tune every epoch (`report_every_s: 0`) or only what it
decides on (rungs, checkpoints, the end: the default). Prints, as one JSON line after
`SEARCH`, what the search decided: each trial's values, status, step it ended at and
best accuracy, and each Optuna trial's state, intermediate values and value.

    PYTHONPATH=benchmarks python tests/support/report_points_search.py STORAGE REPORT_EVERY_S
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from simulated_trials import SimulatedTrials  # benchmarks/ on PYTHONPATH: Ray's workers import it too

from refilled.schema.config import load_experiment
from refilled.store import study as study_store
from refilled.store.experiments import load_trials
from refilled.tune.search import Outcome, open_search

REPO = Path(__file__).resolve().parents[2]

storage, every = sys.argv[1], float(sys.argv[2])
cfg, data = load_experiment(REPO / "search_spaces" / "cifar100_crosstask.yaml")
cfg = cfg.replace(n_training_epochs1=4, n_training_epochs2=16)
section = {k: v for k, v in data["search"].items() if k not in ("staged", "budget_hours")}
section.update(num_samples=10, max_concurrent=1, seed=3, checkpoint_every=5, report_every_s=every,
               resources={"cpu": 1, "gpu": 0}, asha={"rungs": [6, 12], "reduction_factor": 2},
               select={"top_k": 2, "seeds": 1})
search = open_search(storage, "points", cfg, section, SimulatedTrials(epoch_s=0.01))
if search.run(None) is not Outcome.FINISHED:
    sys.exit("the search did not finish")
folder = search.place.folder
table = load_trials(folder).sort_values("number")
searched = [c for c in table.columns if c.startswith("config/")]
trials = [{"values": {c: row[c] for c in searched}, "status": row["status"], "epochs": int(row["epochs"]),
           "best": row["best_val_accuracy_stage2"]} for _, row in table.iterrows()]
study = study_store.load(folder, "points")
told = [{"params": t.params, "state": t.state.name, "intermediate": {str(k): v for k, v in t.intermediate_values.items()},
         "value": t.value} for t in sorted(study.trials, key=lambda t: t.number)]
print("SEARCH " + json.dumps({"trials": trials, "study": told}, default=float))
