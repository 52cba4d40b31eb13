"""The README a newcomer reads in five minutes, and the pages in docs/ it leads to."""

import re
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md"))
INSTALL = "pip install -r requirements.txt"
MAIN = "python tune_refilled.py search --config search_spaces/digits.yaml"

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target), ![alt](target)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def links(text: str) -> list[str]:
    return LINK.findall(text)


def outside(page: Path, target: str) -> str | None:
    """Why a link of `page` leads outside the repository, or None when it stays inside."""
    if SCHEME.match(target) or target.startswith("//"):
        return "an address outside the repository"
    path = unquote(target.split("#", 1)[0])
    if not path:
        return None  # an anchor in the same page
    if path.startswith("/"):
        return "an absolute path"
    resolved = (page.parent / path).resolve()
    if not resolved.is_relative_to(REPO):
        return "a path out of the repository"
    if not resolved.exists():
        return "a file that does not exist"
    return None


def strays(page: Path) -> list[str]:
    text = page.read_text()
    bad = [f"{t}: {why}" for t in links(text) if (why := outside(page, t))]
    # a pointer outside need not be a link: ../shared/SPEC.md in backquotes is one too
    bad += [f"{m}: names a place outside the repository" for m in re.findall(r"\.\./shared\S*|\bSPEC\.md\b", text)]
    return bad


def test_readme_is_short_and_sets_up_in_its_first_screen():
    lines = README.read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines: move the reference to docs/"
    first = "\n".join(lines[:40])
    assert INSTALL in first and MAIN in first
    assert first.index(INSTALL) < first.index(MAIN), "install first, then the main command"


def test_readme_links_every_page_in_docs():
    targets = {(REPO / unquote(t.split("#")[0])).resolve() for t in links(README.read_text())}
    assert PAGES, "docs/ holds the reference pages"
    assert [p.name for p in PAGES if p.resolve() not in targets] == []


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(REPO)))
def test_no_link_leaves_the_repository(page):
    assert strays(page) == []


def test_a_link_out_of_the_repository_is_caught(tmp_path):
    """The check above can fail: each kind of stray link is named."""
    page = DOCS / "method.md"
    for target in ("../../shared/SPEC.md", "https://github.com/njulus/REFILLED", "/etc/hosts", "missing.md"):
        assert outside(page, target) is not None, target
    assert outside(page, "search.md#staged-search") is None and outside(page, "../benchmarks/README.md") is None
    fake = tmp_path / "page.md"
    fake.write_text("See `../shared/SPEC.md` in the project's shared folder.\n")
    assert strays(fake) != []


def test_readme_shows_the_test_commands_ci_runs():
    """One place for the test commands, and they are the ones .ci/run runs (less its --durations)."""
    readme = README.read_text()
    commands = [line.split(" #")[0].strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    ci = [re.sub(r"\s+--durations=\d+", "", c) for c in commands
          if c.startswith(("ruff ", "python -m pytest", "OMP_NUM_THREADS=1 python -m pytest"))]
    assert len(ci) == 3, ci
    assert [c for c in ci if c not in readme] == []
    assert [(p.name, c) for p in PAGES for c in ci if "pytest" in c and c in p.read_text()] == []  # said once


def test_the_readmes_search_section_is_one_the_search_accepts():
    from refilled.schema.config import load_experiment
    from refilled.schema.search import check_rungs_within, parse_search

    example = re.search(r"```yaml\n(search:.*?)```", README.read_text(), flags=re.S).group(1)
    cfg, _ = load_experiment(REPO / "search_spaces" / "digits.yaml")
    settings = parse_search(yaml.safe_load(example)["search"], cfg)
    check_rungs_within(settings, cfg)
    assert settings.staged is not None and settings.select.top_k == 3
