"""Every file and folder of an experiment, named once.

`LAYOUT` is the table docs/experiments.md shows ("The experiment folder"); a test checks
that the two agree. Trial folders are `trial_<id>/` (refilled.store.trial_records).
"""

from __future__ import annotations

EXPERIMENT_FILE = "experiment.yaml"
TEACHER_FILE = "teacher.pt"
STUDY_FILE = "optuna.journal"
STUDY_SQLITE = "optuna.db"  # the study of an experiment made before the journal
BANK_FILE = "bank-tuning.npy"
CENTERS_FILE = "centers-tuning.npy"
STAGE1_CACHE = "stage1_cache"
STAGE1_SEARCH = "stage1_search"
STAGE1_CHOICE = "stage1_choice.pt"
TRIALS_FILE = "trials.csv"
SELECTION_FILE = "selection.csv"
SELECTION_DIR = "selection"
BEST_CONFIG = "best_config.yaml"
COST_FILE = "cost.csv"
DRIVER_FILE = "driver_cost.json"
LEASE_FILE = "driver.lease"
LOCK_FILE = LEASE_FILE + ".lock"  # the driver's flock beside the lease, dropped by the kernel when it dies
INTERRUPTED_TRIALS = "interrupted_trials"
RETRAIN_DIR = "retrain"
RETRAIN_RESULTS = "results.json"  # in RETRAIN_DIR, beside summary.md
RETRAIN_SUMMARY = "summary.md"
# inside a trial folder
RECORD_FILE = "trial_record.json"
STATE_FILE = "state.pt"  # the trial's state in each of its checkpoint folders

BANK_FILES = (BANK_FILE, CENTERS_FILE)

LAYOUT: dict[str, str] = {
    EXPERIMENT_FILE: "the resolved config and search settings (resume, retrain), ending with an end line",
    TEACHER_FILE: "the teacher, trained or copied once before any trial",
    STUDY_FILE: "the Optuna study, a journal of JSON lines (`optuna-dashboard .../optuna.journal`)",
    STUDY_SQLITE: "the Optuna study of an experiment made before the journal (SQLite), still opened as such",
    BANK_FILE: "the teacher's embedding of every training image and augmentation, computed once",
    CENTERS_FILE: "the teacher's global class centres, computed once",
    STAGE1_CACHE + "/": "stage-1 results shared by trials with equal stage-1 settings",
    STAGE1_SEARCH + "/": "a staged search's phase 1: stage-1-only trials, their own experiment.yaml and study",
    STAGE1_CHOICE: "the end-of-stage-1 student phase 1 chose; every phase-2 trial starts there",
    TRIALS_FILE: "one row per trial: config, best stage-2 validation accuracy, epochs, status",
    SELECTION_FILE: "the re-evaluation of the best trials with more seeds, best mean first",
    SELECTION_DIR + "/": "each re-evaluation run as it finishes (`--resume` runs only the missing ones)",
    BEST_CONFIG: "the full config of the chosen trial (the best re-evaluated mean)",
    COST_FILE: "the ledger: every trial by stage, the teacher, the bank, the re-evaluation",
    DRIVER_FILE: "what the driver itself computed (teacher, bank, re-evaluation runs)",
    LEASE_FILE: "who drives the search now (while one runs): host, pid, heartbeat",
    LOCK_FILE: "the lock the driver holds in a folder; the system drops it when the driver dies",
    INTERRUPTED_TRIALS + "/": "trials a killed driver had started after Tune's last state save",
    RETRAIN_DIR + "/": "`retrain`'s runs, results.json and summary.md",
    "trial_<id>/": f"one per trial: {RECORD_FILE} (the driver's), params.json, result.json and TensorBoard events "
                   "(the trial's own, every epoch), the last checkpoints",
}
