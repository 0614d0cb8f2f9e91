"""The one exception type that the command line turns into a one-line message, how such a
message quotes the error of a library beneath it, and how to tell memory the machine refused.

torch is not imported here: an error can only be torch's in a process that has imported it.
"""

import re
import sys

# How torch's CPU allocator says the kernel refused it memory (c10's alloc_cpu.cpp): a plain
# RuntimeError.
CPU_ALLOCATION_REFUSED = "DefaultCPUAllocator: can't allocate memory"
# The size that torch's allocators ("Tried to allocate 2.00 GiB"), numpy ("Unable to allocate
# 1.00 PiB") or pyarrow ("realloc of size 4096 failed") were asked for.
ASKED_FOR = re.compile(
    r"(?:tried|unable) to allocate (\d+ bytes|[\d.]+ [KMGTP]i?B)|alloc of size (\d+) failed",
    re.IGNORECASE,
)


class UserError(Exception):
    """Bad input a user can fix: the message names what was wrong and how to fix it.

    The CLI prints it as a single ``error: ...`` line and exits with status 2. Memory the machine
    refused is one line too (status 1); any other exception is a bug and keeps its traceback.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an error's message, or its type's name where it has none: a one-line
    reason to quote inside a :class:`UserError` (a library's message can run to pages)."""
    message = str(exc).strip()
    return message.splitlines()[0] if message else type(exc).__name__


def memory_refused(exc: BaseException) -> bool:
    """Whether ``exc`` says memory was refused: a ``MemoryError`` (numpy's arrays, pyarrow's
    buffers, Python's objects), torch's CPU allocator's RuntimeError, or CUDA's out-of-memory
    error."""
    return (
        isinstance(exc, MemoryError)
        or gpu_memory_refused(exc)
        or (isinstance(exc, RuntimeError) and CPU_ALLOCATION_REFUSED in str(exc))
    )


def gpu_memory_refused(exc: BaseException) -> bool:
    """Whether ``exc`` is CUDA's out-of-memory error: GPU memory ran out, not the machine's."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.OutOfMemoryError)


def refused_amount(exc: BaseException) -> str:
    """`` (torch asked for 2.00 GiB more and was refused)``, as much as ``exc`` says of the
    allocation that was refused; empty where it names no size (Python's own MemoryError)."""
    asked = ASKED_FOR.search(str(exc))
    if asked is None:
        return ""
    amount = asked.group(1) or f"{asked.group(2)} bytes"
    if amount.endswith(" bytes"):
        amount = f"{int(amount.split()[0]) / 1e9:.1f} GB"
    # torch's CPU allocator raises a plain RuntimeError; numpy's and pyarrow's errors are their own.
    library = type(exc).__module__.split(".")[0]
    asker = "torch" if library == "builtins" else library
    return f" ({asker} asked for {amount} more and was refused)"
