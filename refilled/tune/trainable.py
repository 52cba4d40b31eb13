"""The Ray Tune trainable: both REFILLED stages of one trial.

A function trainable in the style of Ray Tune's examples: it restores from
`tune.get_checkpoint()`, runs stage 1 then stage 2 on the tuning splits
(train / validation, never test), writes every epoch into its folder and tells
Tune what Tune decides on (refilled.tune.trial_report: rungs, checkpoints, the
end, at least every `report_every_s`). The teacher's weights and its embedding bank are
computed once per experiment by the driver and handed to every trial through
Ray's object store (`tune.with_parameters`), never recomputed in a trial.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import tune

from refilled.files import checkpoint
from refilled.method.bank import TeacherBank, teacher_embeddings
from refilled.method.train import STAGE2, Diverged, build_student, global_centers, refilled_epochs
from refilled.runs.epoch_log import STAGE_NAMES
from refilled.runs.inputs import load_teacher_state, student_data, transfer_teacher
from refilled.runtime import keep_freed_memory, resolve_device
from refilled.schema.config import Config, from_dict
from refilled.schema.rungs import CLOCK
from refilled.schema.rungs import clock as rung_clock
from refilled.store.cost import Clock, device_units
from refilled.store.layout import STATE_FILE
from refilled.store.stage1_cache import Stage1Cache, stage1_key
from refilled.tune.trial_plan import Shared, TrialPlan
from refilled.tune.trial_report import TrialReporter


def restored_state(ckpt: tune.Checkpoint | None) -> dict | None:
    """The state a retried or resumed trial continues from. A damaged one is named as it
    is in storage (not as the local copy Ray may have made): the trial's error says it."""
    if ckpt is None:
        return None
    with ckpt.as_directory() as folder:
        return checkpoint.load(Path(folder) / STATE_FILE, "trial checkpoint", shown=f"{ckpt.path}/{STATE_FILE}",
                               remedy="restore it from a backup; this trial cannot resume without it")


def refilled_trial(params: dict[str, Any], *, shared: Shared, plan: TrialPlan) -> None:
    """One trial. `params` are the searched values; `shared` what the driver computed once
    (the experiment's config, the teacher, its bank and centres); `plan` what the trial knows
    of its phase (refilled.tune.trial_inputs): with `plan.stage1` it starts stage 2 from that
    snapshot (phase 2 of a staged search: it reports stage-2 epochs only, their steps continue
    stage 1's); with `plan.stage1_only` it ends after stage 1 (phase 1)."""
    cfg: Config = from_dict(params, from_dict(shared.base))
    cfg = cfg.replace(flag_tuning=True, device="auto")  # searching never sees the test split
    resources = tune.get_context().get_trial_resources().required_resources
    torch.set_num_threads(max(1, int(resources.get("CPU", 1))))
    keep_freed_memory()
    device = resolve_device("auto")  # CUDA exactly when Ray gave this trial a GPU
    clock = Clock(device.type, device_units(device.type, resources.get("CPU", 1), resources.get("GPU", 0)))
    data = student_data(cfg, device)
    teacher_net = load_teacher_state(shared.teacher, cfg, data)
    lookup = TeacherBank(shared.bank).to(device) if shared.bank is not None else None
    if cfg.centers == "global":  # computed once by the driver; recomputed only if absent
        centers = (torch.tensor(np.array(shared.centers), device=device) if shared.centers is not None
                   else global_centers(teacher_net, lookup, data))
    else:
        centers = None
    resume = restored_state(tune.get_checkpoint())
    if resume is None and plan.stage1 is not None:
        resume = plan.stage1
    reporter = TrialReporter(clock, plan.location, params, step_of(resume, cfg), plan.report_every_s)
    run = TrialRun(cfg, plan, reporter, inputs=(data, build_student(cfg, data),
                                                teacher_embeddings(teacher_net, lookup), centers,
                                                transfer_teacher(data, teacher_net)))
    cache = Stage1Cache(shared.cache_dir) if shared.cache_dir and cfg.n_training_epochs1 > 0 else None
    try:
        if cache and resume is None:
            resume = run.stage1_from_cache(cache, stage1_key(cfg, plan.teacher_id))
        run.epochs(resume)
    except Diverged as e:  # end this trial, recorded as diverged; the search goes on
        run.report({"diverged": 1, "diverged_reason": str(e), "val_accuracy": 0.0, "step": run.step + 1,
                    "total_steps": run.total})


def step_of(snapshot: dict | None, cfg: Config) -> int:
    """The step (epoch across both stages) a snapshot was taken after; 0 for none."""
    if snapshot is None:
        return 0
    return snapshot["epoch"] + (cfg.n_training_epochs1 if snapshot["stage"] == STAGE2 else 0)


class TrialRun:
    """The epochs of one trial and their reports: the clock ASHA reads, the best
    stage-2 accuracy so far, a checkpoint every `plan.checkpoint_every` epochs."""

    def __init__(self, cfg: Config, plan: TrialPlan, reporter: TrialReporter, inputs: tuple):
        self.cfg, self.plan, self.reporter = cfg, plan, reporter
        self.data, self.student, self.teacher, self.centers, self.transfer = inputs
        self.total = cfg.n_training_epochs1 if plan.stage1_only else cfg.n_training_epochs1 + cfg.n_training_epochs2
        self.step = 0

    def report(self, metrics: dict[str, Any], snapshot: dict | None = None) -> None:
        self.reporter.epoch(metrics,
                            None if snapshot is None else lambda folder: checkpoint.save(snapshot, folder / STATE_FILE))

    def metrics(self, epoch) -> dict[str, Any]:
        """An epoch's report, with ASHA's clock (phase 2 counts stage-2 epochs)."""
        plan = self.plan
        at = epoch.epoch if plan.stage1 is not None else epoch.step
        return {"stage": STAGE_NAMES[epoch.stage], "stage_epoch": epoch.epoch, "step": epoch.step,
                "total_steps": self.total, "diverged": 0, **epoch.metrics,
                CLOCK: rung_clock(at, list(plan.rungs), plan.reduction_factor, plan.max_t)}

    def epochs(self, resume: dict | None) -> None:
        """Train from `resume` (or from scratch) to the trial's last epoch, reporting each."""
        # the number the search ranks trials by, reported so TensorBoard's HParams tab shows it too
        best2 = (resume or {}).get("best_val_accuracy_stage2", 0.0)
        for epoch in refilled_epochs(self.cfg, self.data, self.student, self.teacher, self.centers, resume,
                                     self.transfer):
            self.step = epoch.step
            metrics = self.metrics(epoch)
            if epoch.stage == STAGE2:
                best2 = metrics["best_val_accuracy_stage2"] = max(best2, metrics["val_accuracy"])
            save = self.step == self.total or self.step % self.plan.checkpoint_every == 0
            self.report(metrics, {**epoch.snapshot(), "best_val_accuracy_stage2": best2} if save else None)
            if self.step == self.total:
                break  # stage1_only: stage 2 is not this trial's

    def stage1_from_cache(self, cache: Stage1Cache, key: str) -> dict:
        """The end-of-stage-1 snapshot: another trial's, replayed epoch by epoch so ASHA
        sees the same reports it would have, or computed here (under the key's lock) and stored."""
        hit = cache.lookup(key)
        if hit is None:
            with cache.computing(key):
                hit = cache.lookup(key)  # another trial may have stored it while we waited
                if hit is None:
                    return self._stage1_stored(cache, key)
        for record in hit["history"]:  # costs what the replay takes: the clock overwrites the record's cost
            self.report({**record, CLOCK: self._clock_of(record), "stage1_cache": "hit"})
        return hit["snapshot"]

    def _clock_of(self, record: dict[str, Any]) -> float:
        plan = self.plan
        return rung_clock(record["step"], list(plan.rungs), plan.reduction_factor, plan.max_t)

    def _stage1_stored(self, cache: Stage1Cache, key: str) -> dict:
        """Run stage 1 (reporting every epoch as usual), store it for other trials, return its snapshot."""
        history, snapshot = [], None
        for epoch in refilled_epochs(self.cfg, self.data, self.student, self.teacher, self.centers):
            metrics = self.metrics(epoch)
            history.append({k: v for k, v in metrics.items() if k != CLOCK})
            snapshot = epoch.snapshot()
            self.step = epoch.step
            self.report({**metrics, "stage1_cache": "miss"},
                        snapshot if epoch.step % self.plan.checkpoint_every == 0 else None)
            if epoch.epoch == self.cfg.n_training_epochs1:
                break  # stage 1 is done; stage 2 resumes from the snapshot
        cache.store(key, snapshot, history)
        return snapshot
