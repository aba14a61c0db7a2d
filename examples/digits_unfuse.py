"""Fine-tuning a fused model vs its ``unfuse``d twin, and adapting a deployed ONNX file to a new domain
with nothing but the file: scikit-learn's bundled 8x8 digits (no download).

1. A small BN CNN (the one of ``digits_precise_bn.py``) is pre-trained on the digits, given precise BN
   statistics, and fused (``normfx.rewrite(model, "fuse")``): the checkpoint a deployment ships.
2. Fine-tuning on a new domain (a small labeled set of shifted digits: lower contrast, a brightness
   offset, pixel noise), same optimizer, learning rate, steps and batch order for
   (a) the fused model (conv + bias, no BN),
   (b) its twin ``normfx.rewrite(fused, "unfuse", data=fine_tuning_images)`` (conv → BN again), and
   (c) the original BN model, as a reference.
   Several seeds and learning rates; training loss and shifted-val accuracy every few steps, whatever
   they show.
3. The ONNX-only adaptation: the fused model exported to ONNX (``normfx.export``), then
   ``normfx.rewrite(path, ["unfuse", "adaptive", "fuse"], data=...)`` on the file, and its shifted-val
   accuracy in onnxruntime next to the torch route's adaptive BN on the original model. Three ways:
   unfuse calibrated on the target data itself (a no-op by construction: unfuse keeps the function on
   the data it measures, so adaptive re-measures the same statistics), unfuse without data (identity
   statistics: adaptive then standardizes every channel, losing the learned scale), and unfuse on a few
   unlabeled *source* images (``data={"unfuse": source, "adaptive": target}``), which recovers the
   source BN exactly, so adaptive BN on it is the torch route's.

Writes ``digits_unfuse.{md,json,png}`` to ``out/examples/`` (``--out examples``: the committed files beside this
script) and prints the tables. Deterministic per seed for a given torch build and ``--threads`` (default 2).
About a minute on 2 cores.

    python examples/digits_unfuse.py [--out examples] [--seeds 5] [--steps 150] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits_precise_bn import SHIFT, load, net  # noqa: E402  (the same data and network)

import normfx  # noqa: E402
from normfx.io_utils import atomic_path, atomic_write_text  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join("out", "examples")  # git-ignored; `--out examples` updates the committed files
PRETRAIN_STEPS = 300
PRETRAIN_LR = 0.1
FINETUNE_IMAGES = 256  # labeled shifted images for fine-tuning
SOURCE_IMAGES = 256  # unlabeled source-domain images that calibrate unfuse before adaptive BN
BATCH = 32
LRS = (0.05, 0.01, 0.002)  # the same learning rates for every variant
EVERY = 10  # record every EVERY steps
VARIANTS = ("fused", "unfused", "original BN")


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float, seed: int,
        evaluate=None) -> list[dict]:
    """SGD (momentum 0.9) on shuffled batches in train mode; a record every EVERY steps."""
    order_gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    records, window = [], []
    order, cursor = torch.randperm(len(x), generator=order_gen), 0
    for step in range(1, steps + 1):
        if cursor + BATCH > len(x):
            order, cursor = torch.randperm(len(x), generator=order_gen), 0
        idx = order[cursor:cursor + BATCH]
        cursor += BATCH
        model.train()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        window.append(loss.item())
        if evaluate is not None and (step % EVERY == 0 or step == steps):
            records.append({"step": step, "train_loss": float(np.mean(window)), **evaluate(model)})
            window = []
    model.eval()
    return records


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def batches(x: torch.Tensor, size: int = 64) -> list[torch.Tensor]:
    return list(torch.split(x, size))


def pretrained(data: dict, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = net(0.1)
    fit(model, data["x_train"], data["y_train"], steps=PRETRAIN_STEPS, lr=PRETRAIN_LR, seed=seed)
    return normfx.recompute_stats(model, batches(data["x_train"]), progress=False)


def fine_tuning(data: dict, original: nn.Module, seeds: int, steps: int, lrs: tuple[float, ...]) -> dict:
    x_ft, y_ft = data["x_ft"], data["y_ft"]
    fused = normfx.rewrite(original, "fuse")
    unfused, report = normfx.rewrite_with_report(fused, "unfuse", data=batches(x_ft))
    start = {"fused": fused, "unfused": unfused, "original BN": original}

    def evaluate(model):
        return {"val_shifted_acc": accuracy(model, data["x_val_shifted"], data["y_val"])}

    curves: dict[str, dict[str, list[list[dict]]]] = {str(lr): {v: [] for v in VARIANTS} for lr in lrs}
    for lr in lrs:
        for seed in range(seeds):
            for variant in VARIANTS:
                torch.manual_seed(seed)
                model = copy.deepcopy(start[variant])
                runs = curves[str(lr)][variant]
                runs.append(fit(model, x_ft, y_ft, steps=steps, lr=lr, seed=100 + seed, evaluate=evaluate))
    before = {v: evaluate(m)["val_shifted_acc"] for v, m in start.items()}
    return {
        "unfuse_report": {"applied": [e.name for e in report.applied], "skipped": {e.name: e.reason for e in report.skipped},
                          "train_mode_rel_error": report.metrics.get("unfuse_train_mode_rel_error")},
        "before": before,
        "curves": curves,
    }


def onnx_adaptation(data: dict, original: nn.Module, workdir: str) -> dict:
    """The fused ONNX file adapted three ways, all ONNX only; the torch route's adaptive BN beside them."""
    x_val, y_val = data["x_val_shifted"], data["y_val"]
    target = batches(data["x_target_unlabeled"])
    source = [b.numpy() for b in batches(data["x_source_unlabeled"])]
    torch_adaptive = normfx.recompute_stats(original, target, mode="adaptive", progress=False)
    fused_path = os.path.join(workdir, "digits_fused.onnx")
    normfx.export(original, data["x_train"][:8], fused_path, policy="fuse")
    target = [b.numpy() for b in target]
    steps = ["unfuse", "adaptive", "fuse"]
    variants = {
        "unfuse and adaptive on target data": normfx.rewrite_with_report(fused_path, steps, data=target),
        "unfuse without data (identity), adaptive on target data": normfx.rewrite_with_report(
            fused_path, steps, data={"adaptive": target}),
        "unfuse on unlabeled source images, adaptive on target data": normfx.rewrite_with_report(
            fused_path, steps, data={"unfuse": source, "adaptive": target}),
    }

    def ort_accuracy(model) -> float:
        session = ort.InferenceSession(model if isinstance(model, str) else model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        logits = session.run(None, {session.get_inputs()[0].name: x_val.numpy()})[0]
        return float((logits.argmax(1) == y_val.numpy()).mean())

    return {
        "fused_onnx_val_shifted": ort_accuracy(fused_path),
        "onnx_only": {label: {"val_shifted": ort_accuracy(model), "notes": report.notes,
                              "batchnorm_left": sum(n.op_type == "BatchNormalization" for n in model.graph.node)}
                      for label, (model, report) in variants.items()},
        "torch_adaptive_val_shifted": accuracy(torch_adaptive, x_val, y_val),
    }


def summary_table(ft: dict) -> str:
    lines = ["| lr | variant | shifted val acc before | after (mean ± std over seeds) | min | max | final train loss (mean) |",
             "|---|---|---|---|---|---|---|"]
    for lr, curves in ft["curves"].items():
        for variant in VARIANTS:
            finals = np.array([run[-1]["val_shifted_acc"] for run in curves[variant]])
            losses = np.array([run[-1]["train_loss"] for run in curves[variant]])
            lines.append(f"| {lr} | {variant} | {ft['before'][variant]:.3f} | {finals.mean():.3f} ± {finals.std():.3f} | "
                         f"{finals.min():.3f} | {finals.max():.3f} | {losses.mean():.3g} |")
    return "\n".join(lines)


def curve_table(ft: dict, lr: str) -> str:
    curves = ft["curves"][lr]
    steps = [r["step"] for r in curves[VARIANTS[0]][0]]
    picks = [i for i, s in enumerate(steps) if s in (10, 20, 50, 100) or i == len(steps) - 1]
    lines = [f"| step (lr {lr}) | " + " | ".join(f"{v} loss | {v} acc" for v in VARIANTS) + " |",
             "|---" * (1 + 2 * len(VARIANTS)) + "|"]
    for i in picks:
        cells = []
        for v in VARIANTS:
            runs = curves[v]
            cells.append(f"{np.mean([r[i]['train_loss'] for r in runs]):.3f}")
            cells.append(f"{np.mean([r[i]['val_shifted_acc'] for r in runs]):.3f}")
        lines.append(f"| {steps[i]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def adaptation_table(ad: dict) -> str:
    lines = ["| model | shifted val acc |", "|---|---|",
             f"| fused ONNX, as deployed | {ad['fused_onnx_val_shifted']:.3f} |"]
    for label, result in ad["onnx_only"].items():
        lines.append(f"| fused ONNX → {label} → fuse (onnxruntime) | {result['val_shifted']:.3f} |")
    lines.append(f"| torch route: adaptive BN on the original BN model | {ad['torch_adaptive_val_shifted']:.3f} |")
    return "\n".join(lines)


def plot(ft: dict, path: str) -> None:
    from matplotlib.figure import Figure

    lrs = list(ft["curves"])
    fig = Figure(figsize=(4.2 * len(lrs), 7), layout="constrained")
    axes = fig.subplots(2, len(lrs), squeeze=False)
    colors = {"fused": "#e76f51", "unfused": "#2a9d8f", "original BN": "#264653"}
    for column, lr in enumerate(lrs):
        ax_loss, ax_acc = axes[0][column], axes[1][column]
        for variant in VARIANTS:
            runs = ft["curves"][lr][variant]
            steps = [r["step"] for r in runs[0]]
            for key, ax in (("train_loss", ax_loss), ("val_shifted_acc", ax_acc)):
                values = np.array([[r[key] for r in run] for run in runs])
                ax.plot(steps, values.mean(0), color=colors[variant], label=variant)
                ax.fill_between(steps, values.min(0), values.max(0), color=colors[variant], alpha=0.15)
        seeds = len(ft["curves"][lr][VARIANTS[0]])
        ax_loss.set_yscale("log")
        ax_loss.set_title(f"lr {lr} ({seeds} seeds: mean, band = min..max)")
        ax_acc.set_xlabel("fine-tuning step")
        ax_acc.set_ylim(0, 1)
    axes[0][0].set_ylabel("training loss (mean over 10 steps)")
    axes[1][0].set_ylabel("shifted val accuracy")
    axes[1][0].legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", "--out-dir", dest="out_dir", default=DEFAULT_OUT,
                        help="folder for the md/json/png (default: %(default)s, git-ignored; give `examples` to update "
                             "the committed files)")
    parser.add_argument("--seed", type=int, default=0, help="data split and pre-training seed")
    parser.add_argument("--seeds", type=int, default=5, help="fine-tuning seeds")
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps")
    parser.add_argument("--lrs", default=",".join(str(lr) for lr in LRS), help="comma-separated learning rates")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (default %(default)s, as for the committed results: deterministic per torch "
                             "build and thread count)")
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = load(args.seed)
    data["x_ft"] = data["x_target_unlabeled"][:FINETUNE_IMAGES]
    data["y_ft"] = data["y_train"][:FINETUNE_IMAGES]
    data["x_source_unlabeled"] = data["x_train"][-SOURCE_IMAGES:]  # a few unlabeled source images, for unfuse
    original = pretrained(data, args.seed)
    lrs = tuple(float(v) for v in args.lrs.split(","))
    ft = fine_tuning(data, original, args.seeds, args.steps, lrs)
    with tempfile.TemporaryDirectory() as workdir:
        ad = onnx_adaptation(data, original, workdir)
    elapsed = time.perf_counter() - start
    tables = "\n\n".join([summary_table(ft)] + [curve_table(ft, lr) for lr in ft["curves"]] + [adaptation_table(ad)])
    print(tables)
    print(f"\nunfuse train-mode deviation on the fine-tuning images: {ft['unfuse_report']['train_mode_rel_error']:.3g}; "
          f"{elapsed:.1f} s")
    base = os.path.join(args.out_dir, "digits_unfuse")
    header = (
        "# Fine-tuning fused vs unfused, and ONNX-only domain adaptation, on scikit-learn digits\n\n"
        f"Generated by `python examples/digits_unfuse.py` (seed {args.seed}, {args.seeds} fine-tuning seeds, "
        f"torch {torch.__version__}). Pre-training: {PRETRAIN_STEPS} SGD steps at lr {PRETRAIN_LR}, then precise BN. "
        f"Fine-tuning: {FINETUNE_IMAGES} labeled shifted training images (contrast x{SHIFT['contrast']}, brightness "
        f"+{SHIFT['brightness']}, noise σ={SHIFT['noise_std']}), {args.steps} steps of SGD (momentum 0.9) at each lr of {lrs}, "
        f"batch {BATCH}, the same batch order for every variant; evaluated on the shifted val images. The unfused twin's "
        "statistics are measured on the fine-tuning images.\n\n"
    )
    atomic_write_text(base + ".md", header + tables + "\n")
    payload = {"seed": args.seed, "seeds": args.seeds, "steps": args.steps, "lrs": lrs, "batch": BATCH,
               "pretrain_steps": PRETRAIN_STEPS, "shift": SHIFT, "fine_tuning": ft, "onnx_adaptation": ad,
               "seconds": elapsed}
    atomic_write_text(base + ".json", json.dumps(payload, indent=1) + "\n")
    plot(ft, base + ".png")
    print(f"wrote {base}.md, {base}.json, {base}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
