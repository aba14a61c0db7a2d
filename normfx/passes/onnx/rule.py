"""What a rule returns: a :class:`Fold` ready to apply, or a :class:`Decline` with the reason.

Each rule module has ``find(site, ws) -> Fold | Decline | None``: ``None`` when its pattern is not
there at all (e.g. the BN's input does not come from a Conv), a ``Decline`` when the pattern is there
but the fold would not be exact or safe, a ``Fold`` otherwise. Nothing is edited before
``Fold.apply()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["Fold", "Decline", "FoldOptions"]


@dataclass
class Fold:
    """A fold that passed its checks; ``apply()`` edits the workspace."""

    rule: str  # e.g. "conv_bn"
    into: str  # label of the node folded into, e.g. "Conv 'conv1'"
    apply: Callable[[], None]
    details: dict[str, Any] = field(default_factory=dict)  # JSON-friendly; apply() may add to it
    parts: list["Fold"] = field(default_factory=list)  # a forward fold into several consumers


@dataclass
class Decline:
    """The pattern is present but the fold is refused, and why."""

    rule: str
    reason: str


@dataclass(frozen=True)
class FoldOptions:
    """The policy options the rules read (see the ``fuse`` policy)."""

    duplicate_shared: bool = True
    border_correction: bool = False  # fold BN before a zero-padded conv with a per-position constant
