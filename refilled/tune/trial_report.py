"""One epoch's report from a trial to Tune, with what it cost and, when asked, a checkpoint."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

from refilled.store.cost import Clock


def report(clock: Clock, metrics: dict[str, Any], save: Callable[[Path], None] | None = None) -> None:
    """tune.report, with the clock's lap (refilled.store.cost) and the node; `save(folder)`
    writes the checkpoint's files into a temporary folder Tune then persists."""
    import ray
    from ray import tune

    # Ray's node_ip is the same for nodes that share a machine; the node id tells them apart
    metrics = {**metrics, **clock.lap(), "node_id": ray.get_runtime_context().get_node_id()}
    if save is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        save(Path(folder))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
