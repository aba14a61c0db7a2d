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
        "ProxyNormAct's constant statistics and affines, StdConv kernels, other libraries' frozen BNs (torchvision, "
        "detectron2, timm; matched by behaviour), per-channel Mul/Add chains (x * w + b: merged into the BN next to "
        "them, else folded into the adjacent layer like a BN) and (ONNX) constant subgraphs; the torch result calls "
        "no Identity, no Dropout left in eval and no wrapper around a kept activation.",
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
            "merge_branches": Option(
                "merge_branches", bool, True,
                "merge a sum of convs reading one tensor (and its identity / identity-BN branch) into one conv "
                "(structural reparameterization: RepVGG, MobileOne); declined with the reason where it would not be exact",
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

# Normalization batch size and train/test consistency (torch route): module swaps keeping the BN's state_dict keys;
# each is BatchNorm itself in eval mode, only training normalizes differently (normfx.layers, docs/training.md).
_VARIANT_NOTE = (" Swaps BatchNorm1d/2d/3d and SyncBatchNorm (state, eps, momentum and mode kept; same output in eval "
                 "mode); Frozen BN, BN subclasses with their own forward and other variants are reported, not swapped.")
register_policy(
    PolicySpec(
        "ghost",
        "Ghost BN: normalize each virtual batch of virtual_batch_size samples on its own statistics (decreases the "
        "normalization batch size); every virtual batch updates the EMA with momentum 1-(1-m)^(1/k), the last virtual "
        "batch holds the remainder." + _VARIANT_NOTE,
        options={"virtual_batch_size": Option("virtual_batch_size", int, 32, "samples per virtual batch (>= 1)")},
        torch_pass=_lazy("normfx.passes.fx.bn_variants:run_ghost"),
    )
)
register_policy(
    PolicySpec(
        "virtual",
        "Virtual BN: training statistics over the batch plus up to reference_size recent samples of each layer's input "
        "(forward-only, no gradient; increases the normalization batch size at a time/memory cost)." + _VARIANT_NOTE,
        options={"reference_size": Option("reference_size", int, 32, "reference samples per layer (>= 1)")},
        torch_pass=_lazy("normfx.passes.fx.bn_variants:run_virtual"),
    )
)
register_policy(
    PolicySpec(
        "sync",
        "Sync BN: normfx.layers.SyncBatchNorm (torch's nn.SyncBatchNorm, plus a CPU/gloo path): statistics over the "
        "union of all ranks' batches (increases the normalization batch size); plain BatchNorm in one process."
        + _VARIANT_NOTE,
        torch_pass=_lazy("normfx.passes.fx.bn_variants:run_sync"),
    )
)
register_policy(
    PolicySpec(
        "renorm",
        "Batch Renorm: training normalizes with batch statistics corrected by r = clip(sigma_B/sigma_EMA, 1/r_max, "
        "r_max) and d = clip((mu_B-mu_EMA)/sigma_EMA, -d_max, d_max) (no gradient through r, d); needs running "
        "statistics." + _VARIANT_NOTE,
        options={
            "r_max": Option("r_max", float, 3.0, "limit of r (>= 1; 1 with d_max=0 is BatchNorm)"),
            "d_max": Option("d_max", float, 5.0, "limit of |d| (>= 0)"),
            "warmup_steps": Option("warmup_steps", int, 0, "training steps with r_max=1, d_max=0 first"),
            "ramp_steps": Option("ramp_steps", int, 0, "then steps over which the limits grow linearly to r_max/d_max"),
        },
        torch_pass=_lazy("normfx.passes.fx.bn_variants:run_renorm"),
    )
)
register_policy(
    PolicySpec(
        "separate",
        "Separate BN: per-domain running statistics (every domain starts from the BN's), affine shared or per domain; "
        "the domain is chosen by normfx.layers.use_domain(model, k) or the layer's domain argument (default 0)."
        + _VARIANT_NOTE,
        options={
            "num_domains": Option("num_domains", int, 2, "number of domains K (>= 1)"),
            "shared_affine": Option("shared_affine", bool, True, "one affine for all domains (false: one per domain)"),
        },
        torch_pass=_lazy("normfx.passes.fx.bn_variants:run_separate"),
    )
)
register_policy(
    PolicySpec(
        "unsync",
        "Turn SyncBatchNorm layers (torch's or normfx's) back into BatchNorm1d/2d/3d with the same numbers (the input "
        "rank comes from example_inputs).",
        torch_pass=_lazy("normfx.passes.fx.bn_variants:run_unsync"),
    )
)
register_policy(
    PolicySpec(
        "batchnorm",
        "Turn Ghost/Virtual/Renorm/Separate/Sync BatchNorm layers back into BatchNorm1d/2d/3d with the same numbers "
        "(a dimension-agnostic layer's input rank comes from example_inputs).",
        options={"domain": Option("domain", int, 0, "the domain a SeparateBatchNorm keeps")},
        torch_pass=_lazy("normfx.passes.fx.bn_variants:run_batchnorm"),
    )
)
