"""One driver per experiment (refilled.store.lease): taking, holding, losing and releasing the lease.

Real files: a folder (exclusive create) and a file:// URI, which pyarrow opens
as it opens s3:// (write, pause, read back). Drivers are threads here; the
slow tests in test_search.py run real drivers against each other.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from refilled.errors import UserError
from refilled.store.lease import TIMEOUT_ENV, Held, Lease, note_if_running, timeout_s
from refilled.store.layout import LEASE_FILE

SHORT = 0.6  # seconds: a heartbeat every 0.1 s


@pytest.fixture(params=["folder", "uri"])
def where(request, tmp_path):
    """An experiment location and the lease file it has."""
    folder = tmp_path / "storage" / "exp"
    location = str(folder) if request.param == "folder" else f"file://{folder}"
    return location, folder / LEASE_FILE


def never_lost(holder):
    raise AssertionError(f"lost the lease to {holder}")


def test_a_second_driver_on_a_live_lease_is_refused(where):
    location, path = where
    first = Lease(location, timeout=SHORT)
    assert first.acquire(on_lost=never_lost) is None
    try:
        held = json.loads(path.read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        beat = held["heartbeat"]
        time.sleep(3 * first.interval)
        assert json.loads(path.read_text())["heartbeat"] > beat  # renewed while it runs
        second = Lease(location, timeout=SHORT)
        with pytest.raises(Held) as refused:
            second.acquire(on_lost=never_lost)
        line = str(refused.value)
        assert "\n" not in line and location in line and f"pid {os.getpid()} on {socket.gethostname()}" in line
        assert "running since" in line and "kill -INT" in line and TIMEOUT_ENV in line, line
        with pytest.raises(Held):
            second.refuse_if_held()
        assert json.loads(path.read_text())["token"] == first.token  # the refused one wrote nothing
    finally:
        first.release()
    assert not path.exists()
    assert not [p for p in path.parent.iterdir() if LEASE_FILE in p.name]


def test_drivers_starting_at_the_same_instant_one_wins(where):
    location, path = where
    # a URI's lease is read back after a pause of timeout / 10: 0.5 s here, long enough for the
    # four threads' writes to land even on a busy machine (the window the module documents)
    leases = [Lease(location, timeout=5.0 if "://" in location else SHORT) for _ in range(4)]
    start, outcome = threading.Barrier(len(leases)), {}

    def take(i):
        start.wait()
        try:
            leases[i].acquire(on_lost=never_lost)
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
        time.sleep(1.5 * leases[winner].interval)  # and it keeps it: nobody else's token is there
        assert json.loads(path.read_text())["token"] == leases[winner].token
    finally:
        for lease in leases:
            lease.release()
    assert not path.exists()


def test_a_stale_lease_is_taken_over(where):
    location, path = where
    dead = Lease(location, timeout=SHORT)
    dead.acquire(on_lost=never_lost)
    dead._stop.set()  # its driver died: no heartbeat, no release
    dead._thread.join()
    with pytest.raises(Held):  # not yet stale
        Lease(location, timeout=SHORT).acquire(on_lost=never_lost)
    time.sleep(SHORT + 0.2)
    successor = Lease(location, timeout=SHORT)
    took = successor.acquire(on_lost=never_lost)
    try:
        assert took is not None and took.token == dead.token and took.stale() and took.age() > SHORT
        assert json.loads(path.read_text())["token"] == successor.token
    finally:
        successor.release()
    assert not path.exists()


def test_a_driver_that_finds_another_token_at_its_heartbeat_stops(where):
    location, path = where
    lost = threading.Event()
    lease = Lease(location, timeout=SHORT)
    lease.acquire(on_lost=lambda holder: lost.set())
    try:
        other = json.loads(path.read_text()) | {"token": "someone-else", "pid": 1}
        path.write_text(json.dumps(other))  # what a driver that took it over (we were paused) wrote
        assert lost.wait(10 * lease.interval)
        lease.release()
        assert json.loads(path.read_text())["token"] == "someone-else"  # not ours to delete
    finally:
        lease.release()


def test_an_unreadable_lease_counts_by_its_age(tmp_path):
    folder = tmp_path / "exp"
    folder.mkdir()
    (folder / LEASE_FILE).write_bytes(b'{"host": "a", "pi')  # cut short, or being written right now
    with pytest.raises(Held, match="cannot be read"):
        Lease(str(folder), timeout=SHORT).acquire(on_lost=never_lost)
    old = time.time() - 10
    os.utime(folder / LEASE_FILE, (old, old))
    lease = Lease(str(folder), timeout=SHORT)
    took = lease.acquire(on_lost=never_lost)
    try:
        assert took is not None and took.token is None
    finally:
        lease.release()


def test_readers_are_told_that_the_search_is_running(where, capsys):
    location, _ = where
    assert note_if_running(location) is None and capsys.readouterr().err == ""
    lease = Lease(location, timeout=SHORT)
    lease.acquire(on_lost=never_lost)
    try:
        assert note_if_running(location).token == lease.token
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and "still running" in err[0] and f"pid {os.getpid()}" in err[0], err
        lease._stop.set()
        lease._thread.join()
        time.sleep(SHORT + 0.2)
        note_if_running(location)
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and "did not end" in err[0] and "--resume" in err[0], err
    finally:
        lease.release()


def test_the_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert timeout_s() == 120.0
    monkeypatch.setenv(TIMEOUT_ENV, "3.5")
    assert timeout_s() == 3.5 and Lease("/nowhere").interval == pytest.approx(3.5 / 6)
    for bad in ("0", "-1", "soon"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(UserError, match=TIMEOUT_ENV):
            timeout_s()
