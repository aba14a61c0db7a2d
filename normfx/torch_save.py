"""Saving a rewritten torch model (``normfx rewrite --out``): a state_dict (``.pt``) when the policy keeps the
module structure (``frozen``, ``unfrozen``, ``precise``, ``adaptive``: the same keys and shapes, so it loads
into the user's own model), else a ``torch.export`` program (``.pt2``), or a one-line error saying why not."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from typing import Any, Sequence

import torch

from .errors import InputDataError, ModelError
from .io_utils import atomic_path, check_output_path

__all__ = ["TORCH_SUFFIXES", "check_torch_out", "structure_change", "save_torch_result"]

TORCH_SUFFIXES = (".pt", ".pt2")


@contextlib.contextmanager
def _quiet_torch():
    """torch.export logs whole graphs at warning level when it fails; the CLI reports the failure in one line."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def check_torch_out(path: str, label: str, protect: Sequence[str] = ()) -> None:
    """Refuse an ``--out`` a torch model cannot be written to, before any work starts."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".onnx":
        raise InputDataError(
            f"--out {path!r}: {label} is a torch model; write --out NAME.pt (state_dict) or NAME.pt2 (torch.export "
            f"program), or use `normfx export --model {label} --out {path}` for ONNX"
        )
    if suffix not in TORCH_SUFFIXES:
        raise InputDataError(
            f"--out {path!r}: for a torch model give a .pt file (state_dict, when the policy keeps the module "
            "structure) or a .pt2 file (torch.export program)"
        )
    check_output_path(path, protect)


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def structure_change(original: torch.nn.Module, result: torch.nn.Module) -> str:
    """How the result's state_dict differs from the original's (keys, shapes); empty when it does not."""
    before, after = _shapes(original), _shapes(result)
    removed = sorted(set(before) - set(after))
    added = sorted(set(after) - set(before))
    reshaped = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    parts = [f"{what} {len(keys)} key(s), e.g. {keys[0]!r}" for what, keys in
             (("removes", removed), ("adds", added), ("reshapes", reshaped)) if keys]
    return "; ".join(parts)


def save_torch_result(original: torch.nn.Module, result: torch.nn.Module, example_inputs: Sequence[Any] | None,
                      path: str, *, policy: str, protect: Sequence[str] = ()) -> str:
    """Write ``result`` to ``path`` (``.pt``: state_dict, ``.pt2``: torch.export program), atomically. Returns
    what was written, in words."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".pt":
        change = structure_change(original, result)
        if change:
            raise InputDataError(
                f"--out {path!r}: policy {policy} changes the module structure ({change}), so a state_dict would not "
                "load into the original model; write --out NAME.pt2 (a torch.export program) instead"
            )
        state = {k: v.detach().cpu().clone() for k, v in result.state_dict().items()}
        with atomic_path(path, protect) as tmp:
            torch.save(state, tmp)
        return "state_dict (load it with model.load_state_dict(torch.load(path)))"
    if example_inputs is None:
        raise InputDataError(f"--out {path!r}: a torch.export program needs an example input; give --input-shape")
    try:
        with _quiet_torch():
            program = torch.export.export(result.eval(), tuple(example_inputs))
    except Exception as exc:  # torch.export raises many types
        first = " ".join(str(exc).split()).split(". ")[0][:240] or type(exc).__name__
        raise ModelError(
            f"--out {path!r}: the rewritten model cannot be saved as a torch.export program ({type(exc).__name__}: "
            f"{first}); rewrite it in Python with normfx.rewrite and keep the module, or export it to ONNX with "
            "`normfx export`"
        ) from None
    with atomic_path(path, protect) as tmp:
        torch.export.save(program, tmp)
    return "torch.export program (load it with torch.export.load(path).module())"
