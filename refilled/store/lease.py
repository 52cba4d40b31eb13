"""One search driver per experiment: a lease with a heartbeat, in the experiment itself.

`search` (new or `--resume`) takes the lease before it writes anything and holds
it until it ends (normally, on an error, on Ctrl-C). The lease is a small JSON
file, `driver.lease`, in the experiment folder or at its URI: who holds it (host,
pid, start time), a random token, the heartbeat that a background thread renews
every `timeout / 6` seconds, and the timeout after which a silent holder counts
as gone (a driver killed with SIGKILL, a machine that rebooted). A second driver
on a live lease is refused; `--resume` takes over a stale one, saying so.
`retrain` and the analysis scripts only look (`note_if_running`).

Races. Two drivers that start at the same instant:
- on a local or shared file system the lease is made with an exclusive create
  (O_CREAT | O_EXCL, atomic on local disks and NFSv3+), and a stale lease is
  replaced only by the driver that first makes its exclusive takeover marker;
- object stores have no atomic create: a driver writes its lease, waits a short
  pause (`settle_s`), reads it back and holds it only if its token is there.
  Left open: a driver whose read-then-write takes longer than that pause (a
  request stalled for seconds) can overwrite a lease another driver has just
  confirmed. Every renewal reads the lease first, so the overwritten driver
  finds a foreign token at its next heartbeat and stops (`on_lost`): two drivers
  can overlap for at most one heartbeat interval.
The same holds for a driver that was only paused past the timeout (SIGSTOP, a
suspended laptop) and taken over meanwhile. Heartbeats are wall-clock times of
the writer; machines must agree on the time to well within the timeout (NTP).

No Ray here: `retrain` and the analysis scripts use it too.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow
import pyarrow.fs as pafs

from refilled.store import storage
from refilled.errors import UserError
from refilled.store.layout import LEASE_FILE

TIMEOUT_ENV = "TUNE_REFILLED_LEASE_TIMEOUT"  # seconds without a heartbeat before a lease is stale
DEFAULT_TIMEOUT_S = 120.0
MARKER_EXPIRY_S = 30.0  # a takeover marker this old was left by a driver that died while taking over


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"{TIMEOUT_ENV}={raw!r}: give the lease timeout in seconds, a number > 0")
    return value


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


@dataclass(frozen=True)
class Holder:
    """What a lease file says. An unreadable one (cut short, written half) has no
    token; its heartbeat is then the file's modification time."""
    host: str
    pid: int | None
    started: float
    heartbeat: float
    timeout_s: float
    token: str | None

    def age(self) -> float:
        return max(0.0, time.time() - self.heartbeat)

    def stale(self) -> bool:
        return self.age() > self.timeout_s

    def describe(self) -> str:
        who = f"pid {self.pid} on {self.host}" if self.token else f"a driver whose {LEASE_FILE} cannot be read"
        return f"{who}, running since {_when(self.started)}, last heartbeat {self.age():.0f} s ago"


class Held(UserError):
    """Another driver holds a live lease."""


# ----------------------------------------------------------------------------- where the file is

class _Local:
    """A folder on a local or shared file system."""

    def __init__(self, folder: Path):
        self.path = folder / LEASE_FILE

    def read(self) -> tuple[bytes, float] | None:
        try:
            return self.path.read_bytes(), self.path.stat().st_mtime
        except FileNotFoundError:
            return None

    def create(self, data: bytes, path: Path | None = None) -> bool:
        """Exclusive create: False if the file exists."""
        path = path or self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def replace(self, data: bytes) -> None:
        tmp = self.path.with_name(f".{LEASE_FILE}.{secrets.token_hex(4)}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.path)  # readers see the old lease or the new one, never half

    def delete(self, path: Path | None = None) -> None:
        (path or self.path).unlink(missing_ok=True)

    def takeover_marker(self, raw: bytes) -> Path:
        return self.path.with_name(f"{LEASE_FILE}.takeover-{hashlib.sha1(raw).hexdigest()[:12]}")


class _Remote:
    """A URI (s3://, gs://, file://...): no atomic create, a write replaces the object whole."""

    def __init__(self, uri: str):
        self.fs, root = storage.filesystem(uri)
        self.path = f"{root.rstrip('/')}/{LEASE_FILE}"

    def read(self) -> tuple[bytes, float] | None:
        try:
            with self.fs.open_input_stream(self.path) as f:
                data = f.read()
            info = self.fs.get_file_info(self.path)
        except FileNotFoundError:
            return None
        except (OSError, pyarrow.ArrowException):
            if self.fs.get_file_info(self.path).type == pafs.FileType.NotFound:
                return None
            raise
        mtime = info.mtime.timestamp() if info.mtime is not None else time.time()
        return data, mtime

    def write(self, data: bytes) -> None:
        self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        # an object store replaces an object whole; a file (file://) is written in place, where two
        # writers at once could leave one's bytes over the other's: there, write aside and rename
        target = f"{self.path}.{secrets.token_hex(4)}.tmp" if isinstance(self.fs, pafs.LocalFileSystem) else self.path
        with self.fs.open_output_stream(target) as f:
            f.write(data)
        if target != self.path:
            self.fs.move(target, self.path)

    def delete(self) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            pass


def _parse(found: tuple[bytes, float] | None, default_timeout: float) -> Holder | None:
    if found is None:
        return None
    raw, mtime = found
    try:
        d = json.loads(raw)
        return Holder(str(d["host"]), int(d["pid"]), float(d["started"]), float(d["heartbeat"]),
                      float(d["timeout_s"]), str(d["token"]))
    except (ValueError, KeyError, TypeError):  # written half, or damaged: judged by its age
        return Holder("?", None, mtime, mtime, default_timeout, None)


# ----------------------------------------------------------------------------- the lease

class Lease:
    """The lease of the experiment at `location` (a folder or a URI, Place.location)."""

    def __init__(self, location: str, timeout: float | None = None):
        self.location = location
        self.timeout = timeout if timeout is not None else timeout_s()
        self.interval = self.timeout / 6  # heartbeats: a live driver renews well within the timeout
        self.settle_s = min(2.0, self.timeout / 10)  # object stores: the pause before reading our write back
        self._where = _Remote(location) if storage.is_uri(location) else _Local(Path(location))
        self.token: str | None = None
        self.started = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --------------------------------------------------------------------- reading

    def _read(self) -> tuple[bytes | None, Holder | None]:
        found = self._where.read()
        return (found[0] if found else None), _parse(found, self.timeout)

    def holder(self) -> Holder | None:
        """Whoever the lease file names (live or stale), or None."""
        return self._read()[1]

    def refuse_if_held(self) -> None:
        """Refuse, in one line, while a live driver holds the lease (reads only)."""
        holder = self.holder()
        if holder is not None and not holder.stale():
            raise self._held(holder)

    def _held(self, holder: Holder) -> Held:
        stop = (f"stop it there (Ctrl-C, or `kill -INT {holder.pid}` on {holder.host})" if holder.token
                else "stop that driver")
        return Held(f"{self.location} is in use by another search driver ({holder.describe()}): {stop} or wait "
                    f"for it to end; a driver that died is taken over by --resume once its heartbeat is "
                    f"{holder.timeout_s:g} s old ({LEASE_FILE}; {TIMEOUT_ENV})")

    # --------------------------------------------------------------------- taking it

    def _content(self, heartbeat: float) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": self.started,
                           "heartbeat": heartbeat, "timeout_s": self.timeout, "token": self.token}).encode()

    def acquire(self, on_lost: Callable[[Holder | None], None]) -> Holder | None:
        """Take the lease and start the heartbeat; returns the stale holder it took over
        (None if it was free). Raises Held if a live driver holds it. `on_lost` is called
        (from the heartbeat thread) if another driver's token is found at a renewal."""
        self.token, self.started = secrets.token_hex(16), time.time()
        took = self._take_local() if isinstance(self._where, _Local) else self._take_remote()
        self._on_lost = on_lost
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return took

    def _take_local(self) -> Holder | None:
        where: _Local = self._where
        for _ in range(5):
            raw, holder = self._read()
            if holder is None:
                if where.create(self._content(time.time())):
                    return None
                continue  # another driver created it first: read it
            if not holder.stale():
                raise self._held(holder)
            marker = where.takeover_marker(raw)
            if not where.create(b"", marker):  # another driver is taking this stale lease over
                try:
                    if time.time() - marker.stat().st_mtime > MARKER_EXPIRY_S:
                        where.delete(marker)  # left by one that died while taking over
                except FileNotFoundError:
                    pass
                time.sleep(0.2)
                continue
            try:
                if self._read()[0] != raw:
                    continue  # it changed meanwhile: judge it again
                where.replace(self._content(time.time()))
                return holder
            finally:
                where.delete(marker)
        raise UserError(f"{self.location}: the lease ({LEASE_FILE}) kept changing while this driver tried to take "
                        "it: another driver is starting on this experiment; try again in a moment")

    def _take_remote(self) -> Holder | None:
        _, holder = self._read()
        if holder is not None and not holder.stale():
            raise self._held(holder)
        self._where.write(self._content(time.time()))
        time.sleep(self.settle_s)  # a driver that wrote at the same time has written by now
        _, now = self._read()
        if now is None or now.token != self.token:
            raise self._held(now) if now is not None else UserError(
                f"{self.location}: the lease ({LEASE_FILE}) vanished while this driver took it: try again")
        return holder

    # --------------------------------------------------------------------- holding it

    def _renew(self) -> bool:
        _, holder = self._read()
        if holder is None or holder.token != self.token:
            return False
        data = self._content(time.time())
        if isinstance(self._where, _Local):
            self._where.replace(data)
        else:
            self._where.write(data)
        return True

    def _beat(self) -> None:
        failing = False
        while not self._stop.wait(self.interval):
            try:
                if not self._renew():
                    if not self._stop.is_set():
                        self._on_lost(self.holder())
                    return
                failing = False
            except (OSError, pyarrow.ArrowException) as e:  # storage unreachable for a moment: keep trying
                if not failing:
                    print(f"warning: renewing the lease of {self.location} failed ({e}); retrying", file=sys.stderr)
                failing = True

    def release(self) -> None:
        """Stop the heartbeat and delete the lease, if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.token is None:
            return
        try:
            holder = self.holder()
            if holder is not None and holder.token == self.token:
                self._where.delete()
        except (OSError, pyarrow.ArrowException) as e:
            print(f"warning: could not delete the lease {self.location}/{LEASE_FILE} ({e}); the next "
                  f"--resume takes it over once it is {self.timeout:g} s old", file=sys.stderr)
        self.token = None


def note_if_running(location: str) -> Holder | None:
    """For readers (retrain, analysis): one line on stderr if a search driver holds the
    experiment's lease (its trials are read as they are now), or left a stale one."""
    try:
        holder = Lease(location, timeout=DEFAULT_TIMEOUT_S).holder()
    except (OSError, pyarrow.ArrowException, UserError):
        return None  # reading goes on: the lease is only a note here
    if holder is None:
        return None
    if holder.stale():
        print(f"note: the search of {location} did not end (its driver's last heartbeat was {holder.age():.0f} s "
              "ago): its trials are read as they are; `search --resume` continues it", file=sys.stderr)
    else:
        print(f"note: the search of {location} is still running ({holder.describe()}): its trials are read "
              "as they are now", file=sys.stderr)
    return holder
