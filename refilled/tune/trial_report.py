"""What a trial tells Tune, and when: every epoch into its own files, to Tune only where
something is decided or saved.

Each `tune.report` goes through the driver's one controller thread, its callbacks and
its state saves (benchmarks/README.md, "Scale"); most epochs decide nothing there.
A trial reports to Tune when its rung clock moves (an ASHA rung, and the phase's end:
refilled.schema.rungs), with each checkpoint, when it diverged, and at least every
`report_every_s` seconds (progress and liveness); every epoch goes into its folder
(refilled.store.epoch_files), written before the report that follows it. A report to
Tune carries its epoch's metrics and the cost of the epochs since the previous one.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from refilled.schema.rungs import CLOCK
from refilled.store.cost import Clock
from refilled.store.epoch_files import COST, EpochFiles


class TrialReporter:
    """One trial's reports. `location`: its experiment (or phase) folder or URI; `start_step`:
    where it starts (0, or the step of the checkpoint it resumes from)."""

    def __init__(self, clock: Clock, location: str, params: dict[str, Any], start_step: int,
                 report_every_s: float):
        import ray
        import ray.util
        from ray import tune

        # Ray Train logs a line for every checkpoint it persists, sent to the driver's console
        # through Ray's log monitor: one per trial every few epochs, which tell the user nothing
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        self.clock, self.every = clock, report_every_s
        # Ray's node_ip is the same for nodes that share a machine; the node id tells them apart
        self.node = {"node_ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id()}
        self.files = EpochFiles(location, tune.get_context().get_trial_id(), params, self.node)
        self.files.start(start_step)
        self._sent_at = time.monotonic()
        self._clock = None  # the rung clock at the last report to Tune
        self._unsent = dict.fromkeys(COST, 0.0)

    def epoch(self, metrics: dict[str, Any], save: Callable[[Path], None] | None = None) -> bool:
        """One epoch: into the files; to Tune (with a checkpoint `save(folder)` writes, if any)
        when something is decided or saved there. Whether Tune was told."""
        lap = self.clock.lap()
        for key in COST:
            self._unsent[key] += lap[key]
        self.files.add({**metrics, **lap, **({"checkpointed": True} if save else {})}, lap["cost_wall_s"])
        moved = metrics.get(CLOCK) != self._clock
        if not (save is not None or moved or metrics.get("diverged")
                or time.monotonic() - self._sent_at >= self.every):
            return False
        self.files.flush()  # before Tune hears of it: a checkpoint never runs ahead of the curve
        self._send({**metrics, **self._unsent}, save)  # Tune adds its own fields (trial_id, node_ip, ...)
        self._clock, self._sent_at = metrics.get(CLOCK), time.monotonic()
        self._unsent = dict.fromkeys(COST, 0.0)
        return True

    def _send(self, metrics: dict[str, Any], save: Callable[[Path], None] | None) -> None:
        from ray import tune

        metrics = {**metrics, "node_id": self.node["node_id"]}  # Tune adds node_ip itself
        if save is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            save(Path(folder))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
