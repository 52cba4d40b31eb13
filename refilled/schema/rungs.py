"""Where ASHA compares trials: rung epochs placed explicitly, what they can tell apart.

Tune's ASHAScheduler puts its rungs at grace_period * reduction_factor**k of its
time attribute. To place them at any epochs (`search.asha.rungs`, as Syne Tune
does), every trial reports a clock (`CLOCK`) that is 0 before the first rung and
reduction_factor**i from the (i+1)-th rung on: ASHA, given grace_period 1 and
max_t = reduction_factor**len(rungs) (`scheduler_args`), then decides exactly at
those epochs. The rung epochs count what the phase trains: steps across both
stages, or stage-2 epochs in phase 2 of a staged search.

A rung is only worth what it ranks: refilled.store.rung_fidelity measures it on a
search's own trials, `schedule_warnings` says before a search starts where a rung is expected
to see little (before stage 2's first learning-rate decay, or after few steps).
"""

from __future__ import annotations

import math
from typing import Any

CLOCK = "rung_clock"
# optimizer steps of its stage before a rung: fewer and the weights have barely moved (on the
# digits default, with bn_stats precise, rungs from 10 steps on correlate >= 0.79 with the end)
MIN_RUNG_STEPS = 25


def counted_epochs(cfg, *, stage1_only: bool = False, from_stage1: bool = False) -> int:
    """The epochs ASHA counts in a phase: stage 1 alone (phase 1 of a staged search),
    stage 2 from phase 1's choice (phase 2), or both stages (a joint search)."""
    if stage1_only:
        return cfg.n_training_epochs1
    return cfg.n_training_epochs2 if from_stage1 else cfg.n_training_epochs1 + cfg.n_training_epochs2


def rung_epochs(grace_period: int, reduction_factor: float, max_t: int, explicit: list[int] | None = None
                ) -> list[int]:
    """The epochs at which ASHA compares trials (those before max_t)."""
    if explicit:
        return [r for r in explicit if r < max_t]
    out, k = [], 0
    while grace_period * reduction_factor ** k < max_t:
        out.append(math.ceil(grace_period * reduction_factor ** k))
        k += 1
    return out


def clock(epoch: int, rungs: list[int], reduction_factor: float, max_t: int) -> float:
    """The time attribute a trial reports at `epoch` (see the module's docstring)."""
    if epoch >= max_t:
        return float(reduction_factor ** len(rungs))
    passed = sum(epoch >= r for r in rungs)
    return 0.0 if passed == 0 else float(reduction_factor ** (passed - 1))


def scheduler_args(rungs: list[int], reduction_factor: float) -> dict[str, Any]:
    """ASHAScheduler's arguments that put its rungs at `rungs` of CLOCK."""
    return {"time_attr": CLOCK, "grace_period": 1, "reduction_factor": reduction_factor,
            "max_t": reduction_factor ** len(rungs)}


def schedule_warnings(rungs: list[int], *, phase2: bool, e1: int, e2: int, point: tuple[int, ...],
                      steps_per_epoch: int | None, bn_stats: str) -> list[str]:
    """One line for each thing about these rungs that is expected to rank poorly, with a
    suggested first rung; empty when nothing is. `steps_per_epoch`: None when the training
    set's size is not known before its data is read (no `shots`): the step count is not judged."""
    total = e2 if phase2 else e1 + e2
    start2 = 0 if phase2 else e1  # the rung clock's epoch where stage 2 starts
    decay = start2 + point[0] if point and point[0] < e2 else None
    suggest = (decay + max(1, (total - decay) // 4)) if decay is not None else None
    hint = f"; e.g. search.asha.rungs: [{suggest}]" if suggest and suggest < total else ""
    out = []
    if not rungs:
        out.append(f"no ASHA rung before the end ({total} epochs): no trial is stopped early{hint}")
        return out
    first = rungs[0]
    if not phase2 and first <= e1:
        out.append(f"the first ASHA rung (epoch {first}) is in stage 1, where trials are compared by NCM "
                   f"accuracy, not the stage-2 accuracy they are chosen by{hint}")
    elif decay is not None and first <= decay and bn_stats == "running":
        # measured: the running statistics trail weights that move fast before the decay
        out.append(f"the first ASHA rung (epoch {first}) comes before stage 2's first learning-rate decay "
                   f"(epoch {decay}) and trials are evaluated with bn_stats: running, whose statistics trail "
                   f"the weights there: set bn_stats: precise, or move the rung{hint}; measure it with "
                   "benchmarks/rung_fidelity.py")
    if steps_per_epoch is None:
        return out
    steps = (first - start2) * steps_per_epoch if first > start2 else first * steps_per_epoch
    if steps < MIN_RUNG_STEPS:
        out.append(f"the first ASHA rung (epoch {first}) comes after {steps} optimizer steps of its stage "
                   f"(fewer than {MIN_RUNG_STEPS}): the weights have barely moved{hint}")
    return out
