"""Pause Python's cyclic garbage collector while a graph pass runs.

A rewrite allocates many small objects (torch.fx nodes, onnx-graphsurgeon nodes and tensors), and every ~700
allocations CPython may run a collection; now and then it is a full one, which walks every tracked object of the
process: with torch and onnxruntime imported, about 190 000 objects, 100–120 ms. On a 641-node ONNX graph whose
``fuse`` pass takes 120 ms, 2 of 5 passes got a full collection and took 220–245 ms (``gc.callbacks``,
one thread). Whether one falls inside a pass is a lottery, so pass times were bimodal. Reference counting still
frees everything that is not in a cycle; the cycles a pass leaves are collected after it, as usual.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator

__all__ = ["paused_gc"]


@contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the cyclic collector for the ``with`` block; re-enable it after, unless it was off already."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
