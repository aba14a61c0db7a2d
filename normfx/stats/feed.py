"""How batches of `data` reach a model: iteration, progress bar, feeding conventions, error wording."""

from __future__ import annotations

import itertools
import logging
import sys
from typing import Any, Callable, Iterator, Mapping

import torch

from ..errors import InputDataError

__all__ = ["iterate_batches", "check_data", "Replayable", "feed", "describe", "model_device", "progress_enabled"]

log = logging.getLogger(__name__)


def describe(batch: Any, depth: int = 0) -> str:
    """A short description of a batch for error messages: kinds, shapes and dtypes."""
    if isinstance(batch, torch.Tensor):
        return f"tensor{tuple(batch.shape)} {str(batch.dtype).replace('torch.', '')}"
    if type(batch).__module__ == "numpy" and hasattr(batch, "shape"):
        return f"ndarray{tuple(batch.shape)} {batch.dtype}"
    if depth >= 2:
        return type(batch).__name__
    if isinstance(batch, Mapping):
        inner = ", ".join(f"{k}: {describe(v, depth + 1)}" for k, v in list(batch.items())[:6])
        return "dict{" + inner + "}"
    if isinstance(batch, (tuple, list)):
        inner = ", ".join(describe(v, depth + 1) for v in batch[:6])
        return f"{type(batch).__name__}[{inner}{', ...' if len(batch) > 6 else ''}]"
    return type(batch).__name__


def model_device(model: torch.nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer (``None`` for a stateless model)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return None


def _to_tensor(value: Any, device: torch.device | None) -> Any:
    if type(value).__module__ == "numpy" and hasattr(value, "shape"):
        value = torch.as_tensor(value)
    if isinstance(value, torch.Tensor) and device is not None and value.device != device:
        value = value.to(device)
    return value


def feed(model: torch.nn.Module, batch: Any, forward: Callable[[torch.nn.Module, Any], Any] | None,
         device: torch.device | None) -> Any:
    """Run one batch through the model.

    ``forward(model, batch)`` when given (the batch is passed untouched); otherwise a tensor (or
    numpy array) is the input, a tuple/list is ``(inputs, *targets)`` and only its first element is
    fed (the DataLoader convention, as ``torch.optim.swa_utils.update_bn`` does), and a dict is fed
    as keyword arguments. Tensors are moved to the model's device.
    """
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, Mapping):
        return model(**{k: _to_tensor(v, device) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise InputDataError("an empty tuple/list batch: expected (inputs, *targets)")
        return model(_to_tensor(batch[0], device))
    if isinstance(batch, torch.Tensor) or (type(batch).__module__ == "numpy" and hasattr(batch, "shape")):
        return model(_to_tensor(batch, device))
    raise InputDataError(
        f"a batch of type {type(batch).__name__}: expected a tensor, a tuple/list (inputs, *targets) or a "
        "dict of keyword inputs; pass forward=callable(model, batch) to feed other kinds"
    )


def progress_enabled(progress: bool) -> bool:
    """A bar only when asked, stderr is a terminal, and (under torch.distributed) on rank 0."""
    if not progress:
        return False
    try:
        if not sys.stderr.isatty():
            return False
    except (AttributeError, ValueError):
        return False
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True


def check_data(data: Any) -> None:
    """Refuse what is not an iterable of batches (None, one array, one dict, a string), with the fix."""
    if data is None:
        raise InputDataError("no data given: pass data= an iterable of batches (a DataLoader, a list of tensors, ...)")
    if isinstance(data, torch.Tensor) or (type(data).__module__ == "numpy" and hasattr(data, "shape")):
        raise InputDataError(
            f"data is a single array of shape {tuple(data.shape)}: pass an iterable of batches, "
            "e.g. a DataLoader or list(torch.split(x, batch_size))"
        )
    if isinstance(data, Mapping):
        raise InputDataError("data is a single dict: pass an iterable of batches, e.g. [batch_dict]")
    if isinstance(data, (str, bytes)):
        raise InputDataError(f"data is a string ({data!r}): pass an iterable of batches; the CLI loads files")


def iterate_batches(data: Any, num_batches: int | None, *, progress: bool, desc: str) -> Iterator[tuple[int, Any]]:
    """``(index, batch)`` for the first ``num_batches`` batches of ``data`` (all when ``None``/0)."""
    check_data(data)
    if num_batches is not None and num_batches < 0:
        raise InputDataError(f"num_batches must be >= 0 (0 or None = all batches), got {num_batches}")
    try:
        iterator = iter(data)
    except TypeError:
        raise InputDataError(f"data of type {type(data).__name__} is not iterable: pass an iterable of batches") from None
    limit = num_batches or None
    total = limit
    if total is None:
        try:
            total = len(data)
        except TypeError:
            total = None
    elif hasattr(data, "__len__"):
        try:
            total = min(limit, len(data))
        except TypeError:
            pass
    batches = itertools.islice(iterator, limit)
    if progress_enabled(progress):
        from tqdm import tqdm

        batches = tqdm(batches, total=total, desc=desc, unit="batch", leave=False)
    yield from enumerate(batches)


class Replayable:
    """``data`` whose first batch stays available: :meth:`first` peeks at it without losing it, and iterating
    remembers it as it goes by, so a one-shot iterator (a generator) can be measured and then still give its
    first batch (a re-iterable — list, DataLoader — is simply iterated again)."""

    def __init__(self, data: Any) -> None:
        check_data(data)
        self._data = data
        self._rest: Iterator[Any] | None = None  # a one-shot iterator after first() took its first batch
        self._first: list[Any] = []

    @property
    def one_shot(self) -> bool:
        """True when iterating the data consumes it (an iterator, e.g. a generator)."""
        return isinstance(self._data, Iterator)

    def first(self) -> Any:
        """The first batch (iterating the data once, if nothing has yet)."""
        if not self._first:
            try:
                iterator = iter(self._data)
            except TypeError:
                raise InputDataError(f"data of type {type(self._data).__name__} is not iterable: pass an iterable of "
                                     "batches") from None
            try:
                self._first.append(next(iterator))
            except StopIteration:
                raise InputDataError("data yielded no batches: give at least one batch") from None
            except InputDataError:
                raise
            except Exception as exc:  # the user's loader / generator failed
                raise InputDataError(f"the data raised {type(exc).__name__} while producing batch 0: {exc}") from exc
            self._rest = iterator if self.one_shot else None
        return self._first[0]

    def __iter__(self) -> Iterator[Any]:
        if self._rest is not None:  # a one-shot iterator whose first batch was taken: give it back first
            rest, self._rest = self._rest, None
            yield self._first[0]
            yield from rest
            return
        for index, batch in enumerate(self._data):
            if index == 0 and not self._first:
                self._first.append(batch)
            yield batch

    def __len__(self) -> int:
        return len(self._data)
