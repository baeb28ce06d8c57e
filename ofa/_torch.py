"""Torch's process-wide settings, changed for one block and restored after it.

Library code calls these instead of ``torch.set_num_threads`` or ``torch.manual_seed``, so
that a caller (a server thread, a test, the next job of a report) finds torch as it left it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["num_threads", "seeded"]


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """torch's CPU (intra-op) threads set to ``n`` inside the block; ``None`` or 0 leaves them as they are."""
    if not n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Inside the block, torch's default generators of the CPU and of ``device`` start from ``seed``.

    The numbers drawn are those after ``torch.manual_seed(seed)``; after the block the
    generators continue where they were. Only the CPU's and ``device``'s generators are
    seeded (``manual_seed`` seeds every GPU), because only theirs are saved and restored.
    """
    device = torch.device(device)
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield
