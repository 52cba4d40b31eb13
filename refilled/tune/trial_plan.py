"""What a search hands its trials, as small frozen records: what every trial shares
(`TrialInputs`, `Shared`), one Ray Tune run (`Phase`), and what a trial knows of its phase
(`TrialPlan`). No torch here: the benchmarks' simulated trials import it too."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refilled.schema.config import Config
from refilled.schema.search import SearchSettings
from refilled.store.storage import Place

if TYPE_CHECKING:
    import numpy as np

METRIC = "val_accuracy"  # what trials report, ASHA compares and the study is told


@dataclass(frozen=True)
class TrialInputs:
    """What every trial of a search shares: the experiment's config, its place, its teacher
    (None for a kind that needs none)."""

    cfg: Config
    place: Place
    teacher_path: Path | None


@dataclass(frozen=True)
class Phase:
    """One Ray Tune run of a search: the whole search, or one phase of a staged one."""

    settings: SearchSettings  # this phase's space, budget and schedule
    max_t: int  # the epochs ASHA counts in it (refilled.schema.rungs.counted_epochs)
    study_name: str
    sub: str = ""  # its folder inside the experiment ("": the experiment itself)
    stage1_only: bool = False  # phase 1 of a staged search: trials end after stage 1
    stage1: dict | None = None  # phase 2: the end-of-stage-1 snapshot every trial starts stage 2 from


@dataclass(frozen=True)
class Shared:
    """What the driver computed once for every trial, handed out through Ray's object store:
    the experiment's config, the teacher's weights, its embedding bank and class centres
    (None where not used), and the stage-1 cache's folder (None: no cache)."""

    base: dict[str, Any]
    teacher: dict[str, Any]
    bank: np.ndarray | None
    centers: np.ndarray | None
    cache_dir: str | None


@dataclass(frozen=True)
class TrialPlan:
    """What a trial needs to know of its phase, besides its config: where it starts and
    stops, when it checkpoints, and where ASHA compares trials (the clock every report
    carries, refilled.schema.rungs)."""

    stage1: dict | None = None
    stage1_only: bool = False
    checkpoint_every: int = 1
    teacher_id: str = ""  # the teacher file's digest: part of the stage-1 cache key
    rungs: tuple[int, ...] = ()
    reduction_factor: float = 3.0
    max_t: int = 0
    location: str = ""  # the phase's experiment (a folder or a URI): each trial writes its epochs there
    report_every_s: float = 30.0  # a trial reports to Tune at least this often (refilled.tune.trial_report)

    @classmethod
    def of(cls, phase: Phase, settings: SearchSettings, teacher_id: str, location: str) -> TrialPlan:
        """`location`: the experiment's (Place.location), as this driver finds it: a moved
        experiment's trials write where it is now."""
        return cls(stage1=phase.stage1, stage1_only=phase.stage1_only, checkpoint_every=settings.checkpoint_every,
                   teacher_id=teacher_id, rungs=tuple(settings.rung_epochs(phase.max_t)),
                   reduction_factor=settings.asha.reduction_factor, max_t=phase.max_t,
                   location=Place.at(location, phase.sub).location, report_every_s=settings.report_every_s)
