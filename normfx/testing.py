"""Helpers for users' test suites."""

from __future__ import annotations

from typing import Any

from .verify import VerifyResult, verify

__all__ = ["assert_equivalent"]


def assert_equivalent(reference: Any, candidate: Any, inputs: Any, *, rtol: float = 1e-5, atol: float = 0.0) -> VerifyResult:
    """Raise ``AssertionError`` naming the worst output unless ``candidate`` matches ``reference``.

    Either side may be a torch module, an ONNX model or path, or an onnxruntime session; ``inputs``
    a tensor/array, a tuple of them, a dict or a ``.npz`` path. Returns the :class:`VerifyResult`.
    """
    result = verify(reference, candidate, inputs, rtol=rtol, atol=atol)
    if not result.ok:
        worst = result.worst
        raise AssertionError(
            f"models differ: output {worst.name} {list(worst.shape)} has max abs error {worst.max_abs_error:.3g} "
            f"and max rel error {worst.max_rel_error:.3g} (rtol={rtol:g}, atol={atol:g})"
        )
    return result
