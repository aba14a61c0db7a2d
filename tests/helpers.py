"""Numeric helpers shared by the tests."""

from __future__ import annotations

import torch


def rel_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """max|Δ| / max|y_ref| in float64."""
    reference, candidate = reference.detach().double(), candidate.detach().double()
    return float((reference - candidate).abs().max() / reference.abs().max().clamp_min(1e-30))


def storages(module: torch.nn.Module) -> set[int]:
    """Data pointers of every parameter and buffer (to prove nothing is shared)."""
    return {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers()) if t.numel()}


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_state_equal(before: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    after = module.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"
