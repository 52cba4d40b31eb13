"""One driver per experiment (refilled.store.lease): taking, holding, losing and releasing the lease.

Real files: a folder (the lock the kernel drops when its holder dies) and a
file:// URI, which pyarrow opens as it opens s3:// (write, pause, read back).
Drivers are threads here, or a subprocess where a driver has to die for real
(SIGKILL); the slow tests in test_search.py and test_resume.py run real drivers
against each other.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from refilled.errors import UserError
from refilled.store.layout import LEASE_FILE, LOCK_FILE
from refilled.store.lease import BOOT, DEFAULT_TIMEOUT_S, TIMEOUT_ENV, Held, lease_at, note_if_running, timeout_s

REPO = Path(__file__).resolve().parent.parent

SHORT = 0.6  # seconds: a heartbeat every 0.1 s


@pytest.fixture(params=["folder", "uri"])
def where(request, tmp_path):
    """An experiment location and the lease file it has."""
    folder = tmp_path / "storage" / "exp"
    location = str(folder) if request.param == "folder" else f"file://{folder}"
    return location, folder / LEASE_FILE


@pytest.fixture
def clock():
    """A wall clock moved by hand, given to the leases: a lease goes stale without a real wait."""
    from support.clocks import FakeClock

    return FakeClock(time.time())


def until(condition, what: str, limit: float = 30.0) -> None:
    """Wait for the lease's own heartbeat thread (no fixed sleep: as long as it takes, up to `limit`)."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not come in {limit:g} s"
        time.sleep(0.01)


def died(lease) -> None:
    """Its driver died: no heartbeat any more, no release (in a folder its lock stays held, as by a paused driver)."""
    lease._stop.set()
    lease._thread.join()


def test_a_second_driver_on_a_live_lease_is_refused(where):
    location, path = where
    first = lease_at(location, timeout=SHORT)
    assert first.acquire() is None
    try:
        held = json.loads(path.read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        beat = held["heartbeat"]
        until(lambda: json.loads(path.read_text())["heartbeat"] > beat, "a renewed heartbeat")  # while it runs
        second = lease_at(location, timeout=SHORT)
        with pytest.raises(Held) as refused:
            second.acquire()
        line = str(refused.value)
        assert "\n" not in line and location in line and f"pid {os.getpid()} on {socket.gethostname()}" in line
        assert "running since" in line and "kill -INT" in line and TIMEOUT_ENV in line, line
        with pytest.raises(Held):
            second.refuse_if_held()
        assert json.loads(path.read_text())["token"] == first.token  # the refused one wrote nothing
        assert not first.lost.is_set()
    finally:
        first.release()
    assert not path.exists()
    assert not [p for p in path.parent.iterdir() if LEASE_FILE in p.name]


def test_drivers_starting_at_the_same_instant_one_wins(where):
    location, path = where
    # a URI's lease is read back after a pause of timeout / 10: 0.5 s here, long enough for the
    # four threads' writes to land even on a busy machine (the window the module documents)
    leases = [lease_at(location, timeout=5.0 if "://" in location else SHORT) for _ in range(4)]
    start, outcome = threading.Barrier(len(leases)), {}

    def take(i):
        start.wait()
        try:
            leases[i].acquire()
            outcome[i] = "held"
        except Held:
            outcome[i] = "refused"

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(leases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert sorted(outcome.values()) == ["held", "refused", "refused", "refused"], outcome
        winner = next(i for i, o in outcome.items() if o == "held")
        beat = json.loads(path.read_text())["heartbeat"]
        until(lambda: json.loads(path.read_text())["heartbeat"] > beat, "a renewed heartbeat")
        assert json.loads(path.read_text())["token"] == leases[winner].token  # it kept it: its own token there
        assert not leases[winner].lost.is_set()
    finally:
        for lease in leases:
            lease.release()
    assert not path.exists()


def test_a_stale_lease_is_taken_over(where, clock):
    location, path = where
    dead = lease_at(location, timeout=SHORT, clock=clock)
    dead.acquire()
    died(dead)
    with pytest.raises(Held):  # not yet stale
        lease_at(location, timeout=SHORT, clock=clock).acquire()
    clock.advance(SHORT + 0.2)
    successor = lease_at(location, timeout=SHORT, clock=clock)
    took = successor.acquire()
    try:
        # in a folder the silent driver still holds its lock (a paused one): the heartbeat decides
        assert took is not None and took.token == dead.token and took.stale() and took.age > SHORT
        assert took.gone == f"stale after {SHORT:g} s without a heartbeat"
        assert json.loads(path.read_text())["token"] == successor.token
    finally:
        successor.release()
        dead.release()
    assert not path.exists()


def test_a_driver_that_finds_another_token_at_its_heartbeat_stops(where):
    location, path = where
    lease = lease_at(location, timeout=SHORT)
    lease.acquire()
    try:
        other = json.loads(path.read_text()) | {"token": "someone-else", "pid": 1}
        path.write_text(json.dumps(other))  # what a driver that took it over (we were paused) wrote
        assert lease.lost.wait(10 * lease.interval)
        assert lease.lost_to is not None and lease.lost_to.token == "someone-else" and lease.lost_to.pid == 1
        time.sleep(3 * lease.interval)
        assert json.loads(path.read_text()) == other  # it renews nothing once it has lost the lease
        lease.release()
        assert json.loads(path.read_text())["token"] == "someone-else"  # not ours to delete
    finally:
        lease.release()


def test_an_unreadable_lease_counts_by_its_age(tmp_path):
    folder = tmp_path / "exp"
    folder.mkdir()
    (folder / LEASE_FILE).write_bytes(b'{"host": "a", "pi')  # cut short, or being written right now
    with pytest.raises(Held, match="cannot be read"):
        lease_at(str(folder), timeout=SHORT).acquire()
    old = time.time() - 10
    os.utime(folder / LEASE_FILE, (old, old))
    lease = lease_at(str(folder), timeout=SHORT)
    took = lease.acquire()
    try:
        assert took is not None and took.token is None
    finally:
        lease.release()


def test_readers_are_told_that_the_search_is_running(where, capsys):
    location, _ = where
    assert note_if_running(location) is None and capsys.readouterr().err == ""
    lease = lease_at(location, timeout=SHORT)
    lease.acquire()
    try:
        assert note_if_running(location).token == lease.token
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and "still running" in err[0] and f"pid {os.getpid()}" in err[0], err
        died(lease)
        until(lambda: lease_at(location).judge().stale(), "a stale lease")  # note_if_running reads the real clock
        note_if_running(location)
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and "did not end" in err[0] and "--resume" in err[0], err
    finally:
        lease.release()


def test_the_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert timeout_s() == 120.0
    monkeypatch.setenv(TIMEOUT_ENV, "3.5")
    assert timeout_s() == 3.5 and lease_at("/nowhere").interval == pytest.approx(3.5 / 6)
    for bad in ("0", "-1", "soon"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(UserError, match=TIMEOUT_ENV):
            timeout_s()


# ----------------------------------------------------------------------------- a folder: the lock

# a driver in another process: takes the lease (timeout 120 s), starts a program that outlives
# it (as Ray's processes may), says both pids, and waits to be killed
HOLD = """
import subprocess, sys, time
from refilled.store.lease import lease_at
lease = lease_at(sys.argv[1], timeout=float(sys.argv[2]))
lease.acquire()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], close_fds=False)
print(child.pid, flush=True)
time.sleep(600)
"""


@pytest.fixture
def driver_process(tmp_path):
    """A live driver in another process holding the lease of a folder: (location, process, its child's pid)."""
    folder = tmp_path / "storage" / "exp"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(DEFAULT_TIMEOUT_S)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(proc.stdout.readline())
        yield str(folder), proc, child
    finally:
        for pid in (proc.pid, child):
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        proc.wait()
        proc.stdout.close()


def _zombie(pid: int) -> bool:
    """Dead and not reaped: its main thread a zombie, its other threads (the heartbeat) gone."""
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state == "Z" and os.listdir(f"/proc/{pid}/task") == [str(pid)]


def test_a_live_driver_in_another_process_is_refused(driver_process, capsys):
    location, proc, _ = driver_process
    folder = Path(location)
    held = json.loads((folder / LEASE_FILE).read_text())
    assert held["pid"] == proc.pid and held["lock"] is True and (folder / LOCK_FILE).is_file()
    second = lease_at(location, timeout=DEFAULT_TIMEOUT_S)
    with pytest.raises(Held) as refused:
        second.acquire()
    line = str(refused.value)
    assert "\n" not in line and f"pid {proc.pid} on {socket.gethostname()}" in line and "at once" in line, line
    with pytest.raises(Held):
        second.refuse_if_held()
    assert note_if_running(location).pid == proc.pid
    assert "still running" in capsys.readouterr().err
    assert json.loads((folder / LEASE_FILE).read_text())["token"] == held["token"]  # untouched
    assert (folder / LOCK_FILE).is_file() and proc.poll() is None


def test_a_driver_killed_with_sigkill_is_taken_over_at_once(driver_process, capsys):
    """The kernel dropped the dead driver's lock: taken over long before its 120 s timeout,
    even while its pid still exists (a zombie not yet reaped) and a program it started runs on."""
    location, proc, child = driver_process
    folder = Path(location)
    token = json.loads((folder / LEASE_FILE).read_text())["token"]
    os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not _zombie(proc.pid):  # dead, not reaped: os.kill(pid, 0) still finds it
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(child, 0)  # the program it started still runs
    assert note_if_running(location).gone is not None
    err = capsys.readouterr().err
    assert "did not end" in err and LOCK_FILE in err, err
    successor = lease_at(location, timeout=DEFAULT_TIMEOUT_S)
    successor.refuse_if_held()
    took = successor.acquire()
    try:
        assert took is not None and took.pid == proc.pid and took.token == token and not took.stale()
        assert took.gone == f"the system released its lock ({LOCK_FILE}): the process ended"
        now = json.loads((folder / LEASE_FILE).read_text())
        assert now["token"] == successor.token and now["pid"] == os.getpid() and now["lock"] is True
        with pytest.raises(Held):  # and the successor holds it as the first did
            lease_at(location, timeout=DEFAULT_TIMEOUT_S).acquire()
        assert not successor.lost.is_set()
    finally:
        successor.release()
    assert not (folder / LEASE_FILE).exists() and not (folder / LOCK_FILE).exists()


def _written_lease(folder: Path, **fields) -> dict:
    """A lease as a driver of this machine holding the lock writes it: fresh, 120 s timeout."""
    now = time.time()
    lease = {"host": socket.gethostname(), "pid": os.getpid(), "started": now - 60, "heartbeat": now,
             "timeout_s": DEFAULT_TIMEOUT_S, "token": "another-driver", "lock": True, "boot": BOOT} | fields
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LEASE_FILE).write_text(json.dumps(lease))
    return lease


def _dead_pid() -> int:
    """A pid that ended and was reaped: no such process now."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(dead.stdout)


def test_a_fresh_lease_of_this_machine_whose_lock_is_free_is_taken_over_at_once(tmp_path, capsys):
    """Its driver ended without releasing it (the kernel dropped its lock): no need to wait for the timeout."""
    folder = tmp_path / "exp"
    _written_lease(folder, pid=_dead_pid())
    note_if_running(str(folder))
    assert "did not end" in capsys.readouterr().err
    lease = lease_at(str(folder), timeout=DEFAULT_TIMEOUT_S)
    lease.refuse_if_held()
    took = lease.acquire()
    try:
        assert took.token == "another-driver" and not took.stale()
        assert took.gone == f"the system released its lock ({LOCK_FILE}): the process ended"
        assert json.loads((folder / LEASE_FILE).read_text())["token"] == lease.token
    finally:
        lease.release()
    assert not (folder / LEASE_FILE).exists() and not (folder / LOCK_FILE).exists()


def test_a_lock_held_without_a_lease_is_refused(tmp_path):
    """A driver that has just taken the lock and not yet written its lease (or is ending)."""
    folder = tmp_path / "exp"
    starting = lease_at(str(folder))
    assert starting._lock() is True
    try:
        with pytest.raises(Held, match="starting or ending"):
            lease_at(str(folder)).acquire()
        assert not (folder / LEASE_FILE).exists()
    finally:
        starting._unlock()
    assert not (folder / LOCK_FILE).exists()


@pytest.mark.parametrize("elsewhere", [{"host": "another-machine"}, {"boot": "another-boot"}])
def test_a_fresh_lease_from_another_machine_is_refused_until_it_is_stale(tmp_path, elsewhere):
    """Another host name (or this one's name on another boot: another machine of the same
    name, or this one before it rebooted): its pid and lock mean nothing here."""
    folder = tmp_path / "exp"
    pid = _dead_pid()
    _written_lease(folder, pid=pid, **elsewhere)  # no such pid here, and the lock is free
    lease = lease_at(str(folder), timeout=DEFAULT_TIMEOUT_S)
    with pytest.raises(Held):
        lease.refuse_if_held()
    with pytest.raises(Held):
        lease.acquire()
    assert not (folder / LOCK_FILE).exists()
    _written_lease(folder, pid=pid, heartbeat=time.time() - DEFAULT_TIMEOUT_S - 1, **elsewhere)
    took = lease.acquire()
    try:
        assert took.gone == f"stale after {DEFAULT_TIMEOUT_S:g} s without a heartbeat"
    finally:
        lease.release()


def test_at_a_uri_a_lease_of_this_machine_waits_for_the_timeout(tmp_path):
    """Object storage has no lock: only the heartbeat tells, even for a driver of this machine that is gone."""
    folder = tmp_path / "bucket" / "exp"
    _written_lease(folder, pid=_dead_pid())
    with pytest.raises(Held):
        lease_at(f"file://{folder}", timeout=DEFAULT_TIMEOUT_S).acquire()
    assert not (folder / LOCK_FILE).exists()
