"""The fix each finding names, per route: a Python call on a torch model (``normfx.rewrite`` returns the fixed
model), a ``normfx`` command on an ONNX file (``--out`` writes the fixed file). ``MODEL`` and ``DATA`` stand
for the model and its calibration data; the CLI puts the model's own name in place of ``MODEL``."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Fixes", "TORCH", "ONNX", "MIN_EPS"]

MIN_EPS = 1e-5  # cuDNN's CUDNN_BN_MIN_EPSILON


@dataclass(frozen=True)
class Fixes:
    route: str

    @property
    def torch(self) -> bool:
        return self.route == "torch"

    def precise(self) -> str:
        """Recompute the statistics on data (precise BN)."""
        if self.torch:
            return "normfx.rewrite(model, 'precise', data=batches)"
        return "normfx rewrite --model MODEL --policy precise --data DATA.npz --out fixed.onnx"

    def raise_eps(self) -> str:
        """Raise eps to cuDNN's minimum, with the stored variance compensated (torch), or fold the BN away (ONNX)."""
        if self.torch:
            return f"normfx.conventions.raise_eps(model, {MIN_EPS:g})"
        return "normfx rewrite --model MODEL --policy fuse --out fused.onnx"

    def keep_unfolded(self, layer: str) -> str:
        """Fold every BN but this one."""
        if self.torch:
            return f"normfx.rewrite(model, {{{layer!r}: 'keep', '*': 'fuse'}})"
        return f"normfx rewrite --model MODEL --policy fuse --override '{layer}=keep' --out fused.onnx"

    def border_correction(self) -> str:
        if self.torch:
            return "normfx.rewrite(model, 'fuse:border_correction=true', example_inputs=x)"
        return "normfx rewrite --model MODEL --policy fuse:border_correction=true --out fused.onnx"

    def frozen(self) -> str:
        """Frozen BN: a constant affine that needs no batch statistics."""
        if self.torch:
            return "normfx.rewrite(model, 'frozen')"
        return ""


TORCH = Fixes("torch")
ONNX = Fixes("onnx")
