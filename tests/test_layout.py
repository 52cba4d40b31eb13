"""The experiment store's layout: named once, shown in docs/experiments.md as it is, written one way."""

import os
import re
import stat
from pathlib import Path

import pytest

from refilled.files.atomic import write_atomic
from refilled.store import layout

REPO = Path(__file__).resolve().parent.parent


def test_the_documented_table_is_the_layout():
    page = (REPO / "docs" / "experiments.md").read_text()
    table = page[page.index("| file or folder | what it holds |"):].split("\n\n")[0]
    rows = dict(re.findall(r"^\| `([^`]+)` \| (.+) \|$", table, flags=re.M))
    assert rows == layout.LAYOUT


def test_every_file_name_is_defined_once():
    names = {v for k, v in vars(layout).items() if k.isupper() and isinstance(v, str)}
    for path in (REPO / "refilled").rglob("*.py"):
        if path.name == "layout.py":
            continue
        text = path.read_text()
        defined = [n for n in names if re.search(rf'^[A-Z_]+ = "{re.escape(n)}"', text, flags=re.M)]
        assert defined == [], f"{path} defines {defined} again: import it from refilled.store.layout"


@pytest.mark.parametrize("content", [b"bytes", "text \u00e9", lambda f: f.write(b"by a function")])
def test_atomic_write_replaces_whole_and_leaves_nothing_aside(tmp_path, content):
    path = tmp_path / "sub" / "file.txt"
    write_atomic(path, "old")
    write_atomic(path, content)
    expected = content if isinstance(content, bytes) else content.encode() if isinstance(content, str) else b"by a function"
    assert path.read_bytes() == expected
    assert [p.name for p in path.parent.iterdir()] == ["file.txt"]


def test_atomic_write_that_fails_keeps_the_old_file(tmp_path):
    path = tmp_path / "file.txt"
    write_atomic(path, "old")

    def broken(f):
        f.write(b"half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        write_atomic(path, broken)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["file.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_write_gives_the_permissions_of_a_plain_write(tmp_path, umask):
    old = os.umask(umask)
    try:
        plain = tmp_path / "plain"
        plain.write_text("x")
        atomic = write_atomic(tmp_path / "atomic", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(atomic.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask


def test_what_is_where_names_every_folder_and_only_those_that_exist():
    page = (REPO / "docs" / "development.md").read_text()
    table = page[page.index("## What is where"):page.index("## Tests")]
    named = set(re.findall(r"^\| `([^`]+)` \|", table, flags=re.M))
    assert all((REPO / n).exists() for n in named), [n for n in named if not (REPO / n).exists()]
    made = ("tests", "experiments", "runs", "data", "__pycache__", "venv")  # not the project's: what running it makes
    folders = {f"{p.name}/" for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".")
               and p.name not in made and not p.name.endswith(".egg-info")}
    packages = {f"refilled/{p.name}/" for p in (REPO / "refilled").iterdir() if (p / "__init__.py").is_file()}
    assert (folders | packages) - {"refilled/data/"} <= named, (folders | packages) - named
    # each module of a package row is named in it
    for package in ("refilled/method/", "refilled/store/", "refilled/tune/"):
        row = next(line for line in table.splitlines() if line.startswith(f"| `{package}`"))
        modules = {p.name for p in (REPO / package).glob("*.py") if p.name != "__init__.py"}
        assert {m for m in modules if f"`{m}`" not in row} == set(), package


def test_analysis_output_folders_are_new_or_their_own(tmp_path):
    from analysis.common import OUTPUT_MARK, output_folder
    from refilled.errors import UserError

    def write(folder: Path, force: bool = False) -> Path:
        with output_folder(folder, force) as aside:
            (aside / "trials.csv").write_text("x")
        return folder

    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "index.md").write_text("my notes")
    with pytest.raises(UserError, match="holds files these commands did not write"):
        write(mine)
    assert [p.name for p in mine.iterdir()] == ["index.md"]  # nothing written
    assert write(mine, force=True) == mine and (mine / OUTPUT_MARK).is_file()
    fresh = write(tmp_path / "new")
    assert write(fresh) == fresh and (fresh / "trials.csv").is_file()  # a folder the scripts wrote before
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        write(tmp_path / "file", force=True)
