"""Which of PyTorch's fused attention kernels the backbone's passes may run: all but cuDNN's.

On Hopper GPUs (the H100 and H200) ``F.scaled_dot_product_attention`` prefers cuDNN's kernel,
which builds an execution graph for each new shape of its inputs and keeps it for that shape; a
build is reported to cost hundreds of milliseconds, against under a millisecond for the kernel
itself. A pass here rarely repeats a shape: its texts are one batch's, cut to their own longest.
On the H200 a step of ``03_stage`` that repeats one batch took 0.24 s, while ``02_stage`` trained
at about 1.1 s a step on batches of the same size, each new (docs/results.md). The
memory-efficient kernel takes the same padding masks with no per-shape set-up. On a CPU nothing
changes: its kernels are flash attention's and the plain products, both allowed.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPE_AGNOSTIC_BACKENDS = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def shape_agnostic_attention() -> AbstractContextManager:
    """A context in which attention runs only on kernels in ``SHAPE_AGNOSTIC_BACKENDS``; the
    previous choice is restored on leaving it."""
    return sdpa_kernel(SHAPE_AGNOSTIC_BACKENDS)
