"""Every path the user gives, checked in one place: an experiment's name (`--name`) and
the output of every command (`--out` of train, pretrain, retrain and the analysis scripts).

A name is one folder name. An output folder is new, empty, or one these commands wrote
before (they mark it with MARK, so that a rerun may replace its own files); a folder that
holds anything else is the user's, refused without `--force`. Never written, `--force` or
not: the folder of an experiment the command reads and its own entries (a new folder
inside it, such as <experiment>/report, is not one), and the repository's code (the
repository itself, its packages, and any folder holding them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterable

from refilled.errors import UserError, escaped, naming, shown

MARK = ".tune-refilled-output"  # in a folder these commands wrote: they may write there again
PARTIAL = ".partial-"  # an analysis script's output being assembled (analysis.common.output_folder)
NAME_BYTES = 255  # the longest file name most file systems take
REPO = Path(__file__).resolve().parents[2]  # the checkout (or the site-packages) that holds refilled/
PACKAGES = ("refilled", "analysis", "tests", "benchmarks")


def real(path: str | Path) -> Path:
    """`path` absolute, `~` expanded and symbolic links followed as far as they lead (a
    symlink loop is left to the file operation that meets it, and said in one line)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def experiment_name(name: str) -> str:
    """`name` if it is one folder name: not empty, not `.` or `..`, no `/`, no control
    character, at most NAME_BYTES bytes (UTF-8); else a UserError in one line."""
    why = None
    if not name:
        why = "is empty"
    elif name in (".", ".."):
        why = "names a folder above or the storage itself"
    elif "/" in name:
        why = "holds a '/' (a path)"
    elif escaped(name) != name:
        why = "holds a control character (a newline, a tab, ...)"
    elif len(name.encode("utf-8", "surrogateescape")) > NAME_BYTES:
        why = f"is {len(name.encode('utf-8', 'surrogateescape'))} bytes long (at most {NAME_BYTES})"
    if why:
        raise UserError(f"--name {shown(repr(name))} {why}: the experiment's name is one folder name in --storage, "
                        "e.g. --name digits")
    return name


def repository_part(folder: Path) -> str | None:
    """What of the repository `folder` (resolved) is, holds or lies in; None for none of it."""
    if folder == REPO:
        return "the repository itself"
    if REPO.is_relative_to(folder):
        return f"a folder that holds the repository ({REPO})"
    for package in PACKAGES:
        if (REPO / package).is_dir() and folder.is_relative_to(REPO / package):
            return f"in the repository's {package}/ folder"
    return None


def refuse_repository(folder: Path, option: str, given: str | Path, file: bool = False) -> None:
    """A folder (or, `file`, the folder of a file) that is, holds or lies in the repository's code is refused."""
    if (part := repository_part(folder)) is not None:
        where = f"would be written into {shown(folder)}, which is {part}" if file else f"is {part}"
        raise UserError(f"{option} {shown(given)} {where}: choose a path outside the repository's code "
                        "(--force does not change this)")


def refuse_experiment(folder: Path, experiments: Iterable[Path], option: str, given: str | Path) -> None:
    """An output folder that is an experiment's folder, or lies in one of its own entries (its
    trials, its retrain/, ...), is refused; a new folder inside it (or one these commands
    wrote there, e.g. <experiment>/report) is not the experiment's."""
    for experiment in experiments:
        experiment = real(experiment)
        if folder == experiment:
            raise UserError(f"{option} {shown(given)} is the experiment {shown(experiment)}, whose files it would "
                            "replace: choose another folder, e.g. a new one inside it (--force does not change this)")
        if folder.is_relative_to(experiment):
            top = experiment / folder.relative_to(experiment).parts[0]
            if top.exists() and not (top.is_dir() and is_ours(top)):
                raise UserError(f"{option} {shown(given)} is inside {shown(top)}, which is the experiment's own: "
                                "choose another folder, e.g. a new one (--force does not change this)")


def is_ours(folder: Path) -> bool:
    return (folder / MARK).is_file()


def theirs(folder: Path) -> list[str]:
    """What `folder` holds that no command of ours wrote (an analysis script's partial folder is ours)."""
    return [p.name for p in folder.iterdir() if p.name != MARK and not p.name.startswith(PARTIAL)]


def probe(path: str | Path) -> None:
    """What the operating system says of `path` (a symlink loop, a name too long, a file where
    a folder belongs), raised now, before a command works for hours and then cannot write."""
    with contextlib.suppress(FileNotFoundError):
        os.stat(os.path.expanduser(os.fspath(path)))


def output_folder(path: str | Path, force: bool = False, option: str = "--out",
                  experiments: Iterable[Path] = ()) -> Path:
    """The output folder `path`, resolved, if a command may write there (the module's rules);
    else a UserError in one line. Nothing is written."""
    probe(path)
    folder = real(path)
    refuse_repository(folder, option, path)
    refuse_experiment(folder, experiments, option, path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {shown(path)} is a file, not a folder: choose another {option}")
    if folder.is_dir() and not force and not is_ours(folder) and theirs(folder):
        raise UserError(f"{option} {shown(path)} holds files these commands did not write: choose another folder, "
                        "or pass --force to write into it (files of the same names are replaced, others are left)")
    return folder


def output_file(path: str | Path, force: bool = False, option: str = "--out") -> Path:
    """The output file `path`, resolved: not a folder, not in the repository's code, not an
    existing file unless `force`; else a UserError in one line."""
    probe(path)
    target = real(path)
    if target.is_dir():
        raise UserError(f"{option} {shown(path)} is a folder: {option} names the file to write, "
                        f"e.g. {shown(Path(path) / 'teacher.pt')}")
    refuse_repository(target.parent, option, path, file=True)
    if target.exists() and not force:
        raise UserError(f"{shown(path)} already exists: pass --force to overwrite it or {option} for another path")
    return target


def new_folders(folder: Path) -> list[Path]:
    """The folders that making `folder` would create, nearest first (to remove them again)."""
    return [p for p in [folder, *folder.parents] if not p.exists()]


def make(folder: Path) -> list[Path]:
    """Make the output folder and mark it as ours; returns the folders it created, nearest first."""
    made = new_folders(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mark(folder)
    return made


def mark(folder: Path) -> None:
    if not is_ours(folder):
        (folder / MARK).write_text("written by tune-refilled; its commands may write here again\n")


def remove_empty(folders: list[Path]) -> None:
    """Remove these folders (nearest first) if empty, as a command that failed leaves them."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def filling(folder: Path, ours: bool, marked: bool = True):
    """Make `folder` (`marked`: as ours, so a rerun may write there again) for a command to
    write into. If the command fails (Ctrl-C, an error) and the folder is `ours` (nothing of
    the user's in it), it is removed with the folders making it created, so nothing blocks
    the rerun; an OSError that does not say which file is named after the folder."""
    made = new_folders(folder)
    try:
        make(folder) if marked else folder.mkdir(parents=True, exist_ok=True)
        yield folder
    except BaseException as e:
        if ours:
            shutil.rmtree(folder, ignore_errors=True)
            remove_empty(made[1:])
        if isinstance(e, OSError) and (named := naming(e, folder)) is not e:  # a full disk: say where it wrote
            raise named from e
        raise
