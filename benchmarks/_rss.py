"""Resident memory of a run's driver and of its Ray actors, sampled every few seconds.

Used by the soak and stage-memory benchmarks. Actors are found as this
process's descendants (a local Ray instance is started by the driver) whose
process title Ray set to ``ray::<actor class>`` (e.g.
``ray::MapWorker(MapBatches(LayoutRenderer))``): the stages' actor pools and
the shard writers; idle pooled workers and Ray's own daemons and actors are
left out.
"""
from __future__ import annotations

import threading
import time

import psutil

MB = 1024 * 1024
ACTORS = ("ray::MapWorker", "ray::_MapWorker", "ray::ShardWriterActor")  # stage pools and shard writers


def actor_name(title: str) -> str:
    """'ray::MapWorker(MapBatches(LayoutRenderer))' -> 'LayoutRenderer'."""
    name = title[len("ray::"):]
    for prefix in ("MapWorker(MapBatches(", "_MapWorker(MapBatches("):
        if name.startswith(prefix):
            return name[len(prefix):].split(")")[0]
    return name.split(".")[0].split("(")[0]


def actor_rss(root: psutil.Process | None = None) -> dict[int, tuple[str, int]]:
    """{pid: (actor name, RSS bytes)} of the Ray actors below ``root`` (default: this process)."""
    root = root or psutil.Process()
    out = {}
    for p in root.children(recursive=True):
        try:
            title = p.cmdline()[0] if p.cmdline() else ""
            if title.startswith(ACTORS):
                out[p.pid] = (actor_name(title.split()[0]), p.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
            continue
    return out


class RssSampler(threading.Thread):
    """Samples (seconds, progress, driver RSS, {pid: (actor, RSS)}) every ``interval`` s until stopped."""

    def __init__(self, interval: float = 3.0, progress=lambda: 0):
        super().__init__(daemon=True)
        self.interval, self.progress = interval, progress
        self.samples: list[tuple[float, int, int, dict]] = []
        self._halt = threading.Event()
        self._t0 = time.time()

    def run(self) -> None:
        me = psutil.Process()
        while not self._halt.is_set():
            self.samples.append((time.time() - self._t0, self.progress(), me.memory_info().rss, actor_rss(me)))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def peak_by_actor(self) -> dict[str, int]:
        """The largest RSS any actor of each name reached."""
        peak: dict[str, int] = {}
        for *_, actors in self.samples:
            for name, rss in actors.values():
                peak[name] = max(peak.get(name, 0), rss)
        return peak
