"""The `search:` section of an experiment file: space, ASHA, resources, faults.

Example (search_spaces/digits.yaml)::

    search:
      num_samples: 16
      space:                    # loguniform, uniform, randint, lograndint ([low, high): high
                                # excluded, as Ray's tune.randint), choice
        tau1:  {loguniform: [0.5, 16]}
        lambd: {loguniform: [0.1, 100]}
        flag_merge: {choice: [false, true]}
      start_with: authors       # first trial: the authors' defaults (or: config, none, or an
                                # earlier experiment's folder or URI: its top trials run first)
      asha: {grace_period: 10, reduction_factor: 3}   # rungs at 10, 30, 90, ... epochs
                                # or placed: {rungs: [30, 60], reduction_factor: 3}
      resources: {cpu: 1, gpu: 0}   # per trial; gpu may be fractional (0.25)
      max_concurrent: 2
      max_failures: 1
      checkpoint_every: 5       # epochs between trial checkpoints
      keep_checkpoints: 2
      reuse_actors: true        # a trial runs in the process of the one before it (no start-up)
      seed: 0
      sampler: tpe              # Optuna's TPE; random: Optuna's RandomSampler (the baseline searches are measured against)
      select: {top_k: 3, seeds: 3}  # re-run the 3 best trials with 3 more seeds; the best mean wins
      budget_hours: 10          # optional: no new trial once this many device hours are spent
      staged:                   # optional: two phases instead of one joint search
        num_samples: 8          # phase 1: stage 1 only, its keys (tau1, lr1, ...) ranked by NCM
        asha: {grace_period: 5, reduction_factor: 3}

A staged search first searches the keys that act only on stage 1
(`STAGE1_ONLY`) with stage-1-only trials ranked by their last validation NCM
accuracy, then searches the other keys with trials that all start stage 2
from the chosen embedding (ASHA's clock then counts stage-2 epochs).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictStr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from refilled.errors import UserError
from refilled.schema._messages import must, one_line, shown
from refilled.schema.config import FIELDS, NOT_SEARCHABLE, STAGE1_KEYS, STAGE1_ONLY, Config, coerce, from_dict, increasing
from refilled.schema.rungs import counted_epochs, rung_epochs

DEFAULT_SPACE = {"tau1": {"loguniform": [0.5, 16.0]}, "tau2": {"loguniform": [0.5, 8.0]},
                 "lambd": {"loguniform": [0.1, 100.0]}, "lr1": {"loguniform": [0.005, 0.2]},
                 "lr2": {"loguniform": [0.005, 0.2]}}


def _number(value: Any) -> Any:  # `num_samples: "8"` or `true` is a mistake, not a number
    if isinstance(value, (bool, str)):
        raise ValueError("not a number")
    return value


Count = Annotated[int, BeforeValidator(_number), must("a whole number")]
Number = Annotated[float, BeforeValidator(_number), must("a number")]


class _Dist(BaseModel):
    """One key's distribution, written with its kind as its one key: {loguniform: [0.5, 16]}."""
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @property
    def kind(self) -> str:
        return next(iter(type(self).model_fields))

    @property
    def args(self) -> list:
        return getattr(self, self.kind)


class _Range(_Dist):
    """[low, high] (randint, lograndint: [low, high), high excluded, as Ray's tune.randint)."""

    @model_validator(mode="after")
    def _ordered(self) -> "_Range":
        low, high = self.args
        if not low < high:
            raise ValueError(f": low must be below high, got {self.args}")
        if self.kind.startswith("log") and low <= 0:
            raise ValueError(f": bounds must be > 0 on a log scale, got {self.args}")
        return self


Floats = Annotated[list[Annotated[Union[int, float], BeforeValidator(_number)]], Field(min_length=2, max_length=2),
                   must("two numbers [low, high]", keep=())]
Ints = Annotated[list[Count], Field(min_length=2, max_length=2), must("two whole numbers [low, high)", keep=())]


class LogUniform(_Range):
    loguniform: Floats


class Uniform(_Range):
    uniform: Floats


class RandInt(_Range):
    randint: Ints


class LogRandInt(_Range):
    lograndint: Ints


class Choice(_Dist):
    choice: Annotated[list[Any], Field(min_length=1), must("a list of at least one value, e.g. [false, true]", keep=())]


KINDS = {next(iter(kind.model_fields)): kind for kind in (LogUniform, Uniform, RandInt, LogRandInt, Choice)}


def _one_kind(value: Any) -> Any:
    if isinstance(value, _Dist):
        return value
    if not isinstance(value, dict) or len(value) != 1:
        raise ValueError(f"must be one of {{{', '.join(KINDS)}: ...}}, e.g. {{loguniform: [0.5, 16]}}")
    if next(iter(value)) not in KINDS:
        raise ValueError(f": unknown distribution {shown(next(iter(value)))}; use one of {', '.join(KINDS)}")
    return value


# a key's distribution: the model of its kind, chosen by its one key
Distribution = Annotated[Union[tuple(Annotated[kind, Tag(name)] for name, kind in KINDS.items())],
                         Discriminator(lambda v: v.kind if isinstance(v, _Dist) else next(iter(v))),
                         BeforeValidator(_one_kind)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _known(cls, values: Any) -> Any:
        unknown = [k for k in values if k not in cls.model_fields] if isinstance(values, dict) else []
        if unknown:
            raise PydanticCustomError("unknown_setting", "unknown setting '{name}'", {
                "name": unknown[0], "takes": ", ".join(k for k in cls.model_fields if k != "fixed")})
        return values


class Asha(_Section):
    """ASHA's rungs: geometric from grace_period, or placed (`rungs`, refilled.schema.rungs)."""
    grace_period: Count = Field(10, ge=1)
    reduction_factor: Number = Field(3, gt=1)
    rungs: Optional[Annotated[list[Annotated[Count, Field(ge=1)]], Field(min_length=1), AfterValidator(increasing),
                              must("a list of increasing epochs >= 1, e.g. [30, 60]", keep=())]] = None

    @model_validator(mode="after")
    def _first_rung_is_the_grace_period(self) -> "Asha":
        if self.rungs:
            if "grace_period" in self.model_fields_set and self.grace_period != self.rungs[0]:
                raise ValueError(f": grace_period {self.grace_period} and rungs {self.rungs} disagree (the first "
                                 "rung is the grace period): give one of them")
            self.grace_period = self.rungs[0]
        return self


class Resources(_Section):
    cpu: Number = Field(1, gt=0)
    gpu: Number = Field(0, ge=0)

    @model_validator(mode="after")
    def _whole_gpus_above_one(self) -> "Resources":
        if self.gpu > 1 and not float(self.gpu).is_integer():
            raise ValueError(f".gpu may be a fraction only below 1 (0.25 packs four trials on a GPU), got {self.gpu}")
        return self


MOST_TRIALS = 100_000  # a stated ceiling on num_samples: a typo is refused, not queued


class Select(_Section):
    top_k: Count = Field(3, ge=0)  # trials re-evaluated after the search (0: the best single trial wins)
    seeds: Count = Field(3, ge=1, le=1000)  # seeds each of them runs again with


class Staged(_Section):
    """Phase 1 of a staged search: how many stage-1-only trials, and their ASHA."""
    num_samples: Count = Field(8, ge=1, le=MOST_TRIALS)
    asha: Asha = Field(default_factory=lambda: Asha(grace_period=5))


class SearchSettings(_Section):
    """The `search:` section as it is written (refilled.schema.search: the example above)."""
    space: dict[str, Distribution] = Field(default_factory=lambda: dict(DEFAULT_SPACE), validate_default=True)
    num_samples: Count = Field(16, ge=1, le=MOST_TRIALS)
    start_with: Annotated[Optional[StrictStr], must("authors, config, none or an experiment's folder or URI")
                          ] = "authors"  # "authors", "config", "none", or an earlier experiment
    asha: Asha = Field(default_factory=Asha)
    resources: Resources = Field(default_factory=Resources)
    max_concurrent: Count = Field(0, ge=0)  # 0: as many as resources allow
    max_failures: Count = Field(1, ge=0)
    checkpoint_every: Count = Field(1, ge=1)
    keep_checkpoints: Count = Field(2, ge=1)
    # a trial tells Tune what it decides on (rungs, checkpoints, the end) and at least this often;
    # every epoch is in its own files (refilled.tune.trial_report). 0: every epoch to Tune
    report_every_s: Number = Field(30, ge=0)
    # Ray starts the next trial in the ended trial's worker process: no Python, torch and
    # data start-up per trial (half the wall time of a small CPU search). Trials seed
    # everything themselves, so results do not change.
    reuse_actors: Annotated[StrictBool, must("true or false")] = True
    seed: Count = 0
    sampler: Annotated[Literal["tpe", "random"], must("tpe or random")] = "tpe"
    staged: Optional[Staged] = None
    select: Select = Field(default_factory=Select)
    budget_hours: Annotated[Optional[Number], Field(gt=0), must("a number of device hours > 0", keep=())
                            ] = None  # device hours after which no new trial starts
    fixed: dict[str, Any] = Field(default_factory=dict, exclude=True)  # phase 2: phase 1's choice, in every trial

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, values: Any) -> Any:
        if isinstance(values, dict):
            values = dict(values)
            if values.get("staged") is True:  # `staged: true`: the defaults
                values["staged"] = {}
            if values.get("staged") is False:
                values["staged"] = None
            if "start_with" in values and values["start_with"] is None:
                values["start_with"] = "none"
        return values

    @field_validator("space", mode="before")
    @classmethod
    def _searchable(cls, space: Any) -> Any:
        if not isinstance(space, dict) or not space:
            raise ValueError("must be a mapping of config keys to distributions")
        for key in space:
            if key not in FIELDS:
                raise ValueError(f".{key}: unknown config key {shown(key)} (searchable keys are the config keys, "
                                 "e.g. tau1, lambd, lr1)")
            if key in NOT_SEARCHABLE:
                raise ValueError(f".{key}: '{key}' cannot be searched; set it in the config section")
        return space

    @field_validator("space")
    @classmethod
    def _of_their_keys(cls, space: dict[str, _Dist], info: ValidationInfo) -> dict[str, _Dist]:
        """Each value (choice) or bound as its key's type, and each a valid config with the
        others of `base` (the validation context's; without one, unchecked)."""
        base = (info.context or {}).get("base")
        for key, dist in space.items() if base else ():
            values = []
            for value in dist.args:
                try:
                    values.append(coerce(key, value))
                    from_dict({key: values[-1]}, base)
                except UserError as e:
                    raise ValueError(f".{key}: value {shown(value)} is not allowed ({e})") from None
            space[key] = type(dist).model_validate({dist.kind: values})  # an int range stays whole
        return space

    @model_validator(mode="after")
    def _phases(self) -> "SearchSettings":
        if self.staged is None:
            return self
        first, second = self.phase_spaces()
        both = sorted(set(self.space) & (set(STAGE1_KEYS) - set(STAGE1_ONLY)))
        if both:
            raise ValueError(f".staged: {', '.join(both)} act on both stages, so phase 1 cannot choose them "
                             "alone: fix them in the config section or drop staged")
        if not first or not second:
            raise ValueError(f".staged needs keys of both phases in search.space: stage-1 keys "
                             f"({', '.join(STAGE1_ONLY)}) and stage-2 keys (e.g. tau2, lambd, lr2); got "
                             f"{', '.join(self.space)}")
        return self

    def phase_spaces(self) -> tuple[dict, dict]:
        """(stage-1-only keys, the others) of the space: phase 1 and phase 2 of a staged search."""
        first = {k: v for k, v in self.space.items() if k in STAGE1_ONLY}
        return first, {k: v for k, v in self.space.items() if k not in STAGE1_ONLY}

    def phase(self, which: int, fixed: dict[str, Any] | None = None) -> "SearchSettings":
        """The settings one phase of a staged search runs with: its part of the space
        (phase 2 also gets phase 1's choice, `fixed`, as constants in every trial's config)."""
        first, second = self.phase_spaces()
        if which == 1:
            return self.model_copy(update={"space": first, "num_samples": self.staged.num_samples, "staged": None,
                                           "asha": self.staged.asha})
        return self.model_copy(update={"space": second, "staged": None, "fixed": dict(fixed or {})})

    def param_space(self) -> dict[str, Any]:
        """Tune's param_space: the constants every trial gets (phase 2: phase 1's choice).
        The searched keys come from the searcher (refilled.tune.searcher), which owns the space."""
        return dict(self.fixed)

    def rung_epochs(self, max_t: int) -> list[int]:
        """The epochs at which ASHA compares this phase's trials (refilled.schema.rungs)."""
        return rung_epochs(self.asha.grace_period, self.asha.reduction_factor, max_t, self.asha.rungs)

    def is_log(self, key: str) -> bool:
        return self.space[key].kind in ("loguniform", "lograndint")

    def fixed_points(self, cfg: Config) -> list[dict[str, Any]]:
        """The configuration queued as the first trial when `start_with` is authors or
        config (none: no point). An earlier experiment's top trials are the store's to
        read (refilled.store.experiments.first_points)."""
        if self.start_with not in ("authors", "config"):
            return []
        source = Config() if self.start_with == "authors" else cfg
        point = {k: getattr(source, k) for k in self.space}
        for key, value in point.items():
            if not self.inside(key, value):
                raise UserError(f"search.start_with '{self.start_with}' puts {key}={value} outside its space "
                                f"{dict(self.space[key])}: widen the space or use start_with: none")
        return [point]

    def inside(self, key: str, value: Any) -> bool:
        """Whether `value` lies in the space of `key`."""
        dist = self.space[key]
        if dist.kind == "choice":
            return value in dist.args
        low, high = dist.args  # randint, lograndint: [low, high), high excluded, as Ray's tune.randint
        return low <= value < high if dist.kind.endswith("randint") else low <= value <= high

    def to_section(self) -> dict[str, Any]:
        """The `search:` section these settings read back from (experiment.yaml)."""
        return self.model_dump(exclude_none=True)


def distributions(space: dict[str, Any]) -> dict:
    """The search space (SearchSettings.space, or as experiment.yaml holds it) as Optuna's
    distributions (the searcher asks with them; the analysis rebuilds trials with them)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, dist in space.items():
        (kind, args), = dict(dist).items()
        if kind == "choice":
            out[key] = CategoricalDistribution(list(args))
        elif kind in ("uniform", "loguniform"):
            out[key] = FloatDistribution(float(args[0]), float(args[1]), log=kind == "loguniform")
        else:  # randint, lograndint: [low, high), high excluded, as Ray's tune.randint
            out[key] = IntDistribution(int(args[0]), int(args[1]) - 1, log=kind == "lograndint")
    return out


def parse_search(section: dict[str, Any] | None, base: Config) -> SearchSettings:
    """Validate the `search:` section with its config; every problem is a one-line UserError."""
    try:
        settings = SearchSettings.model_validate({} if section is None else section, context={"base": base})
    except ValidationError as e:
        raise UserError(one_line(e, "search")) from None
    settings.fixed_points(base)  # an earlier experiment (start_with: PATH) is read when the search starts
    return settings


def check_rungs_within(s: SearchSettings, cfg: Config) -> None:
    """A rung the user placed beyond the epochs its trials run could never stop one: said,
    with the end (for a new search; an experiment.yaml read back holds every default)."""

    staged = s.staged is not None
    phases = [("search.asha", s.asha, counted_epochs(cfg, from_stage1=staged),
               "stage-2 epochs (phase 2)" if staged else "epochs of both stages")]
    if staged:
        phases.append(("search.staged.asha", s.staged.asha, counted_epochs(cfg, stage1_only=True),
                       "stage-1 epochs (phase 1)"))
    for where, asha, end, unit in phases:
        if not asha.model_fields_set & {"grace_period", "rungs"}:
            continue  # the default grace period: no rung in a short run is no mistake of the user's
        beyond = [r for r in (asha.rungs or [asha.grace_period]) if r > end]
        if beyond:
            raise UserError(f"{where}: rung {beyond[0]} is beyond the {end} {unit} its trials run, so ASHA could "
                            f"never stop a trial there: use rungs below {end} (grace_period {end}: every trial "
                            "runs to the end)")
