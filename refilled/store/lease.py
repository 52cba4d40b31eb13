"""One search driver per experiment (docs/reliability.md, "One driver per experiment"): a lease file,
`driver.lease`, renewed by a heartbeat thread, and in a folder an flock on `driver.lease.lock` that the
kernel drops when its holder dies. `search` and a `retrain` writing into the experiment hold it
(`lease_at(location).acquire()`, then `lost` checked at safe points); readers look (`note_if_running`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow.fs as pafs

from refilled.errors import UserError
from refilled.store import storage
from refilled.store.layout import LEASE_FILE, LOCK_FILE

TIMEOUT_ENV = "TUNE_REFILLED_LEASE_TIMEOUT"  # seconds without a heartbeat before a lease is stale
DEFAULT_TIMEOUT_S = 120.0
BOOT = None  # this kernel's boot id: a host name may be shared, and a lock of another boot is long gone
with contextlib.suppress(OSError):
    BOOT = Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    with contextlib.suppress(ValueError):
        if (value := float(raw or DEFAULT_TIMEOUT_S)) > 0:
            return value
    raise UserError(f"{TIMEOUT_ENV}={raw!r}: give the lease timeout in seconds, a number > 0")


@dataclass(frozen=True)
class Holder:
    """A lease as read. `age`: seconds since its heartbeat, by the reader's clock (an unreadable lease:
    since its file was written; it has no token). `gone`: why its holder is gone, or None."""
    host: str
    pid: int | None
    started: float
    age: float
    timeout_s: float
    token: str | None
    lock: bool
    boot: str | None
    gone: str | None = None
    command: str = "search"  # what holds it: a search driver, or a retrain writing into the experiment

    def stale(self) -> bool:
        return self.age > self.timeout_s

    def describe(self) -> str:
        who = f"pid {self.pid} on {self.host}" if self.token else f"a driver whose {LEASE_FILE} cannot be read"
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"{who}, running since {since}, last heartbeat {self.age:.0f} s ago"


class Held(UserError):
    """Another driver holds a live lease."""


class Lease:
    """The lease of the experiment at `location` (a folder or a URI): its file `path` on the pyarrow
    file system `fs`, with a lock where the backend has one. `clock`: wall-clock time."""

    def __init__(self, location: str, timeout: float | None = None, clock=time.time, command: str = "search"):
        self.location, self.clock, self.command = location, clock, command
        self.timeout = timeout if timeout is not None else timeout_s()
        self.interval = self.timeout / 6  # a live driver renews well within the timeout
        self.token, self.started, self.locked = None, 0.0, None  # locked: held, another's, no lock here
        self.lost, self.lost_to = threading.Event(), None  # set by the heartbeat once another holds the lease
        self._stop, self._thread = threading.Event(), None
        self.fs, root = storage.filesystem_of(location)
        self.path = f"{root.rstrip('/')}/{LEASE_FILE}"

    def _lock(self) -> bool | None: return None  # True: held now; False: another holds it; None: no lock
    def _unlock(self) -> None: pass

    def _read(self) -> tuple[bytes, float] | None:  # the lease file's bytes and modification time
        if (info := self.fs.get_file_info(self.path)).type == pafs.FileType.NotFound:
            return None
        with contextlib.suppress(FileNotFoundError), self.fs.open_input_stream(self.path) as f:  # or deleted: None
            return f.read(), info.mtime.timestamp() if info.mtime is not None else self.clock()

    def judge(self) -> Holder | None:
        """Whoever the lease names, with `gone` set if it can be taken over now; None if nobody.
        Unless this Lease is taking or holding it, the lock is taken for an instant to look."""
        if (found := self._read()) is None:
            return None
        (raw, mtime), seen = found, self.clock()
        try:
            d = json.loads(raw)
            holder = Holder(str(d["host"]), int(d["pid"]), float(d["started"]), max(0.0, seen - float(d["heartbeat"])),
                            float(d["timeout_s"]), str(d["token"]), d["lock"] is True, d["boot"],
                            command=str(d.get("command") or "search"))
        except (ValueError, KeyError, TypeError):  # written half, or damaged: judged by its age
            holder = Holder("?", None, mtime, max(0.0, seen - mtime), self.timeout, None, False, None)
        here = holder.lock and holder.host == socket.gethostname() and holder.boot == BOOT
        if here and self.token is None:
            self.locked = self._lock()
            self._unlock()
        if here and self.locked is True:
            return replace(holder, gone=f"the system released its lock ({LOCK_FILE}): the process ended")
        return replace(holder, gone=f"stale after {holder.timeout_s:g} s without a heartbeat" if holder.stale() else None)

    def refuse_if_held(self) -> None:
        """Raise Held, in one line, while a live driver holds the lease (it only looks, as judge() does)."""
        if (holder := self.judge()) is not None and holder.gone is None:
            raise self._held(holder)

    def _held(self, holder: Holder) -> Held:
        stop = f"stop it there (Ctrl-C, or `kill -INT {holder.pid}` on {holder.host})" if holder.token else "stop it"
        who = "another search driver" if holder.command == "search" else f"a {holder.command} writing into it"
        takeover = (f"at once on the same machine (a folder), otherwise once its heartbeat is {holder.timeout_s:g} s "
                    f"old ({LEASE_FILE}; {TIMEOUT_ENV})")
        then = (f"--resume takes over from a driver that died: {takeover}" if self.command == "search" else
                f"a {self.command} with --out elsewhere only reads the experiment; one that died is taken over {takeover}")
        return Held(f"{self.location} is in use by {who} ({holder.describe()}): {stop} or wait for it to end; {then}")

    def _write(self) -> None:
        """Written aside, then moved in place: a reader finds the old lease or the new one, never half."""
        self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(aside := f"{self.path}.{secrets.token_hex(4)}.tmp") as f:
            f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": self.started,
                                "heartbeat": self.clock(), "timeout_s": self.timeout, "token": self.token,
                                "lock": self.locked is True, "boot": BOOT, "command": self.command}).encode())
        self.fs.move(aside, self.path)

    def acquire(self) -> Holder | None:
        """Take the lease and start the heartbeat; returns the holder taken over from (`gone`
        says why), None if it was free. Raises Held while a live driver holds it."""
        self.token, self.started, self.lost_to = secrets.token_hex(16), self.clock(), None
        self.lost.clear()
        self.locked = self._lock()
        try:
            took = self.judge()
            if took is None and self.locked is False:
                raise Held(f"{self.location} is in use by another driver that is starting or ending right "
                           f"now (it holds {LOCK_FILE} and has no {LEASE_FILE}): try again in a moment")
            if took is not None and took.gone is None:
                raise self._held(took)
            self._write()
            if not self.locked:  # no lock decides: the last writer wins; read back after a pause
                time.sleep(min(2.0, self.timeout / 10))
                if (there := self.judge()) is None or there.token != self.token:
                    raise self._held(there) if there else UserError(
                        f"{self.location}: the lease ({LEASE_FILE}) vanished while this driver took it: try again")
        except BaseException:
            self._unlock()
            self.token = None
            raise
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return took

    def _beat(self) -> None:
        failing = False
        while not self._stop.wait(self.interval):
            try:
                if (holder := self.judge()) is None or holder.token != self.token:  # not ours: renew nothing
                    self.lost_to = holder
                    return self.lost.set()
                self._write()
                failing = False
            except storage.ERRORS as e:  # storage unreachable for a moment: keep trying
                if not failing:
                    print(f"warning: renewing the lease of {self.location} failed ({e}); retrying", file=sys.stderr)
                failing = True

    def release(self) -> None:
        """Stop the heartbeat, delete the lease if it is still ours, then let the lock go."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            if self.token is not None and (holder := self.judge()) is not None and holder.token == self.token:
                self.fs.delete_file(self.path)
        except storage.ERRORS as e:
            print(f"warning: could not delete the lease {self.location}/{LEASE_FILE} ({e}); the next "
                  f"--resume takes it over ({TIMEOUT_ENV})", file=sys.stderr)
        finally:
            self._unlock()  # after the lease is gone: a driver that then locks finds none
            self.token = None


class FolderLease(Lease):
    """A folder on a local or shared file system, with an flock on LOCK_FILE. Its holder removes
    LOCK_FILE while still holding it; one that locked a removed file (opened before) tries again."""

    _fd: int | None = None  # the lock file, open while locked

    def _lock(self) -> bool | None:
        self.lock_path = Path(self.location) / LOCK_FILE
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a lock held for an instant (a reader's look, a driver ending) is tried again
            try:
                self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.path.samestat(os.fstat(self._fd), os.stat(self.lock_path)):
                    return True
            except (BlockingIOError, FileNotFoundError):  # held, or removed by its holder just now
                time.sleep(0.05)
            except OSError:  # ENOLCK, EOPNOTSUPP, another user's lock file: no lock (None), the heartbeat only
                return self._unlock(remove=False)
            self._unlock(remove=False)
        return False

    def _unlock(self, remove: bool = True) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):  # if not removed, the next driver locks it as it is
                if remove and os.path.samestat(os.fstat(self._fd), os.stat(self.lock_path)):
                    self.lock_path.unlink()
            os.close(self._fd)
            self._fd = None


class UriLease(Lease):
    """A URI (s3://, gs://, file://...): no lock and no atomic create, the heartbeat only."""


def lease_at(location: str, timeout: float | None = None, clock=time.time, command: str = "search") -> Lease:
    """The lease of the experiment at `location` (Place.location: a folder or a URI), to be
    taken by `command` (a search driver, or a retrain that writes into the experiment)."""
    return (UriLease if storage.is_uri(location) else FolderLease)(location, timeout, clock, command)


def note_if_running(location: str) -> Holder | None:
    """For readers (retrain, analysis): one line on stderr if a search driver holds the lease, or left one."""
    try:
        holder = lease_at(location, timeout=DEFAULT_TIMEOUT_S).judge()
    except (*storage.ERRORS, UserError):
        return None  # reading goes on: the lease is only a note here
    if holder is not None:
        if holder.command != "search" and not holder.gone:
            print(f"note: a {holder.command} of {location} is writing into it ({holder.describe()})", file=sys.stderr)
            return holder
        print(f"note: the search of {location} " + (
            f"did not end (its driver is gone: {holder.gone}; last heartbeat {holder.age:.0f} s ago): its "
            "trials are read as they are; `search --resume` continues it" if holder.gone else
            f"is still running ({holder.describe()}): its trials are read as they are now"), file=sys.stderr)
    return holder
