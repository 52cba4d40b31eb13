"""The experiment's Optuna study: one file, opened one way by everything that reads it.

A search writes its study as an Optuna journal (`optuna.journal`: JournalStorage
with a file backend, an append-only log of JSON lines). Experiments made before
it have an SQLite study (`optuna.db`), which keeps opening as SQLite. The journal
is Optuna's storage for one file on shared storage (NFS) and, measured at cluster
scale, asks a trial in 6-28 ms where SQLite took 105-160 ms (every ask read all
trials back through SQLAlchemy): benchmarks/README.md, "Scale". The Optuna
dashboard opens either: `optuna-dashboard <experiment>/optuna.journal`.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from refilled.errors import UserError
from refilled.store.layout import STUDY_FILE, STUDY_SQLITE

STUDY_FILES = (STUDY_FILE, STUDY_SQLITE)


def study_file(folder: str | Path) -> Path:
    """The study file of an experiment folder: its SQLite one when it was made with one, else the journal."""
    folder = Path(folder)
    return folder / STUDY_SQLITE if (folder / STUDY_SQLITE).is_file() and not (folder / STUDY_FILE).is_file() \
        else folder / STUDY_FILE


def storage(folder: str | Path):
    """The Optuna storage of the experiment folder's study (made when it has none)."""
    path = study_file(folder)
    if path.name == STUDY_SQLITE:
        return f"sqlite:///{path}"
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def load(folder: str | Path, name: str):
    """The study `name` of an experiment folder, as Optuna reads it."""
    import optuna

    return optuna.load_study(study_name=name, storage=storage(folder))


def dashboard(folder: str | Path) -> str:
    """The command that shows the study in the Optuna dashboard."""
    path = study_file(folder)
    return shlex.join(["optuna-dashboard", f"sqlite:///{path}" if path.name == STUDY_SQLITE else str(path)])


def check(path: Path, shown: str, remedy: str) -> None:
    """Refuse a study file Optuna could not read whole, in one line; read only. A journal's
    last line cut short by a crash is what Optuna skips itself; a damaged line before it is not."""
    if not path.is_file():
        return
    if path.name == STUDY_SQLITE:
        return _check_sqlite(path, shown, remedy)
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as e:
        raise UserError(f"Optuna study {shown} cannot be read ({e.strerror}): {remedy}") from None
    for number, line in enumerate(lines[:-1], start=1):  # the part after the last newline: what a crash cut
        try:
            if not isinstance(json.loads(line), dict):
                raise ValueError
        except ValueError:
            raise UserError(f"Optuna study {shown} is damaged (line {number} is not a journal entry): "
                            f"{remedy}") from None


def _check_sqlite(path: Path, shown: str, remedy: str) -> None:
    """SQLite's quick check, opened read-only: a check never writes (Optuna would make
    tables in an empty file)."""
    import sqlite3

    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            problem = None if db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] else "no tables"
            result = db.execute("PRAGMA quick_check").fetchall()
            if problem is None and result != [("ok",)]:
                problem = str(result[0][0])[:120]
        finally:
            db.close()
    except sqlite3.Error as e:
        if "readonly" in str(e) or "read-only" in str(e):
            return  # a journal to roll back (a driver killed mid-write): Optuna rolls it back when it opens it
        problem = str(e)
    if problem:
        raise UserError(f"Optuna study {shown} is damaged ({problem}): {remedy}")
