"""One live run per output range: a lease file with a heartbeat.

A run holds a lease on the shards it writes (``--shards A:B``, or all of them):
``_leases/<run id>.json`` in the output, with its run id, host, process, range
and a heartbeat it rewrites every ``HEARTBEAT_S`` seconds. Another run whose
range overlaps a live lease is refused before it writes anything, so it can no
longer delete a live run's temporary files in its clean-up; runs of disjoint
ranges (one recipe split across jobs) share the output.

A lease is stale, and taken over with a message that says so, when its
heartbeat is older than ``STALE_S`` seconds, or at once when it names a
process on this host that no longer exists (a run killed with kill -9 here is
resumed without waiting). Works on any fsspec filesystem: no locks, only
files; two runs that start in the same instant both write their lease, read
the others back, and the younger one steps aside.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from .errors import FactoryError
from .output_errors import writing
from .shards import LEASES

HEARTBEAT_S = 15.0
STALE_S = 120.0  # eight missed heartbeats: a stalled file system, not a slow run


@dataclass
class LeaseRecord:
    run_id: str
    host: str
    pid: int
    pid_started: str  # the process's start time: a pid reused by another process is not the owner
    first: int
    stop: int
    started: float
    heartbeat: float

    def overlaps(self, shards: range) -> bool:
        return max(self.first, shards.start) < min(self.stop, shards.stop)

    def stale_reason(self, now: float) -> str | None:
        if self.host == socket.gethostname() and self.pid_started != _process_started(self.pid):
            return f"its process {self.pid} on this host is gone"
        age = now - self.heartbeat
        if age > STALE_S:
            return f"its last heartbeat is {age:.0f} s old (stale after {STALE_S:.0f} s)"
        return None

    def describe(self) -> str:
        return (f"run {self.run_id} (host {self.host}, pid {self.pid}, shards {self.first}:{self.stop}, "
                f"started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))})")


def _process_started(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat[stat.rindex(")") + 2:].split()[19]  # field 22: start time in clock ticks
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return "alive"  # no /proc: alive is all we can tell
        except ProcessLookupError:
            return ""
        except PermissionError:
            return "alive"


class Lease:
    """A held lease; :meth:`release` ends it. ``lost`` is set if another run took it over."""

    def __init__(self, out, record: LeaseRecord):
        self.out, self.record = out, record
        self.path = out.path(f"{LEASES}/{record.run_id}.json")
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="factory-lease-heartbeat", daemon=True)

    @classmethod
    def acquire(cls, out, shards: range, notify=None) -> "Lease":
        """Take the lease on ``shards`` of ``out``, or refuse with the live run that holds them."""
        now = time.time()
        overlapping = [o for o in read_leases(out) if o.overlaps(shards)]
        live = [o for o in overlapping if o.stale_reason(now) is None]
        if live:
            raise _refusal(out, live, shards, now)
        for other in overlapping:
            reason = other.stale_reason(now)
            with writing(out.url, "the lease"):
                out.fs.rm(out.path(f"{LEASES}/{other.run_id}.json"))
            if notify:
                notify(f"took over the stale lease of {other.describe()} on {out.url}: {reason}")
        pid = os.getpid()
        record = LeaseRecord(uuid.uuid4().hex[:12], socket.gethostname(), pid, _process_started(pid),
                             shards.start, shards.stop, now, now)
        lease = cls(out, record)
        lease._write()
        # Two runs may have passed the check above together: the older lease wins.
        rivals = [o for o in read_leases(out) if o.run_id != record.run_id and o.overlaps(shards)
                  and o.stale_reason(time.time()) is None and (o.started, o.run_id) < (now, record.run_id)]
        if rivals:
            lease._remove()
            raise _refusal(out, rivals, shards, time.time())
        lease._thread.start()
        return lease

    def _write(self) -> None:
        self.record.heartbeat = time.time()
        with writing(self.out.url, "the lease"):
            self.out.fs.makedirs(self.out.path(LEASES), exist_ok=True)
            self.out.write_json(f"{LEASES}/{self.record.run_id}.json", asdict(self.record))

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if not self.out.fs.exists(self.path):
                    self.lost = "its lease file was removed (another run took it over)"
                    return
                self._write()
            except Exception:  # noqa: BLE001 - a missed beat; the run's own writes report the fault
                pass

    def check(self) -> None:
        if self.lost:
            raise FactoryError(f"this run lost its lease on {self.out.url}: {self.lost}. It stopped so that two "
                               f"runs never write the same shards; complete shards were kept.")

    def _remove(self) -> None:
        try:
            self.out.fs.rm(self.path)
        except FileNotFoundError:
            pass

    def release(self, tidy: bool = False) -> None:
        """End the lease; ``tidy`` also removes the lease folder if no other lease is in it."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self.lost:
            return
        try:
            self._remove()
            folder = self.out.path(LEASES)
            if tidy and not self.out.fs.ls(folder, detail=False):
                self.out.fs.rmdir(folder)
        except Exception:  # noqa: BLE001 - a lease left behind goes stale; never mask the run's error
            pass


def read_leases(out) -> list[LeaseRecord]:
    folder = out.path(LEASES)
    if not out.fs.exists(folder):
        return []
    records = []
    for p in out.fs.glob(f"{folder}/*.json"):
        try:
            with out.fs.open(p) as f:
                records.append(LeaseRecord(**json.load(f)))
        except (FileNotFoundError, ValueError, TypeError):
            continue  # released while we listed, or being written
    return records


def _refusal(out, live: list[LeaseRecord], shards: range, now: float) -> FactoryError:
    runs = "; and a live ".join(f"{o.describe()}, last heartbeat {now - o.heartbeat:.0f} s ago" for o in live)
    return FactoryError(
        f"output {out.url} is being written by a live {runs}. This run's shards {shards.start}:{shards.stop} "
        f"overlap {'its' if len(live) == 1 else 'their'} own. "
        f"Nothing was written. Wait for it to finish (rerun then to fill in anything missing), give this run a "
        f"disjoint --shards range, or, if that run is dead on another host, wait until its heartbeat is over "
        f"{STALE_S:.0f} s old and run again: its lease is then taken over."
    )
