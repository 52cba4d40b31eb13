"""One typed schema for a REFILLED run, loaded from YAML and the command line.

Keys keep the names of the authors' `main.py` arguments (same defaults, see
docs) so their commands translate one to one; the keys after them are this
project's: teacher architecture and pre-training, class splits, shots, and
implementation choices. An experiment file (search_spaces/*.yaml) holds a
`config:` section of these keys, plus `search:` settings read by refilled.tune.

The schema is a pydantic model: types, ranges and choices are its fields'; what
depends on several keys is its one model validator. Each key's groups (it decides
the teacher, it acts on stage 1, on stage 1 alone, it cannot be searched) are
stated once, in its field (`key(...)`); TEACHER_KEYS, STAGE1_KEYS, STAGE1_ONLY and
NOT_SEARCHABLE are read from there. The validators say what is wrong in ValueErrors;
`from_dict` and `load_experiment` raise it as a one-line UserError naming the key
(refilled.schema._messages). A Config is frozen: `replace` makes a validated new one.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from refilled.errors import UserError
from refilled.schema._messages import flat, must, one_line, shown

DATA_NAMES = ("CIFAR-100", "CUB-200", "digits", "folder")  # folder: a folder of images in data_root
CLASS_COUNT = {"CIFAR-100": 100, "CUB-200": 200, "digits": 10}  # known before a file is read (a folder: not)
# the names a data set may be given by, compared without case, dashes, underscores or spaces
_ALIASES = {"cifar100": "CIFAR-100", "cub200": "CUB-200", "cub2002011": "CUB-200", "cub": "CUB-200",
            "digits": "digits", "sklearndigits": "digits", "folder": "folder", "imagefolder": "folder"}


def canonical_data_name(data_name: str) -> str | None:
    """The canonical name of a data set given as e.g. "cifar100" or "CUB-200-2011", or None."""
    return _ALIASES.get("".join(ch for ch in str(data_name).lower() if ch not in "-_ "))

# a key's groups (field metadata)
TEACHER = "teacher"  # decides which teacher a config needs (its cache file name)
STAGE1 = "stage1"  # decides the result of stage 1 (the stage-1 cache key)
STAGE1_ALONE = "stage1_only"  # acts on stage 1 alone (phase 1 of a staged search searches these)
FIXED = "not_searchable"  # a search refuses it


def key(default: Any, *groups: str, **constraints: Any) -> Any:
    return Field(default, json_schema_extra={"groups": list(groups)}, **constraints)


def _known_data_name(value: str) -> str:
    name = canonical_data_name(value)
    if name is None:
        raise ValueError(f"must be one of {', '.join(DATA_NAMES)}, got {shown(value)}")
    return name


def increasing(values: Any) -> Any:
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError("not increasing")
    return values


def _no_bool(value: Any) -> Any:  # `depth: true` is no number, though Python says it is 1
    if isinstance(value, bool):
        raise ValueError("not a boolean")
    return value


def _none_word(value: Any) -> Any:  # `--shots none` on the command line
    return None if isinstance(value, str) and value.strip().lower() in ("none", "null") else value


def _int_list(value: Any) -> Any:  # `--point 30,45` or `point: 60`
    if isinstance(value, str):
        return [v for v in value.replace(",", " ").split()]
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value):
        raise ValueError("not a list of numbers")
    return value


Int = Annotated[int, BeforeValidator(_no_bool), must("an integer")]
Float = Annotated[float, BeforeValidator(_no_bool), must("a number")]
OptInt = Annotated[Optional[int], BeforeValidator(_none_word), BeforeValidator(_no_bool), must("an integer or null")]
OptFloat = Annotated[Optional[float], BeforeValidator(_none_word), BeforeValidator(_no_bool), must("a number or null")]
Epochs = Annotated[tuple[Annotated[int, Field(ge=1)], ...], BeforeValidator(_int_list), AfterValidator(increasing),
                   must("strictly increasing epochs >= 1, e.g. [30, 45]", keep=())]
Bool = Annotated[bool, must("true or false")]
Str = Annotated[str, must("a string")]
DataName = Annotated[Str, AfterValidator(_known_data_name)]
AuthorsNetwork = Literal["wide_resnet", "resnet", "mobile_net"]
NETWORKS = get_args(AuthorsNetwork)
TORCHVISION = "torchvision:"  # torchvision:NAME, any classification model torchvision.models.get_model builds


def _network_name(value: Any) -> Any:
    if isinstance(value, str) and (value in NETWORKS or (value.startswith(TORCHVISION) and value != TORCHVISION)):
        return value
    raise ValueError(f"must be one of {', '.join(NETWORKS)} or torchvision:NAME (e.g. torchvision:resnet18), "
                     f"got {shown(value)}")


def _classes(value: Any) -> Any:  # positions ("0-49", "all") or a list of class names ([cat, dog])
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
            raise ValueError("not a list of class names")
        return [str(v) for v in value]
    return value


Network = Annotated[str, BeforeValidator(_network_name)]
Classes = Annotated[Union[str, list[str]], BeforeValidator(_classes),
                    must("positions ('all', '0-49', '0,3,7-9') or a list of class names ([cat, dog])", keep=())]
OptStr = Annotated[Optional[str], BeforeValidator(_none_word), must("a string or null")]
Floats3 = Annotated[Optional[tuple[float, ...]], BeforeValidator(_none_word),
                    must("null or one number a channel, e.g. [0.485, 0.456, 0.406]", keep=())]
# The teacher's depth when the config does not give one, by its family, as the authors'
# main.py builds the teacher: ResNet-110, WRN-40-2 (teacher_width 2); a MobileNet has no
# depth (teacher_ca 1.0 sizes it): 40 there, the earlier default, keeps its cache name.
TEACHER_DEPTH = {"resnet": 110, "wide_resnet": 40, "mobile_net": 40}


MOST_EPOCHS = 10_000  # a stated ceiling on every epoch count (the authors train 200): a typo is refused, not run


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True, allow_inf_nan=False,
                              validate_default=False)

    # --- the authors' arguments, their defaults -------------------------------
    data_name: DataName = key("CIFAR-100", TEACHER, STAGE1, FIXED)
    teacher_network_name: Network = key("wide_resnet", TEACHER)
    student_network_name: Network = key("wide_resnet", STAGE1)
    flag_tuning: Bool = key(False, STAGE1, FIXED)  # True: train on train, evaluate on validation
    lr1: Float = key(0.1, STAGE1, STAGE1_ALONE, gt=0)
    lr2: Float = key(0.1, gt=0)
    point: Epochs = key((100, 140, 180))
    gamma: Float = key(0.2, gt=0)
    wd: Float = key(5e-4, TEACHER, STAGE1, ge=0)
    mo: Float = key(0.9, TEACHER, STAGE1, ge=0)
    depth: Int = key(16, STAGE1)
    width: Int = key(1, STAGE1, gt=0)
    ca: Float = key(0.25, STAGE1, gt=0)
    dropout_rate: Float = key(0.3, STAGE1, ge=0, lt=1)
    n_training_epochs1: Int = key(200, STAGE1, STAGE1_ALONE, ge=0, le=MOST_EPOCHS)
    n_training_epochs2: Int = key(200, ge=1, le=MOST_EPOCHS)  # stage 2 makes the classifier
    batch_size: Int = key(128, STAGE1, gt=0)
    flag_merge: Bool = key(False, STAGE1, STAGE1_ALONE)  # stage 1 on (anchor, positive) tuples
    tau1: Float = key(4.0, STAGE1, STAGE1_ALONE, gt=0)
    tau2: Float = key(2.0, gt=0)
    lambd: Float = key(100.0, ge=0)
    # --- teacher: architecture (authors' defaults per network) and pre-training
    # not given (or null): by the teacher's family (TEACHER_DEPTH), as the authors' main.py, and not counted as
    # given (Config.given): a config built on this one chooses it again by its own family
    teacher_depth: OptInt = Field(default_factory=lambda keys: TEACHER_DEPTH.get(keys.get("teacher_network_name")),
                                  json_schema_extra={"groups": [TEACHER]}, description="by teacher_network_name: "
                                  "resnet 110, wide_resnet 40, mobile_net unused, teacher_ca sizes it")
    teacher_width: Int = key(2, TEACHER, gt=0)
    teacher_ca: Float = key(1.0, TEACHER, gt=0)
    teacher_dropout_rate: Float = key(0.3, TEACHER, ge=0, lt=1)
    teacher_lr: Float = key(0.1, TEACHER, gt=0)  # the authors' pretrain.py: SGD Nesterov, multi-step decay
    teacher_point: Epochs = key((100, 140, 180), TEACHER)
    teacher_gamma: Float = key(0.2, TEACHER, gt=0)
    teacher_epochs: Int = key(200, TEACHER, ge=0, le=MOST_EPOCHS)
    teacher_batch_size: Int = key(128, TEACHER, gt=0)
    teacher_val_fraction: Float = key(0.1, TEACHER, gt=0, lt=1)  # source images that choose the teacher's epoch
    # --- data ---------------------------------------------------------------------
    data_root: Str = key("data", FIXED)
    download: Bool = key(False, FIXED)
    image_size: OptInt = key(None, TEACHER, STAGE1, FIXED)  # digits: upsampled to this side, 3 channels
    class_order: Literal["natural", "cifar_fs"] = key("natural", TEACHER, STAGE1)  # cifar_fs: cross-task order
    source_classes: Classes = key("all", TEACHER)  # teacher's classes: positions in class_order, e.g. "0-49", or names
    target_classes: Classes = key("all", STAGE1)  # student's classes, e.g. "50-99" or [cat, dog]; overlap allowed
    shots: OptInt = key(None, STAGE1, ge=1)  # labelled images per student class (middle-shot); None = all
    val_per_class: OptInt = key(None, STAGE1, FIXED, ge=1)  # with shots: validation images from outside them
    val_fraction: Float = key(0.1, STAGE1, gt=0, lt=1)  # part of the training set held out when flag_tuning
    split_seed: Int = key(0, TEACHER, STAGE1, FIXED, ge=0)  # draws shots and validation (a search over it selects on luck)
    # a folder of one's own images (data_name: folder, data_root: DIR): docs/your-data.md
    folder_cache: OptStr = key(None, FIXED)  # where its images are decoded once (default ~/.cache/tune-refilled)
    folder_test_fraction: OptFloat = key(None, TEACHER, STAGE1, FIXED, gt=0, lt=1)  # no test/: hold out this part
    skip_bad_images: Bool = key(False, TEACHER, STAGE1, FIXED)  # leave out (with a note) files that are no images
    augmentation: Literal["auto", "crop_flip", "resized_crop"] = key("auto", TEACHER, STAGE1)  # auto: by data set
    # a torchvision teacher or student (torchvision:NAME): its weights, a state-dict file or a torchvision weights
    # name (e.g. ResNet50_Weights.IMAGENET1K_V2); the input a teacher from a file expects (default: the student's
    # image size, ImageNet's mean and std; a weights name brings its own)
    teacher_weights: OptStr = key(None, TEACHER, FIXED)
    teacher_input_size: OptInt = key(None, TEACHER, FIXED, ge=8)
    teacher_mean: Floats3 = key(None, TEACHER, FIXED)
    teacher_std: Floats3 = key(None, TEACHER, FIXED)
    student_weights: OptStr = key(None, STAGE1, FIXED)
    # --- implementation choices -----------------------------------------------------
    loss_scale1: OptFloat = key(None, STAGE1, STAGE1_ALONE, gt=0)  # stage-1 KL multiplier; None: the authors'
    tuple_negatives: Literal["all", "smallest"] = key("all", STAGE1, STAGE1_ALONE)  # flag_merge groups
    margin: Float = key(0.2, STAGE1, STAGE1_ALONE, gt=0)  # semi-hard mining margin
    centers: Literal["global", "local"] = key("global")  # whole training split, or per batch
    transfer_set: Bool = key(False)  # stage 2 also distils on the student's unlabelled images (not the authors')
    teacher_bank: Literal["auto", "on", "off"] = key("auto")  # look up teacher embeddings
    bn_stats: Literal["running", "precise"] = key("running", STAGE1, FIXED)  # evaluate with BN statistics as
    # trained, or recomputed from the current weights (docs/search.md); it changes what is measured, not trained
    seed: Int = key(0, TEACHER, STAGE1)
    device: Literal["auto", "cpu", "cuda"] = key("auto", FIXED)

    def replace(self, **changes: Any) -> "Config":
        return _validated({**self.given(), **changes})

    def given(self) -> dict[str, Any]:
        """Every key's value, except teacher_depth where it was chosen by the teacher's
        family (TEACHER_DEPTH): a config built on this one chooses it again by its own."""
        return self.model_dump(exclude=None if "teacher_depth" in self.model_fields_set else {"teacher_depth"})

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.model_dump().items()}  # YAML has no tuples

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

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, values: Any) -> Any:
        if isinstance(values, dict):
            unknown = [k for k in values if k not in cls.model_fields]
            if unknown:
                close = [k for k in cls.model_fields if k.startswith(str(unknown[0])[:3])] if str(unknown[0]) else []
                raise ValueError(f"unknown config key {shown(unknown[0])}" +
                                 (f" (did you mean {', '.join(close[:5])}?)" if close else ""))
            if _none_word(values.get("teacher_depth", 0)) is None:  # null: by the teacher's family
                values = {k: v for k, v in values.items() if k != "teacher_depth"}
        return values

    @model_validator(mode="after")
    def _together(self) -> "Config":
        """What no single key's type says: the checks that read several keys."""
        for prefix, net in (("", self.student_network_name), ("teacher_", self.teacher_network_name)):
            depth = getattr(self, prefix + "depth")
            if net == "wide_resnet" and (depth < 10 or (depth - 4) % 6):
                raise ValueError(f"config key '{prefix}depth': wide_resnet depth must be 6n+4 "
                                 f"(10, 16, 22, 28, 40, ...), got {depth}")
            if net == "resnet" and (depth < 8 or (depth - 2) % 6):
                raise ValueError(f"config key '{prefix}depth': resnet depth must be 6n+2 (8, 14, 20, 32, 56, 110, "
                                 f"...) as the authors' resnet.py asserts, got {depth}")
            if net == "mobile_net" and int(32 * getattr(self, prefix + "ca")) < 1:
                raise ValueError(f"config key '{prefix}ca' must be >= 1/32 (the stem has int(32 * ca) channels), "
                                 f"got {getattr(self, prefix + 'ca')}")
        if self.val_per_class is not None and self.shots is None:
            raise ValueError(f"config key 'val_per_class' needs 'shots' (validation images are taken from outside "
                             f"the shots), got {self.val_per_class} with shots {self.shots}")
        native = {"CIFAR-100": 32, "CUB-200": 224}.get(self.data_name)  # digits and folders: any side >= 8
        size = self.image_size
        if size is not None and (size < 8 if native is None else size != native):
            allowed = f"null or {native} (its own size)" if native else "null (digits: 8, a folder: 32) or >= 8"
            raise ValueError(f"config key 'image_size' for {self.data_name} must be {allowed}, got {size}")
        if self.transfer_set and self.shots is None:
            raise ValueError("config key 'transfer_set' needs 'shots': the transfer set is the training "
                             "images outside the shots, and without shots there are none")
        if self.transfer_set and self.centers != "global":
            raise ValueError("config key 'transfer_set' needs centers: global (an unlabelled image has no "
                             "class in the batch to take local centres from)")
        if self.data_name != "folder" and (self.folder_test_fraction is not None or self.folder_cache is not None):
            raise ValueError("config keys 'folder_test_fraction' and 'folder_cache' are for data_name: folder")
        for prefix in ("teacher_", "student_"):
            if getattr(self, prefix + "weights") and not getattr(self, prefix + "network_name").startswith(TORCHVISION):
                raise ValueError(f"config key '{prefix}weights' is for a torchvision:NAME {prefix}network_name; "
                                 f"an authors' network takes its weights from --teacher FILE")
        for name in ("teacher_mean", "teacher_std"):
            value = getattr(self, name)
            if value is not None and len(value) not in (1, 3):
                raise ValueError(f"config key '{name}' must hold one number a channel (1 or 3), got {shown(list(value))}")
        if self.class_order == "cifar_fs" and self.data_name != "CIFAR-100":
            raise ValueError("config key 'class_order': cifar_fs is the CIFAR-100 order; use 'natural' here")
        return self


FIELDS = Config.model_fields


def _group(name: str) -> list[str]:
    return [k for k, f in FIELDS.items() if name in (f.json_schema_extra or {}).get("groups", ())]


TEACHER_KEYS = _group(TEACHER)
STAGE1_KEYS = _group(STAGE1)
STAGE1_ONLY = tuple(_group(STAGE1_ALONE))
NOT_SEARCHABLE = set(_group(FIXED))


def _validated(values: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(values)
    except ValidationError as e:
        raise UserError(one_line(e, "config")) from None


@functools.cache
def _adapter(name: str) -> TypeAdapter:
    return TypeAdapter(FIELDS[name].rebuild_annotation(), config=Config.model_config)


def coerce(name: str, value: Any) -> Any:
    """`value` as the type of key `name` (its type and range only), or a UserError naming the key."""
    if name not in FIELDS:
        _validated({name: value})  # the one-line "unknown config key" error
    try:
        return _adapter(name).validate_python(value)
    except ValidationError as e:
        raise UserError(one_line(e, f"config key '{name}'")) from None


def from_dict(values: dict[str, Any], base: Config | None = None) -> Config:
    """Build a Config from `base` (default: authors' defaults) and overrides."""
    if not isinstance(values, dict):
        raise UserError(f"a config must be a mapping of keys to values, got {type(values).__name__}")
    return _validated({**base.given(), **values} if base else values)


class TrialKindNote(BaseModel):
    """Trials of another kind than the method's, as the driver that ran them notes them in
    experiment.yaml (`name`, and whatever else it says of them): they trained no REFILLED."""
    model_config = ConfigDict(extra="allow", frozen=True)
    name: str


class ExperimentFile(BaseModel):
    """An experiment file's sections: search_spaces/*.yaml, or experiment.yaml as `search`
    writes it (refilled.store.experiment_file), with the notes a search adds."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    config: Config
    search: Optional[dict[Any, Any]] = None  # refilled.schema.search.parse_search reads it (and names a bad key)
    name: Any = None
    description: Any = None
    retrain: Any = None
    stage1_choice: Optional[dict[str, Any]] = None  # a staged search's phase-1 choice
    stage1_only: Bool = False  # in phase 1's own experiment.yaml
    trial_kind: Optional[TrialKindNote] = None  # absent: the trials trained REFILLED

    @model_validator(mode="before")
    @classmethod
    def _sections(cls, data: dict[str, Any]) -> dict[str, Any]:
        for name, what in (("config", "keys to values"), ("search", "settings")):
            if data.get(name) is not None and not isinstance(data[name], dict):
                raise ValueError(f"the {name}: section must be a mapping of {what}, got {type(data[name]).__name__}")
        unknown = sorted(set(data) - set(cls.model_fields), key=str)
        if unknown:
            raise ValueError(f"unknown section {shown(unknown[0])}: expected {', '.join(sorted(cls.model_fields))}")
        return {**data, "config": data.get("config") or {}}


class _UniqueKeys(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser where PyYAML has it: 5x faster
    """YAML with a key given twice refused: PyYAML would keep the last one without a word. A
    key that is a list or a mapping is refused as PyYAML refuses it; merged keys (`<<: *base`)
    are YAML's way to give keys again, and the mapping's own keys replace them."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                raise yaml.constructor.ConstructorError(None, None, f"a key must be a single value, not a "
                                                        f"{type(key).__name__}", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {shown(key)} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping whole, turning every problem into a one-line UserError."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config file {path} is a folder: pass a YAML file in it, e.g. search_spaces/digits.yaml")
    if not path.is_file():
        raise UserError(f"config file {path} not found: pass an existing YAML file, e.g. search_spaces/digits.yaml")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not a text file (byte {e.start} is not UTF-8): pass a YAML file") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror}): check its permissions") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeys)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid syntax"
        raise UserError(flat(f"malformed YAML in {path}{where}: {problem}")) from None
    except RecursionError:
        raise UserError(f"malformed YAML in {path}: it nests lists or mappings too deep to read") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a YAML mapping (key: value lines), got {type(data).__name__}")
    return data


def load_experiment(path: str | Path) -> tuple[Config, dict[str, Any]]:
    """Read an experiment file (ExperimentFile): its config and the whole file as read.

    A file without sections (only config keys) is read as a plain config.
    """
    data = read_yaml(path)
    if not data:
        raise UserError(f"config file {path} is empty: give it a config: section (e.g. copy "
                        "search_spaces/digits.yaml), or `config: {data_name: CIFAR-100}` for the authors' defaults")
    if "config" not in data and set(data) <= set(ExperimentFile.model_fields):
        raise UserError(f"{path} has no config: section (it has {', '.join(sorted(data))}): add one with at least "
                        "data_name, e.g. as search_spaces/digits.yaml")
    try:
        if "config" in data:
            return ExperimentFile.model_validate(data).config, data
        return Config.model_validate(data), {}
    except ValidationError as e:
        raise UserError(f"{path}: {one_line(e, '' if 'config' in data else 'config')}") from None


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
