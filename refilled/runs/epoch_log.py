"""Per-epoch records of a run: TensorBoard scalars and a JSON history."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refilled.files.atomic import write_json
from refilled.method.train import STAGE1, STAGE2, TEACHER, Epoch

STAGE_NAMES = {TEACHER: "teacher", STAGE1: "stage1", STAGE2: "stage2"}




def epoch_record(e: Epoch) -> dict[str, Any]:
    return {"stage": STAGE_NAMES[e.stage], "epoch": e.epoch, "step": e.step, **e.metrics}


class RunLog:
    """TensorBoard scalars (tag `stage/metric`, x = step) plus metrics.json."""

    def __init__(self, folder: str | Path, config: dict[str, Any] | None = None):
        from torch.utils.tensorboard import SummaryWriter  # imported late: tensorboard is slow to import

        self.folder = Path(folder)
        self.writer = SummaryWriter(str(self.folder))
        self.history: list[dict[str, Any]] = []
        self.config = config or {}

    def add(self, e: Epoch) -> dict[str, Any]:
        record = epoch_record(e)
        self.history.append(record)
        for key, value in e.metrics.items():
            self.writer.add_scalar(f"{STAGE_NAMES[e.stage]}/{key}", value, e.step)
        return record

    def close(self, summary: dict[str, Any] | None = None) -> Path:
        self.writer.close()
        return write_json({"config": self.config, "summary": summary or {}, "epochs": self.history},
                          self.folder / "metrics.json")
