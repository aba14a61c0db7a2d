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
        "Fold BatchNorm into the adjacent Conv/ConvTranspose/Linear (before or after it) for inference; also fold "
        "ProxyNormAct's constant statistics and affines, StdConv kernels, and (ONNX) constant subgraphs and "
        "per-channel Mul/Add chains.",
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

# Batch-independent normalization (torch route): BN → GroupNorm / LayerNorm / InstanceNorm, Proxy Norm, WS.
_GROUP_OPTIONS = {
    "groups": Option("groups", int, 0, "number of groups G (must divide every targeted layer's channel count C); "
                                       "0 = the default rule"),
    "group_size": Option("group_size", int, 0, "channels per group S (G = C / S; must divide C); set groups or "
                                               "group_size, not both; 0 = the default rule"),
}
_WS_OPTION = {"ws": Option("ws", bool, False, "also turn the Conv1d/2d/3d feeding each new norm into a StdConv "
                                              "(Weight Standardization, as in BiT's GN + WS)")}
_SWAP_NOTE = (" BN eps and affine (weight/bias) are kept at the BN's path, running statistics dropped; "
              "BN subclasses keep their own activation after the norm; functional F.batch_norm calls are reported, "
              "not replaced.")
register_policy(
    PolicySpec(
        "groupnorm",
        "Replace every BatchNorm (1d/2d/3d, SyncBatchNorm, Frozen, subclasses) by nn.GroupNorm. Default groups: the "
        "largest divisor of C that is <= 32 and leaves >= 2 channels per group; 1 group on a 2-D (N, C) input "
        "(pass example_inputs to prove a BatchNorm1d's rank)." + _SWAP_NOTE,
        options={**_GROUP_OPTIONS, **_WS_OPTION},
        torch_pass=_lazy("normfx.passes.fx.norm_swap:run_groupnorm"),
        exact=False,
    )
)
register_policy(
    PolicySpec(
        "layernorm",
        "Replace every BatchNorm by LayerNorm in the Proxy Norm paper's sense: nn.GroupNorm(1, C), statistics over C "
        "and the spatial axes, per-channel affine (channels-first; not nn.LayerNorm, which acts on the last axes)."
        + _SWAP_NOTE,
        options=dict(_WS_OPTION),
        torch_pass=_lazy("normfx.passes.fx.norm_swap:run_layernorm"),
        exact=False,
    )
)
register_policy(
    PolicySpec(
        "instancenorm",
        "Replace every BatchNorm by InstanceNorm as nn.GroupNorm(C, C): per-channel statistics over the spatial axes, "
        "per-channel affine, the same in train and eval (unlike nn.InstanceNorm*); refused on 2-D (N, C) inputs, "
        "where each group would hold one value." + _SWAP_NOTE,
        options=dict(_WS_OPTION),
        torch_pass=_lazy("normfx.passes.fx.norm_swap:run_instancenorm"),
        exact=False,
    )
)
register_policy(
    PolicySpec(
        "proxynorm",
        "Proxy Norm: each BatchNorm → activation pair becomes norm (no affine) → ProxyNormAct(activation), whose "
        "weight/bias start from the BN's gamma/beta (kept at the BN's path; the norm sits at '<bn>_norm'); a BN "
        "without an activation after it becomes the norm with its affine; BN+activation subclasses give "
        "ProxyNormAct(their activation). Default norm: GroupNorm with the largest divisor of C that is <= 4 "
        "(>= 2 channels per group); 1 group on 2-D inputs. Needs torch.fx: a BN in a part it cannot trace gets "
        "GroupNorm with affine (its activation is unknown), reported.",
        options={
            **_GROUP_OPTIONS,
            "norm": Option("norm", str, "groupnorm", "the norm before ProxyNormAct: groupnorm or layernorm "
                                                     "(GroupNorm with 1 group)"),
            **_WS_OPTION,
        },
        torch_pass=_lazy("normfx.passes.fx.proxy_pairs:run"),
        exact=False,
    )
)
register_policy(
    PolicySpec(
        "weight_standardization",
        "Turn every targeted Conv1d/2d/3d whose output feeds a GroupNorm (incl. those groupnorm/layernorm/"
        "instancenorm/proxynorm create) into a StdConv (Weight Standardization; same weight/bias keys). Convs before "
        "a BatchNorm are left alone: convert the BN first, or use ws=true on those policies. Entries are named by "
        "the conv.",
        options={"eps": Option("eps", float, 1e-6, "added to the variance of each output channel's weights")},
        torch_pass=_lazy("normfx.passes.fx.weight_std:run"),
        exact=False,
    )
)
