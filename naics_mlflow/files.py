"""Files written whole or not at all, and the one error for an ``--out`` that cannot be written."""

from __future__ import annotations

import contextlib
import errno
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from naics_mlflow.errors import UserError


@contextlib.contextmanager
def written_whole(target: Path) -> Iterator[Path]:
    """A path beside ``target`` to write to, renamed onto ``target`` when the block ends and
    removed if the block raises, which leaves ``target`` as it was.

    A rename within one folder is atomic, so a process killed mid-write leaves at most a
    ``<name>.<pid>.partial`` file, never a ``target`` cut short; the process id keeps apart the
    processes that write one file (the ranks of a data-parallel run). Creates the folder first;
    raises ``OSError`` as the file system does.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        yield partial
        os.replace(partial, target)
    except BaseException:
        with contextlib.suppress(OSError):  # the folder may be gone or read-only
            partial.unlink(missing_ok=True)
        raise


def save_torch_whole(value: Any, target: Path) -> None:
    """``torch.save(value)`` at ``target`` through :func:`written_whole`.

    Serialised in memory first: torch's own file writer reports a write the system refuses (a
    full disk) as ``RuntimeError: unexpected pos ...``, where a Python write raises the
    ``OSError`` it is, which callers turn into their one line. Costs one copy of the file in
    memory (a checkpoint is tens of MB).
    """
    import torch  # here, not at the top: commands that never load a model import this module

    serialised = io.BytesIO()
    torch.save(value, serialised)
    with written_whole(target) as partial:
        partial.write_bytes(serialised.getbuffer())


# What a disk without room for a write says: full, over quota, or a file past the size limit.
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def out_of_room(exc: OSError) -> bool:
    """Whether a write failed for want of room on its disk: an errno that says so, or numpy's
    short write (``N requested and M written``), which carries none."""
    return exc.errno in NO_ROOM or ("requested and" in str(exc) and "written" in str(exc))


class OutputError(UserError):
    """A command's ``--out`` that cannot be written."""


def _output_error(target: Path, reason: str, no_room: bool = False) -> OutputError:
    remedy = (
        "free space on its disk, or give --out a path on another"
        if no_room
        else "give --out a path in a folder you can write"
    )
    return OutputError(f"cannot write {target} ({reason}); {remedy}")


def why_unwritable(target: Path) -> str | None:
    """Why ``target`` could not be written, or None: the nearest folder on its path that exists
    is a file or is not writable. Creates nothing."""
    folder = target.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return os.strerror(errno.ENOTDIR)
    if not os.access(folder, os.W_OK):
        return os.strerror(errno.EACCES)
    return None


def check_output(target: Path) -> None:
    """Raise :class:`OutputError` now, before a command's long part, where ``target`` could not
    be written (:func:`why_unwritable`). Creates nothing, so that a command refused later for
    another reason leaves no trace."""
    if reason := why_unwritable(target):
        raise _output_error(target, reason)


def write_output(target: Path, write: Callable[[Path], None]) -> None:
    """``write(path)`` through :func:`written_whole`; a failure ends in :class:`OutputError`."""
    try:
        with written_whole(target) as partial:
            write(partial)
    except OSError as exc:
        # pyarrow's errors carry the errno with a message naming the partial file, which is
        # not the path the user gave.
        reason = os.strerror(exc.errno) if exc.errno else exc.strerror or str(exc)
        raise _output_error(target, reason, out_of_room(exc)) from exc
