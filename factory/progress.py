"""A progress bar with samples/s and ETA, per-stage failure counters, and the final summary."""
from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


class RunProgress:
    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>7.1f} samples/s"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[counters]}"),
            console=self.console,
            disable=not sys.stderr.isatty() and False,
        )
        self.task = None

    def start(self, total: int) -> None:
        self.bar.start()
        self.task = self.bar.add_task("generating", total=total, rate=0.0, counters="")

    def update(self, n: int, result) -> None:
        t = self.bar.tasks[0]
        elapsed = t.elapsed or 1e-9
        counters = " ".join(
            f"{kind} {stage}={k}" for kind in ("failed", "filtered") for stage, k in getattr(result, kind).items()
        )
        self.bar.update(self.task, advance=n, rate=(t.completed + n) / elapsed, counters=counters)

    def stop(self) -> None:
        self.bar.stop()


def print_summary(result, console: Console | None = None) -> None:
    console = console or Console()
    t = Table(title=f"run summary: {result.out}", show_header=False)
    t.add_row("planned samples", str(result.planned))
    span = getattr(result, "shards", None)
    if span and len(span) != result.shards_total:  # a --shards range of the plan
        t.add_row("shards", f"{span.start}:{span.stop} of {result.shards_total} ({result.shards_written} written now, "
                            f"{result.shards_skipped} already complete; {result.missing} of the plan still missing)")
    else:
        t.add_row("shards", f"{result.shards_total} ({result.shards_written} written now, "
                            f"{result.shards_skipped} already complete)")
    t.add_row("samples in shards", str(result.generated))
    for kind in ("filtered", "failed"):
        for stage, n in getattr(result, kind).items():
            t.add_row(f"{kind} this run ({stage})", str(n))
    t.add_row("wall time", f"{result.seconds:.1f} s (start-up {result.startup_seconds:.1f} s)")
    console.print(t)
    for w in result.warnings:
        console.print(f"[yellow]warning:[/] {w}")
