"""A record of the operations that read a value back from the device they run on.

On a GPU each such read (``.item()``, a Python ``if`` on a tensor, ``F.one_hot``'s range check,
a boolean index, ``nonzero``, a ``repeat_interleave`` whose counts are a tensor) waits for every
kernel queued before it, so the host stops queueing work while the GPU drains. They show on a CPU
as the same operations, which is where the tests look for them.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

READING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim"}
INDEXING_OPS = {"index", "index_put", "index_put_"}


def _reads_back(name: str, args: tuple, kwargs: dict) -> bool:
    if name in READING_OPS:
        return True
    if name in INDEXING_OPS:
        return any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        )
    if name == "repeat_interleave":
        return isinstance(args[1] if len(args) > 1 else None, torch.Tensor) and (
            kwargs.get("output_size") is None
        )
    return False


class ReadsBack(TorchDispatchMode):
    """Within it, ``names`` lists each operation that read a value back, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if _reads_back(name, args, kwargs):
            self.names.append(name)
        return func(*args, **kwargs)
