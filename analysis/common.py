"""Shared loading for the analysis scripts: experiments, trials, curves, search spaces.

Everything is read from the experiment folder that `tune_refilled.py search`
writes (layout in refilled/tune/search.py), or from a local mirror of an
experiment at a URI (s3://..., refilled.store.storage); no Ray is needed. Trials come from
refilled.store.experiments.load_trials (the same table as the search's trials.csv),
with the searched values as plain columns (`tau1`, not `config/tau1`), and
trial folders that never reported an epoch added as rows of their own.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd

from refilled.errors import UserError, naming, one_line, os_error_line
from refilled.schema.config import Config
from refilled.schema.search import Distribution, SearchSettings, parse_search
from refilled.store import paths
from refilled.store.experiments import RANKING, choosable, experiment_config, load_trials, read_results, read_retrain, say_once
from refilled.store.integrity import study
from refilled.store.layout import EXPERIMENT_FILE, STAGE1_SEARCH
from refilled.store.lease import note_if_running
from refilled.store.storage import Place

METRIC = RANKING[0]  # the final metric of a trial (what the search ranks by first)
ANALYSIS_STUDY = "restore it from a backup, or move it aside: the analysis reads the trials, not the study"


@dataclass
class Experiment:
    """One experiment folder, read once."""

    folder: Path
    label: str  # the experiment column: the folder name (parent/name if two share a name)
    config: Config
    data: dict[str, Any]  # experiment.yaml as written by `search`
    # its search settings; a staged search's are phase 2's: those of the trials in the folder
    settings: SearchSettings
    location: str = ""  # as given: the folder, or the URI whose local mirror `folder` is
    # what a script read of it, read once (a report reads each trial table and curve in every figure)
    _read: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def once(self, key: Any, read):
        """`read()`, the first time `key` is asked for; what it returned, after."""
        if key not in self._read:
            self._read[key] = read()
        return self._read[key]

    def results(self, trial_folder: str | Path) -> list[dict]:
        """A trial's reported epochs (refilled.store.experiments.read_results), read once."""
        return self.once(("results", str(trial_folder)), lambda: read_results(Path(trial_folder)))

    def ledger(self) -> pd.DataFrame:
        """The experiment's cost ledger (refilled.store.cost.ledger), from the trials' rows read once."""
        from refilled.store import cost

        return self.once("ledger", lambda: cost.ledger(self.folder, read=self.results)).copy()

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def space(self) -> dict[str, Distribution]:
        """What the experiment's trials searched: each key's distribution (refilled.schema.search)."""
        return self.settings.space

    @property
    def total_epochs(self) -> int:
        return self.config.n_training_epochs1 + self.config.n_training_epochs2

    @property
    def staged(self) -> bool:
        """A staged search: its trials start at stage 2 from phase 1's choice (stage1_search/)."""
        return bool((self.data.get("search") or {}).get("staged"))

    def stage1_trials(self) -> pd.DataFrame:
        """Phase 1's trials of a staged search (refilled.store.experiments.load_trials); empty otherwise."""
        phase1 = self.folder / STAGE1_SEARCH
        if not self.staged or not (phase1 / EXPERIMENT_FILE).is_file():
            return pd.DataFrame()
        return self.once("stage1_trials", lambda: load_trials(phase1)).copy()

    @property
    def stage1_search_epochs(self) -> int:
        """Epochs phase 1 of a staged search computed (0 otherwise): part of what the search cost."""
        table = self.stage1_trials()
        return int(table["epochs_run"].sum()) if not table.empty else 0

    @property
    def searched(self) -> list[str]:
        return list(self.space)

    def kind(self, param: str) -> str:
        """The distribution a searched parameter was drawn from (loguniform, choice, ...)."""
        return self.space[param].kind

    def asha_rungs(self) -> list[int]:
        """The steps at which ASHA stopped trials of this experiment, as their records
        have them: where it compared trials and cut (a rung at which it cut nobody does
        not show)."""
        table = self.once("trials_as_stored", lambda: load_trials(self.folder))
        if table.empty:
            return []
        return sorted({int(v) for v in pd.to_numeric(table["stopped_at"], errors="coerce").dropna()})


def open_experiments(paths: Iterable[str | Path]) -> list[Experiment]:
    """The experiments at these folders; a folder that is not one is a UserError."""
    folders, names, running, locations = [], [], [], []
    for p in paths:
        place = Place.mirrored(p)  # a URI is read from a local mirror
        experiment_config(place.folder, place.location)  # refuses what is not an experiment, in one line
        # a damaged study is refused before any output is written
        study(place.folder, place.location, remedy=ANALYSIS_STUDY)
        running.append(place.location)
        if place.folder not in folders:
            folders.append(place.folder)
            locations.append(place.location)
            names.append(place.name)
    if not folders:
        raise UserError("no experiment given: pass one or more experiment folders, e.g. experiments/digits")
    for location in dict.fromkeys(running):  # a search still running is read as it is now: said, not refused
        note_if_running(location)
    out = []
    for folder, name, location in zip(folders, names, locations):
        label = name if names.count(name) == 1 else f"{folder.parent.name}/{name}"
        cfg, data = experiment_config(folder)
        settings = parse_search(data.get("search"), cfg)
        if settings.staged:  # phase 2's trials share phase 1's choice: those keys do not vary
            settings = settings.phase(2)
        out.append(Experiment(folder, label, cfg, data, settings, location))
    return out


def as_experiments(experiments) -> list[Experiment]:
    """Experiment objects as given, else the experiments at these folders (one folder, or many)."""
    if isinstance(experiments, (str, Path, Experiment)):
        experiments = [experiments]
    given = list(experiments)
    if given and all(isinstance(e, Experiment) for e in given):
        return given
    return open_experiments(given)


def best(table: pd.DataFrame) -> pd.Series | None:
    """The best trial of a trials table by the search's ranking (refilled.store.experiments.choosable:
    reached stage 2, did not diverge); None when there is none."""
    ranked = choosable(table)
    return None if ranked.empty else ranked.iloc[0]


def _times(rows: list[dict]) -> tuple[float | None, float | None]:
    """(start, end) of a trial as unix times, from its result rows."""
    if not rows:
        return None, None
    end = rows[-1].get("timestamp")
    first = rows[0]
    start = first.get("timestamp", 0) - first.get("time_this_iter_s", 0) if "timestamp" in first else None
    return start, end


def trials(exp: Experiment) -> pd.DataFrame:
    """One row per trial folder of an experiment (refilled.store.experiments.load_trials;
    trials that never reported are there too, with 0 epochs).

    Adds: trial (the trial's number in its record: the order Tune created it in),
    start_time and end_time (unix seconds), searched values without the `config/` prefix.
    """
    return exp.once("trials", lambda: _trials(exp)).copy()


def _trials(exp: Experiment) -> pd.DataFrame:
    table = exp.once("trials_as_stored", lambda: load_trials(exp.folder, read=exp.results)).copy()
    if table.empty:
        return table
    table["experiment"] = exp.label
    table["trial_id"] = table["trial_id"].astype(str)
    table = table.rename(columns={"number": "trial"})
    starts, ends = zip(*(_times(exp.results(f)) for f in table["folder"]))
    table["start_time"], table["end_time"] = list(starts), list(ends)
    table["stopped_at"] = pd.to_numeric(table["stopped_at"], errors="coerce").astype("Int64")
    for col in [c for c in table.columns if str(c).startswith("config/")]:
        name = col.split("/", 1)[1]
        table = table.rename(columns={col: name if name not in table.columns else col})
    return table


def all_trials(experiments: list[Experiment]) -> pd.DataFrame:
    frames = [trials(e) for e in experiments]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def curves(experiments: list[Experiment]) -> pd.DataFrame:
    """Long table of every reported epoch: experiment, trial_id, step, stage, val_accuracy, status.

    A diverged trial's last row (its `diverged` report) is left out of the curve.
    """
    frames = [exp.once("curves", lambda: _curves(exp)) for exp in experiments]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=CURVE_COLUMNS)


CURVE_COLUMNS = ["experiment", "trial_id", "status", "step", "stage", "val_accuracy", "time_total_s"]


def _curves(exp: Experiment) -> pd.DataFrame:
    table, records = trials(exp), []
    if not table.empty:
        for folder, trial_id, status in zip(table["folder"], table["trial_id"], table["status"]):
            records += [(exp.label, trial_id, status, r.get("step"), r.get("stage"), r["val_accuracy"],
                         r.get("time_total_s")) for r in exp.results(folder)
                        if not r.get("diverged") and "val_accuracy" in r]
    return pd.DataFrame.from_records(records, columns=CURVE_COLUMNS)


def retrain_results(exp: Experiment) -> dict[str, Any] | None:
    """<exp>/retrain/results.json if the final retrain ran and its file reads whole, else
    None; a damaged one is left out, said once (note_left_out)."""
    try:
        return read_retrain(exp.folder, exp.location or None)
    except UserError as e:
        note_left_out(e, "the final retrain is left out")
        return None


def note_left_out(error: UserError, what: str) -> None:
    """A damaged file a script can go on without: one line on stderr (once), and what it leaves out."""
    say_once(f"note: {error}; {what}")


# ----------------------------------------------------------------------------- output

def fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(df: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub markdown table (no `tabulate` needed)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        cells = []
        for v in row:
            try:
                missing = pd.isna(v)
            except (TypeError, ValueError):
                missing = False
            cells.append("-" if missing is True else fmt(v, digits).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


OUTPUT_MARK = paths.MARK  # in a folder these scripts (or the commands) wrote: they may write it again


@contextlib.contextmanager
def output_folder(path: str | Path, force: bool = False, experiments: Iterable[Experiment] = ()) -> Iterator[Path]:
    """A script's outputs, assembled aside: yields a hidden folder inside `path` to write into
    and moves its files into `path` when the block ends. A script that fails leaves `path` (and
    the folders above it) as they were. `path` must be new or one these scripts wrote before
    (it holds OUTPUT_MARK, written when the block ends); a folder holding anything else is the
    user's, refused without `force`; never the folder of one of `experiments`, nor the
    repository's code (refilled.store.paths). A partial folder that a killed script left
    is removed by the next run."""
    folder = paths.output_folder(path, force, experiments=[e.folder for e in experiments])
    made = paths.new_folders(folder)  # nearest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_partials_of_the_dead(folder)
        aside = Path(tempfile.mkdtemp(prefix=f"{paths.PARTIAL}{os.getpid()}-", dir=folder))  # same file system
    except BaseException:
        paths.remove_empty(made)
        raise
    try:
        yield aside
        for source in sorted(aside.rglob("*")):
            if source.is_file():
                target = folder / source.relative_to(aside)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)
        paths.mark(folder)
    except BaseException as e:
        shutil.rmtree(aside, ignore_errors=True)
        paths.remove_empty(made)
        if isinstance(e, OSError) and (named := naming(e, folder)) is not e:  # a full disk: say where it wrote
            raise named from e
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _remove_partials_of_the_dead(folder: Path) -> None:
    """The partial folders (.partial-<pid>-...) of scripts that were killed (their process is
    gone; a folder of an earlier version names none) are removed."""
    for partial in folder.glob(f"{paths.PARTIAL}*"):
        pid = partial.name[len(paths.PARTIAL):].split("-", 1)[0]
        if not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (a number no pid can be: none)
        return False
    except OSError:  # another user's process
        return True
    return True


DPI = 110


def save_figure(fig, path: Path) -> Path:
    """A figure as PNG (white background, cropped to what it draws), then closed."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line with exit code 2, as tune_refilled.py does."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def experiments_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The arguments every analysis script takes: experiments and --out."""
    p = Parser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiments", nargs="+", metavar="EXPERIMENT",
                   help="experiment folder(s) made by `search`, or their URIs (s3://...); one whose search "
                        "still runs is read as it is now (said on stderr)")
    p.add_argument("--out", default="analysis-out", metavar="DIR",
                   help="output folder (default analysis-out): new, or one these scripts wrote before")
    p.add_argument("--force", action="store_true",
                   help="write into an --out folder that holds other files (files of the same names are replaced)")
    return p


def run_cli(main, argv: list[str] | None = None) -> int:
    """Run a script's main: bad input, and what the operating system refuses (permissions, a
    full disk, ...), is one line on stderr (refilled.errors.one_line) and exit code 2;
    matplotlib's notes on glyphs its fonts lack stay off stderr."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"(?s).*[Gg]lyph .* missing from", category=UserWarning)
            with _quiet_font_manager():
                return main(argv)
    except UserError as e:
        return _fail(str(e))
    except OSError as e:
        if (line := os_error_line(e)) is None:
            raise
        return _fail(line)


def _fail(message: str) -> int:
    print(f"error: {one_line(message)}", file=sys.stderr)
    return 2


@contextlib.contextmanager
def _quiet_font_manager() -> Iterator[None]:
    """matplotlib's font manager logs "findfont: ..." when a font it was asked for is missing."""
    import logging

    logger = logging.getLogger("matplotlib.font_manager")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


__all__ = ["Experiment", "open_experiments", "as_experiments", "best", "trials", "all_trials", "curves",
           "retrain_results", "note_left_out", "markdown_table", "output_folder", "save_figure", "experiments_parser",
           "run_cli", "fmt", "METRIC", "OUTPUT_MARK", "UserError"]
