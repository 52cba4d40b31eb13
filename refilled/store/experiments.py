"""Reading a finished (or running) search back from its experiment folder.

Needs no Ray: the trial folders hold `params.json` (the searched values) and
`result.json` (one JSON line per epoch), which each trial writes itself
(refilled.store.epoch_files), and `trial_record.json` (refilled.store.trial_records: status, why it
ended, its newest checkpoint, ...), which is all the leaderboard, the best
config and the analysis scripts need.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import yaml

from refilled.errors import UserError, one_line
from refilled.schema._messages import shown
from refilled.schema.config import FIELDS, Config, coerce, from_dict, read_yaml
from refilled.schema.search import SearchSettings
from refilled.store import experiment_file, trial_records
from refilled.store.layout import (
    BEST_CONFIG,
    EXPERIMENT_FILE,
    LEASE_FILE,
    RETRAIN_DIR,
    RETRAIN_RESULTS,
    SELECTION_DIR,
    SELECTION_FILE,
    STAGE1_SEARCH,
)
from refilled.store.storage import Place

STATUSES = ("finished", "stopped", "diverged", "errored", "running")
# Trials rank by their best stage-2 validation accuracy; ties (small validation
# sets make many) go to the one that ended higher, then to the better embedding.
RANKING = ["best_val_accuracy_stage2", "last_val_accuracy_stage2", "best_val_ncm_stage1"]
# A staged search's phase 1 ranks its stage-1-only trials by the embedding they ended with.
STAGE1_RANKING = ["last_val_ncm_stage1", "best_val_ncm_stage1"]


def is_experiment(folder: str | Path) -> bool:
    return experiment_file.exists(folder)


def experiment_config(folder: str | Path, location: str | None = None) -> tuple[Config, dict[str, Any]]:
    """The experiment's config and experiment.yaml; `location` names it in the error
    (the URI of an experiment read from its local mirror)."""
    return experiment_file.read(folder, location)


def trial_folders(folder: Path) -> list[Path]:
    return sorted(p.parent for p in folder.glob("*/params.json"))


class DamagedTrial(Exception):
    """A trial file that cannot be read whole: the trial is left out, and said so."""


# exact types (what json gives; a bool is not a number here): checked on every line of every trial
def _number(value: Any) -> bool:
    return type(value) is float or type(value) is int


def _whole(value: Any) -> bool:
    return type(value) is int


def _text(value: Any) -> bool:
    return type(value) is str


# the fields of a reported epoch the readers take, and what each holds (Ray Tune's and the trial's own,
# refilled.tune.trainable; `diverged` is 0 or 1); a line that says anything else is damaged
ROW_FITS = {"step": _whole, "total_steps": _whole, "stage": _text, "val_accuracy": _number, "trial_id": _text,
            "time_total_s": _number, "time_this_iter_s": _number, "timestamp": _number, "cost_wall_s": _number,
            "cost_device_s": _number, "device": _text, "node_ip": _text, "stage1_cache": _text,
            "diverged": lambda v: isinstance(v, (bool, int)), "diverged_reason": _text}


def _file_text(path: Path) -> str:
    """A trial file's text; DamagedTrial when it is no file of text."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise DamagedTrial(f"{path.name} is not text") from None
    except OSError as e:  # a folder where the file belongs, a file that cannot be read
        raise DamagedTrial(f"{path.name} cannot be read ({e.strerror})") from None


def read_results(trial_folder: Path) -> list[dict[str, Any]]:
    """Every reported epoch of a trial, in order. A last line cut off by a crash is
    skipped; a file that is not text, a damaged line before the last, or a line whose
    fields are not what a trial reports (ROW_FITS) is DamagedTrial."""
    path = trial_folder / "result.json"
    if not path.exists():
        return []
    lines = _file_text(path).splitlines()
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            if i == len(lines) - 1:
                continue  # the line a crash cut off
            raise DamagedTrial(f"line {i + 1} of result.json is not JSON") from None
        if not isinstance(row, dict):
            raise DamagedTrial(f"line {i + 1} of result.json is not a record")
        wrong = next((k for k in ROW_FITS.keys() & row.keys() if not ROW_FITS[k](row[k])), None)
        if wrong:
            raise DamagedTrial(f"line {i + 1} of result.json gives {wrong} {shown(row[wrong])}, which no trial "
                               "reports")
        rows.append(row)
    return rows


def _params(trial_folder: Path) -> dict[str, Any]:
    text = _file_text(trial_folder / "params.json")
    try:
        params = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise DamagedTrial("params.json is not whole JSON") from None
    if not isinstance(params, dict):
        raise DamagedTrial("params.json is not a mapping")
    for key, value in params.items():  # the trial's config keys: each of its key's type and range
        if key in FIELDS:
            try:
                coerce(key, value)
            except UserError as e:
                raise DamagedTrial(f"params.json gives {key} {shown(value)}, which no trial ran with ({e})") from None
    return params


def _status(rows: list[dict], record: dict[str, Any]) -> str:
    """What the trial's own reports say (diverged, or every step run), else what its
    record says (stopped by ASHA, errored); running otherwise: still, or when the
    search was interrupted."""
    if rows and trial_records.ending(rows[-1]) in ("diverged", "finished"):
        return trial_records.ending(rows[-1])
    status = record.get("status")
    return status if status in trial_records.ENDED else "running"


_SAID: set[Any] = set()  # a script reads an experiment several times: each note once


def say_once(line: str, key: Any = None) -> None:
    """A note on stderr, once in a process (`key`: what makes two notes the same; the line itself
    by default)."""
    key = line if key is None else key
    if key not in _SAID:
        _SAID.add(key)
        print(one_line(line), file=sys.stderr)


def say_notes(folder: Path, notes: dict[str, str]) -> None:
    """The one-line notes of load_trials, one per trial, on stderr, each once in a process."""
    for trial_id, why in notes.items():
        say_once(f"note: trial_{trial_id} of {folder.name}: its {why}", key=(str(Path(folder).resolve()), trial_id, why))


def _check_ended(rows: list[dict], record: dict[str, Any]) -> None:
    """An ended trial's result.json holds every step its record says it reported; one cut
    short (a full disk, an interrupted copy) would rank the trial on part of its curve."""
    step = record.get("step")
    reported = max((r.get("step", 0) for r in rows), default=0)
    if record.get("status") in trial_records.ENDED and isinstance(step, int) and reported < step:
        raise DamagedTrial(f"result.json ends at step {reported}, but its {trial_records.RECORD_FILE} says it "
                           f"reported step {step}")


def load_trials(folder: str | Path, notes: dict[str, str] | None = None,
                read: Callable[[Path], list[dict[str, Any]]] = read_results) -> pd.DataFrame:
    """One row per trial of an experiment.

    Columns: experiment, trial_id, number (the order Tune created it in), status
    (finished, stopped by ASHA, diverged, errored, running: still, or when the
    search was interrupted), epochs (the
    step it reached, across both stages), epochs_run (the epochs it computed
    itself: not stage-1 epochs replayed from the stage-1 cache or started from a
    staged search's stage-1 choice), stopped_at (the step a stopped trial ended
    at: its ASHA rung), best/last validation accuracy of each stage (stage 1:
    NCM, stage 2: classifier), reached_stage2, wall time (s), diverged_reason,
    node, checkpoint (its newest checkpoint folder), and one `config/<key>`
    column per searched key. `read`: a trial folder's rows (read_results; a reader that
    keeps what it read, to read each file once).
    """
    folder = Path(folder)
    cfg, data = experiment_config(folder)
    total = cfg.n_training_epochs1 + (0 if data.get("stage1_only") else cfg.n_training_epochs2)
    # a search may be running: the lease is in the experiment's folder, above a staged search's phase 1
    running = any((f / LEASE_FILE).is_file() for f in (folder, folder.parent if folder.name == STAGE1_SEARCH else folder))
    said_here = notes is None  # else the caller says them (retrain: in its one line, when it matters)
    notes = {} if notes is None else notes
    records = []
    for trial_folder in trial_folders(folder):
        name = trial_folder.name.removeprefix("trial_")
        try:
            params = _params(trial_folder)
            rows = read(trial_folder)
            record = trial_records.read(trial_folder)
            if not running:  # a running search's trial may be between two writes (or two copies)
                _check_ended(rows, record)
        except DamagedTrial as e:
            if (folder / LEASE_FILE).is_file() and time.time() - trial_folder.stat().st_mtime < 60:
                continue  # being written by a search still running: the trial began a moment ago
            notes[name] = f"{e}: it is left out of the tables; restore it from a backup"
            continue
        if not record and (trial_folder / trial_records.RECORD_FILE).is_file():
            notes[name] = f"{trial_records.RECORD_FILE} is damaged: its status is read from its results alone"
        # a trial that never reported is still a trial
        trial_id = record.get("trial_id") or (rows[-1].get("trial_id") if rows else trial_folder.name)
        s1 = [r["val_accuracy"] for r in rows if r.get("stage") == "stage1" and "val_accuracy" in r]
        s2 = [r["val_accuracy"] for r in rows if r.get("stage") == "stage2" and "val_accuracy" in r]
        status = _status(rows, record)
        epochs = max((r.get("step", 0) for r in rows if not r.get("diverged")), default=0)
        # what the trial computed: not the stage-1 epochs it replayed from the stage-1 cache, nor
        # those of the stage-1 choice a staged search's phase 2 starts from (never reported)
        epochs_run = sum(1 for r in rows if not r.get("diverged") and r.get("stage1_cache") != "hit")
        records.append({
            "experiment": folder.name, "trial_id": trial_id, "number": record.get("number"), "status": status,
            "epochs": epochs, "epochs_run": epochs_run, "total_epochs": total,
            "stopped_at": record.get("stopped_at", epochs) if status == "stopped" else None,
            "best_val_ncm_stage1": max(s1) if s1 else None, "last_val_ncm_stage1": s1[-1] if s1 else None,
            "best_val_accuracy_stage2": max(s2) if s2 else None, "last_val_accuracy_stage2": s2[-1] if s2 else None,
            "reached_stage2": bool(s2), "wall_time_s": rows[-1].get("time_total_s") if rows else None,
            "diverged_reason": rows[-1].get("diverged_reason") if rows else None,
            "stage1_cache": next((r["stage1_cache"] for r in rows if "stage1_cache" in r), None),
            "node": record.get("node") or (rows[-1].get("node_ip") if rows else None),
            "checkpoint": record.get("checkpoint"), "folder": str(trial_folder),
            **{f"config/{k}": v for k, v in params.items()},
        })
    if said_here:
        say_notes(folder, notes)
    table = pd.DataFrame.from_records(records)
    if table.empty:
        return table
    return in_rank_order(table).reset_index(drop=True)


def in_rank_order(trials: pd.DataFrame) -> pd.DataFrame:
    """Every trial, best first by the search's ranking (RANKING); a trial without a value
    comes after those with one, and ties keep their order."""
    return trials.sort_values(RANKING, ascending=False, na_position="last", kind="stable")


def choosable(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials the search can choose (they reached stage 2 and did not diverge), best
    first by the search's ranking (RANKING); empty when there is none."""
    if trials.empty:
        return trials
    return in_rank_order(trials[trials["reached_stage2"] & (trials["status"] != "diverged")])


def ranked(trials: pd.DataFrame) -> pd.DataFrame:
    """choosable(trials), refused when there is none."""
    reached = choosable(trials)
    if reached.empty:
        raise UserError("no trial of this experiment reached stage 2, so there is no stage-2 validation "
                        "accuracy to choose by: run a longer search (more samples or a larger grace_period)")
    return reached


def stage1_choosable(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials phase 1 of a staged search can choose from (they finished), best first
    by STAGE1_RANKING; empty when there is none."""
    if trials.empty:
        return trials
    return trials[trials["status"] == "finished"].sort_values(STAGE1_RANKING, ascending=False, kind="stable")


def best_trial(trials: pd.DataFrame) -> pd.Series:
    """The trial with the best stage-2 validation accuracy among those that reached stage 2."""
    return ranked(trials).iloc[0]




# a re-evaluation run's record (refilled.tune.selection) and what each field holds (epochs: not in
# those of early versions)
REEVAL_FITS = {"trial_id": _text, "seed": _whole, "val_accuracy": _number, "wall_s": _number, "device": _text,
               "device_s": _number}


def read_json(path: Path) -> Any:
    """A JSON file's content; ValueError when it is not a file of whole JSON (a folder in its place,
    bytes that are not text, a file cut short)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, RecursionError) as e:
        raise ValueError(str(e)) from None


def fits(record: Any, fields: dict[str, Any]) -> bool:
    """Whether `record` is a mapping that holds each of `fields` as it says (field name: test)."""
    return isinstance(record, dict) and all(k in record and test(record[k]) for k, test in fields.items())


def reeval_results(folder: str | Path) -> list[dict[str, Any]]:
    """Every re-evaluation run finished so far (trial_id, seed, val_accuracy, epochs, wall_s, device, device_s)."""
    out = []
    for path in sorted((Path(folder) / SELECTION_DIR).glob("*-seed*.json")):
        try:
            record = read_json(path)
        except ValueError:
            record = None
        if not fits(record, REEVAL_FITS) or not _whole(record.get("epochs", 0)):
            raise UserError(f"{path} is damaged: delete it and run `search --resume` to run it again")
        out.append(record)
    return out


def read_selection(folder: str | Path) -> pd.DataFrame | None:
    """selection.csv, best re-evaluated mean first; None when the search made none."""
    path = Path(folder) / SELECTION_FILE
    if not path.is_file():
        return None
    damaged = UserError(f"{path} is damaged: delete it and run `search --resume` to re-evaluate again")
    try:
        table = pd.read_csv(path, dtype={"trial_id": str})
        whole = path.read_bytes().endswith(b"\n")  # cut inside its last number: every row written ends with one
    except (ValueError, pd.errors.ParserError, OSError):
        raise damaged from None
    needed = ["trial_id", "val_accuracy_reeval_mean"]
    if not set(needed) <= set(table.columns) or table[needed].isna().any().any():
        raise damaged  # a row cut short reads as empty cells
    numbers = [c for c in ("val_accuracy_search", "val_accuracy_reeval_mean", "val_accuracy_reeval_std") if c in table]
    if not all(pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c]) for c in numbers):
        raise damaged  # a number's cell holds text
    if "val_accuracy_reeval_std" in table and (table["val_accuracy_reeval_std"] < 0).any():
        raise damaged  # no spread is negative
    if not whole:
        raise damaged
    return table.sort_values("val_accuracy_reeval_mean", ascending=False, kind="stable").reset_index(drop=True)


def chosen_trial(folder: str | Path, trials: pd.DataFrame, notes: dict[str, str] | None = None) -> pd.Series:
    """The trial the search chose: the re-evaluation's winner when there is one (the
    best mean over more seeds), else the best single stage-2 validation score. A winner
    that cannot be read is refused, never replaced by the runner-up."""
    selection = read_selection(folder)
    if selection is not None and not selection.empty:
        winner = str(selection.iloc[0]["trial_id"])
        match = trials[trials["trial_id"].astype(str) == winner] if not trials.empty else trials
        if not match.empty:
            return match.iloc[0]
        if winner not in (notes or {}) and not (Path(folder) / trial_records.folder_name(winner)).is_dir():
            raise UserError(f"{Path(folder) / SELECTION_FILE} is damaged: it chose trial {shown(winner)}, which "
                            f"{Path(folder).name} does not hold; delete it and run `search --resume` to re-evaluate "
                            "again, or retrain a trial with --trial ID")
        why = (notes or {}).get(winner, "files cannot be read: restore them from a backup")
        raise UserError(f"the chosen trial {winner} ({SELECTION_FILE}) of {Path(folder).name} cannot be read: its "
                        f"{why}, or retrain another with --trial ID")
    return best_trial(trials)


def top_configs(location: str | Path, n: int) -> list[dict[str, Any]]:
    """The full configs of an experiment's `n` best trials, best first: in the order of
    its re-evaluation, then of its search ranking (a warm start: search.start_with)."""

    place = Place.mirrored(location)
    experiment_config(place.folder, place.location)  # refuses what is not an experiment
    trials = load_trials(place.folder)
    if trials.empty:
        raise UserError(f"search.start_with: {place.location} has no trial results to start from")
    order = list(ranked(trials)["trial_id"].astype(str))
    selection = read_selection(place.folder)
    if selection is not None:
        first = [t for t in selection["trial_id"].astype(str) if t in order]
        order = first + [t for t in order if t not in first]
    by_id = {str(row["trial_id"]): row for _, row in trials.iterrows()}
    return [trial_config(place.folder, by_id[t]).to_dict() for t in order[:n]]


def trial_config(folder: str | Path, trial: pd.Series) -> Config:
    """The experiment's config with one trial's searched values applied."""
    cfg, _ = experiment_config(folder)
    params = {k.split("/", 1)[1]: plain_value(v) for k, v in trial.items() if k.startswith("config/") and _present(v)}
    return from_dict(params, cfg)


def plain_value(v: Any) -> Any:
    """A Python value for a table cell: pandas hands out numpy scalars (np.True_,
    np.int64), which the config's type checks rightly refuse."""
    return v.item() if hasattr(v, "item") and not isinstance(v, (str, bytes)) else v


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def write_best_config(place: Place, trials: pd.DataFrame, reeval: str = "") -> tuple[Path, Config, pd.Series]:
    """best_config.yaml: the chosen trial's full config (`reeval`: how its re-evaluation went, for the header)."""
    folder = place.folder
    best = chosen_trial(folder, trials)
    cfg = trial_config(folder, best)
    header = (f"# {'chosen' if reeval else 'best'} trial {best['trial_id']} of {folder.name}: stage-2 validation "
              f"accuracy {best['best_val_accuracy_stage2']:.4f} in the search ({best['status']}, {best['epochs']} "
              f"epochs){'; ' + reeval if reeval else ''}\n")
    path = place.write(BEST_CONFIG, header + yaml.safe_dump({"config": cfg.to_dict()}, sort_keys=False))
    return path, cfg, best


def read_best_config(folder: str | Path, location: str | None = None) -> dict[str, Any] | None:
    """best_config.yaml read whole (every config key experiment.yaml has), or None when the
    search wrote none; `location` names the experiment in the error (a URI's mirror)."""
    path = Path(folder) / BEST_CONFIG
    if not path.is_file():
        return None
    try:
        data = read_yaml(path)
    except UserError:
        data = {}
    experiment_config(folder, location)  # refused first when damaged itself
    written = read_yaml(Path(folder) / EXPERIMENT_FILE).get("config")  # the keys of the version that wrote both
    keys = set(written) if isinstance(written, dict) else set(FIELDS)
    section = data.get("config")
    if not isinstance(section, dict) or not keys <= set(section):
        raise UserError(f"{location or folder}/{BEST_CONFIG} is damaged: delete it and run `search --resume`, "
                        "which writes it again")
    return data


def read_retrain(folder: str | Path, location: str | None = None) -> dict[str, Any] | None:
    """The final retrain's results.json read whole, or None when `retrain` has not run."""
    path = Path(folder) / RETRAIN_DIR / RETRAIN_RESULTS
    if not path.is_file():
        return None
    try:
        results = read_json(path)
    except ValueError:
        results = None
    if not _whole_results(results):
        raise UserError(f"{location or folder}/{RETRAIN_DIR}/{RETRAIN_RESULTS} is damaged: run `retrain --experiment "
                        f"{location or folder} --force` again (or restore it from a backup)")
    return results


def _numbers(value: Any) -> bool:
    return isinstance(value, list) and all(map(_number, value))


# a final retrain's results (refilled.runs.final_retrain.results_of_runs): each model's accuracies, the gain
RUN_FITS = {"test_accuracy": _numbers, "mean": _number, "std": _number}


def _whole_results(results: Any) -> bool:
    return (isinstance(results, dict) and fits(results, {"refilled": lambda v: fits(v, RUN_FITS),
                                                         "config": lambda v: isinstance(v, dict)})
            and ("student_alone" not in results or fits(results["student_alone"], RUN_FITS))
            and ("gain" not in results or _number(results["gain"]))
            and (results.get("gain_se") is None or _number(results["gain_se"]))
            and isinstance(results.get("source", {}), dict))


def first_points(settings: SearchSettings, cfg: Config) -> list[dict[str, Any]]:
    """The configurations queued as the first trials (`search.start_with`): the authors'
    defaults, the config's values, none, or the top trials of an earlier experiment (its
    re-evaluated ranking when it has one), each restricted to this space."""
    if settings.start_with in ("authors", "config", "none"):
        return settings.fixed_points(cfg)
    points = []
    for values in top_configs(settings.start_with, max(settings.select.top_k, 3)):
        point = {k: values[k] for k in settings.space if k in values}
        if len(point) == len(settings.space) and all(settings.inside(k, v) for k, v in point.items()) \
                and point not in points:
            points.append(point)
    return points
