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

from typing import Annotated, Any, Optional

from pydantic_core import PydanticCustomError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError, model_validator

from refilled.schema.rungs import counted_epochs, rung_epochs
from refilled.schema.config import FIELDS, NOT_SEARCHABLE, STAGE1_KEYS, STAGE1_ONLY, Config, coerce, from_dict
from refilled.errors import UserError

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "lograndint", "choice")
DEFAULT_SPACE = {"tau1": {"loguniform": [0.5, 16.0]}, "tau2": {"loguniform": [0.5, 8.0]},
                 "lambd": {"loguniform": [0.1, 100.0]}, "lr1": {"loguniform": [0.005, 0.2]},
                 "lr2": {"loguniform": [0.005, 0.2]}}


def _number(value: Any) -> Any:  # `num_samples: "8"` or `true` is a mistake, not a number
    if isinstance(value, (bool, str)):
        raise ValueError("must be a number")
    return value


Count = Annotated[int, BeforeValidator(_number)]
Number = Annotated[float, BeforeValidator(_number)]


def _said(after: str, text: str) -> PydanticCustomError:
    """A check of this module's own, said after where it is: `search.asha` + after + text."""
    return PydanticCustomError("search_setting", "{text}", {"after": after, "text": text})


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Asha(_Section):
    """ASHA's rungs: geometric from grace_period, or placed (`rungs`, refilled.schema.rungs)."""
    grace_period: Count = Field(10, ge=1)
    reduction_factor: Number = Field(3, gt=1)
    rungs: Optional[list[Count]] = None

    @model_validator(mode="before")
    @classmethod
    def _first_rung_is_the_grace_period(cls, values: Any) -> Any:
        if not isinstance(values, dict) or values.get("rungs") is None:
            return values
        rungs = values["rungs"]
        if (not isinstance(rungs, list) or not rungs
                or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rungs)
                or any(b <= a for a, b in zip(rungs, rungs[1:]))):
            raise _said(".rungs", f"must be a list of increasing epochs >= 1, e.g. [30, 60], got {rungs!r}")
        if values.get("grace_period") not in (None, rungs[0]):
            raise _said(":", f"grace_period {values['grace_period']} and rungs {rungs} disagree (the first rung is "
                            "the grace period): give one of them")
        return {**values, "grace_period": rungs[0]}


class Resources(_Section):
    cpu: Number = Field(1, gt=0)
    gpu: Number = Field(0, ge=0)

    @model_validator(mode="after")
    def _whole_gpus_above_one(self) -> "Resources":
        if self.gpu > 1 and not float(self.gpu).is_integer():
            raise _said(".gpu", f"may be a fraction only below 1 (0.25 packs four trials on a GPU), got {self.gpu}")
        return self


class Select(_Section):
    top_k: Count = Field(3, ge=0)  # trials re-evaluated after the search (0: the best single trial wins)
    seeds: Count = Field(3, ge=1)  # seeds each of them runs again with


class Staged(_Section):
    """Phase 1 of a staged search: how many stage-1-only trials, and their ASHA."""
    num_samples: Count = Field(8, ge=1)
    asha: Asha = Field(default_factory=lambda: Asha(grace_period=5))


class SearchSettings(_Section):
    """The `search:` section as it is written (refilled.schema.search: the example above)."""
    space: dict[str, dict[str, list]] = Field(default_factory=lambda: dict(DEFAULT_SPACE))
    num_samples: Count = Field(16, ge=1)
    start_with: Optional[str] = "authors"  # "authors", "config", "none", or an earlier experiment
    asha: Asha = Field(default_factory=Asha)
    resources: Resources = Field(default_factory=Resources)
    max_concurrent: Count = Field(0, ge=0)  # 0: as many as resources allow
    max_failures: Count = Field(1, ge=0)
    checkpoint_every: Count = Field(1, ge=1)
    keep_checkpoints: Count = Field(2, ge=1)
    # Ray starts the next trial in the ended trial's worker process: no Python, torch and
    # data start-up per trial (half the wall time of a small CPU search). Trials seed
    # everything themselves, so results do not change.
    reuse_actors: StrictBool = True
    seed: Count = 0
    staged: Optional[Staged] = None
    select: Select = Field(default_factory=Select)
    budget_hours: Optional[Number] = Field(None, gt=0)  # device hours after which no new trial starts
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
        return next(iter(self.space[key])) in ("loguniform", "lograndint")

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
                                f"{self.space[key]}: widen the space or use start_with: none")
        return [point]

    def inside(self, key: str, value: Any) -> bool:
        """Whether `value` lies in the space of `key`."""
        (kind, args), = self.space[key].items()
        if kind == "choice":
            return value in args
        if kind.endswith("randint"):  # [low, high): high excluded, as Ray's tune.randint
            return args[0] <= value < args[1]
        return args[0] <= value <= args[1]

    def to_section(self) -> dict[str, Any]:
        """The `search:` section these settings read back from (experiment.yaml)."""
        return self.model_dump(exclude_none=True)


def distributions(space: dict[str, dict[str, list]]) -> dict:
    """The search space as Optuna's distributions (the searcher asks with them; the
    analysis rebuilds trials with them)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, dist in space.items():
        (kind, args), = dist.items()
        if kind == "choice":
            out[key] = CategoricalDistribution(list(args))
        elif kind in ("uniform", "loguniform"):
            out[key] = FloatDistribution(float(args[0]), float(args[1]), log=kind == "loguniform")
        else:  # randint, lograndint: [low, high), high excluded, as Ray's tune.randint
            out[key] = IntDistribution(int(args[0]), int(args[1]) - 1, log=kind == "lograndint")
    return out


def _as_key(where: str, key: str, value: Any) -> Any:
    try:
        return coerce(key, value)
    except UserError as e:
        raise UserError(f"{where}: value {value!r} is not allowed ({e})") from None


def _check_distribution(key: str, dist: Any, base: Config) -> dict[str, list]:
    where = f"search.space.{key}"
    if key not in FIELDS:
        raise UserError(f"{where}: unknown config key '{key}' (searchable keys are the config keys, e.g. tau1, lambd, lr1)")
    if key in NOT_SEARCHABLE:
        raise UserError(f"{where}: '{key}' cannot be searched; set it in the config section")
    if not isinstance(dist, dict) or len(dist) != 1:
        raise UserError(f"{where} must be one of {{{', '.join(DISTRIBUTIONS)}: ...}}, e.g. {{loguniform: [0.5, 16]}}")
    (kind, args), = dist.items()
    if kind not in DISTRIBUTIONS:
        raise UserError(f"{where}: unknown distribution '{kind}'; use one of {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list):
        raise UserError(f"{where}.{kind} needs a list, e.g. [0.5, 16], got {args!r}")
    if not args:
        raise UserError(f"{where}.{kind} is empty: give at least one value ({kind}: [a, b])")
    if kind == "choice":
        values = [_as_key(where, key, v) for v in args]
    else:
        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise UserError(f"{where}.{kind} needs two numbers [low, high], got {args}")
        low, high = args
        if not low < high:
            raise UserError(f"{where}.{kind}: low must be below high, got [{low}, {high}]")
        if kind.startswith("log") and low <= 0:
            raise UserError(f"{where}.{kind}: bounds must be > 0 on a log scale, got [{low}, {high}]")
        if kind.endswith("randint") and not all(float(a).is_integer() for a in args):
            raise UserError(f"{where}.{kind}: bounds must be integers, got [{low}, {high}]")
        values = [_as_key(where, key, low), _as_key(where, key, high)]
        if kind.endswith("randint"):
            values = [int(low), int(high)]
    for v in values:  # every end of the range must make a valid config
        try:
            from_dict({key: v}, base)
        except UserError as e:
            raise UserError(f"{where}: value {v} is not allowed ({e})") from None
    return {kind: values}


def _problem(error: dict[str, Any]) -> str:
    """A pydantic error as one line: where in the `search:` section, what it must be, what was given."""
    where = ".".join(["search", *(str(part) for part in error["loc"])])
    ctx, kind = error.get("ctx") or {}, error["type"]
    bounds = {"greater_than": f"> {ctx.get('gt')}", "greater_than_equal": f">= {ctx.get('ge')}",
              "less_than": f"< {ctx.get('lt')}"}
    if kind == "search_setting":
        return f"{where}{ctx['after']} {ctx['text']}" if ctx["after"] != ":" else f"{where}: {ctx['text']}"
    if kind == "extra_forbidden":
        parent, name = where.rsplit(".", 1)
        model = {"search": SearchSettings, "search.asha": Asha, "search.staged": Staged, "search.staged.asha": Asha,
                 "search.resources": Resources, "search.select": Select}.get(parent)
        takes = f" ({parent} takes {', '.join(k for k in model.model_fields if k != 'fixed')})" if model else ""
        return f"{parent}: unknown setting '{name}'{takes}"
    if kind in bounds:
        return f"{where} must be {bounds[kind]}, got {error.get('input')!r}"
    if kind == "bool_type":
        return f"{where} must be true or false, got {error.get('input')!r}"
    if kind in ("model_type", "dict_type"):
        return f"{where} must be a mapping of settings, got {error.get('input')!r}"
    if kind == "string_type":
        return f"{where} must be a string, got {error.get('input')!r}"
    if kind in ("int_from_float", "int_parsing", "int_type"):
        return f"{where} must be a whole number, got {error.get('input')!r}"
    return f"{where} must be a number, got {error.get('input')!r}"


def parse_search(section: dict[str, Any] | None, base: Config) -> SearchSettings:
    """Validate the `search:` section; every problem is a one-line UserError."""
    if section is not None and not isinstance(section, dict):
        raise UserError(f"the search: section must be a mapping of settings (num_samples: 12, ...), "
                        f"got {type(section).__name__}")
    section = dict(section or {})
    if "space" in section:
        space = section["space"]
        if not isinstance(space, dict) or not space:
            raise UserError("search.space must be a mapping of config keys to distributions")
    section["space"] = {k: _check_distribution(k, v, base) for k, v in section.get("space", DEFAULT_SPACE).items()}
    if section.get("start_with") is not None and not isinstance(section["start_with"], str):
        raise UserError(f"search.start_with must be authors, config, none or an experiment's folder "
                        f"or URI, got {section['start_with']!r}")
    budget = section.get("budget_hours")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
        raise UserError(f"search.budget_hours must be a number of device hours > 0, got {budget!r}")
    try:
        s = SearchSettings.model_validate(section)
    except ValidationError as e:
        raise UserError(_problem(e.errors()[0])) from None
    if s.staged is not None:
        _check_staged(s)
    s.fixed_points(base)  # an earlier experiment (start_with: PATH) is read when the search starts
    return s


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


def _check_staged(s: SearchSettings) -> None:
    first, second = s.phase_spaces()
    both = sorted(set(s.space) & (set(STAGE1_KEYS) - set(STAGE1_ONLY)))
    if both:
        raise UserError(f"search.staged: {', '.join(both)} act on both stages, so phase 1 cannot choose them "
                        "alone: fix them in the config section or drop staged")
    if not first or not second:
        raise UserError(f"search.staged needs keys of both phases in search.space: stage-1 keys "
                        f"({', '.join(STAGE1_ONLY)}) and stage-2 keys (e.g. tau2, lambd, lr2); got "
                        f"{', '.join(s.space)}")
