"""Every epoch of a trial, written by the trial itself into its folder in the experiment.

Tune is told only what it decides on (refilled.tune.trial_report); the curve of
each trial is kept here, in the files Ray Tune's loggers used to write, so every
reader reads what it read before:

    params.json                 the trial's searched values
    result.json                 one JSON line per epoch (the trial's metrics, its cost,
                                and Tune's fields: trial_id, training_iteration,
                                time_total_s, timestamp, node_ip, ...; the values are
                                in params.json, not repeated in every line)
    events.out.tfevents.*       TensorBoard: a scalar per metric per epoch (tags
                                `ray/tune/<key>`, as Ray's logger named them, at the
                                epoch's step) and the HParams tab's summaries

Rows are kept in memory and written at each `flush` (the trial flushes before
each report to Tune, so a checkpoint Tune holds never runs ahead of the files).
In a folder the new bytes are appended; at a URI (object stores cannot append)
each file is written whole under a temporary name, then moved in place. A trial
that starts again from a checkpoint (`start(step)`) drops the rows after it, an
earlier run's, and writes both files anew: no step twice, none missing (what the
dropped epochs cost is added to the next epoch's cost: they were computed).
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import pyarrow.fs as pafs

from refilled.files.atomic import write_atomic
from refilled.store import storage
from refilled.store.trial_records import folder_name

RESULT_FILE = "result.json"
PARAMS_FILE = "params.json"
EVENTS_PREFIX = "events.out.tfevents."
TAG = "ray/tune/"  # Ray's TensorBoard logger's tags: views and scripts made before still find them
NOT_SCALARS = ("config", "pid", "timestamp", "time_total_s", "training_iteration")  # as Ray's logger left out
COST = ("cost_wall_s", "cost_device_s")  # refilled.store.cost
HPARAM_METRICS = ("val_accuracy", "best_val_accuracy_stage2", "step")  # the HParams tab's columns


class EpochFiles:
    """The per-epoch files of one trial (`trial_id`) of the experiment (or its part) at `location`;
    `node`: where it runs, in every row (Ray's node_ip and node_id)."""

    def __init__(self, location: str, trial_id: str, params: dict[str, Any], node: dict[str, str] | None = None):
        self.trial_id, self.params = trial_id, params
        self.uri = storage.is_uri(location)  # an object store: files written whole, never appended to
        self.fs, root = storage.filesystem_of(location)
        self.folder = f"{root.rstrip('/')}/{folder_name(trial_id)}"
        self.rows: list[dict[str, Any]] = []
        self._carried = dict.fromkeys(COST, 0.0)
        self._result = _File(self, RESULT_FILE)
        self._events = _File(self, f"{EVENTS_PREFIX}{int(time.time())}.{trial_id}")
        self._identity = {"trial_id": trial_id, "pid": os.getpid(), "hostname": socket.gethostname(), **(node or {})}

    def start(self, step: int) -> None:
        """Begin after `step` (0 from scratch, a checkpoint's step when resumed from it): the
        rows an earlier run of this trial wrote after it are dropped, both files written anew."""
        kept, dropped = [], []
        for row in self._read_rows():
            (kept if isinstance(row.get("step"), int) and row["step"] <= step else dropped).append(row)
        # the dropped epochs were computed: their cost goes into the next epoch's (refilled.store.cost)
        self._carried = {k: sum(r[k] for r in dropped if isinstance(r.get(k), (int, float))) for k in COST}
        self._write_whole(PARAMS_FILE, json.dumps(self.params, indent=2, sort_keys=True).encode())
        for name in self._listing():  # an earlier run's event files: their steps are rewritten here
            if name.startswith(EVENTS_PREFIX) and name != self._events.name:
                self._remove(name)
        self.rows = []
        self._result.reset()
        self._events.reset(_event_record(_first_event()) + b"".join(_event_record(e) for e in _hparams(self.params)))
        for row in kept:
            self._add(row)
        self.flush(whole=True)

    def add(self, metrics: dict[str, Any], wall_s: float) -> dict[str, Any]:
        """Keep one epoch's metrics (written at the next flush); returns the row as written."""
        last = self.rows[-1] if self.rows else {}
        now = time.time()
        if any(self._carried.values()):
            metrics = {**metrics, **{k: metrics.get(k, 0.0) + v for k, v in self._carried.items()}}
            self._carried = dict.fromkeys(COST, 0.0)
        row = {**metrics, **self._identity, "timestamp": int(now), "time_this_iter_s": wall_s,
               "time_total_s": last.get("time_total_s", 0.0) + wall_s,
               "training_iteration": last.get("training_iteration", 0) + 1}
        self._add(row, now)
        return row

    def flush(self, whole: bool = False) -> None:
        """Write what was added since the last flush (`whole`: the whole files)."""
        self._result.flush(whole)
        self._events.flush(whole)

    def _add(self, row: dict[str, Any], wall_time: float | None = None) -> None:
        self.rows.append(row)
        self._result.add(json.dumps(row, default=_plain).encode() + b"\n")
        self._events.add(_event_record(_scalars(row, wall_time or row.get("timestamp", time.time()))))

    # ------------------------------------------------------------------ storage: a folder or a URI

    def _path(self, name: str) -> str:
        return f"{self.folder}/{name}"

    def _read_rows(self) -> list[dict[str, Any]]:
        try:
            with self.fs.open_input_stream(self._path(RESULT_FILE)) as f:
                text = f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return []
        rows = []
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line a crash cut off
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def _listing(self) -> list[str]:
        return [i.base_name for i in self.fs.get_file_info(pafs.FileSelector(self.folder, allow_not_found=True))]

    def _remove(self, name: str) -> None:
        try:
            self.fs.delete_file(self._path(name))
        except FileNotFoundError:
            pass

    def _write_whole(self, name: str, content: bytes) -> None:
        if self.uri:
            self.fs.create_dir(self.folder, recursive=True)
            temporary = f"{self._path(name)}.writing"
            with self.fs.open_output_stream(temporary) as f:
                f.write(content)
            self.fs.move(temporary, self._path(name))
        else:
            write_atomic(self._path(name), content)

    def _append(self, name: str, content: bytes) -> None:
        with open(self._path(name), "ab") as f:
            f.write(content)


class _File:
    """One of a trial's files: its bytes so far, and those not yet written."""

    def __init__(self, owner: EpochFiles, name: str):
        self.owner, self.name = owner, name
        self.content, self.pending = bytearray(), bytearray()

    def reset(self, head: bytes = b"") -> None:
        self.content, self.pending = bytearray(head), bytearray(head)

    def add(self, data: bytes) -> None:
        self.content += data
        self.pending += data

    def flush(self, whole: bool) -> None:
        if not self.pending and not whole:
            return
        if whole or self.owner.uri:
            self.owner._write_whole(self.name, bytes(self.content))
        else:
            self.owner._append(self.name, bytes(self.pending))
        self.pending = bytearray()


def _plain(value: Any) -> Any:
    """What json cannot write as it is (numpy numbers): as a Python number, else as text."""
    try:
        return value.item()
    except AttributeError:
        return str(value)


# ----------------------------------------------------------------------------- TensorBoard's records

def _event_record(event) -> bytes:
    """One event in TFRecord framing (what TensorBoard's own RecordWriter writes)."""
    import io

    from tensorboard.summary.writer.record_writer import RecordWriter

    buffer = io.BytesIO()
    RecordWriter(buffer).write(event.SerializeToString())
    return buffer.getvalue()


def _first_event():
    from tensorboard.compat.proto.event_pb2 import Event

    return Event(wall_time=time.time(), file_version="brain.Event:2")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and value == value  # bools are ints, as in Ray's logger; NaN is not kept


def _scalars(row: dict[str, Any], wall_time: float):
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    values = [Summary.Value(tag=TAG + k, simple_value=float(v)) for k, v in row.items()
              if k not in NOT_SCALARS and _number(v)]
    return Event(wall_time=wall_time, step=int(row.get("step") or 0), summary=Summary(value=values))


def _hparams(params: dict[str, Any]) -> list:
    """The HParams tab's experiment and session-start summaries (as Ray's logger wrote them at
    a trial's end; written at its start here, so a trial ASHA stops is listed too)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    kept = {k: v for k, v in params.items() if isinstance(v, (int, float, str, bool))}
    start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for key, value in kept.items():
        if isinstance(value, bool):
            start.hparams[key].bool_value = value
        elif isinstance(value, str):
            start.hparams[key].string_value = value
        else:
            start.hparams[key].number_value = float(value)
    experiment = api_pb2.Experiment(
        hparam_infos=[api_pb2.HParamInfo(name=k) for k in kept],
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=TAG + m)) for m in HPARAM_METRICS])

    def summary(tag: str, data) -> Event:
        content = plugin_data_pb2.HParamsPluginData(version=0, **data).SerializeToString()
        metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="hparams", content=content))
        return Event(wall_time=time.time(), summary=Summary(value=[Summary.Value(tag=tag, metadata=metadata)]))

    return [summary("_hparams_/experiment", {"experiment": experiment}),
            summary("_hparams_/session_start_info", {"session_start_info": start})]
