"""Simulated trials: the search's driver measured at scale without training anything.

`SimulatedTrials` is a trial kind (refilled.tune.trial_inputs.TrialKind) for
`open_search(..., kind=SimulatedTrials(...)).run()`: each trial writes every epoch with the keys a
real one reports and tells Tune what a real one tells it (refilled.tune.trial_report: both
stages, the rung clock, the cost clock, a checkpoint every `checkpoint_every` epochs,
resumed from its checkpoint), from a synthetic
learning curve of its configuration, after sleeping a fixed time per epoch. It
imports neither torch nor the method, so hundreds run at once on one machine;
the driver, its searcher, callbacks, storage, selection and the analysis are
the real ones. benchmarks/search_scale.py drives it (docs: benchmarks/README.md,
"Scale"). An experiment it writes says so in experiment.yaml (`trial_kind: {name:
simulated, ...}`), so that `retrain` refuses it.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from refilled.schema.rungs import CLOCK
from refilled.schema.rungs import clock as rung_clock
from refilled.store.cost import Clock, device_units
from refilled.tune.trial_plan import Phase, TrialInputs, TrialPlan
from refilled.tune.trial_report import TrialReporter

STATE = "state.json"  # the simulated trial's checkpoint (a real one's is state.pt)


def _unit(*parts: Any) -> random.Random:
    """A random stream fixed by its parts: an epoch run again reports the same."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def final_accuracy(params: dict[str, Any], base: dict[str, Any], seed: int) -> float:
    """Where a configuration's curve ends: best at the experiment's own values of the
    searched keys, falling off with each key's distance from them in decades."""
    miss = 0.0
    for key, value in params.items():
        own = base.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(own, (int, float)) \
                and value > 0 and own > 0:
            miss += (math.log10(value) - math.log10(own)) ** 2
    return 0.3 + 0.5 * math.exp(-miss / (2 * 0.5 ** 2)) + _unit("final", params, seed).gauss(0, 0.01)


def curve_point(params: dict[str, Any], base: dict[str, Any], seed: int, step: int, total: int) -> float:
    """The validation accuracy reported at `step` of `total`: rising towards the end,
    noisier early (what makes early rungs rank worse than late ones)."""
    end = final_accuracy(params, base, seed)
    progress = (1 - math.exp(-3 * step / total)) / (1 - math.exp(-3))
    noise = _unit("step", params, seed, step).gauss(0, 0.03 * (1 - step / total) + 0.005)
    return min(1.0, max(0.0, end * progress + noise))


def simulated_trial(params: dict[str, Any], *, base: dict[str, Any], epoch_s: float, checkpoint_bytes: int,
                    plan: TrialPlan) -> None:
    """One simulated trial: `epoch_s` seconds of sleep an epoch, then the report a real
    trial would make (refilled.tune.trainable, through refilled.tune.trial_report). The epoch
    after a report to Tune says how long that report took, its files' flush and the wait for
    the driver (`report_wait_s`); each says whether torch was loaded in this process
    (`torch_loaded`: it must not be)."""
    from ray import tune

    n1, n2 = int(base["n_training_epochs1"]), int(base["n_training_epochs2"])
    total = n1 if plan.stage1_only else n1 + n2
    seed = int(base.get("seed", 0))
    resources = tune.get_context().get_trial_resources().required_resources
    device = "cuda" if resources.get("GPU", 0) > 0 else "cpu"  # what a real trial would run on
    clock = Clock(device, device_units(device, resources.get("CPU", 1), resources.get("GPU", 0)))
    state = _restored(tune.get_checkpoint())
    reporter = TrialReporter(clock, plan.location, params, state.get("step", 0), plan.report_every_s)
    best2, waited = state.get("best_val_accuracy_stage2", 0.0), None
    for step in range(state.get("step", 0) + 1, total + 1):
        time.sleep(epoch_s)
        stage1 = step <= n1
        stage_epoch = step if stage1 else step - n1
        accuracy = curve_point(params, base, seed, step, total)
        metrics = {"stage": "stage1" if stage1 else "stage2", "stage_epoch": stage_epoch, "step": step,
                   "total_steps": total, "diverged": 0, "loss": 2.5 * (1 - accuracy), "lr": 0.1,
                   "val_accuracy": accuracy, "torch_loaded": int("torch" in sys.modules)}
        if waited is not None:  # the epoch after a report to Tune says how long that report took
            metrics["report_wait_s"] = waited
        if not stage1:
            best2 = metrics["best_val_accuracy_stage2"] = max(best2, accuracy)
        metrics[CLOCK] = rung_clock(step, list(plan.rungs), plan.reduction_factor, plan.max_t)
        save = step == total or step % plan.checkpoint_every == 0
        snapshot = {"step": step, "best_val_accuracy_stage2": best2}
        sent = time.perf_counter()
        told = reporter.epoch(metrics, (lambda path: _save(path, snapshot, checkpoint_bytes)) if save else None)
        waited = time.perf_counter() - sent if told else None


def _save(folder: Path, snapshot: dict, size: int) -> None:
    # padded to the size of the network and optimizer state a real trial saves
    (folder / STATE).write_text(json.dumps({**snapshot, "weights": "0" * size}))


def _restored(ckpt) -> dict:
    if ckpt is None:
        return {}
    with ckpt.as_directory() as folder:
        state = json.loads((Path(folder) / STATE).read_text())
    state.pop("weights", None)
    return state


def simulated_run(cfg_dict: dict[str, Any], kind: str, seed: int, teacher_path: str | None, out: str,
                  tuning: bool = True) -> dict[str, Any]:
    """One re-evaluation run (refilled.tune.selection), simulated: where the curve of
    this configuration ends with another seed. `cfg_dict` is the whole configuration,
    so the searched keys are compared with the experiment's (`base`, inside it)."""
    start = time.perf_counter()
    params = {k: v for k, v in cfg_dict.items() if k != "simulation_base"}
    accuracy = final_accuracy(params, cfg_dict.get("simulation_base", {}), seed)
    return {"kind": kind, "seed": seed, "val_accuracy": accuracy, "folder": out,
            "wall_s": time.perf_counter() - start, "device": "cpu"}


@dataclass(frozen=True)
class SimulatedTrials:
    """The trial kind that simulates: `epoch_s` seconds an epoch, checkpoints padded to
    `checkpoint_bytes` (a real CIFAR ResNet-14 student with its optimizer: about 1.4 MB)."""

    epoch_s: float = 0.5
    checkpoint_bytes: int = 0

    def note(self) -> dict[str, Any]:
        """What experiment.yaml says of the simulation (refilled.schema.config.ExperimentFile)."""
        return {"trial_kind": {"name": "simulated", **asdict(self)}}

    def check(self, cfg, teacher: str | None = None) -> None:
        return None  # nothing is read: no data set, no network

    def prepare_teacher(self, cfg, place, teacher: str | None) -> None:
        return None  # no teacher: nothing is trained

    def trainable_for(self, inputs: TrialInputs, phase: Phase):
        from ray import tune

        if phase.stage1 is not None or phase.stage1_only:
            from refilled.errors import UserError
            raise UserError("a simulated search is not staged: remove search.staged")
        settings = phase.settings
        fn = tune.with_parameters(simulated_trial, base=inputs.cfg.to_dict(), epoch_s=self.epoch_s,
                                  checkpoint_bytes=self.checkpoint_bytes,
                                  plan=TrialPlan.of(phase, settings, "", inputs.place.location))
        return tune.with_resources(fn, {"cpu": settings.resources.cpu, "gpu": settings.resources.gpu})

    def reevaluation(self, inputs: TrialInputs, cfg, seed: int, run_folder: str, resources: dict):
        import ray

        base = {**cfg.to_dict(), "simulation_base": _base_of(inputs.place)}
        return ray.remote(**resources)(simulated_run).remote(base, "refilled", seed, None, run_folder)


def _base_of(place) -> dict[str, Any]:
    """The experiment's own configuration (experiment.yaml), which the curves are centred on."""
    from refilled.store.experiment_file import read

    cfg, _ = read(place.folder)
    return cfg.to_dict()
