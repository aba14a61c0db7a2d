"""What both routes of ``unfuse`` share: its options, checked once, and the words it says to the user."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import PolicyError

__all__ = ["NORMS", "UnfuseOptions", "unfuse_options", "NO_DATA_NOTE", "CLASSIFIER_REASON", "train_mode_note"]

NORMS = ("batchnorm", "frozen", "sync")

NO_DATA_NOTE = ("unfuse without data: the inserted BatchNorms have identity statistics (exact in eval mode), but in "
                "train mode they normalize with batch statistics, a different function; give data (--data) to measure "
                "them")
CLASSIFIER_REASON = "produces the model output (the classifier): left as it is; unfuse:classifier=true unfuses it too"


@dataclass(frozen=True)
class UnfuseOptions:
    norm: str
    eps: float
    momentum: float
    classifier: bool
    num_batches: int | None


def unfuse_options(ctx: Any) -> UnfuseOptions:
    """The step's options, checked: ``norm`` one of :data:`NORMS`, finite ``eps > 0``, ``0 <= momentum <= 1``
    (PyTorch's convention), ``num_batches >= 0``."""
    norm = str(ctx.option("norm")).lower()
    if norm not in NORMS:
        raise PolicyError(f"policy 'unfuse': norm={ctx.option('norm')!r} is not one of {', '.join(NORMS)}")
    eps, momentum = float(ctx.option("eps")), float(ctx.option("momentum"))
    if not (math.isfinite(eps) and eps > 0):
        raise PolicyError(f"policy 'unfuse': eps must be a finite number > 0, got {eps}")
    if not 0.0 <= momentum <= 1.0:
        raise PolicyError(f"policy 'unfuse': momentum must be in [0, 1] (PyTorch convention), got {momentum}")
    num_batches = int(ctx.option("num_batches"))
    if num_batches < 0:
        raise PolicyError(f"policy 'unfuse': num_batches must be >= 0 (0 = all of the data), got {num_batches}")
    return UnfuseOptions(norm, eps, momentum, bool(ctx.option("classifier")), num_batches or None)


def train_mode_note(deviation: float) -> str:
    """The report note giving the measured train-mode deviation (``report.metrics["unfuse_train_mode_rel_error"]``)."""
    return (f"train mode vs eval on the first batch of data (inserted BNs on batch statistics): max rel error "
            f"{deviation:.3g}")
