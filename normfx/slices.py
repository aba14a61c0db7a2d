"""Pure channel-slice arithmetic for the concat / split folds: which channels of a per-channel affine each
piece of a concatenation or a split owns. Integers and float64 numpy arrays in, the same out; no graphs.

The fold itself is :mod:`normfx.fold`'s (``fold_bn_after`` per concat input, ``fold_bn_before`` per split
piece) applied to the affine restricted to the piece's channels: a per-channel map commutes with a
concatenation or a split along the channel axis, channel by channel, so each piece's restriction is exact.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .errors import RewriteError

__all__ = ["concat_ranges", "split_sizes", "chunk_sizes", "onnx_split_sizes", "slice_channels", "restrict",
           "channel_axis"]


def channel_axis(axis: int, rank: int | None) -> bool | None:
    """Whether ``axis`` (possibly negative) is the channel axis 1 of a tensor of ``rank`` (None: unknown rank
    and a negative axis)."""
    if axis >= 0:
        return axis == 1
    if rank is None:
        return None
    return axis + rank == 1


def concat_ranges(sizes: Sequence[int]) -> list[np.ndarray]:
    """The channel indices each input of a channel concatenation occupies in its output."""
    out, start = [], 0
    for size in sizes:
        size = int(size)
        if size < 0:
            raise RewriteError(f"a concatenated input cannot have {size} channels")
        out.append(np.arange(start, start + size))
        start += size
    return out


def split_sizes(channels: int, split: int | Sequence[int]) -> list[int]:
    """``torch.split(x, split, dim=1)``: an int is a piece size (the last piece smaller), a list the sizes."""
    if isinstance(split, (int, np.integer)):
        size = int(split)
        if size <= 0:
            raise RewriteError(f"torch.split size must be > 0, got {size}")
        return [min(size, channels - s) for s in range(0, channels, size)] or [0]
    sizes = [int(s) for s in split]
    if sum(sizes) != channels or any(s < 0 for s in sizes):
        raise RewriteError(f"split sizes {sizes} do not add up to {channels} channels")
    return sizes


def chunk_sizes(channels: int, chunks: int) -> list[int]:
    """``torch.chunk(x, chunks, dim=1)``: pieces of ``ceil(C / chunks)`` (possibly fewer than ``chunks``)."""
    if chunks <= 0:
        raise RewriteError(f"torch.chunk needs chunks > 0, got {chunks}")
    size = -(-channels // chunks) if channels else 1
    return split_sizes(channels, size)


def onnx_split_sizes(channels: int, outputs: int, split: Sequence[int] | None) -> list[int]:
    """ONNX ``Split``: the given sizes, else ``outputs`` pieces of ``ceil(C / outputs)``, the last smaller
    (opset 18; an even split in earlier opsets, where the ceiling is the same size)."""
    if split is not None:
        sizes = [int(s) for s in split]
        if len(sizes) != outputs or sum(sizes) != channels or any(s < 0 for s in sizes):
            raise RewriteError(f"Split sizes {sizes} do not give {outputs} pieces of {channels} channels")
        return sizes
    size = -(-channels // outputs)
    sizes = [max(0, min(size, channels - i * size)) for i in range(outputs)]
    if sum(sizes) != channels:
        raise RewriteError(f"Split into {outputs} pieces does not cover {channels} channels")
    return sizes


def slice_channels(channels: int, start: Any = None, stop: Any = None, step: Any = None) -> np.ndarray:
    """The channel indices ``x[:, start:stop:step]`` reads (Python's clamping, which ONNX ``Slice`` shares)."""
    if step is not None and int(step) == 0:
        raise RewriteError("a slice step cannot be 0")
    bound = lambda v: None if v is None else int(max(min(int(v), 2**62), -(2**62)))  # noqa: E731
    return np.arange(channels)[slice(bound(start), bound(stop), bound(step))]


def restrict(scale: Any, shift: Any, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel affine ``(scale, shift)`` (float64) restricted to the channels ``index``."""
    s = np.asarray(scale, dtype=np.float64)
    t = np.asarray(shift, dtype=np.float64)
    if s.shape != t.shape or s.ndim != 1:
        raise RewriteError(f"scale and shift must be two (C,) vectors, got {s.shape} and {t.shape}")
    if index.size and (index.min() < 0 or index.max() >= s.shape[0]):
        raise RewriteError(f"channel indices out of range for {s.shape[0]} channels")
    return s[index].copy(), t[index].copy()
