"""refilled.files.checkpoint and teacher loading: atomic writes, safe reads, mismatch checks."""

from __future__ import annotations

import pickle
import shlex
import warnings
from pathlib import Path

import pytest
import torch

from refilled.errors import UserError
from refilled.files import checkpoint
from refilled.method.networks import Network
from refilled.runs import inputs as runs
from support.configs import make_tiny_config


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg.strip() and "\n" not in msg, repr(msg)
    return msg


@pytest.fixture(scope="module")
def student_data():
    return runs.student_data(make_tiny_config())


# ----------------------------------------------------------------------------- save / load

def test_atomic_save_leaves_only_the_file(tmp_path):
    obj = {"kind": "x", "w": torch.arange(6.0).view(2, 3), "meta": {"a": [1, 2], "b": None, "c": "text"}}
    path = checkpoint.save(obj, tmp_path / "deep" / "er" / "ck.pt")
    assert path == tmp_path / "deep" / "er" / "ck.pt"
    assert [p.name for p in path.parent.iterdir()] == ["ck.pt"]
    back = checkpoint.load(path)
    assert torch.equal(back["w"], obj["w"]) and back["meta"] == obj["meta"] and back["kind"] == "x"
    # overwriting replaces the content, still without leftovers
    checkpoint.save({"kind": "y"}, path)
    assert checkpoint.load(path) == {"kind": "y"}
    assert [p.name for p in path.parent.iterdir()] == ["ck.pt"]


def test_failed_save_keeps_the_old_file_and_no_temp(tmp_path):
    path = checkpoint.save({"kind": "old"}, tmp_path / "ck.pt")
    before = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(Exception):
        checkpoint.save({"kind": "new", "bad": Unpicklable()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_teacher_round_trip(teacher_path, student_data):
    cfg = make_tiny_config()
    raw = checkpoint.load(teacher_path, "teacher checkpoint")
    assert raw["kind"] == "teacher" and raw["classes"] == [0, 1, 2, 3, 4] and raw["data_name"] == "digits"
    assert raw["arch"]["depth"] == 10 and raw["arch"]["width"] == 1 and raw["arch"]["n_classes"] == 5
    assert 0.0 <= raw["metrics"]["test_accuracy"] <= 1.0
    teacher = runs.load_teacher(teacher_path, cfg, student_data)
    assert isinstance(teacher, Network) and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    state = teacher.state_dict()
    assert state.keys() == raw["model"].keys()
    for k in state:
        assert torch.equal(state[k], raw["model"][k]), k
    # it embeds the student's images (the teacher is built for the source task's class count)
    with torch.no_grad():
        emb, logits = teacher(student_data.train_x[:4].float())
    assert emb.shape == (4, teacher.embedding_dim) and logits.shape == (4, 5)


# ----------------------------------------------------------------------------- refused content

CALLED: list[str] = []


def _record(marker: str) -> str:
    """What an unpickler that trusted the file would call: leaves a marker."""
    CALLED.append(marker)
    Path(marker).write_text("ran")
    return marker


class _Sneaky:
    """An object whose unpickling runs code from this module."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_record, (self.marker,))


class _Shell:
    """An object whose unpickling would call os.system (with a harmless `touch`)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {shlex.quote(self.marker)}",))


@pytest.mark.parametrize("kind", [_Sneaky, _Shell])
@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_code_in_a_pickle_is_refused_and_never_runs(tmp_path, student_data, kind, writer):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    payload = {"kind": "teacher", "model": {}, "arch": {"name": "wide_resnet"}, "x": kind(str(marker))}
    if writer == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    CALLED.clear()
    with pytest.raises(UserError) as e, warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        checkpoint.load(path, "teacher checkpoint")
    msg = one_line(e)
    assert str(path) in msg and "refused" in msg
    assert "GLOBAL" in msg or "Unsupported" in msg  # torch's reason, without its paragraphs of advice
    assert "Weights only load failed" not in msg and "documentation" not in msg
    assert warned == []  # nothing but the one line reaches the terminal
    with pytest.raises(UserError):
        runs.load_teacher(path, make_tiny_config(), student_data)
    assert not marker.exists() and CALLED == []


def test_the_sneaky_object_would_run_if_trusted(tmp_path):
    """Control: the payload above really does run code when unpickled without restriction."""
    marker = tmp_path / "marker"
    CALLED.clear()
    pickle.loads(pickle.dumps(_Sneaky(str(marker))))
    assert marker.exists() and CALLED == [str(marker)]
    CALLED.clear()


@pytest.mark.parametrize("content", ["truncated", "empty", "text", "zeros", "tail_cut"])
def test_corrupt_files_are_user_errors(tmp_path, teacher_path, content):
    path = tmp_path / "bad.pt"
    data = teacher_path.read_bytes()
    path.write_bytes({
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "text": b"hello world\nthis is not a checkpoint\n",
        "zeros": bytes(4096),
        "tail_cut": data[:-200],
    }[content])
    with pytest.raises(UserError) as e:
        checkpoint.load(path, "teacher checkpoint")
    msg = one_line(e)
    assert str(path) in msg


def test_not_a_dict(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(UserError) as e:
        checkpoint.load(path)
    assert "Tensor" in one_line(e)


def test_missing_file(tmp_path, student_data):
    with pytest.raises(UserError) as e:
        checkpoint.load(tmp_path / "nothing.pt", "teacher checkpoint")
    assert "not found" in one_line(e) and "nothing.pt" in str(e.value)
    with pytest.raises(UserError):
        runs.load_teacher(tmp_path / "nothing.pt", make_tiny_config(), student_data)


# ----------------------------------------------------------------------------- teacher mismatches

def test_teacher_of_another_architecture(teacher_path, student_data):
    cfg = make_tiny_config(teacher_depth=16)
    with pytest.raises(UserError) as e:
        runs.load_teacher(teacher_path, cfg, student_data)
    msg = one_line(e)
    assert "depth=10" in msg and "depth=16" in msg and str(teacher_path) in msg
    with pytest.raises(UserError) as e:
        runs.load_teacher(teacher_path, make_tiny_config(teacher_width=2), student_data)
    assert "width=1" in one_line(e) and "width=2" in str(e.value)
    with pytest.raises(UserError) as e:
        runs.load_teacher(teacher_path, make_tiny_config(teacher_network_name="resnet", teacher_depth=8),
                         student_data)
    assert "resnet" in one_line(e)


@pytest.mark.parametrize("source", ["0-3", "5-9", "0-9"])
def test_teacher_of_other_source_classes(teacher_path, student_data, source):
    cfg = make_tiny_config(source_classes=source)
    with pytest.raises(UserError) as e:
        runs.load_teacher(teacher_path, cfg, student_data)
    msg = one_line(e)
    assert "source classes" in msg and "[0, 1, 2, 3, 4]" in msg


def test_teacher_weights_not_matching_recorded_arch(tmp_path, teacher_path, student_data):
    raw = checkpoint.load(teacher_path)
    raw["model"] = {k: v for k, v in raw["model"].items() if not k.startswith("fc.")}
    path = checkpoint.save(raw, tmp_path / "broken.pt")
    with pytest.raises(UserError) as e:
        runs.load_teacher(path, make_tiny_config(), student_data)
    assert "does not hold a wide_resnet depth 10 width 1" in one_line(e) and "lacks fc.weight" in one_line(e)
    raw = checkpoint.load(teacher_path)
    raw["model"]["fc.weight"] = torch.zeros(7, raw["model"]["fc.weight"].shape[1])
    path = checkpoint.save(raw, tmp_path / "other_count.pt")
    with pytest.raises(UserError) as e:
        runs.load_teacher(path, make_tiny_config(), student_data)
    assert "fc.weight is (7, 64) in the file, (5, 64) here" in one_line(e)


def test_other_kind_of_checkpoint_is_no_teacher(tmp_path, student_data):
    path = checkpoint.save({"kind": "student", "student": {}, "arch": {}}, tmp_path / "student.pt")
    with pytest.raises(UserError) as e:
        runs.load_teacher(path, make_tiny_config(), student_data)
    assert "not a teacher checkpoint" in one_line(e)
