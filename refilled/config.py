"""One typed schema for a REFILLED run, loaded from YAML and the command line.

Keys keep the names of the authors' `main.py` arguments (same defaults, see
SPEC.md) so their commands translate one to one; the keys after them are this
project's: teacher architecture and pre-training, class splits, shots, and
implementation choices. An experiment file (search_spaces/*.yaml) holds a
`config:` section of these keys, plus `search:` settings read by refilled.tune.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from refilled.errors import UserError

NETWORKS = ("wide_resnet", "resnet", "mobile_net")
DATA_NAMES = ("CIFAR-100", "CUB-200", "digits")


@dataclass
class Config:
    # --- the authors' arguments, their defaults -------------------------------
    data_name: str = "CIFAR-100"
    teacher_network_name: str = "wide_resnet"
    student_network_name: str = "wide_resnet"
    flag_tuning: bool = False  # True: train on train, evaluate on validation
    lr1: float = 0.1
    lr2: float = 0.1
    point: tuple[int, ...] = (100, 140, 180)
    gamma: float = 0.2
    wd: float = 5e-4
    mo: float = 0.9
    depth: int = 16
    width: int = 1
    ca: float = 0.25
    dropout_rate: float = 0.3
    n_training_epochs1: int = 200
    n_training_epochs2: int = 200
    batch_size: int = 128
    flag_merge: bool = False  # stage 1 on (anchor, positive) tuples
    tau1: float = 4.0
    tau2: float = 2.0
    lambd: float = 100.0
    # --- teacher: architecture (authors' defaults per network) and pre-training
    teacher_depth: int = 40
    teacher_width: int = 2
    teacher_ca: float = 1.0
    teacher_dropout_rate: float = 0.3
    teacher_lr: float = 0.1  # the authors' pretrain.py: SGD Nesterov, multi-step decay
    teacher_point: tuple[int, ...] = (100, 140, 180)
    teacher_gamma: float = 0.2
    teacher_epochs: int = 200
    teacher_batch_size: int = 128
    teacher_val_fraction: float = 0.1  # source training images that choose the teacher's epoch
    # --- data ---------------------------------------------------------------------
    data_root: str = "data"
    download: bool = False
    image_size: int | None = None  # digits only: upsampled to this side, 3 channels (None: 8, their own)
    class_order: str = "natural"  # "natural" or "cifar_fs" (CIFAR-100 cross-task order)
    source_classes: str = "all"  # teacher's classes: positions in class_order, e.g. "0-49"
    target_classes: str = "all"  # student's classes, e.g. "50-99"; overlap allowed
    shots: int | None = None  # labelled images per student class (middle-shot); None = all
    val_per_class: int | None = None  # with shots: validation images a class from outside the shots
    val_fraction: float = 0.1  # part of the training set held out when flag_tuning
    split_seed: int = 0  # draws the shots and the validation part (the run's seed never does)
    # --- implementation choices -----------------------------------------------------
    loss_scale1: float | None = None  # stage-1 KL multiplier; None: the authors' (500 triplets, 1000 tuples)
    tuple_negatives: str = "all"  # flag_merge: "all" (padded groups) or "smallest" (cut to the batch's smallest, GKD)
    margin: float = 0.2  # semi-hard mining margin
    centers: str = "global"  # "global" (whole training split) or "local" (per batch)
    transfer_set: bool = False  # stage 2 also distils on the student's unlabelled images (not in SPEC)
    teacher_bank: str = "auto"  # "auto", "on" or "off": look up teacher embeddings
    bn_stats: str = "running"  # evaluate with BN statistics "running" (as trained) or "precise" (recomputed)
    seed: int = 0
    device: str = "auto"  # "auto", "cpu" or "cuda"

    def replace(self, **changes: Any) -> "Config":
        return validate(dataclasses.replace(self, **changes))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["point"], d["teacher_point"] = list(self.point), list(self.teacher_point)
        return d

    @property
    def stage1_scale(self) -> float:
        """The stage-1 loss multiplier: loss_scale1, or the authors' for the form. Their
        triplet form is 1000 x a KL averaged over 2T entries (500 x the mean over
        triplets); their tuple form 1000 x the mean over (anchor, positive) groups."""
        if self.loss_scale1 is not None:
            return self.loss_scale1
        return 1000.0 if self.flag_merge else 500.0

    def digest(self, keys: list[str] | None = None) -> str:
        """Short stable hash of some (default all) settings, for cache keys."""
        d = self.to_dict()
        if keys is not None:
            d = {k: d[k] for k in keys}
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


FIELDS = {f.name: f for f in fields(Config)}
# Tuning a non-tunable key (paths, device) makes no sense; the search refuses them.
NOT_SEARCHABLE = {"data_root", "download", "device", "flag_tuning", "data_name", "image_size", "val_per_class",
                  "split_seed",  # a search over image draws would select on luck
                  "bn_stats"}  # it changes how trials are measured, not what they train


def _type_name(f: dataclasses.Field) -> str:
    return str(f.type).replace("tuple[int, ...]", "list of ints")


def coerce(key: str, value: Any) -> Any:
    """Convert `value` to the type of `key`, or raise UserError naming the key."""
    if key not in FIELDS:
        close = [k for k in FIELDS if k.startswith(key[:3])]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown config key '{key}'{hint}")
    kind = FIELDS[key].type
    bad = UserError(f"config key '{key}' must be {_type_name(FIELDS[key])}, got {value!r}")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):  # `--flag_merge 1` arrives as YAML int 1
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad
    if kind in ("int", "int | None"):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if kind == "int":
                raise bad
            return None
        if isinstance(value, bool):
            raise bad
        if isinstance(value, float):
            if value.is_integer():
                return int(value)
            raise bad
        try:
            return int(value)
        except (TypeError, ValueError):
            raise bad from None
    if kind == "float | None" and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    if kind in ("float", "float | None"):
        if isinstance(value, bool):
            raise bad
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if not math.isfinite(value):  # nan slips through every range check below
            raise UserError(f"config key '{key}' must be a finite number, got {value!r}")
        return value
    if kind == "tuple[int, ...]":
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split()]
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad
        try:
            return tuple(coerce("depth", v) for v in value)
        except UserError:
            raise bad from None
    if kind == "str":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise bad
        return value
    raise AssertionError(f"unhandled type {kind}")


def _positive(cfg: Config, *keys: str) -> None:
    for k in keys:
        if not getattr(cfg, k) > 0:
            raise UserError(f"config key '{k}' must be > 0, got {getattr(cfg, k)}")


def validate(cfg: Config) -> Config:
    """Check values that types alone do not catch; return cfg normalised."""
    aliases = {"cifar-100": "CIFAR-100", "cifar100": "CIFAR-100", "cub-200": "CUB-200",
               "cub200": "CUB-200", "cub-200-2011": "CUB-200", "digits": "digits"}
    name = aliases.get(cfg.data_name.lower())
    if name is None:
        raise UserError(f"config key 'data_name' must be one of {', '.join(DATA_NAMES)}, got {cfg.data_name!r}")
    cfg.data_name = name
    for k in ("teacher_network_name", "student_network_name"):
        if getattr(cfg, k) not in NETWORKS:
            raise UserError(f"config key '{k}' must be one of {', '.join(NETWORKS)}, got {getattr(cfg, k)!r}")
    _positive(cfg, "tau1", "tau2", "lr1", "lr2", "teacher_lr", "gamma", "teacher_gamma", "batch_size",
              "teacher_batch_size", "width", "teacher_width", "ca", "teacher_ca", "margin")
    if cfg.loss_scale1 is not None and not cfg.loss_scale1 > 0:
        raise UserError(f"config key 'loss_scale1' must be > 0 or null (the authors' scale), got {cfg.loss_scale1}")
    for k in ("lambd", "wd", "mo", "n_training_epochs1", "n_training_epochs2", "teacher_epochs"):
        if getattr(cfg, k) < 0:
            raise UserError(f"config key '{k}' must be >= 0, got {getattr(cfg, k)}")
    for k in ("dropout_rate", "teacher_dropout_rate"):
        if not 0 <= getattr(cfg, k) < 1:
            raise UserError(f"config key '{k}' must be in [0, 1), got {getattr(cfg, k)}")
    if cfg.n_training_epochs2 < 1:
        raise UserError("config key 'n_training_epochs2' must be >= 1: stage 2 makes the classifier")
    for prefix, net in (("", cfg.student_network_name), ("teacher_", cfg.teacher_network_name)):
        depth = getattr(cfg, prefix + "depth")
        if net == "wide_resnet" and (depth < 10 or (depth - 4) % 6):
            raise UserError(f"config key '{prefix}depth': wide_resnet depth must be 6n+4 "
                            f"(10, 16, 22, 28, 40, ...), got {depth}")
        if net == "resnet" and (depth < 8 or (depth - 2) % 6):
            raise UserError(f"config key '{prefix}depth': resnet depth must be 6n+2 (8, 14, 20, 32, 56, 110, ...) "
                            f"as the authors' resnet.py asserts, got {depth}")
        if net == "mobile_net" and int(32 * getattr(cfg, prefix + "ca")) < 1:
            raise UserError(f"config key '{prefix}ca' must be >= 1/32 (the stem has int(32 * ca) channels), "
                            f"got {getattr(cfg, prefix + 'ca')}")
    for key in ("point", "teacher_point"):
        points = getattr(cfg, key)
        if any(b <= a for a, b in zip(points, points[1:])) or any(p < 1 for p in points):
            raise UserError(f"config key '{key}' must be strictly increasing epochs >= 1, got {list(points)}")
    for key in ("val_fraction", "teacher_val_fraction"):
        if not 0 < getattr(cfg, key) < 1:
            raise UserError(f"config key '{key}' must be in (0, 1), got {getattr(cfg, key)}")
    if cfg.split_seed < 0:
        raise UserError(f"config key 'split_seed' must be >= 0, got {cfg.split_seed}")
    if cfg.shots is not None and cfg.shots < 1:
        raise UserError(f"config key 'shots' must be >= 1 or null, got {cfg.shots}")
    if cfg.val_per_class is not None and (cfg.val_per_class < 1 or cfg.shots is None):
        raise UserError(f"config key 'val_per_class' must be >= 1 and needs 'shots' (validation images are "
                        f"taken from outside the shots), got {cfg.val_per_class} with shots {cfg.shots}")
    native = {"CIFAR-100": 32, "CUB-200": 224}.get(cfg.data_name)
    if cfg.image_size is not None and (cfg.image_size < 8 if native is None else cfg.image_size != native):
        allowed = f"null or {native} (its own size)" if native else "null (8, their own size) or >= 8"
        raise UserError(f"config key 'image_size' for {cfg.data_name} must be {allowed}, got {cfg.image_size}")
    choices = {"class_order": ("natural", "cifar_fs"), "centers": ("global", "local"),
               "tuple_negatives": ("all", "smallest"),
               "teacher_bank": ("auto", "on", "off"), "device": ("auto", "cpu", "cuda"),
               "bn_stats": ("running", "precise")}
    for k, allowed in choices.items():
        if getattr(cfg, k) not in allowed:
            raise UserError(f"config key '{k}' must be one of {', '.join(allowed)}, got {getattr(cfg, k)!r}")
    if cfg.transfer_set and cfg.shots is None:
        raise UserError("config key 'transfer_set' needs 'shots': the transfer set is the training "
                        "images outside the shots, and without shots there are none")
    if cfg.transfer_set and cfg.centers != "global":
        raise UserError("config key 'transfer_set' needs centers: global (an unlabelled image has no "
                        "class in the batch to take local centres from)")
    if cfg.class_order == "cifar_fs" and cfg.data_name != "CIFAR-100":
        raise UserError("config key 'class_order': cifar_fs is the CIFAR-100 order; use 'natural' here")
    return cfg


def from_dict(values: dict[str, Any], base: Config | None = None) -> Config:
    """Build a Config from `base` (default: authors' defaults) and overrides."""
    if not isinstance(values, dict):
        raise UserError(f"a config must be a mapping of keys to values, got {type(values).__name__}")
    changes = {k: coerce(k, v) for k, v in values.items()}
    return validate(dataclasses.replace(base or Config(), **changes))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning every problem into a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found: pass an existing YAML file, e.g. search_spaces/digits.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid syntax"
        raise UserError(f"malformed YAML in {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a YAML mapping (key: value lines), got {type(data).__name__}")
    return data


def load_experiment(path: str | Path) -> tuple[Config, dict[str, Any]]:
    """Read an experiment file: its `config:` section and its other sections.

    A file without sections (only config keys) is read as a plain config.
    """
    data = read_yaml(path)
    sections = {"config", "search", "retrain", "name", "description",
                "stage1_choice", "stage1_only"}  # written by a staged search into its experiment.yaml
    if "config" in data or set(data) <= sections:
        unknown = set(data) - sections
        if unknown:
            raise UserError(f"unknown section '{sorted(unknown)[0]}' in {path}: expected {', '.join(sorted(sections))}")
        try:
            return from_dict(data.get("config") or {}), data
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
    try:
        return from_dict(data), {}
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings (values parsed as YAML scalars) into a dict."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"override {pair!r} must look like key=value, e.g. tau1=2")
        key, raw = pair.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out
