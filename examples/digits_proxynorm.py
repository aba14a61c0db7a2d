"""Batch-independent normalization on real data: BatchNorm vs GroupNorm / LayerNorm, with and without
Proxy Norm or Weight Standardization, on scikit-learn's bundled 8x8 digits (no download).

One BatchNorm model definition, a small pre-activation ResNet (ResNet v2, as the Proxy Norm paper
prefers: every normalization is directly followed by its activation)::

    stem conv3x3 1→32 · block(32) · block(32→64, stride 2, 1x1 projection) · block(64) · norm-ReLU · GAP · linear
    block(x) = x + conv(ReLU(norm(conv(ReLU(norm(x))))))                                  (~150k parameters)

and every variant is made from it (the same initial conv/linear weights per seed):

* ``BN (batch 32)`` — the reference; ``BN (batch 2)`` — the small-batch failure;
* ``GN`` (4 groups), ``LN`` (GroupNorm with 1 group), ``GN + WS`` (GN with standardized convs: the policy's
  ``ws=true`` standardizes the convs whose output feeds a norm, here the three ``conv1`` of the blocks), and
  ``GN + WS (all convs)``, by hand: every conv standardized, as BiT does in its pre-activation ResNets;
* ``GN + PN``, ``LN + PN`` — the norm without affine, then ``ProxyNormAct`` (``normfx.layers``);
* ``IN`` (instance norm: GroupNorm with one group per channel), an extra row for the expressivity diagnostic.

They come from ``normfx.rewrite(bn_model, policy)`` when the policy is registered (``normfx.policy_names()``)
and otherwise from a hand-built swap with the structure the policy is specified to produce (issue 9):
each BN → GroupNorm (affine kept) and, for Proxy Norm, each BN → ReLU pair → GroupNorm(affine=False) →
ProxyNormAct(ReLU) (for these the two routes give the same model; for ``ws`` the hand route standardizes every
conv). The ``built by`` column says which.

The same training budget for every variant: SGD (momentum 0.9), cosine learning rate, the same epochs and the
same samples in the same order per seed; weight decay on conv/linear weights and on ProxyNormAct's β̃, γ̃
(``normfx.layers.param_groups``: the official recipe; norm affines and PN's β, γ not decayed). Batch 32 for
all but ``BN (batch 2)``, which sees the same samples in the same order in batches of 2 (16x the steps, the
learning rate scaled linearly by 2/32), so only the batch size changes.

The two diagnostics of the paper, on the trained models (eval mode) over the test images, at every norm
layer on its normalized output Y before any affine (the input of ProxyNormAct for the PN variants;
BN in eval mode uses its running statistics):

1. channel-wise normalization: per channel c, μ_c and σ_c of Y over (images, h, w); reported: mean_c |μ_c|
   and std_c σ_c (LayerNorm's failure mode: channels collapse to channel-wise constants, |μ_c| large);
2. expressivity: per image b and channel c the instance statistics μ_{b,c}, σ_{b,c} of Y over (h, w);
   reported: Var_b[μ_{b,c}] and Var_b[σ_{b,c}] averaged over channels (instance norm's failure mode: both 0).

Both are averaged over layers. The paper's decomposition E[Y²] = (E_b μ_{b,c})² + Var_b μ_{b,c} + (E_b σ_{b,c})²
+ Var_b σ_{b,c} (averaged over c; ≈ 1 for every variant) is in the .md as four shares summing to 1.

Writes ``digits_proxynorm.{md,json,png}`` to ``out/examples/`` (``--out examples``: the committed files beside this
script), prints the tables.
Deterministic per seed for a given torch build and thread count (CPU); about 4 minutes on one thread (the
``BN (batch 2)`` runs take half of it).

    python examples/digits_proxynorm.py [--out examples] [--seeds 3] [--epochs 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits_precise_bn import load  # noqa: E402  (the same data split and pixel normalization)

import normfx  # noqa: E402
from normfx.io_utils import atomic_path, atomic_write_text  # noqa: E402
from normfx.layers import ProxyNormAct, StdConv2d, param_groups  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join("out", "examples")  # git-ignored; `--out examples` updates the committed files
BATCH = 32
SMALL_BATCH = 2
LR = 0.05  # at batch 32; scaled linearly with the batch size
WEIGHT_DECAY = 5e-4
EPOCHS = 10
GROUPS = 4


@dataclass(frozen=True)
class Variant:
    name: str
    policy: str | None  # the normfx policy spec, None for the untouched BN model
    batch: int = BATCH
    hand: bool = False  # built by module surgery (``by_hand``) even when the policy is registered


VARIANTS = (
    Variant("BN (batch 32)", None),
    Variant("BN (batch 2)", None, SMALL_BATCH),
    Variant("GN", f"groupnorm:groups={GROUPS}"),
    Variant("LN", "layernorm"),
    Variant("GN + PN", f"proxynorm:norm=groupnorm,groups={GROUPS}"),
    Variant("LN + PN", "proxynorm:norm=layernorm"),
    Variant("GN + WS", f"groupnorm:groups={GROUPS},ws=true"),
    Variant("GN + WS (all convs)", f"groupnorm:groups={GROUPS},ws=all", hand=True),
    Variant("IN (extra)", "instancenorm"),
)


# ---------------------------------------------------------------------------------------------- the model


class Block(nn.Module):
    """Pre-activation residual block: x + conv(act(norm(conv(act(norm(x)))))), 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.norm1, self.act1 = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm2, self.act2 = nn.BatchNorm2d(cout), nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.norm1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.act2(self.norm2(out)))
        return out + skip


class ResNet(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.block1 = Block(width, width)
        self.block2 = Block(width, 2 * width, stride=2)
        self.block3 = Block(2 * width, 2 * width)
        self.norm, self.act = nn.BatchNorm2d(2 * width), nn.ReLU()
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        x = self.act(self.norm(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ------------------------------------------------------------------------------------ building the variants


def _policy_name(spec: str) -> str:
    return spec.split(":", 1)[0]


def _options(spec: str) -> dict[str, str]:
    _, _, rest = spec.partition(":")
    return dict(item.split("=", 1) for item in rest.split(",") if item)


def _group_norm(groups: int | None, channels: int, bn: nn.BatchNorm2d, affine: bool) -> nn.GroupNorm:
    """``groups`` None → one group per channel (instance norm); the BN's affine copied when kept."""
    gn = nn.GroupNorm(channels if groups is None else groups, channels, eps=bn.eps, affine=affine)
    if affine:
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
    return gn


def by_hand(bn_model: nn.Module, spec: str) -> nn.Module:
    """The swap a policy is specified to make, done by module surgery on this file's ResNet: every BatchNorm2d →
    GroupNorm (affine kept); ``proxynorm``: each BN → ReLU pair (``normX`` → ``actX``, all of them in this model)
    → GroupNorm(affine=False) → ProxyNormAct(ReLU) with the BN's γ, β; ``ws=true`` or ``ws=all``: every conv →
    StdConv2d (the BiT recipe: all convs standardized; the policy's ``ws=true`` only takes the convs feeding a norm)."""
    model = copy.deepcopy(bn_model)
    name, opts = _policy_name(spec), _options(spec)
    if name == "proxynorm":
        groups = 1 if opts.get("norm") == "layernorm" else int(opts.get("groups", GROUPS))
    else:
        groups = {"groupnorm": int(opts.get("groups", GROUPS)), "layernorm": 1, "instancenorm": None}[name]
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                if name == "proxynorm":
                    act_name = child_name.replace("norm", "act")
                    assert isinstance(getattr(parent, act_name, None), nn.ReLU), f"{child_name} has no ReLU after it"
                    setattr(parent, child_name, _group_norm(groups, child.num_features, child, affine=False))
                    pn = ProxyNormAct(child.num_features, nn.ReLU())
                    with torch.no_grad():
                        pn.weight.copy_(child.weight)
                        pn.bias.copy_(child.bias)
                    setattr(parent, act_name, pn)
                else:
                    setattr(parent, child_name, _group_norm(groups, child.num_features, child, affine=True))
            elif isinstance(child, nn.Conv2d) and opts.get("ws") in ("true", "all"):
                setattr(parent, child_name, StdConv2d.from_conv(child))
    return model


def build(bn_model: nn.Module, variant: Variant) -> tuple[nn.Module, str]:
    """The variant's model from the BN model, and how it was built."""
    if variant.policy is None:
        return copy.deepcopy(bn_model), "the BN model"
    if variant.hand:
        return by_hand(bn_model, variant.policy), "by hand (module surgery)"
    if _policy_name(variant.policy) in normfx.policy_names():
        return normfx.rewrite(bn_model, variant.policy, strict=True), f'normfx.rewrite(model, "{variant.policy}")'
    return by_hand(bn_model, variant.policy), f"by hand (no `{_policy_name(variant.policy)}` policy registered)"


def layer_summary(model: nn.Module) -> dict[str, int]:
    """Counts of the layer types that matter, to check a variant is what its name says."""
    counts = {"BatchNorm": 0, "GroupNorm(affine)": 0, "GroupNorm(no affine)": 0, "ProxyNormAct": 0,
              "StdConv": 0, "Conv": 0}
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            counts["BatchNorm"] += 1
        elif isinstance(m, nn.GroupNorm):
            counts["GroupNorm(affine)" if m.affine else "GroupNorm(no affine)"] += 1
        elif isinstance(m, nn.modules.instancenorm._InstanceNorm):
            counts["InstanceNorm"] = counts.get("InstanceNorm", 0) + 1
        elif isinstance(m, ProxyNormAct):
            counts["ProxyNormAct"] += 1
        elif isinstance(m, StdConv2d):
            counts["StdConv"] += 1
        elif isinstance(m, nn.Conv2d):
            counts["Conv"] += 1
    return {k: v for k, v in counts.items() if v}


# ------------------------------------------------------------------------------------------------ training


def epoch_orders(n: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """The samples of each epoch in order: a permutation per epoch, cut to a multiple of BATCH so that batch 32
    and batch 2 see exactly the same samples in the same order."""
    gen = torch.Generator().manual_seed(1000 + seed)
    usable = (n // BATCH) * BATCH
    return [torch.randperm(n, generator=gen)[:usable] for _ in range(epochs)]


def train(model: nn.Module, data: dict, orders: list[torch.Tensor], batch: int, base_lr: float = LR) -> dict:
    x, y = data["x_train"], data["y_train"]
    lr = base_lr * batch / BATCH
    opt = torch.optim.SGD(param_groups(model, WEIGHT_DECAY), lr=lr, momentum=0.9)
    steps_per_epoch = len(orders[0]) // batch
    total = steps_per_epoch * len(orders)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + np.cos(np.pi * step / total)))
    model.train()
    epoch_losses = []
    for order in orders:
        losses = []
        for idx in order.split(batch):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        epoch_losses.append(float(np.mean(losses)))
    model.eval()
    return {"steps": total, "lr": lr, "epoch_train_loss": epoch_losses}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = torch.cat([model(chunk) for chunk in x.split(256)])
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


# --------------------------------------------------------------------------------------------- diagnostics

NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def _normalized(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm layer's output Y before its affine (eval mode: BN uses its running statistics)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return F.batch_norm(x, module.running_mean, module.running_var, training=False, eps=module.eps)
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return F.instance_norm(x, eps=module.eps)
    return F.group_norm(x, module.num_groups, eps=module.eps)


@torch.no_grad()
def diagnostics(model: nn.Module, x: torch.Tensor) -> dict:
    """Per norm layer, over the images ``x``: the channel-wise statistics of Y and the variance over images of
    its instance statistics (float64), and the four terms of E[Y²] (means over channels)."""
    model.eval()
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, NORMS)]
    captured: dict[str, list[torch.Tensor]] = {n: [] for n, _ in norms}
    hooks = [m.register_forward_hook(lambda m, inp, out, n=n: captured[n].append(_normalized(m, inp[0]).double()))
             for n, m in norms]
    try:
        for chunk in x.split(256):
            model(chunk)
    finally:
        for h in hooks:
            h.remove()
    layers = []
    for name, _ in norms:
        y = torch.cat(captured[name])  # (B, C, H, W)
        mu_bc = y.mean(dim=(2, 3))  # instance statistics
        sigma_bc = y.std(dim=(2, 3), correction=0)
        mu_c = y.mean(dim=(0, 2, 3))  # channel-wise statistics over the dataset
        sigma_c = y.std(dim=(0, 2, 3), correction=0)
        terms = {"mean_c_sq": mu_bc.mean(0).square(), "var_b_mu": mu_bc.var(0, correction=0),
                 "mean_b_sigma_sq": sigma_bc.mean(0).square(), "var_b_sigma": sigma_bc.var(0, correction=0)}
        terms = {k: float(v.mean()) for k, v in terms.items()}
        total = sum(terms.values())
        layers.append({
            "layer": name, "channels": y.shape[1], "spatial": y.shape[2] * y.shape[3],
            "abs_mu_c": float(mu_c.abs().mean()), "std_sigma_c": float(sigma_c.std(correction=0)),
            "mean_sigma_c": float(sigma_c.mean()), "sigma_c_max_min": float(sigma_c.max() / sigma_c.min().clamp_min(1e-12)),
            "var_b_mu_bc": terms["var_b_mu"], "var_b_sigma_bc": terms["var_b_sigma"],
            "e_y2": total, "shares": {k: v / total for k, v in terms.items()},
        })
    keys = ("abs_mu_c", "std_sigma_c", "sigma_c_max_min", "var_b_mu_bc", "var_b_sigma_bc", "e_y2")
    mean = {k: float(np.mean([layer[k] for layer in layers])) for k in keys}
    mean["shares"] = {k: float(np.mean([layer["shares"][k] for layer in layers])) for k in layers[0]["shares"]}
    return {"mean_over_layers": mean, "layers": layers}


# -------------------------------------------------------------------------------------------------- a run


def run_all(data: dict, seeds: int, epochs: int, variants=VARIANTS, width: int = 32, lr: float = LR,
            log=print) -> dict:
    results: dict[str, dict] = {v.name: {"policy": v.policy, "batch": v.batch, "runs": []} for v in variants}
    for seed in range(seeds):
        torch.manual_seed(seed)
        bn_model = ResNet(width)
        orders = epoch_orders(len(data["x_train"]), epochs, seed)
        for variant in variants:
            model, built_by = build(bn_model, variant)
            torch.manual_seed(seed)
            start = time.perf_counter()
            training = train(model, data, orders, variant.batch, lr)
            seconds = time.perf_counter() - start
            test_acc, test_loss = evaluate(model, data["x_val"], data["y_val"])
            train_acc, train_loss = evaluate(model, data["x_train"], data["y_train"])
            entry = results[variant.name]
            entry["built_by"], entry["layers"] = built_by, layer_summary(model)
            entry["parameters"] = sum(p.numel() for p in model.parameters())
            entry["runs"].append({
                "seed": seed, **training, "seconds": seconds, "test_acc": test_acc, "test_loss": test_loss,
                "train_acc_eval": train_acc, "train_loss_eval": train_loss,
                "train_loss_last_epoch": training["epoch_train_loss"][-1],
                "diagnostics": diagnostics(model, data["x_val"]),
            })
            log(f"seed {seed} {variant.name:12s} test acc {test_acc:.4f}  train loss {train_loss:.4f}  {seconds:5.1f} s")
    return results


def _ms(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.3f} ± {values.std():.3f}"


def results_table(results: dict) -> str:
    lines = ["| variant | built by | batch (steps) | test acc, mean ± std | min – max | train loss (eval, full train set) "
             "| train loss (last epoch, train mode) | train acc (eval) | s / run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in results.items():
        runs = entry["runs"]
        acc = [r["test_acc"] for r in runs]
        lines.append(
            f"| {name} | {entry['built_by']} | {entry['batch']} ({runs[0]['steps']}) | {_ms(acc)} | "
            f"{min(acc):.3f} – {max(acc):.3f} | {np.mean([r['train_loss_eval'] for r in runs]):.4f} | "
            f"{np.mean([r['train_loss_last_epoch'] for r in runs]):.4f} | "
            f"{np.mean([r['train_acc_eval'] for r in runs]):.4f} | {np.mean([r['seconds'] for r in runs]):.1f} |")
    return "\n".join(lines)


def diagnostics_table(results: dict) -> str:
    lines = ["| variant | (1) mean_c abs(μ_c) | (1) std_c σ_c | (1) max/min σ_c | (2) Var_b μ_bc | (2) Var_b σ_bc "
             "| E[Y²] shares: (E_b μ_bc)² / Var_b μ_bc / (E_b σ_bc)² / Var_b σ_bc |",
             "|---|---|---|---|---|---|---|"]
    for name, entry in results.items():
        diags = [r["diagnostics"]["mean_over_layers"] for r in entry["runs"]]
        shares = [np.mean([d["shares"][k] for d in diags]) for k in diags[0]["shares"]]
        lines.append(
            f"| {name} | {_ms([d['abs_mu_c'] for d in diags])} | {_ms([d['std_sigma_c'] for d in diags])} | "
            f"{np.mean([d['sigma_c_max_min'] for d in diags]):.1f} | {_ms([d['var_b_mu_bc'] for d in diags])} | "
            f"{_ms([d['var_b_sigma_bc'] for d in diags])} | " + " / ".join(f"{s:.3f}" for s in shares) + " |")
    return "\n".join(lines)


COMPARISONS = (("BN (batch 32)", "BN (batch 2)"), ("GN", "GN + PN"), ("LN", "LN + PN"), ("GN", "GN + WS"),
               ("GN", "GN + WS (all convs)"), ("GN + WS (all convs)", "GN + PN"), ("BN (batch 32)", "GN + PN"))


def comparison_table(results: dict) -> str:
    """Paired by seed (same initial weights, same samples in the same order): B − A."""
    lines = ["| A → B | Δ test acc (mean over seeds) | seeds B > A / = / < | train loss (eval) A → B "
             "| mean_c abs(μ_c) A → B | Var_b μ_bc A → B |", "|---|---|---|---|---|---|"]
    for a, b in COMPARISONS:
        if a not in results or b not in results:
            continue
        ra, rb = results[a]["runs"], results[b]["runs"]
        delta = np.array([y["test_acc"] - x["test_acc"] for x, y in zip(ra, rb)])
        wins = f"{int((delta > 0).sum())} / {int((delta == 0).sum())} / {int((delta < 0).sum())}"

        def mean(runs, key, diag=False):
            return np.mean([r["diagnostics"]["mean_over_layers"][key] if diag else r[key] for r in runs])

        lines.append(f"| {a} → {b} | {delta.mean():+.4f} | {wins} | {mean(ra, 'train_loss_eval'):.4f} → "
                     f"{mean(rb, 'train_loss_eval'):.4f} | {mean(ra, 'abs_mu_c', True):.3f} → {mean(rb, 'abs_mu_c', True):.3f} "
                     f"| {mean(ra, 'var_b_mu_bc', True):.3f} → {mean(rb, 'var_b_mu_bc', True):.3f} |")
    return "\n".join(lines)


def per_layer_table(results: dict, key: str, label: str) -> str:
    names = list(results)
    layer_names = [layer["layer"] for layer in results[names[0]]["runs"][0]["diagnostics"]["layers"]]
    lines = [f"| {label}: layer | " + " | ".join(names) + " |", "|---" * (1 + len(names)) + "|"]
    for i, layer in enumerate(layer_names):
        cells = [f"{np.mean([r['diagnostics']['layers'][i][key] for r in results[n]['runs']]):.3f}" for n in names]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- plot


def plot(results: dict, path: str) -> None:
    from matplotlib.figure import Figure

    names = list(results)
    xs = np.arange(len(names))
    colors = ["#264653", "#8d99ae", "#2a9d8f", "#e9c46a", "#1d7874", "#f4a261", "#457b9d", "#a8dadc", "#e76f51"]
    fig = Figure(figsize=(17, 9.5), layout="constrained")
    axes = fig.subplots(2, 3)

    ax = axes[0][0]
    for i, name in enumerate(names):
        acc = np.array([r["test_acc"] for r in results[name]["runs"]])
        ax.scatter(np.full(len(acc), i) + np.linspace(-0.12, 0.12, len(acc)), acc, s=14, color=colors[i % len(colors)])
        ax.errorbar(i + 0.25, acc.mean(), yerr=acc.std(), fmt="o", color="black", capsize=3, ms=4)
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"test accuracy ({len(results[names[0]]['runs'])} seeds: dots; mean ± std: black)")

    ax = axes[0][1]
    for i, name in enumerate(names):
        curves = np.array([r["epoch_train_loss"] for r in results[name]["runs"]])
        ax.plot(np.arange(1, curves.shape[1] + 1), curves.mean(0), color=colors[i % len(colors)], label=name)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (train mode, epoch mean)")
    ax.set_title("training loss (mean over seeds)")
    ax.legend(fontsize=7)

    def bars(ax, keys_labels, title, ylabel):
        width = 0.8 / len(keys_labels)
        for j, (key, label) in enumerate(keys_labels):
            values = np.array([[r["diagnostics"]["mean_over_layers"][key] for r in results[n]["runs"]] for n in names])
            ax.bar(xs + (j - (len(keys_labels) - 1) / 2) * width, values.mean(1), width, yerr=values.std(1),
                   capsize=2, label=label)
        ax.set_xticks(xs)
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)

    bars(axes[0][2], [("abs_mu_c", "mean_c |μ_c|"), ("std_sigma_c", "std_c σ_c")],
         "(1) channel-wise normalization of Y (0, 0 = normalized)", "mean over layers (test images)")
    bars(axes[1][0], [("var_b_mu_bc", "Var_b μ_bc"), ("var_b_sigma_bc", "Var_b σ_bc")],
         "(2) expressivity: variance of instance statistics", "mean over channels and layers")

    ax = axes[1][1]
    labels = {"mean_c_sq": "(E_b μ_bc)²: channel-wise collapse", "var_b_mu": "Var_b μ_bc",
              "mean_b_sigma_sq": "(E_b σ_bc)²", "var_b_sigma": "Var_b σ_bc"}
    bottom = np.zeros(len(names))
    for j, (key, label) in enumerate(labels.items()):
        values = np.array([np.mean([r["diagnostics"]["mean_over_layers"]["shares"][key] for r in results[n]["runs"]])
                           for n in names])
        ax.bar(xs, values, 0.7, bottom=bottom, label=label, color=["#e76f51", "#2a9d8f", "#adb5bd", "#264653"][j])
        bottom += values
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.0)
    ax.set_title("shares of E[Y²] (the paper's decomposition, mean over layers)")
    ax.legend(fontsize=7, loc="center", framealpha=0.9)

    ax = axes[1][2]
    layer_names = [layer["layer"] for layer in results[names[0]]["runs"][0]["diagnostics"]["layers"]]
    for i, name in enumerate(names):
        per_layer = np.array([[layer["shares"]["mean_c_sq"] for layer in r["diagnostics"]["layers"]]
                              for r in results[name]["runs"]]).mean(0)
        ax.plot(np.arange(len(per_layer)), per_layer, "o-", color=colors[i % len(colors)], label=name, ms=3)
    ax.set_xticks(np.arange(len(layer_names)))
    ax.set_xticklabels(layer_names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("share of (E_b μ_bc)² in E[Y²]")
    ax.set_title("channel-wise collapse per layer (depth →)")
    ax.legend(fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", "--out-dir", dest="out_dir", default=DEFAULT_OUT,
                        help="folder for the md/json/png (default: %(default)s, git-ignored; give `examples` to update "
                             "the committed files)")
    parser.add_argument("--seed", type=int, default=0, help="data split seed")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds (initialization and data order)")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--variants", default="", help="comma-separated variant names to run (default: all)")
    parser.add_argument("--lr", type=float, default=LR, help="learning rate at batch 32")
    parser.add_argument("--max-train", type=int, default=0, help="use only the first N training images (quick checks)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: these tiny ops gain little from 2, and 2 threads stall badly when "
                             "another process shares the cores)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = load(args.seed)
    if args.max_train:
        data["x_train"], data["y_train"] = data["x_train"][:args.max_train], data["y_train"][:args.max_train]
    variants = VARIANTS
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",")]
        unknown = set(wanted) - {v.name for v in VARIANTS}
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; valid: {[v.name for v in VARIANTS]}")
        variants = tuple(v for v in VARIANTS if v.name in wanted)
    results = run_all(data, args.seeds, args.epochs, variants, width=args.width, lr=args.lr,
                      log=(lambda *a: None) if args.quiet else print)
    elapsed = time.perf_counter() - start
    tables = "\n\n".join([
        results_table(results), diagnostics_table(results), comparison_table(results),
        per_layer_table(results, "abs_mu_c", "(1) mean_c abs(μ_c)"),
        per_layer_table(results, "var_b_mu_bc", "(2) Var_b μ_bc"),
    ])
    print(tables)
    print(f"\n{len(data['x_train'])} train / {len(data['x_val'])} test images; {args.seeds} seeds x {len(results)} "
          f"variants, {args.epochs} epochs; {elapsed:.1f} s")
    base = os.path.join(args.out_dir, "digits_proxynorm")
    first = next(iter(results.values()))
    header = (
        "# Batch Norm vs batch-independent norms, with and without Proxy Norm, on scikit-learn digits\n\n"
        f"Generated by `python examples/digits_proxynorm.py` (data seed {args.seed}, {args.seeds} training seeds, "
        f"torch {torch.__version__}, {elapsed:.0f} s on {torch.get_num_threads()} CPU thread(s)). "
        f"{len(data['x_train'])} train / {len(data['x_val'])} test images. A pre-activation ResNet "
        f"(width {args.width}, {first['parameters']} parameters with BN), one BN definition; every variant built "
        f"from it. {args.epochs} epochs of the same samples in the same order, SGD momentum 0.9, cosine lr "
        f"{args.lr} at batch {BATCH} (x batch/{BATCH} for batch {SMALL_BATCH}), weight decay {WEIGHT_DECAY} on conv/linear "
        "weights and on ProxyNormAct's β̃, γ̃ (`normfx.layers.param_groups`). Test accuracy and the diagnostics "
        "are on the held-out test images, in eval mode.\n\n"
        "Diagnostics on Y, each norm layer's normalized output before its affine (the input of ProxyNormAct "
        "for PN), averaged over the norm layers: (1) channel-wise normalization — mean over channels of "
        "|μ_c| and std over channels of σ_c, both over (images, h, w), 0 for a channel-wise normalized Y; "
        "(2) expressivity — variance over images of the per-image, per-channel mean μ_bc and std σ_bc "
        "(over h, w), averaged over channels. The shares split E[Y²] into the paper's four terms.\n\n"
    )
    layers = "\n".join(f"- {name}: {entry['layers']}" for name, entry in results.items())
    atomic_write_text(base + ".md", header + tables + "\n\nLayers of each variant:\n\n" + layers + "\n")
    payload = {"seed": args.seed, "seeds": args.seeds, "epochs": args.epochs, "width": args.width, "lr": args.lr,
               "batch": BATCH, "small_batch": SMALL_BATCH, "weight_decay": WEIGHT_DECAY, "groups": GROUPS,
               "torch": torch.__version__, "seconds": elapsed, "results": results}
    atomic_write_text(base + ".json", json.dumps(payload, indent=1) + "\n")
    plot(results, base + ".png")
    print(f"wrote {base}.md, {base}.json, {base}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
