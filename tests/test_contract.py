"""The error contract, tested by property (hypothesis).

Whatever an experiment file or an experiment folder holds, a command ends with exit code
0, or with exit code 2 and one line on stderr that starts with "error:" (notes, lines that
start with "note:", may come before it); never a traceback; and a command that reads an
experiment changes nothing in it.

- Experiment files: random text and bytes, YAML with lists or maps as keys, anchors,
  aliases, merges and an alias bomb, wrong types and extreme values (huge, negative,
  nan/inf, long strings, unicode, control characters, newlines) for every config key and
  search setting. The loaders (load_experiment, parse_search) decide valid or not, and
  `search --config FILE --num-samples 0` must end with one line: the loaders' own message
  for a bad file, the refusal of --num-samples 0 for a good one (so Ray never starts).
- Experiment folders: a small experiment written once per module as a search leaves it
  (its file, teacher, study, trials, re-evaluation, best config, final retrain, costs;
  and a staged one with its phase 1), then damaged: files cut anywhere, emptied,
  replaced by random bytes or by a folder, deleted, a field of a JSON or YAML file given
  a value of another type. The report (analysis/report.py) and `retrain` (up to where it
  would train) read it.

Each property runs a bounded number of examples (MAX_*), so the file takes seconds.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from refilled.errors import UserError
from refilled.schema.config import FIELDS, load_experiment
from refilled.schema.search import parse_search
from support.configs import REPO, TINY
from support.reports import unrendered

# The fast tier runs the same examples every time (derandomize); TUNE_REFILLED_CONTRACT_SCALE=N runs
# N times as many, new ones each run, to look further.
SCALE = int(os.environ.get("TUNE_REFILLED_CONTRACT_SCALE", "1"))
RENDER = SCALE > 1  # the report's figures rendered (layout, PNG) too: a second a report
MAX_FILES = 60 * SCALE  # examples of the experiment-file property
MAX_FOLDERS = 8 * SCALE  # examples of each damaged-folder property (a report draws its plots: the slow part)


def bounded(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck),
                    derandomize=SCALE == 1, database=None)


# ----------------------------------------------------------------------------- the contract

def run(command, argv: list[str]) -> tuple[int | None, str, str]:
    """A command line's main in-process: (exit code, stdout, stderr); exit code None where it
    was about to train (WouldTrain: `retrain` read everything it reads)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = command(argv)
        except WouldTrain:
            code = None
    return code, out.getvalue(), err.getvalue()


def kept(code: int, out: str, err: str) -> str | None:
    """Assert the contract; the error line when the command refused."""
    assert "Traceback" not in out + err, (code, out, err)
    lines = [line for line in err.splitlines() if line.strip()]  # splitlines: every kind of line break
    errors = [line for line in lines if not line.startswith("note: ")]
    if code == 0:
        assert not errors, err
        return None
    assert code == 2, (code, out, err)
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("error: "), err
    assert len(errors[0]) <= 1000, f"{len(errors[0])} characters: {errors[0][:300]}..."
    return errors[0]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under `root`: kind, mode, and a file's size, mtime and content hash."""
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if stat.S_ISDIR(info.st_mode):
            found[str(path.relative_to(root))] = ("dir", info.st_mode)
        else:
            try:
                digest = hashlib.sha1(path.read_bytes()).hexdigest()
            except OSError:  # made unreadable (as root, still read)
                digest = None
            found[str(path.relative_to(root))] = ("file", info.st_mode, info.st_size, info.st_mtime_ns, digest)
    return found


# ----------------------------------------------------------------------------- experiment files

SEARCH = yaml.safe_load((REPO / "tests" / "search_tiny.yaml").read_text())["search"]
VALID = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}, "search": SEARCH}
# every search setting, by its place in the section
SETTINGS = ["space", "space.tau1", "space.tau1.loguniform", "space.flag_merge.choice", "space.lr1", "num_samples",
            "start_with", "asha", "asha.grace_period", "asha.reduction_factor", "asha.rungs", "resources",
            "resources.cpu", "resources.gpu", "max_concurrent", "max_failures", "checkpoint_every",
            "keep_checkpoints", "reuse_actors", "seed", "staged", "staged.num_samples", "staged.asha",
            "select", "select.top_k", "select.seeds", "budget_hours", "fixed"]
CONTROL = "".join(map(chr, range(32))) + "\x7f\x85\u2028\u2029"

strings = st.one_of(st.text(max_size=30), st.text(alphabet=CONTROL + "ab:#-'\"{}[]&*!|>%@`", max_size=20),
                    st.integers(1000, 100_000).map(lambda n: "x" * n))
numbers = st.one_of(st.integers(), st.integers(10 ** 20, 10 ** 400), st.integers(-(10 ** 400), -1),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, -1, 0.0, -0.0, 1e308, 5e-324]))
scalars = st.one_of(st.none(), st.booleans(), numbers, strings)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.one_of(strings, numbers), inner, max_size=3)),
                      max_leaves=8)
# values some keys take (so that a file with a few keys changed may still be valid)
plausible = st.sampled_from([1, 2, 3, 10, 0.5, 0.1, True, False, None, "all", "auto", "none", [3], [2, 4],
                             {"loguniform": [0.5, 16]}, {"choice": [1, 2]}, {"grace_period": 2}, {}])
# wrong or extreme values every config key and search setting is given in turn
WRONG = [None, True, "abc", "", "x\ny", "\x1b[31mred", "é\u2028", "x" * 10_000, 10 ** 400, -(10 ** 30), -1, 0,
         math.nan, math.inf, -math.inf, 1e308, [], [1, "a"], {}, {"a": 1}, [[1, 2], [3]]]


def put(data: dict, place: list[str], value: Any) -> None:
    """Set data[place[0]][place[1]]... to `value`, making mappings on the way."""
    for part in place[:-1]:
        if not isinstance(data.get(part), dict):
            data[part] = {}
        data = data[part]
    data[place[-1]] = value


@st.composite
def structured(draw) -> str:
    """The valid experiment file with a few keys given other values (some valid ones too),
    an unknown key or section, or a section removed, dumped as YAML."""
    data = json.loads(json.dumps(VALID))
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from(["config", "search", "unknown", "section", "drop"]))
        if where == "config":
            put(data, ["config", draw(st.sampled_from(sorted(FIELDS)))], draw(st.one_of(values, plausible)))
        elif where == "search":
            put(data, ["search", *draw(st.sampled_from(SETTINGS)).split(".")], draw(st.one_of(values, plausible)))
        elif where == "unknown":
            put(data, [draw(st.sampled_from(["config", "search", "search.asha"])).split(".")[0], draw(strings)],
                draw(values))
        elif where == "section":
            data[draw(st.one_of(strings, st.sampled_from(["config", "search", "name", "retrain", "stage1_choice",
                                                          "stage1_only", "trial_kind"])))] = draw(values)
        else:
            data.pop(draw(st.sampled_from(["config", "search"])), None)
    return yaml.safe_dump(data, allow_unicode=draw(st.booleans()), default_flow_style=draw(st.booleans()))


def bomb(depth: int, width: int) -> str:
    """An alias bomb: `depth` levels of `width` aliases to the level below (width ** depth items)."""
    lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, depth)]
    return "\n".join(lines) + "\n"


BOMB = bomb(7, 9)  # about 500 bytes of YAML, 9 ** 7 = 4.8 million items


@st.composite
def yaml_tricks(draw) -> str:
    """YAML with keys that are lists or maps, anchors, aliases, merges, recursion, an alias
    bomb, tags, several documents: placed at the top, in config: or in search:."""
    where = draw(st.sampled_from(["top", "config", "search", "space"]))
    trick = draw(st.sampled_from(["list key", "map key", "alias", "merge", "recursive", "bomb", "tag",
                                  "documents", "duplicate", "null key", "number key"]))
    body = {"list key": "? [a, b]\n: 1\n", "map key": "? {a: 1}\n: 2\n", "alias": "tau1: &t 2.0\ntau2: *t\n",
            "merge": "<<: {tau1: 2.0}\ntau2: 3.0\n", "recursive": "tau1: &r [*r]\n", "tag": "tau1: !!binary aGVsbG8=\n",
            "duplicate": "tau1: 2\ntau1: 3\n", "null key": "~: 1\n", "number key": "1.5: 1\n",
            "documents": "tau1: 2\n---\ntau2: 3\n",
            "bomb": bomb(draw(st.integers(1, 7)), draw(st.integers(1, 9)))}[trick]
    if where == "top":
        rest = yaml.safe_dump({k: v for k, v in VALID.items()})
        return body + rest if trick != "documents" else rest + "---\n" + body
    if where == "space":
        body = body.replace("tau1", "tau1").replace("2.0", "{loguniform: [0.5, 16]}")
        return yaml.safe_dump({"config": VALID["config"]}) + "search:\n  space:\n" + _indent(body, 4)
    section = {k: v for k, v in VALID.items() if k != where}
    return yaml.safe_dump(section) + f"{where}:\n" + _indent(body, 2) + \
        ("  data_name: digits\n" if where == "config" else "")


def _indent(text: str, n: int) -> str:
    return "".join(" " * n + line + "\n" for line in text.splitlines())


experiment_files = st.one_of(
    structured().map(str.encode),
    yaml_tricks().map(str.encode),
    st.text(max_size=200).map(str.encode),
    st.binary(max_size=200),
    st.builds(lambda text, cut: text[:cut], structured().map(str.encode), st.integers(0, 400)),  # a file cut short
)


def verdict(path: Path) -> str | None:
    """What the loaders say of a file: None (valid), or their one-line message."""
    try:
        cfg, data = load_experiment(path)
        parse_search(data.get("search"), cfg)
    except UserError as e:
        return str(e)
    return None


@bounded(MAX_FILES)
@given(content=experiment_files)
@example(content=b"? [a, b]\n: 1\n")  # a list as a key: was a TypeError's traceback
@example(content=b"config:\n  ? {a: 1}\n  : 2\n")
@example(content=yaml.safe_dump({"config": {"data_name": "digits"}}).encode() + b"search:\n  space:\n    ? [tau1]\n    : 1\n")
@example(content=BOMB.encode())  # unknown keys: short anyway
@example(content=(f"name:\n{_indent(BOMB, 2)}config: {{data_name: digits, tau1: *l6}}\n").encode())
@example(content=(f"name:\n{_indent(BOMB, 2)}config: {{data_name: digits}}\n"
                  "search: {space: {tau1: {choice: *l6}}}\n").encode())
@example(content=yaml.safe_dump({"config": {"data_name": "digits", "x\ny": 1}}).encode())  # a key with a line break
@example(content=yaml.safe_dump({"config": {"data_name": "d" * 100_000}}).encode())
@example(content=yaml.safe_dump({"config": VALID["config"], "search": {"a\u2028b": 1}}).encode())
@example(content=b"config: &c {data_name: digits, tau1: 2.0}\nsearch: {space: {tau1: {loguniform: [1, 2]}}}\n"
                 b"name: {<<: *c}\n")
def test_any_experiment_file_is_read_or_refused_in_one_line(content):
    import tune_refilled

    with tempfile.TemporaryDirectory() as tmp:
        path, storage = Path(tmp) / "exp.yaml", Path(tmp) / "storage"
        path.write_bytes(content)
        said = verdict(path)
        if said is not None:
            assert len(said) <= 1000 and len(said.splitlines()) == 1, said[:300]
        code, out, err = run(tune_refilled.main, ["search", "--config", str(path), "--storage", str(storage),
                                                  "--num-samples", "0"])
        line = kept(code, out, err)
        assert line is not None and not storage.exists(), (code, err)  # nothing written, no Ray
        refused_zero = "num_samples must be >= 1, got 0" in line
        if said is None:
            assert refused_zero, line
        else:  # the loaders' message; one about search: may give way to num_samples' (checked first)
            assert line == f"error: {said}" or (said.startswith("search.") and refused_zero), (line, said)


@pytest.mark.parametrize("section", ["config", "search"])
def test_every_key_with_a_wrong_value_is_refused_in_one_line(tmp_path, section):
    """Each config key and each search setting given each of WRONG, as read from a file (YAML's
    part is the property's above): the loaders' message is one short line in this project's
    words; the command line says it (each key with one of the values, in turn)."""
    import tune_refilled

    keys = sorted(FIELDS) if section == "config" else SETTINGS
    path = tmp_path / "exp.yaml"
    path.write_text("the file as read is given below")
    for i, key in enumerate(keys):
        for j, value in enumerate(WRONG):
            data = json.loads(json.dumps(VALID))
            put(data, [section, *key.split(".")], value)
            with mock.patch("refilled.schema.config.read_yaml", lambda path: copy.deepcopy(data)):
                said = verdict(path)
                if said is not None:
                    assert len(said) <= 1000 and len(said.splitlines()) == 1, (key, value, said[:300])
                    assert "Input should be" not in said, said  # pydantic's words, not this project's
                if j == i % len(WRONG):
                    code, out, err = run(tune_refilled.main, ["search", "--config", str(path), "--storage",
                                                              str(tmp_path / "s"), "--num-samples", "0"])
                    assert kept(code, out, err) is not None and not (tmp_path / "s").exists()


@pytest.mark.parametrize("resources", [True, [1, 2], "ab"])
def test_search_resources_that_are_no_mapping_are_refused_in_one_line(tmp_path, resources):
    """Found by the property above (at TUNE_REFILLED_CONTRACT_SCALE=8): a traceback, not a line."""
    import tune_refilled

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({**VALID, "search": {**SEARCH, "resources": resources}}))
    assert verdict(path) is not None
    code, out, err = run(tune_refilled.main, ["search", "--config", str(path), "--storage", str(tmp_path / "s"),
                                              "--num-samples", "0"])
    assert "search.resources" in kept(code, out, err)


def test_an_alias_bomb_is_one_short_line(tmp_path):
    """500 bytes of YAML that hold millions of items: the message shows a few of them."""
    path = tmp_path / "bomb.yaml"
    path.write_text(f"name:\n{_indent(BOMB, 2)}config: {{data_name: digits, tau1: *l6}}\n")
    said = verdict(path)
    assert said is not None and len(said) < 400 and "tau1" in said, said[:400]


# ----------------------------------------------------------------------------- experiment folders

E1, E2 = 2, 3  # stage-1 and stage-2 epochs: steps 1-2 are stage 1, 3-5 stage 2
SPACE = {"tau1": {"loguniform": [0.5, 16.0]}, "lambd": {"loguniform": [0.1, 100.0]}}


class WouldTrain(Exception):
    """`retrain` read everything and is about to train: as far as the contract goes, it took the input."""


def _rows(trial_id: str, accs: list[float], first_step: int = 1, stage1: int = E1, total: int = E1 + E2) -> list[dict]:
    """result.json's rows as a trial reports them: `stage1` NCM epochs, then a stage-2 epoch per accuracy."""
    rows, t = [], 1_700_000_000.0
    stages = ["stage1"] * stage1 + ["stage2"] * len(accs)
    for i, (stage, acc) in enumerate(zip(stages, [0.4 + 0.05 * s for s in range(stage1)] + accs)):
        t += 2.5
        rows.append({"trial_id": trial_id, "stage": stage, "step": first_step + i, "total_steps": total,
                     "val_accuracy": acc, "cost_wall_s": 2.5, "cost_device_s": 2.5, "device": "cpu",
                     "time_this_iter_s": 2.5, "time_total_s": 2.5 * (i + 1), "timestamp": t, "node_ip": "10.0.0.1",
                     "stage1_cache": "miss" if stage == "stage1" else None})
    return rows


def _trial(folder: Path, trial_id: str, number: int, params: dict, rows: list[dict], status: str, **record) -> None:
    from refilled.store import trial_records

    trial = folder / trial_records.folder_name(trial_id)
    (trial / "checkpoint_000001").mkdir(parents=True)
    (trial / "params.json").write_text(json.dumps(params))
    (trial / "result.json").write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n"
                                               for r in rows))
    step = rows[-1]["step"] if rows else 0
    trial_records.write(trial, {"trial_id": trial_id, "number": number, "status": status, "step": step,
                                "total_steps": rows[-1]["total_steps"] if rows else E1 + E2,
                                "checkpoint": "checkpoint_000001", "node": "10.0.0.1",
                                "at_last_save": {"status": status, "checkpoint": "checkpoint_000001"}, **record})


def _study(folder: Path, name: str, values: list[float]) -> None:
    import optuna

    from refilled.schema.search import distributions
    from refilled.store import study as study_store

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=study_store.storage(folder), direction="maximize")
    for value in values:
        study.tell(study.ask(distributions(SPACE)), value)


def _concluded(folder: Path, cfg, staged: bool) -> None:
    """What a search writes when it ends: the re-evaluation, best config, tables, costs, and a final retrain."""
    import pandas as pd

    from refilled.runs.final_retrain import results_of_runs, write_results
    from refilled.store import cost
    from refilled.store.experiments import load_trials, write_best_config
    from refilled.store.storage import Place

    place = Place(folder)
    cost.add_driver_cost(place, "teacher", "teacher", 30.0, "cpu", 1.0)
    cost.add_driver_cost(place, "bank", "bank", 5.0, "cpu", 1.0)
    trials = load_trials(folder)
    top = trials[trials["reached_stage2"]].head(2)
    rows = []
    for _, trial in top.iterrows():
        accs = []
        for seed in (1, 2):
            record = {"trial_id": trial["trial_id"], "seed": seed, "val_accuracy": 0.6 + 0.01 * seed,
                      "epochs": E1 + E2, "wall_s": 12.0, "device": "cpu", "device_s": 12.0}
            (folder / "selection").mkdir(exist_ok=True)
            (folder / "selection" / f"{trial['trial_id']}-seed{seed}.json").write_text(json.dumps(record, indent=1))
            accs.append(record["val_accuracy"])
        rows.append({"trial_id": trial["trial_id"], "tau1": trial["config/tau1"] if not staged else None,
                     "lambd": trial["config/lambd"], "val_accuracy_search": trial["best_val_accuracy_stage2"],
                     "val_accuracy_reeval_mean": sum(accs) / 2, "val_accuracy_reeval_std": 0.007, "seeds": "1 2"})
    pd.DataFrame(rows).dropna(axis=1, how="all").to_csv(folder / "selection.csv", index=False)
    path, best_cfg, best = write_best_config(place, trials, reeval="re-evaluated with 2 seeds")
    trials.to_csv(folder / "trials.csv", index=False)
    cost.ledger(folder).to_csv(folder / "cost.csv", index=False)
    (folder / "retrain").mkdir()
    runs = [{"kind": kind, "seed": seed, "test_accuracy": 0.5 + 0.02 * seed + (0.05 if kind == "refilled" else 0)}
            for kind in ("refilled", "student_alone") for seed in (0, 1)]
    write_results(folder / "retrain", results_of_runs(runs, {"source": {"experiment": folder.name,
                                                                        "trial_id": str(best["trial_id"])},
                                                              "config": best_cfg.to_dict(), "epochs": E1 + E2,
                                                              "eval_split": "test"}))


def write_experiment(folder: Path, staged: bool = False) -> Path:
    """An ended search's experiment folder, file by file as the search leaves it (its Ray Tune
    state aside): four trials (two finished, one stopped by ASHA, one still in stage 1), or with
    `staged` a phase 1 in stage1_search/ and phase-2 trials that start at stage 2."""
    import torch

    from refilled.files import checkpoint
    from refilled.schema.search import parse_search
    from refilled.store import experiment_file
    from refilled.store.storage import Place
    from support.configs import make_tiny_config

    cfg = make_tiny_config(n_training_epochs1=E1, n_training_epochs2=E2)
    section = {"num_samples": 4, "space": SPACE, "select": {"top_k": 2, "seeds": 2}, "asha": {"grace_period": 1}}
    if staged:
        section["staged"] = {"num_samples": 2, "asha": {"grace_period": 1}}
    settings = parse_search(section, cfg)
    folder.mkdir(parents=True)
    checkpoint.save({"kind": "teacher", "state_dict": {"w": torch.ones(4)}}, folder / "teacher.pt")
    _study(folder, folder.name, [0.6, 0.7, 0.5])
    if staged:
        phase1 = folder / "stage1_search"
        phase1.mkdir()
        experiment_file.write(Place(phase1), cfg, settings.phase(1).to_section(), {"stage1_only": True})
        for i, tau1 in enumerate((2.0, 5.0)):
            _trial(phase1, f"s{i}", i + 1, {"tau1": tau1}, _rows(f"s{i}", [], total=E1), "finished")
        choice = {"trial_id": "s0", "values": {"tau1": 2.0}, "val_ncm_accuracy": 0.45}
        checkpoint.save({"kind": "stage1_choice", **choice, "snapshot": {"w": torch.ones(2)}},
                        folder / "stage1_choice.pt")
        experiment_file.write(Place(folder), cfg, settings.to_section(), {"stage1_choice": choice})
        for i, (lambd, accs, status) in enumerate([(1.0, [0.5, 0.6, 0.65], "finished"), (10.0, [0.4], "stopped"),
                                                  (0.3, [0.55, 0.6, 0.7], "finished")]):
            _trial(folder, f"p{i}", i + 1, {"lambd": lambd, "tau1": 2.0}, _rows(f"p{i}", accs, first_step=E1 + 1,
                                                                                stage1=0), status,
                   **({"stopped_at": E1 + 1} if status == "stopped" else {}))
    else:
        experiment_file.write(Place(folder), cfg, settings.to_section())
        for i, (params, accs, status) in enumerate([({"tau1": 2.0, "lambd": 1.0}, [0.5, 0.6, 0.65], "finished"),
                                                    ({"tau1": 8.0, "lambd": 50.0}, [0.3], "stopped"),
                                                    ({"tau1": 1.0, "lambd": 0.5}, [0.55, 0.6, 0.7], "finished"),
                                                    ({"tau1": 3.0, "lambd": 3.0}, None, "running")]):
            rows = _rows(f"t{i}", accs) if accs is not None else _rows(f"t{i}", [], stage1=1)
            _trial(folder, f"t{i}", i + 1, params, rows, status, **({"stopped_at": E1 + 1} if status == "stopped"
                                                                    else {}))
    _concluded(folder, cfg, staged)
    return folder


@pytest.fixture(scope="module")
def experiments(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("contract")
    return {"plain": write_experiment(base / "plain"), "staged": write_experiment(base / "staged", staged=True)}


# every file and folder of the two experiments (a test checks these against the fixture's)
TRIAL_FILES = ["", "/params.json", "/result.json", "/trial_record.json", "/checkpoint_000001"]
COMMON = ["experiment.yaml", "teacher.pt", "optuna.journal", "driver_cost.json", "selection", "selection.csv",
          "best_config.yaml", "trials.csv", "cost.csv", "retrain", "retrain/results.json", "retrain/summary.md"]
PATHS = {
    "plain": COMMON + [f"trial_t{i}{f}" for i in range(4) for f in TRIAL_FILES]
    + [f"selection/t{i}-seed{s}.json" for i in (0, 2) for s in (1, 2)],
    "staged": COMMON + ["stage1_choice.pt", "stage1_search", "stage1_search/experiment.yaml"]
    + [f"stage1_search/trial_s{i}{f}" for i in range(2) for f in TRIAL_FILES]
    + [f"trial_p{i}{f}" for i in range(3) for f in TRIAL_FILES] + [f"selection/p{i}-seed{s}.json" for i in (0, 2)
                                                                   for s in (1, 2)],
}
HOW = ["cut", "empty", "random bytes", "folder", "delete", "unreadable", "value"]
# the fields a value is given to: those of the files' records (dotted: inside a field), and any other
KEYS = ["step", "stage", "val_accuracy", "total_steps", "trial_id", "cost_wall_s", "cost_device_s", "device",
        "time_total_s", "timestamp", "time_this_iter_s", "diverged", "diverged_reason", "stage1_cache", "node_ip",
        "tau1", "lambd", "number", "status", "checkpoint", "stopped_at", "at_last_save", "at_last_save.checkpoint",
        "node", "seed", "epochs", "wall_s", "device_s", "refilled", "refilled.mean", "refilled.test_accuracy",
        "student_alone.std", "gain", "gain_se", "source", "source.trial_id", "config", "config.tau1",
        "config.n_training_epochs1", "search", "search.space", "search.staged", "search.select.top_k",
        "stage1_choice", "stage1_choice.values", "stage1_choice.trial_id", "stage1_only", "trial_kind",
        "val_accuracy_search", "val_accuracy_reeval_mean", "val_accuracy_reeval_std", "seeds", "op_code", "values"]
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.integers(10 ** 20, 10 ** 30),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(["abc", "", "0"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=5)


def damage_of(kind: str):
    """One damage to one file or folder of experiment `kind`: (path, how, a number that says
    where to cut or which line, the field a value goes to, that value, the bytes written)."""
    return st.tuples(st.sampled_from(PATHS[kind]), st.sampled_from(HOW), st.integers(0, 10 ** 6),
                     st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), json_values, st.binary(min_size=1,
                                                                                                 max_size=300))


cases = st.sampled_from(sorted(PATHS)).flatmap(
    lambda kind: st.tuples(st.just(kind), st.lists(damage_of(kind), min_size=1, max_size=2)))


def _set(data: Any, key: str, value: Any) -> Any:
    """`data` with its field `key` (dotted: inside fields) set to `value`; a list's element by the first part's hash."""
    if isinstance(data, list) and data:
        data[sum(map(ord, key)) % len(data)] = _set(data[sum(map(ord, key)) % len(data)], key, value)
        return data
    if not isinstance(data, dict):
        return {key: value}
    first, _, rest = key.partition(".")
    data[first] = _set(data.get(first), rest, value) if rest else value
    return data


def give_value(path: Path, n: int, key: str, value: Any) -> None:
    """Give field `key` of `path` (of line `n` of a file of JSON lines) the value `value`, the rest kept."""
    from refilled.store.experiment_file import END, HEADER

    text = path.read_text()
    if path.suffix == ".yaml":
        data = _set(yaml.safe_load(text), key, value)
        body = yaml.safe_dump(data, sort_keys=False)
        path.write_text(f"{HEADER}\n{body}{END}\n" if text.startswith(HEADER) else body)
    elif path.suffix == ".csv":
        lines = text.splitlines()
        header = lines[0].split(",")
        row = 1 + n % max(len(lines) - 1, 1)
        cells = lines[row].split(",") if row < len(lines) else [""] * len(header)
        column = header.index(key) if key in header else n % len(header)
        cells[column] = json.dumps(value).replace(",", ";")
        lines[row:row + 1] = [",".join(cells)]
        path.write_text("\n".join(lines) + "\n")
    elif path.suffix in (".json", ".journal"):
        lines = text.splitlines()
        whole = len(lines) > 1 and path.name != "result.json" and path.suffix != ".journal"  # indented JSON
        if whole:
            path.write_text(json.dumps(_set(json.loads(text), key, value), indent=1))
        else:
            i = n % len(lines)
            lines[i] = json.dumps(_set(json.loads(lines[i]), key, value))
            path.write_text("\n".join(lines) + "\n")
    else:
        path.write_bytes(json.dumps(value).encode())


def damage(root: Path, rel: str, how: str, n: int, key: str, value: Any, blob: bytes) -> None:
    path = root / rel
    if not path.exists() and not path.is_symlink():
        return  # gone with an earlier damage (its folder deleted)
    folder = path.is_dir()
    if how == "delete":
        shutil.rmtree(path) if folder else path.unlink()
    elif how == "folder":  # a folder where a file belongs, a file where a folder does
        if folder:
            shutil.rmtree(path)
            path.write_bytes(blob)
        else:
            path.unlink()
            path.mkdir()
    elif how == "unreadable":
        path.chmod(0)  # as root, still read: the test suite may run as anyone
    elif folder:  # the rest damage files: a folder is emptied
        shutil.rmtree(path)
        path.mkdir()
    elif how == "cut":
        data = path.read_bytes()
        path.write_bytes(data[:n % max(len(data), 1)])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random bytes":
        path.write_bytes(blob)
    else:
        try:
            give_value(path, n, key, value)
        except (ValueError, IndexError, yaml.YAMLError):  # not parseable as its kind: bytes instead
            path.write_bytes(blob)


def _writable(root: Path) -> None:
    """Permissions back, so that the temporary folder can be removed (by anyone)."""
    for path in [root, *root.rglob("*")]:
        with contextlib.suppress(OSError):
            path.chmod(0o700 if path.is_dir() else 0o600)


def read_damaged(made: Path, damages: list[tuple], render: bool = RENDER) -> dict[str, Any]:
    """A copy of the experiment `made` with `damages`, read by the report and by `retrain`
    (up to where it would train). Asserts the contract; returns what each command ended with
    (exit code, stdout, stderr) and the report's index.md when it wrote one.
    Without `render`, the report's figures are drawn but not rendered (layout and PNG:
    most of its time)."""
    import tune_refilled
    from analysis.common import run_cli
    from analysis.report import main as report
    from refilled.store import experiments as store

    ended = {}
    with tempfile.TemporaryDirectory() as tmp:
        exp = Path(tmp) / "storage" / made.name
        shutil.copytree(made, exp)
        try:
            for d in damages:
                damage(exp, *d)
            before = snapshot(exp)
            store._SAID.clear()  # each example as a new process: every note said again
            with contextlib.ExitStack() as stack:
                if not render:
                    stack.enter_context(unrendered())
                ended["report"] = run(lambda argv: run_cli(report, argv), [str(exp), "--out", f"{tmp}/report"])
            if kept(*ended["report"]) is None:
                ended["index"] = (Path(tmp) / "report" / "index.md").read_text()
            assert snapshot(exp) == before
            store._SAID.clear()
            with mock.patch("refilled.runs.final_retrain.run_one", side_effect=WouldTrain):
                ended["retrain"] = run(tune_refilled.main, ["retrain", "--experiment", str(exp), "--seeds", "1",
                                                            "--no-baseline", "--out", f"{tmp}/retrain"])
            code, out, err = ended["retrain"]
            if code is None:  # it would train now: what it said on the way is notes and its progress bar
                assert "Traceback" not in out + err and "error" not in err, err
            else:
                kept(code, out, err)
            assert snapshot(exp) == before
        finally:
            _writable(Path(tmp))
    return ended


def test_the_paths_are_those_of_the_experiments(experiments):
    for kind, made in experiments.items():
        assert sorted(PATHS[kind]) == sorted(str(p.relative_to(made)) for p in made.rglob("*")), kind


def test_the_whole_experiments_are_read(experiments):
    """The control: nothing damaged, the report is written and retrain goes on to train."""
    for made in experiments.values():
        ended = read_damaged(made, [])
        assert ended["report"][0] == 0 and ended["retrain"][0] is None, ended
        assert not ended["report"][2].strip(), ended["report"][2]


@bounded(MAX_FOLDERS)
@given(case=cases)
@example(case=("plain", [("trial_t0/result.json", "value", 0, "step", "abc", b"x")]))  # a TypeError's traceback
@example(case=("plain", [("selection/t0-seed1.json", "folder", 0, "", None, b"x")]))  # IsADirectoryError
@example(case=("plain", [("retrain/summary.md", "random bytes", 0, "", None, b"\xff\xfe")]))  # UnicodeDecodeError
@example(case=("plain", [("trial_t0/params.json", "value", 0, "tau1", "abc", b"x")]))  # ValueError in params.png
@example(case=("plain", [("selection.csv", "value", 0, "val_accuracy_reeval_std", -1, b"x")]))  # in selection.png
def test_a_damaged_experiment_is_read_or_refused_in_one_line(experiments, case):
    kind, damages = case
    read_damaged(experiments[kind], damages)


# ----------------------------------------------------------------------------- what the properties found

def _copy(made: Path, tmp_path: Path) -> Path:
    target = tmp_path / "storage" / made.name
    shutil.copytree(made, target)
    return target


def test_a_reported_epoch_of_another_kind_leaves_its_trial_out_with_a_note(experiments, tmp_path):
    """{"step": "abc"} in a result.json was a TypeError's traceback in every reader."""
    from refilled.store import experiments as store

    exp = _copy(experiments["plain"], tmp_path)
    damage(exp, "trial_t1/result.json", "value", 0, "step", "abc", b"")
    store._SAID.clear()
    ended = read_damaged(exp, [])
    notes = ended["report"][2].splitlines()
    assert ended["report"][0] == 0 and len(notes) == 2, notes  # once each, though the ledger is read thrice
    assert all("trial_t1" in n and "line 1 of result.json gives step 'abc'" in n and "left out" in n for n in notes)
    assert "left out of the tables" in notes[0] and "left out of the ledger" in notes[1]


def test_a_report_of_a_search_without_trials_says_it_has_none_yet(experiments, tmp_path):
    """It said "the experiments have no searched parameters"."""
    exp = _copy(experiments["plain"], tmp_path)
    for path in exp.iterdir():
        if path.name not in ("experiment.yaml", "teacher.pt", "optuna.journal", "driver_cost.json"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    line = kept(*read_damaged(exp, [])["report"])
    assert line == "error: plain has no trials yet: run or resume its search (`python tune_refilled.py search ...`), " \
                   "then run this report again", line


def test_a_staged_search_without_its_phase_1_is_reported_and_said_so_once(experiments, tmp_path):
    """Without stage1_search/ the report left phase 1 out of the trials and the cost without a word."""
    exp = _copy(experiments["staged"], tmp_path)
    shutil.rmtree(exp / "stage1_search")
    ended = read_damaged(exp, [])
    code, out, err = ended["report"]
    note = "phase 1 of staged (stage1_search/) is missing: its trials and what they cost are left out of this " \
           "report (restore it from a backup)"
    assert code == 0 and err.splitlines() == [f"note: {note}"], err
    assert ended["index"].count(note[1:]) == 1 and ended["retrain"][0] is None
