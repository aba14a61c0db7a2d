"""What both routes of ``unfuse`` share: its options, checked once, and the words it says to the user."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import PolicyError

__all__ = ["NORMS", "UnfuseOptions", "unfuse_options", "NO_DATA_NOTE", "CLASSIFIER_REASON", "ALREADY_NORMALIZED",
           "train_mode_note", "nothing_to_unfuse", "refuse_or_note"]

NORMS = ("batchnorm", "frozen", "sync")

NO_DATA_NOTE = ("unfuse without data: the inserted BatchNorms have identity statistics (exact in eval mode), but in "
                "train mode they normalize with batch statistics, a different function; give data (--data) to measure "
                "them")
CLASSIFIER_REASON = "produces the model output (the classifier): left as it is; unfuse:classifier=true unfuses it too"
ALREADY_NORMALIZED = "already followed by"  # how the reason of a layer with a normalization after it starts


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


def nothing_to_unfuse(model: str, reasons: list[str]) -> str:
    """The one-line refusal of a rewrite that would unfuse nothing although layers were targeted."""
    already = sum(r.startswith(ALREADY_NORMALIZED) for r in reasons)
    head = sum(r == CLASSIFIER_REASON for r in reasons)
    other = len(reasons) - already - head
    parts = [f"{already} already followed by a normalization"] if already else []
    parts += [f"{head} producing the model output"] if head else []
    parts += [f"{other} for other reasons (see explain)"] if other else []
    return (f"{model}: no layer to unfuse ({', '.join(parts)}); unfuse is for a fused model whose BatchNorms were "
            "folded into its layers")


def refuse_or_note(ctx: Any, model: str, reasons: list[str]) -> None:
    """Nothing was unfused although layers were targeted: ``explain`` says so in a note, ``rewrite`` refuses."""
    from ..errors import ModelError

    if not reasons:
        return
    if ctx.dry_run:
        ctx.report.note(f"rewrite would refuse: {nothing_to_unfuse(model, reasons)}")
    else:
        raise ModelError(nothing_to_unfuse(model, reasons))
