"""Typed errors. Every message is one line: what went wrong, where, and how to fix it."""

from __future__ import annotations


class NormfxError(Exception):
    """Base class of every error normfx raises on purpose (the CLI maps it to exit code 2)."""


class PolicyError(NormfxError, ValueError):
    """An unknown policy name, an unknown option, or an option value of the wrong type."""


class ModelError(NormfxError, ValueError):
    """The model (or model file) given cannot be used: wrong kind, unreadable, corrupt."""


class InputDataError(NormfxError, ValueError):
    """Example inputs or calibration data that do not fit the model."""


class RewriteError(NormfxError, RuntimeError):
    """A rewrite could not be carried out; with ``strict=True``, anything the policy skipped."""


class VerificationError(NormfxError, RuntimeError):
    """A rewritten model is not numerically equivalent to its reference."""


class ProviderError(NormfxError, RuntimeError):
    """An onnxruntime execution provider that is unknown or not offered by the installed build."""
