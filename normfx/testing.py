"""Helpers for users' test suites."""

from __future__ import annotations

from typing import Any

from .verify import VerifyResult, verify

__all__ = ["assert_equivalent"]


def assert_equivalent(reference: Any, candidate: Any, inputs: Any, *, rtol: float | None = None,
                      atol: float = 0.0) -> VerifyResult:
    """Raise ``AssertionError`` naming the worst output unless ``candidate`` matches ``reference``.

    Either side may be a torch module, an ONNX model or path, or an onnxruntime session; ``inputs``
    a tensor/array, a tuple of them, a dict or a ``.npz`` path. Returns the :class:`VerifyResult`.

    ``rtol=None`` (default): the candidate is judged against a float64 run of the reference and may be
    off by ``max(1e-5, 2 x the reference's own float32 error)`` (its noise floor, measured on ``inputs``);
    an explicit ``rtol`` is exactly that tolerance against the reference's own outputs (see
    :func:`normfx.verify`). The message gives the error, the noise floor and the tolerance used.
    """
    result = verify(reference, candidate, inputs, rtol=rtol, atol=atol)
    if not result.ok:
        worst = result.worst
        versus = "" if result.versus == "reference" else f" vs {result.versus}"
        raise AssertionError(
            f"models differ: output {worst.name} {list(worst.shape)} has max abs error {worst.max_abs_error:.3g} "
            f"and max rel error {worst.max_rel_error:.3g}{versus} ({result.tolerance_text()})"
        )
    return result
