"""The tiny digits setting every fast test derives its configs from."""

from __future__ import annotations

from pathlib import Path

from refilled.schema.config import Config

REPO = Path(__file__).resolve().parents[2]

# The tiny setting as Config keyword arguments (tests derive variants with
# make_tiny_config(**changes)); the CLI tests get it as a YAML file (`tiny_yaml`).
TINY = dict(
    data_name="digits",
    source_classes="0-4",
    target_classes="5-9",
    shots=10,
    val_fraction=0.3,
    teacher_network_name="wide_resnet",
    teacher_depth=10,
    teacher_width=1,
    teacher_epochs=2,
    teacher_batch_size=64,
    student_network_name="wide_resnet",
    depth=10,
    width=1,
    n_training_epochs1=2,
    n_training_epochs2=3,
    point=(2,),
    batch_size=16,
    lr1=0.05,
    lr2=0.05,
    tau1=4.0,
    tau2=2.0,
    lambd=1.0,
    device="cpu",
)


def make_tiny_config(**changes) -> Config:
    return Config(**TINY).replace(**changes)


