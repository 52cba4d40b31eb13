"""The project as an installed package: a console script, no sys.path edits, the linter clean."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_console_script_and_script_give_the_same_help(tmp_path):
    # run from elsewhere: the package is importable because it is installed, not because of the folder
    # the console script beside this Python: a virtual environment used without activating it has no PATH entry
    console = Path(sys.executable).parent / "tune-refilled"
    script = subprocess.run([str(console), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    plain = subprocess.run([sys.executable, str(REPO / "tune_refilled.py"), "--help"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert script.returncode == plain.returncode == 0, script.stderr + plain.stderr
    assert script.stdout.startswith("usage: tune-refilled ") and plain.stdout.startswith("usage: tune_refilled.py ")
    def same(text):
        return text.replace("tune-refilled", "X").replace("tune_refilled.py", "X")

    assert same(script.stdout) == same(plain.stdout)


def test_no_module_edits_sys_path():
    edit = re.compile(r"sys\.path\.(insert|append|extend)|sys\.path\s*[+]?=")
    offenders = [str(p.relative_to(REPO)) for p in REPO.rglob("*.py")
                 if ".git" not in p.parts and edit.search(p.read_text())]
    assert offenders == [], offenders


def test_ruff_passes():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
