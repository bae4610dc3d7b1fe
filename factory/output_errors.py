"""Write faults: a write to the output that fails stops the run with one paragraph.

Shards are written on the workers, so a full disk, a refused permission or an
object store's error is raised in an actor or a task, far from the driver.
There it becomes an :class:`OutputWriteError` (picklable: the output, what was
being written, the cause in words); Ray carries it to the driver, which finds
it in the exception chain and turns it into a :class:`FactoryError` naming the
output and the cause. Complete shards are never touched by a failed write:
each is written under a temporary name and renamed only when whole.
"""
from __future__ import annotations

import errno as errnos
from contextlib import contextmanager

from .errors import FactoryError

HINTS = {
    errnos.ENOSPC: "the disk is full",
    errnos.EDQUOT: "the disk quota is exceeded",
    errnos.EACCES: "permission denied",
    errnos.EPERM: "the operation is not permitted",
    errnos.EROFS: "the filesystem is read-only",
}


class OutputWriteError(Exception):
    def __init__(self, url: str, what: str, cause: str):
        super().__init__(url, what, cause)
        self.url, self.what, self.cause = url, what, cause

    def __str__(self) -> str:
        return f"writing {self.what} to {self.url} failed: {self.cause}"


def describe(e: BaseException) -> str:
    """The cause in words: what it means where we know, then the error as raised."""
    code = getattr(e, "errno", None)
    if isinstance(e, PermissionError) and code is None:
        code = errnos.EACCES
    hint = HINTS.get(code)
    text = f"{type(e).__name__}: {e}".rstrip(". ")
    return f"{hint} ({text})" if hint else text


@contextmanager
def writing(url: str, what: str):
    """Raise any failure inside as an OutputWriteError about ``what`` in the output ``url``."""
    try:
        yield
    except (OutputWriteError, FactoryError):
        raise
    except Exception as e:  # noqa: BLE001 - the filesystem's own errors vary (OSError, botocore, HTTP)
        raise OutputWriteError(url, what, describe(e)) from None


def find_write_error(e: BaseException | None) -> OutputWriteError | None:
    """The OutputWriteError behind an exception Ray or Ray Data raised, if one is."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None)
        if isinstance(inner, BaseException):  # Ray's RayTaskError: the worker's own exception
            e = inner
            continue
        if isinstance(e, OutputWriteError):
            return e
        e = e.__cause__ or e.__context__
    return None


def fault_message(err: OutputWriteError, complete: int, total: int, command: str) -> str:
    return (
        f"cannot write to the output {err.url}: {err.cause}, while writing {err.what}. The run stopped; "
        f"{complete} of {total} shards are complete there and were kept (a shard is renamed into place only "
        f"when whole), and no partial shard was left. Fix the cause (free space, permissions, credentials "
        f"or the store's availability) and run the same command again to resume: {command}"
    )
