"""normfx's own policies: name, help, options, and where each pass lives (imported when first run).

Every pass is a function ``run(model, ctx) -> model`` taking a private copy of the caller's model
and a :class:`normfx.engine.PassContext`.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from .policy import Option, PolicySpec, register_policy


def _lazy(target: str) -> Callable[..., Any]:
    module_name, _, attr = target.partition(":")

    def run(model: Any, ctx: Any) -> Any:
        return getattr(importlib.import_module(module_name), attr)(model, ctx)

    run.__qualname__ = run.__name__ = f"lazy[{target}]"
    return run


register_policy(
    PolicySpec(
        "keep",
        "Leave the normalization layers as they are (useful in per-layer overrides).",
        torch_pass=_lazy("normfx.passes.fx.frozen:run_keep"),
        onnx_pass=_lazy("normfx.passes.onnx.keep:run"),
    )
)
register_policy(
    PolicySpec(
        "frozen",
        "Replace every BatchNorm (1d/2d/3d, SyncBatchNorm, subclasses; activations kept) by FrozenBatchNorm: a constant affine.",
        torch_pass=_lazy("normfx.passes.fx.frozen:run_frozen"),
    )
)
register_policy(
    PolicySpec(
        "unfrozen",
        "Turn FrozenBatchNorm layers back into trainable BatchNorm with the same numbers.",
        torch_pass=_lazy("normfx.passes.fx.frozen:run_unfrozen"),
    )
)
register_policy(
    PolicySpec(
        "fuse",
        "Fold BatchNorm into the adjacent Conv/ConvTranspose/Linear (before or after it) for inference.",
        options={
            "forward": Option("forward", bool, True, "also fold a BN into the conv/linear that follows it"),
            "duplicate_shared": Option(
                "duplicate_shared", bool, True, "fold into a private copy of a conv/linear module called more than once"
            ),
            "border_correction": Option(
                "border_correction", bool, False,
                "fold a BN into a following zero-padded conv / ConvTranspose with an exact per-position constant "
                "(needs a fixed input shape; ties the model to it and adds an elementwise Add)",
            ),
        },
        torch_pass=_lazy("normfx.passes.fx.fuse:run"),
        copies_input=True,
        onnx_pass=_lazy("normfx.passes.onnx.fuse:run"),
    )
)
register_policy(
    PolicySpec(
        "precise",
        "Recompute BN running statistics as the true population average over `data` (precise BN).",
        options={"num_batches": Option("num_batches", int, 0, "batches to use; 0 = all of `data`")},
        torch_pass=_lazy("normfx.stats:run_precise"),
        onnx_pass=_lazy("normfx.stats.onnx_recompute:run_precise"),
        rerun_on_export=False,
        needs_data=True,
        recomputes_statistics=True,
        exact=False,
    )
)
register_policy(
    PolicySpec(
        "adaptive",
        "Recompute BN running statistics on target-domain `data` (adaptive BN for domain shift).",
        options={"num_batches": Option("num_batches", int, 0, "batches to use; 0 = all of `data`")},
        torch_pass=_lazy("normfx.stats:run_adaptive"),
        onnx_pass=_lazy("normfx.stats.onnx_recompute:run_adaptive"),
        rerun_on_export=False,
        needs_data=True,
        recomputes_statistics=True,
        exact=False,
    )
)
register_policy(
    PolicySpec(
        "unfuse",
        "Put a BatchNorm back after every Conv/ConvTranspose/Linear that no normalization follows (for fine-tuning "
        "a fused model); with data= its statistics are measured, so eval outputs are unchanged and train mode is close.",
        options={
            "norm": Option("norm", str, "batchnorm", "the layer inserted: batchnorm, frozen (FrozenBatchNorm) or sync "
                                                     "(SyncBatchNorm); ONNX inserts BatchNormalization"),
            "eps": Option("eps", float, 1e-5, "eps of the inserted BatchNorm"),
            "momentum": Option("momentum", float, 0.1, "momentum of the inserted BatchNorm (PyTorch convention)"),
            "classifier": Option("classifier", bool, False,
                                 "also unfuse the layers whose output is the model's output (the classifier)"),
            "num_batches": Option("num_batches", int, 0, "batches of data to measure statistics on; 0 = all of `data`"),
        },
        torch_pass=_lazy("normfx.passes.fx.unfuse:run"),
        onnx_pass=_lazy("normfx.passes.onnx.unfuse:run"),
        rerun_on_export=False,
        uses_data=True,
        calibrates_on_data=True,
    )
)
