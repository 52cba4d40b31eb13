"""refilled.schema.config: the authors' defaults, YAML loading, overrides and validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from refilled.data import sources
from refilled.errors import UserError
from refilled.schema.config import FIELDS, TEACHER_KEYS, Config, from_dict, load_experiment, parse_overrides, read_yaml

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "search_spaces").glob("*.yaml"))


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg.strip() and "\n" not in msg, repr(msg)
    return msg


# ----------------------------------------------------------------------------- defaults

AUTHORS = {
    "data_name": "CIFAR-100",
    "teacher_network_name": "wide_resnet",
    "student_network_name": "wide_resnet",
    "lr1": 0.1,
    "lr2": 0.1,
    "point": (100, 140, 180),
    "gamma": 0.2,
    "wd": 5e-4,
    "mo": 0.9,
    "depth": 16,
    "width": 1,
    "ca": 0.25,
    "dropout_rate": 0.3,
    "n_training_epochs1": 200,
    "n_training_epochs2": 200,
    "batch_size": 128,
    "flag_merge": False,
    "tau1": 4,
    "tau2": 2,
    "lambd": 100,
    "flag_tuning": False,
}


@pytest.mark.parametrize("key", sorted(AUTHORS))
def test_defaults_are_the_authors(key):
    assert getattr(Config(), key) == AUTHORS[key]


def test_default_config_validates_and_teacher_defaults():
    cfg = from_dict({})
    assert cfg == Config()
    # SPEC and the authors' pretrain.py: the WRN teacher is WRN-40-2, pre-trained with SGD Nesterov
    # lr 0.1, multi-step decay at (100, 140, 180) by 0.2, 200 epochs, batch 128
    assert (cfg.teacher_depth, cfg.teacher_width, cfg.teacher_lr, cfg.teacher_epochs, cfg.teacher_batch_size) == \
        (40, 2, 0.1, 200, 128)
    assert cfg.teacher_point == (100, 140, 180) and cfg.teacher_gamma == 0.2
    assert cfg.loss_scale1 is None and cfg.margin == 0.2 and cfg.tuple_negatives == "all"


def test_stage1_scale_is_the_authors_for_each_form_unless_set():
    # their triplet form: 1000 x KLDivLoss(batchmean) over the (2T, 1) stack of [p, 1-p] = 500 x the
    # mean over triplets; their tuple form (flag_merge): 1000 x the mean over groups
    assert Config().stage1_scale == 500.0
    assert Config(flag_merge=True).stage1_scale == 1000.0
    assert from_dict({"flag_merge": True, "loss_scale1": 250}).stage1_scale == 250.0
    assert from_dict({"loss_scale1": "null"}).loss_scale1 is None


def test_to_dict_and_digest():
    cfg = Config()
    d = cfg.to_dict()
    assert d["point"] == [100, 140, 180] and set(d) == set(FIELDS)
    assert from_dict(d) == cfg
    assert cfg.digest() == Config().digest()
    assert cfg.digest() != cfg.replace(tau1=3).digest()
    assert cfg.digest(["data_name"]) == cfg.replace(tau1=3).digest(["data_name"])


# ----------------------------------------------------------------------------- YAML

def test_experiment_file_with_config_section(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: demo\nconfig:\n  data_name: digits\n  tau1: 2\n  point: [3, 5]\n"
                    "  flag_merge: true\n  shots: 10\nsearch:\n  num_samples: 4\n")
    cfg, sections = load_experiment(path)
    assert cfg.data_name == "digits" and cfg.tau1 == 2.0 and isinstance(cfg.tau1, float)
    assert cfg.point == (3, 5) and cfg.flag_merge is True and cfg.shots == 10
    assert cfg.lr1 == 0.1  # untouched keys keep the defaults
    assert sections["search"] == {"num_samples": 4} and sections["name"] == "demo"


@pytest.mark.parametrize("given, canonical", [("Cifar_100", "CIFAR-100"), ("CUB", "CUB-200"),
                                               ("cub_200_2011", "CUB-200"), ("sklearn-digits", "digits")])
def test_config_takes_every_name_the_loader_takes(given, canonical):
    # one alias table: a name the data loader knows is never refused by the config
    assert Config(data_name=given).data_name == canonical == sources.canonical_data_name(given)


def test_flat_config_file(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text("data_name: cifar100\nlambd: 5\nbatch_size: 64\nshots: null\n")
    cfg, sections = load_experiment(path)
    assert sections == {}
    assert cfg.data_name == "CIFAR-100"  # aliases normalised
    assert cfg.lambd == 5.0 and cfg.batch_size == 64 and cfg.shots is None


def test_empty_or_section_less_files_are_named_as_such(tmp_path):
    # an empty file used to mean the authors' CIFAR-100 run, and its error was about downloading it
    for text, needle in [("", "is empty"), ("search:\n  num_samples: 4\n", "has no config: section"),
                         ("config: [1, 2]\n", "config: section must be a mapping"),
                         ("config:\n  tau1: 1\nsearch: [1]\n", "search: section must be a mapping")]:
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(UserError) as e:
            load_experiment(path)
        assert needle in one_line(e) and str(path) in str(e.value)


def test_files_are_read_whole_or_refused(tmp_path):
    binary = tmp_path / "random.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    twice = tmp_path / "twice.yaml"
    twice.write_text("config:\n  tau1: 1\n  tau1: 2\n")
    for path, needle in [(binary, "is not a text file"), (twice, "key 'tau1' is given twice"),
                         (tmp_path, "is a folder")]:
        with pytest.raises(UserError) as e:
            load_experiment(path)
        assert needle in one_line(e), str(e.value)


def test_shipped_files_exist():
    assert SHIPPED, "search_spaces/*.yaml should ship at least one experiment"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_file_loads(path):
    cfg, sections = load_experiment(path)
    assert isinstance(cfg, Config)
    assert isinstance(read_yaml(path), dict)


def test_crosstask_file_is_the_journal_codes_setting():
    """njulus/GKD: CIFAR-FS order, teacher on positions 0-49, student on 50-99; tuple form at
    1000 x, groups cut to the batch's smallest K; milestones (50, 100, 150); tau2 1, lambd 1,
    batch 256; the teacher pre-trained with the same milestones."""
    cfg, _ = load_experiment(REPO / "search_spaces" / "cifar100_crosstask.yaml")
    assert (cfg.class_order, cfg.source_classes, cfg.target_classes) == ("cifar_fs", "0-49", "50-99")
    assert cfg.flag_merge and cfg.tuple_negatives == "smallest" and cfg.stage1_scale == 1000.0
    assert cfg.point == (50, 100, 150) and cfg.gamma == 0.2 and cfg.teacher_point == (50, 100, 150)
    assert (cfg.tau1, cfg.tau2, cfg.lambd, cfg.batch_size, cfg.lr1, cfg.lr2) == (4, 1, 1, 256, 0.1, 0.1)
    assert (cfg.student_network_name, cfg.depth) == ("resnet", 14)  # their ResNet-16 without its failing assert


def test_embedded_default_is_the_papers_cross_task_setting():
    """Teacher and student on disjoint digits, few shots, no transfer set, the authors' input
    size; trials ranked on at least 150 validation images outside the shots (one image moves
    the metric by under a point), and the final run trains on the same shots."""
    from refilled.data.splits import student_task
    from refilled.runs.inputs import source_for

    cfg, _ = load_experiment(REPO / "search_spaces" / "digits.yaml")
    assert (cfg.source_classes, cfg.target_classes, cfg.transfer_set, cfg.image_size) == ("0-4", "5-9", False, 32)
    assert cfg.shots == 5
    tuning = student_task(source_for(cfg), cfg.replace(flag_tuning=True))
    final = student_task(source_for(cfg), cfg)
    assert len(tuning.eval.labels) >= 150 and tuning.eval.images.shape[1:] == (3, 32, 32)
    assert np.array_equal(tuning.train.images, final.train.images)


def test_tiny_experiment_file(tiny_yaml):
    from support.configs import make_tiny_config

    cfg, sections = load_experiment(tiny_yaml)
    assert cfg == make_tiny_config() and set(sections) == {"config"}


# ----------------------------------------------------------------------------- bad input

def test_malformed_yaml_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("config:\n  tau1: 2\n  lambd: [1, 2\n  tau2: 3\n")
    with pytest.raises(UserError) as e:
        load_experiment(path)
    msg = one_line(e)
    assert "malformed YAML" in msg and str(path) in msg and "line " in msg
    line = int(msg.split("line ")[1].split(",")[0])
    assert 3 <= line <= 5


def test_malformed_yaml_tab_indent(tmp_path):
    path = tmp_path / "tab.yaml"
    path.write_text("tau1: 2\n\tlambd: 3\n")
    with pytest.raises(UserError) as e:
        load_experiment(path)
    assert "line 2" in one_line(e)


def test_missing_file(tmp_path):
    with pytest.raises(UserError) as e:
        load_experiment(tmp_path / "nope.yaml")
    assert "not found" in one_line(e)


def test_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(UserError) as e:
        load_experiment(path)
    assert "mapping" in one_line(e)


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "unknown.yaml"
    path.write_text("config:\n  tau3: 1\n")
    with pytest.raises(UserError) as e:
        load_experiment(path)
    msg = one_line(e)
    assert "'tau3'" in msg and str(path) in msg
    assert "tau1" in msg  # a hint at the close names


def test_unknown_section(tmp_path):
    path = tmp_path / "section.yaml"
    path.write_text("config:\n  tau1: 1\nserach:\n  x: 1\n")
    with pytest.raises(UserError) as e:
        load_experiment(path)
    assert "serach" in one_line(e)


BAD = [
    ({"tau1": "abc"}, "tau1"),
    ({"batch_size": 1.5}, "batch_size"),
    ({"batch_size": "many"}, "batch_size"),
    ({"flag_merge": "maybe"}, "flag_merge"),
    ({"flag_tuning": 2}, "flag_tuning"),
    ({"point": "a,b"}, "point"),
    ({"point": {"x": 1}}, "point"),
    ({"depth": True}, "depth"),
    ({"data_name": ["digits"]}, "data_name"),
    ({"tau1": 0}, "tau1"),
    ({"tau1": -1}, "tau1"),
    ({"tau2": 0}, "tau2"),
    ({"lambd": -1}, "lambd"),
    ({"lr1": 0}, "lr1"),
    ({"lr2": -0.1}, "lr2"),
    ({"teacher_lr": 0}, "teacher_lr"),
    ({"batch_size": 0}, "batch_size"),
    ({"depth": 15}, "depth"),
    ({"teacher_depth": 15}, "teacher_depth"),
    ({"student_network_name": "resnet", "depth": 17}, "depth"),
    ({"student_network_name": "resnet", "depth": 16}, "depth"),  # the journal code's ResNet-16 fails their assert
    ({"student_network_name": "mobile_net", "ca": 0.01}, "ca"),
    ({"loss_scale1": 0}, "loss_scale1"),
    ({"tuple_negatives": "some"}, "tuple_negatives"),
    ({"image_size": 64}, "image_size"),  # CIFAR-100 is 32 px
    ({"data_name": "digits", "image_size": 4}, "image_size"),
    ({"val_per_class": 10}, "val_per_class"),  # needs shots
    ({"shots": 5, "val_per_class": 0}, "val_per_class"),
    ({"teacher_point": [50, 50]}, "teacher_point"),
    ({"teacher_val_fraction": 1.0}, "teacher_val_fraction"),
    ({"teacher_network_name": "resnet", "teacher_depth": 17}, "teacher_depth"),
    ({"point": [140, 100]}, "point"),
    ({"point": [0, 10]}, "point"),
    ({"shots": 0}, "shots"),
    ({"data_name": "digits", "class_order": "cifar_fs"}, "class_order"),
    ({"data_name": "mnist"}, "data_name"),
    ({"student_network_name": "vgg"}, "student_network_name"),
    ({"dropout_rate": 1.0}, "dropout_rate"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"split_seed": -1}, "split_seed"),
    ({"transfer_set": True}, "transfer_set"),  # no shots: no images outside them
    ({"transfer_set": True, "shots": 5, "centers": "local"}, "transfer_set"),
    ({"n_training_epochs2": 0}, "n_training_epochs2"),
    ({"n_training_epochs1": -1}, "n_training_epochs1"),
    ({"centers": "both"}, "centers"),
    ({"teacher_bank": "maybe"}, "teacher_bank"),
    ({"device": "tpu"}, "device"),
    ({"lambd": float("nan")}, "lambd"),
    ({"wd": float("nan")}, "wd"),
    ({"lr1": float("inf")}, "lr1"),
]


@pytest.mark.parametrize("values,key", BAD, ids=[f"{k}={v!r}" for v, k in BAD])
def test_bad_values_raise_one_line_user_error_naming_the_key(values, key):
    with pytest.raises(UserError) as e:
        from_dict(values)
    assert f"'{key}'" in one_line(e)


@pytest.mark.parametrize("values,key", BAD[:6], ids=[f"{k}" for _, k in BAD[:6]])
def test_bad_values_in_a_file_name_file_and_key(tmp_path, values, key):
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"config": values}))
    with pytest.raises(UserError) as e:
        load_experiment(path)
    msg = one_line(e)
    assert f"'{key}'" in msg and str(path) in msg


def test_valid_depths_accepted():
    assert from_dict({"depth": 10}).depth == 10
    assert from_dict({"depth": 40, "width": 2}).depth == 40
    for d in (8, 14, 20, 32, 56, 110):
        assert from_dict({"student_network_name": "resnet", "depth": d}).depth == d
    # mobile_net ignores depth
    assert from_dict({"student_network_name": "mobile_net", "depth": 15}).depth == 15
    assert from_dict({"class_order": "cifar_fs"}).class_order == "cifar_fs"  # on CIFAR-100


def test_coercions():
    cfg = from_dict({"tau1": "2.5", "flag_merge": "yes", "point": "30, 45",
                     "shots": "none", "lambd": 0, "n_training_epochs1": 0, "batch_size": 64.0})
    assert from_dict({"batch_size": "32"}).batch_size == 32
    assert cfg.tau1 == 2.5 and cfg.flag_merge is True and cfg.point == (30, 45)
    assert cfg.shots is None and cfg.lambd == 0.0 and cfg.n_training_epochs1 == 0
    assert cfg.batch_size == 64 and isinstance(cfg.batch_size, int)
    assert from_dict({"point": 7}).point == (7,)
    assert from_dict({"flag_merge": "False"}).flag_merge is False
    # what `--flag_merge 1` / `--set flag_tuning=0` give after YAML parsing
    assert from_dict(parse_overrides(["flag_merge=1", "flag_tuning=0"])) == Config(flag_merge=True)


def test_replace_validates():
    with pytest.raises(UserError):
        Config().replace(tau1=0)
    assert Config().replace(tau1=3).tau1 == 3


# ----------------------------------------------------------------------------- overrides

def test_parse_overrides_yaml_scalars():
    got = parse_overrides(["tau1=2", "point=[30,45]", "flag_merge=true", "data_name=digits",
                           "shots=", "source_classes=0-49", "x=a=b"])
    assert got == {"tau1": 2, "point": [30, 45], "flag_merge": True, "data_name": "digits",
                   "shots": None, "source_classes": "0-49", "x": "a=b"}
    assert parse_overrides(["bad=[1,"]) == {"bad": "[1,"}  # not YAML: kept as text
    cfg = from_dict(parse_overrides(["tau1=2", "point=[30,45]", "lr1=1e-3"]), from_dict({"lambd": 3}))
    assert cfg.tau1 == 2.0 and cfg.point == (30, 45) and cfg.lr1 == 1e-3 and cfg.lambd == 3.0


def test_parse_overrides_refuses_missing_equals():
    with pytest.raises(UserError) as e:
        parse_overrides(["tau1"])
    assert "key=value" in one_line(e)


def test_override_unknown_key():
    with pytest.raises(UserError) as e:
        from_dict(parse_overrides(["foo=1"]))
    assert "'foo'" in one_line(e)


@pytest.mark.parametrize("family, depth", [("resnet", 110), ("wide_resnet", 40)])
def test_teacher_depth_follows_the_teachers_family_as_the_authors_main(family, depth):
    """Their main.py: teacher ResNet-110, WRN-40-2, MobileNet ca 1.0, whatever the student."""
    cfg = from_dict({"teacher_network_name": family})
    assert cfg.teacher_depth == depth and cfg.to_dict()["teacher_depth"] == depth
    assert from_dict(cfg.to_dict()) == cfg  # experiment files and trials write the number and read it back
    if family == "wide_resnet":
        assert cfg.teacher_width == 2


def test_a_resnet_teacher_without_teacher_depth_is_accepted_on_any_base():
    wrn = from_dict({"teacher_network_name": "wide_resnet"})
    assert from_dict({"teacher_network_name": "resnet"}, wrn).teacher_depth == 110
    assert wrn.replace(teacher_network_name="resnet").teacher_depth == 110
    assert from_dict({"teacher_network_name": "mobile_net"}).teacher_ca == 1.0


def test_a_given_teacher_depth_is_kept():
    given = from_dict({"teacher_network_name": "resnet", "teacher_depth": 20})
    assert given.teacher_depth == 20 and given.replace(seed=3).teacher_depth == 20
    assert from_dict({"teacher_depth": 16}).replace(teacher_network_name="wide_resnet").teacher_depth == 16
    with pytest.raises(UserError, match="teacher_depth"):
        given.replace(teacher_network_name="wide_resnet")  # 20 is no WRN depth: given, so not chosen again


def test_the_default_teachers_cache_name_is_unchanged_by_the_family_default():
    """The depth chosen by family is the number a config that gives it holds: same teacher, same file."""
    name = lambda cfg: cfg.digest(TEACHER_KEYS)  # noqa: E731  (runs.default_teacher_path's part of it)
    assert name(Config()) == name(from_dict({"teacher_depth": 40}))
    mobile = from_dict({"teacher_network_name": "mobile_net"})
    assert name(mobile) == name(mobile.replace(teacher_depth=40))
