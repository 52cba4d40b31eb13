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

from dataclasses import dataclass, field
from typing import Any

from refilled.config import FIELDS, NOT_SEARCHABLE, STAGE1_KEYS, STAGE1_ONLY, Config, coerce, from_dict
from refilled.errors import UserError

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "lograndint", "choice")
DEFAULT_SPACE = {"tau1": {"loguniform": [0.5, 16.0]}, "tau2": {"loguniform": [0.5, 8.0]},
                 "lambd": {"loguniform": [0.1, 100.0]}, "lr1": {"loguniform": [0.005, 0.2]},
                 "lr2": {"loguniform": [0.005, 0.2]}}


@dataclass
class StagedSettings:
    """Phase 1 of a staged search: how many stage-1-only trials, and their ASHA."""
    num_samples: int = 8
    grace_period: int = 5
    reduction_factor: float = 3
    rungs: list[int] | None = None


@dataclass
class SearchSettings:
    space: dict[str, dict[str, list]] = field(default_factory=lambda: dict(DEFAULT_SPACE))
    num_samples: int = 16
    start_with: str = "authors"  # "authors", "config" or "none"
    grace_period: int = 10
    reduction_factor: float = 3
    rungs: list[int] | None = None  # explicit rung epochs (search.asha.rungs); None: geometric from grace_period
    cpu: float = 1
    gpu: float = 0
    max_concurrent: int = 0  # 0: as many as resources allow
    max_failures: int = 1
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    # Ray starts the next trial in the ended trial's worker process: no Python, torch and
    # data start-up per trial (half the wall time of a small CPU search). Trials seed
    # everything themselves, so results do not change.
    reuse_actors: bool = True
    seed: int = 0
    staged: StagedSettings | None = None
    select_top_k: int = 3  # trials re-evaluated after the search (0: the best single trial wins)
    select_seeds: int = 3  # seeds each of them runs again with
    budget_hours: float | None = None  # device hours after which no new trial starts
    fixed: dict[str, Any] = field(default_factory=dict)  # constants in every trial's config (phase 2)

    def phase_spaces(self) -> tuple[dict, dict]:
        """(stage-1-only keys, the others) of the space: phase 1 and phase 2 of a staged search."""
        first = {k: v for k, v in self.space.items() if k in STAGE1_ONLY}
        return first, {k: v for k, v in self.space.items() if k not in STAGE1_ONLY}

    def phase(self, which: int, fixed: dict[str, Any] | None = None) -> "SearchSettings":
        """The settings one phase of a staged search runs with: its part of the space
        (phase 2 also gets phase 1's choice, `fixed`, as constants in every trial's config)."""
        from dataclasses import replace

        first, second = self.phase_spaces()
        if which == 1:
            return replace(self, space=first, num_samples=self.staged.num_samples, staged=None,
                           grace_period=self.staged.grace_period, reduction_factor=self.staged.reduction_factor,
                           rungs=self.staged.rungs)
        return replace(self, space=second, staged=None, fixed=dict(fixed or {}))

    def param_space(self) -> dict[str, Any]:
        """Tune's param_space: the constants every trial gets (phase 2: phase 1's choice).
        The searched keys come from the searcher (refilled.tune.searcher), which owns the space."""
        return dict(self.fixed)

    def rung_epochs(self, max_t: int) -> list[int]:
        """The epochs at which ASHA compares this phase's trials (refilled.tune.rungs)."""
        from refilled.tune.rungs import rung_epochs

        return rung_epochs(self.grace_period, self.reduction_factor, max_t, self.rungs)

    def is_log(self, key: str) -> bool:
        return next(iter(self.space[key])) in ("loguniform", "lograndint")

    def first_points(self, cfg: Config) -> list[dict[str, Any]]:
        """The configurations queued as the first trials: the authors' defaults, the
        config's values, none, or the top trials of an earlier experiment (its
        re-evaluated ranking when it has one), each restricted to this space."""
        if self.start_with == "none":
            return []
        if self.start_with in ("authors", "config"):
            source = Config() if self.start_with == "authors" else cfg
            point = {k: getattr(source, k) for k in self.space}
            for key, value in point.items():
                if not self.inside(key, value):
                    raise UserError(f"search.start_with '{self.start_with}' puts {key}={value} outside its space "
                                    f"{self.space[key]}: widen the space or use start_with: none")
            return [point]
        from refilled.store.experiments import top_configs

        points = []
        for values in top_configs(self.start_with, max(self.select_top_k, 3)):
            point = {k: values[k] for k in self.space if k in values}
            if len(point) == len(self.space) and all(self.inside(k, v) for k, v in point.items()) \
                    and point not in points:
                points.append(point)
        return points

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
        return {"space": self.space, "num_samples": self.num_samples, "start_with": self.start_with,
                "asha": _asha_section(self.grace_period, self.reduction_factor, self.rungs),
                "resources": {"cpu": self.cpu, "gpu": self.gpu}, "max_concurrent": self.max_concurrent,
                "max_failures": self.max_failures, "checkpoint_every": self.checkpoint_every,
                "keep_checkpoints": self.keep_checkpoints, "reuse_actors": self.reuse_actors, "seed": self.seed,
                "select": {"top_k": self.select_top_k, "seeds": self.select_seeds},
                **({"budget_hours": self.budget_hours} if self.budget_hours is not None else {}),
                **({"staged": {"num_samples": self.staged.num_samples,
                               "asha": {"grace_period": self.staged.grace_period,
                                        "reduction_factor": self.staged.reduction_factor}}}
                   if self.staged else {})}


def _asha_section(grace_period: int, reduction_factor: float, rungs: list[int] | None) -> dict[str, Any]:
    if rungs:
        return {"rungs": list(rungs), "reduction_factor": reduction_factor}
    return {"grace_period": grace_period, "reduction_factor": reduction_factor}


def _parse_rungs(where: str, value: Any, grace_period: Any) -> list[int]:
    """search.asha.rungs: increasing epochs >= 1; grace_period, if also given, is the first."""
    if (not isinstance(value, list) or not value
            or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in value)
            or any(b <= a for a, b in zip(value, value[1:]))):
        raise UserError(f"{where}.rungs must be a list of increasing epochs >= 1, e.g. [30, 60], got {value!r}")
    if grace_period is not None and grace_period != value[0]:
        raise UserError(f"{where}: grace_period {grace_period} and rungs {value} disagree (the first rung is the "
                        "grace period): give one of them")
    return list(value)


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
    if not isinstance(args, list) or not args:
        raise UserError(f"{where}.{kind} needs a list, e.g. [0.5, 16]")
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


def parse_search(section: dict[str, Any] | None, base: Config) -> SearchSettings:
    """Validate the `search:` section; every problem is a one-line UserError."""
    section = dict(section or {})
    s = SearchSettings()
    if "space" in section:
        space = section.pop("space")
        if not isinstance(space, dict) or not space:
            raise UserError("search.space must be a mapping of config keys to distributions")
        s.space = {k: _check_distribution(k, v, base) for k, v in space.items()}
    else:
        s.space = {k: _check_distribution(k, v, base) for k, v in DEFAULT_SPACE.items()}
    if "staged" in section:
        s.staged = _parse_staged(section.pop("staged"), s)
    asha = section.get("asha")
    if isinstance(asha, dict) and "rungs" in asha:
        asha = dict(asha)
        s.rungs = _parse_rungs("search.asha", asha.pop("rungs"), asha.get("grace_period"))
        asha["grace_period"] = s.rungs[0]
        section["asha"] = asha
    nested = {"asha": ("grace_period", "reduction_factor"), "resources": ("cpu", "gpu"),
              "select": ("top_k", "seeds")}
    flat: dict[str, Any] = {}
    for name, keys in nested.items():
        sub = section.pop(name, None) or {}
        if not isinstance(sub, dict) or set(sub) - set(keys):
            raise UserError(f"search.{name} takes {', '.join(keys + (('rungs',) if name == 'asha' else ()))}, "
                            f"got {sub}")
        flat.update({f"select_{k}" if name == "select" else k: v for k, v in sub.items()})
    flat.update(section)
    numbers = {"num_samples": int, "grace_period": int, "reduction_factor": float, "cpu": float, "gpu": float,
               "max_concurrent": int, "max_failures": int, "checkpoint_every": int, "keep_checkpoints": int,
               "seed": int, "select_top_k": int, "select_seeds": int}
    for key, value in flat.items():
        if key == "reuse_actors":
            if not isinstance(value, bool):
                raise UserError(f"search.reuse_actors must be true or false, got {value!r}")
            s.reuse_actors = value
        elif key == "start_with":
            if value is not None and not isinstance(value, str):
                raise UserError(f"search.start_with must be authors, config, none or an experiment's folder "
                                f"or URI, got {value!r}")
            s.start_with = value or "none"
        elif key == "budget_hours":
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise UserError(f"search.budget_hours must be a number of device hours > 0, got {value!r}")
            s.budget_hours = None if value is None else float(value)
        elif key in numbers:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"search.{key} must be a number, got {value!r}")
            setattr(s, key, numbers[key](value))
        else:
            raise UserError(f"search: unknown setting '{key}'")
    for key in ("num_samples", "grace_period", "checkpoint_every", "keep_checkpoints"):
        if getattr(s, key) < 1:
            raise UserError(f"search.{key} must be >= 1, got {getattr(s, key)}")
    if s.reduction_factor <= 1:
        raise UserError(f"search.asha.reduction_factor must be > 1, got {s.reduction_factor}")
    if s.cpu <= 0 or s.gpu < 0 or (s.gpu > 1 and not float(s.gpu).is_integer()):
        raise UserError(f"search.resources: cpu must be > 0 and gpu >= 0 (fractions only below 1), got cpu={s.cpu} gpu={s.gpu}")
    if s.max_failures < 0 or s.max_concurrent < 0:
        raise UserError("search.max_failures and search.max_concurrent must be >= 0")
    if s.select_top_k < 0 or s.select_seeds < 1:
        raise UserError(f"search.select: top_k must be >= 0 (0: no re-evaluation) and seeds >= 1, "
                        f"got top_k={s.select_top_k} seeds={s.select_seeds}")
    if s.start_with in ("authors", "config"):
        s.first_points(base)  # an earlier experiment is read when the search starts
    return s


def _parse_staged(section: Any, s: SearchSettings) -> StagedSettings | None:
    if section is None or section is False:
        return None
    if section is True:
        section = {}
    if not isinstance(section, dict) or set(section) - {"num_samples", "asha"}:
        raise UserError(f"search.staged takes num_samples and asha {{grace_period, reduction_factor, rungs}}, "
                        f"got {section!r}")
    staged = StagedSettings()
    asha = section.get("asha") or {}
    if not isinstance(asha, dict) or set(asha) - {"grace_period", "reduction_factor", "rungs"}:
        raise UserError(f"search.staged.asha takes grace_period, reduction_factor, rungs, got {asha!r}")
    if "rungs" in asha:
        asha = dict(asha)
        staged.rungs = _parse_rungs("search.staged.asha", asha.pop("rungs"), asha.get("grace_period"))
        asha["grace_period"] = staged.rungs[0]
    for key, value in {"num_samples": section.get("num_samples"), **asha}.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"search.staged: {key} must be a number, got {value!r}")
        setattr(staged, key, float(value) if key == "reduction_factor" else int(value))
    if staged.num_samples < 1 or staged.grace_period < 1 or staged.reduction_factor <= 1:
        raise UserError("search.staged: num_samples and grace_period must be >= 1, reduction_factor > 1")
    first, second = s.phase_spaces()
    both = sorted(set(s.space) & (set(STAGE1_KEYS) - set(STAGE1_ONLY)))
    if both:
        raise UserError(f"search.staged: {', '.join(both)} act on both stages, so phase 1 cannot choose them "
                        "alone: fix them in the config section or drop staged")
    if not first or not second:
        raise UserError(f"search.staged needs keys of both phases in search.space: stage-1 keys "
                        f"({', '.join(STAGE1_ONLY)}) and stage-2 keys (e.g. tau2, lambd, lr2); got "
                        f"{', '.join(s.space)}")
    return staged
