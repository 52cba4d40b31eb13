"""The experiment store's layout: named once, shown in the README as it is, written one way."""

import os
import re
import stat
from pathlib import Path

import pytest

from refilled.store import layout
from refilled.store.atomic import write_atomic

REPO = Path(__file__).resolve().parent.parent


def test_readme_table_is_the_layout():
    readme = (REPO / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([^`]+)` \| (.+) \|$", readme[readme.index("| file or folder | what it holds |"):],
                           flags=re.M))
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
