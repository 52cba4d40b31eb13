"""One search driver per experiment: a lease in the experiment itself, held with an OS
lock on a file system and with a heartbeat everywhere.

`search` (new or `--resume`) takes the lease before it writes anything and holds
it until it ends (normally, on an error, on Ctrl-C). The lease is a small JSON
file, `driver.lease`, in the experiment folder or at its URI: who holds it (host,
pid, start time), a random token, whether its holder also holds the lock below,
the heartbeat that a background thread renews every `timeout / 6` seconds, and
the timeout after which a silent holder counts as gone. A second driver on a live
lease is refused; `--resume` takes over the lease of a driver that is gone, saying
so. `retrain` and the analysis scripts only look (`note_if_running`).

How a driver that died is told from a live one:
- in a folder (a local or shared file system) the driver also holds an exclusive
  `flock` on `driver.lease.lock` beside the lease, which the kernel drops when
  the process ends, however it ends (SIGKILL, the out-of-memory killer). A driver
  that cannot take the lock is refused; one that takes it while the lease names a
  lock-holding driver on this machine knows that driver is gone and takes over at
  once. A lease of this machine whose pid no longer exists (one written without
  the lock: an older version, a file system without locks) is taken over at once
  too;
- at a URI (object storage), and for a holder on another machine, only the
  heartbeat tells: its lease is taken over once the heartbeat is older than the
  timeout (a driver killed there, a machine that rebooted). That also holds on a
  file system when the lock is held but the lease is not renewed (a process the
  dead driver forked that keeps its lock open, a lock that a crashed NFS client
  left): no driver waits longer than the timeout.

Races. Two drivers that start at the same instant:
- on a local or shared file system the lock decides; besides, the lease is made
  with an exclusive create (O_CREAT | O_EXCL, atomic on local disks and NFSv3+),
  and a lease of a gone driver is replaced only by the driver that first makes
  its exclusive takeover marker;
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

import dataclasses
import fcntl
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
from refilled.files.atomic import write_atomic
from refilled.store.layout import LEASE_FILE, LOCK_FILE

TIMEOUT_ENV = "TUNE_REFILLED_LEASE_TIMEOUT"  # seconds without a heartbeat before a lease is stale
DEFAULT_TIMEOUT_S = 120.0
MARKER_EXPIRY_S = 30.0  # a takeover marker this old was left by a driver that died while taking over
LOCK_TRIES = 5  # a lock held for a moment (a reader's look, a driver whose threads are ending) is tried again
LOCK_PAUSE_S = 0.05


def now() -> float:
    """Wall-clock time (heartbeats are compared across machines); the tests put a fake clock here."""
    return time.time()


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


def _machine() -> tuple[str | None, str | None]:
    """This kernel's boot id and this process's pid namespace: two machines may share a host
    name, and a lock or a pid of another boot (or a pid of another container) means nothing here."""
    def read(how):
        try:
            return how()
        except OSError:
            return None
    return (read(lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip()),
            read(lambda: os.readlink("/proc/self/ns/pid")))


def _same(theirs: str | None, ours: str | None) -> bool:
    return theirs is None or ours is None or theirs == ours  # unknown (an older lease): the host name decides


def _pid_gone(pid: int | None) -> bool:
    """Whether no process of this pid exists on this machine (a zombie still exists)."""
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process
        return False
    return False


@dataclass(frozen=True)
class Holder:
    """What a lease file says. An unreadable one (cut short, written half) has no
    token; its heartbeat is then the file's modification time. `locked`: its holder
    also holds the lock file (a folder). `gone`: why it is gone, once judged so."""
    host: str
    pid: int | None
    started: float
    heartbeat: float
    timeout_s: float
    token: str | None
    locked: bool = False
    boot: str | None = None  # its kernel's boot id and pid namespace (_machine), where written
    pidns: str | None = None
    gone: str | None = None

    def age(self) -> float:
        return max(0.0, now() - self.heartbeat)

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
        self.lock_path = folder / LOCK_FILE
        self._lock_fd: int | None = None

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
        write_atomic(self.path, data)  # readers see the old lease or the new one, never half

    def delete(self, path: Path | None = None) -> None:
        (path or self.path).unlink(missing_ok=True)

    def takeover_marker(self, raw: bytes) -> Path:
        return self.path.with_name(f"{LEASE_FILE}.takeover-{hashlib.sha1(raw).hexdigest()[:12]}")

    # the lock: an exclusive flock on LOCK_FILE, held from before the lease is written until
    # after it is deleted; its holder removes the file while it still holds the lock, and a
    # driver that locked a file that was removed meanwhile (it opened it before) tries again

    def lock(self) -> bool | None:
        """Take the lock: True (held until unlock()), False (another process holds it),
        None (this file system has no locks)."""
        if self._lock_fd is not None:
            return True
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(LOCK_TRIES):
            try:  # not inherited by the programs this process starts (Python opens files close-on-exec)
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except PermissionError:  # another user's lock file, in a folder both may write to
                fd = os.open(self.lock_path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                time.sleep(LOCK_PAUSE_S)
                continue
            except OSError:  # ENOLCK, EOPNOTSUPP...: no locks on this file system
                os.close(fd)
                return None
            try:
                mine, there = os.fstat(fd), os.stat(self.lock_path)
                current = (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)
            except FileNotFoundError:
                current = False
            if current:
                self._lock_fd = fd
                return True
            os.close(fd)  # its holder removed it as it ended: lock the one there now
        return False

    def unlock(self) -> None:
        """Remove the lock file (still holding it) and let the lock go."""
        if self._lock_fd is None:
            return
        try:
            mine, there = os.fstat(self._lock_fd), os.stat(self.lock_path)
            if (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino):
                self.lock_path.unlink()
        except OSError:
            pass  # left in place: the next driver locks it as it is
        finally:
            os.close(self._lock_fd)
            self._lock_fd = None

    def lock_free(self) -> bool | None:
        """Look only: True if no process holds the lock (or there is no lock file), False if
        one does, None if this file system cannot tell. A shared lock, taken for an instant."""
        if self._lock_fd is not None:
            return False  # this Lease holds it
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return True
        except OSError:
            return None
        try:
            for attempt in range(LOCK_TRIES):
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:  # held, or its holder's last threads are ending right now
                    if attempt < LOCK_TRIES - 1:
                        time.sleep(LOCK_PAUSE_S)
            return False
        except OSError:
            return None
        finally:
            os.close(fd)  # lets the shared lock go


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
        mtime = info.mtime.timestamp() if info.mtime is not None else now()
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
                      float(d["timeout_s"]), str(d["token"]), bool(d.get("lock", False)),
                      d.get("boot"), d.get("pidns"))
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
        self._locked = False  # this driver holds the lock file (a folder)
        self._boot, self._pidns = _machine()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --------------------------------------------------------------------- reading

    def _read(self) -> tuple[bytes | None, Holder | None]:
        found = self._where.read()
        return (found[0] if found else None), _parse(found, self.timeout)

    def holder(self) -> Holder | None:
        """Whoever the lease file names (live or gone), or None."""
        return self._read()[1]

    def _gone(self, holder: Holder, lock_free: bool | None) -> str | None:
        """Why the holder the lease names is gone (so its lease can be taken over now), or
        None while it may be alive. `lock_free` (a folder): whether no process holds the
        lock file; None where this file system has no locks. At a URI: the heartbeat only."""
        # a lock held by a live process (a driver, or one taking this lease over): the heartbeat tells
        if self._here(holder) and lock_free is not False:
            if lock_free and holder.locked:
                return f"the system released its lock ({LOCK_FILE}): the process ended"
            if self._pid_gone(holder):
                return f"pid {holder.pid} no longer exists on this machine"
        if holder.stale():
            return f"stale after {holder.timeout_s:g} s without a heartbeat"
        return None

    def _here(self, holder: Holder) -> bool:
        """A lease in a folder, written on this machine (host name, and boot where known)."""
        return (isinstance(self._where, _Local) and holder.token is not None
                and holder.host == socket.gethostname() and _same(holder.boot, self._boot))

    def _pid_gone(self, holder: Holder) -> bool:
        return self._here(holder) and _same(holder.pidns, self._pidns) and _pid_gone(holder.pid)

    def judge(self) -> Holder | None:
        """The holder the lease names, with `gone` set if it can be taken over; None if
        there is no lease. Reads only (a folder's lock is looked at, not kept)."""
        holder = self.holder()
        if holder is None:
            return None
        free = self._where.lock_free() if isinstance(self._where, _Local) else None
        return dataclasses.replace(holder, gone=self._gone(holder, free))

    def refuse_if_held(self) -> None:
        """Refuse, in one line, while a live driver holds the lease (reads only)."""
        holder = self.judge()
        if holder is not None and holder.gone is None:
            raise self._held(holder)

    def _held(self, holder: Holder) -> Held:
        stop = (f"stop it there (Ctrl-C, or `kill -INT {holder.pid}` on {holder.host})" if holder.token
                else "stop that driver")
        return Held(f"{self.location} is in use by another search driver ({holder.describe()}): {stop} or wait "
                    f"for it to end; --resume takes over from a driver that died: at once on the same machine "
                    f"(a folder), otherwise once its heartbeat is {holder.timeout_s:g} s old ({LEASE_FILE}; "
                    f"{TIMEOUT_ENV})")

    # --------------------------------------------------------------------- taking it

    def _content(self, heartbeat: float) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": self.started,
                           "heartbeat": heartbeat, "timeout_s": self.timeout, "token": self.token,
                           "lock": self._locked, "boot": self._boot, "pidns": self._pidns}).encode()

    def acquire(self, on_lost: Callable[[Holder | None], None]) -> Holder | None:
        """Take the lease and start the heartbeat; returns the holder it took over from,
        with `gone` saying why (None if it was free). Raises Held if a live driver holds it.
        `on_lost` is called (from the heartbeat thread) if another driver's token is found
        at a renewal."""
        self.token, self.started = secrets.token_hex(16), now()
        took = self._take_local() if isinstance(self._where, _Local) else self._take_remote()
        self._on_lost = on_lost
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return took

    def _take_local(self) -> Holder | None:
        where: _Local = self._where
        lock = where.lock()
        try:
            return self._take_local_locked(where, lock)
        except BaseException:
            where.unlock()
            self._locked = False
            raise

    def _take_local_locked(self, where: _Local, lock: bool | None) -> Holder | None:
        waited = None  # why a driver that the lock kept out waited, the last time round
        for _ in range(10):
            if lock is False and waited:  # held by another process: perhaps one that is ending, try again
                lock = where.lock()
            waited = None
            self._locked = bool(lock)
            raw, holder = self._read()
            if holder is None:
                if lock is False:  # the lock's holder is writing its lease, or has just deleted it
                    waited = "starting"
                    time.sleep(0.1)
                    continue
                if where.create(self._content(now())):
                    return None
                continue  # another driver created it first: read it
            gone = self._gone(holder, lock)  # holding the lock ourselves: no other process holds it
            if gone is None:
                if lock is False and self._pid_gone(holder):
                    waited = "taking over"  # the lock's holder is taking this lease over right now
                    time.sleep(0.1)
                    continue
                raise self._held(holder)
            marker = where.takeover_marker(raw)
            if not where.create(b"", marker):  # another driver is taking this lease over
                try:
                    if now() - marker.stat().st_mtime > MARKER_EXPIRY_S:
                        where.delete(marker)  # left by one that died while taking over
                except FileNotFoundError:
                    pass
                time.sleep(0.2)
                continue
            try:
                if self._read()[0] != raw:
                    continue  # it changed meanwhile: judge it again
                where.replace(self._content(now()))
                return dataclasses.replace(holder, gone=gone)
            finally:
                where.delete(marker)
        if waited == "starting":
            raise Held(f"{self.location} is in use by another search driver that is starting or ending right now "
                       f"(it holds {LOCK_FILE} and has no {LEASE_FILE}): try again in a moment")
        if waited == "taking over":
            raise Held(f"{self.location}: its lease names a driver that is gone ({holder.describe()}; pid "
                       f"{holder.pid} no longer exists), but another process holds {LOCK_FILE} (a driver taking "
                       f"over, or a process the dead driver started): stop that process, or --resume takes over "
                       f"once the heartbeat is {holder.timeout_s:g} s old ({TIMEOUT_ENV})")
        raise UserError(f"{self.location}: the lease ({LEASE_FILE}) kept changing while this driver tried to take "
                        "it: another driver is starting on this experiment; try again in a moment")

    def _take_remote(self) -> Holder | None:
        _, holder = self._read()
        if holder is not None:
            gone = self._gone(holder, None)
            if gone is None:
                raise self._held(holder)
            holder = dataclasses.replace(holder, gone=gone)
        self._where.write(self._content(now()))
        time.sleep(self.settle_s)  # a driver that wrote at the same time has written by now
        _, there = self._read()
        if there is None or there.token != self.token:
            raise self._held(there) if there is not None else UserError(
                f"{self.location}: the lease ({LEASE_FILE}) vanished while this driver took it: try again")
        return holder

    # --------------------------------------------------------------------- holding it

    def _renew(self) -> bool:
        _, holder = self._read()
        if holder is None or holder.token != self.token:
            return False
        data = self._content(now())
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
        """Stop the heartbeat, delete the lease if it is still ours, then let the lock go."""
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
            later = "at once on this machine" if self._locked else f"once it is {self.timeout:g} s old"
            print(f"warning: could not delete the lease {self.location}/{LEASE_FILE} ({e}); the next "
                  f"--resume takes it over {later}", file=sys.stderr)
        finally:
            if isinstance(self._where, _Local):
                self._where.unlock()  # after the lease is gone: a driver that then locks finds none
            self._locked = False
            self.token = None


def note_if_running(location: str) -> Holder | None:
    """For readers (retrain, analysis): one line on stderr if a search driver holds the
    experiment's lease (its trials are read as they are now), or left one behind."""
    try:
        holder = Lease(location, timeout=DEFAULT_TIMEOUT_S).judge()
    except (OSError, pyarrow.ArrowException, UserError):
        return None  # reading goes on: the lease is only a note here
    if holder is None:
        return None
    if holder.gone:
        print(f"note: the search of {location} did not end (its driver is gone: {holder.gone}; last heartbeat "
              f"{holder.age():.0f} s ago): its trials are read as they are; `search --resume` continues it",
              file=sys.stderr)
    else:
        print(f"note: the search of {location} is still running ({holder.describe()}): its trials are read "
              "as they are now", file=sys.stderr)
    return holder
