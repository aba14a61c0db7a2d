"""Normalization batch size (NBS) as a knob of its own: Ghost BN at a fixed SGD batch on scikit-learn's bundled
8x8 digits (no download), like the talk's table (ResNet-50 on ImageNet: NBS 2 … 1024, train and val error).

One BatchNorm CNN (the one of ``digits_precise_bn.py``: conv-BN-ReLU x2, maxpool, conv-BN-ReLU, global average
pool, linear; ~30k parameters) is trained with the same SGD batch of 32, the same samples in the same order,
the same initial weights and the same schedule per seed; only the normalization batch size changes, through
``normfx.rewrite(model, "ghost:virtual_batch_size=NBS")`` for NBS = 2, 4, 8, 16, 32 (32 = the whole batch:
BatchNorm itself, bit for bit). Errors after training, in eval mode (EMA statistics; Ghost BN's EMA is
updated by every virtual batch with the horizon-matched momentum):

* train error: on the training images (what the model fits), and the error the training steps saw in train
  mode (batch statistics of the virtual batches) over the last epoch;
* val error: on the held-out images (the same split as the other digits examples).

Writes ``digits_ghost_bn.{md,json,png}`` to ``out/examples/`` (``--out examples`` updates the committed files)
and prints the table. Deterministic per seed for a given torch build (CPU, one thread); 2–3 minutes on one
thread (204 s on a loaded 2-core machine).

    python examples/digits_ghost_bn.py [--out examples] [--seeds 3] [--epochs 10] [--nbs 2,4,8,16,32]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits_precise_bn import load  # noqa: E402  (the same data split and pixel normalization)

import normfx  # noqa: E402
from normfx.io_utils import atomic_path, atomic_write_text  # noqa: E402

DEFAULT_OUT = os.path.join("out", "examples")
BATCH = 32
NBS = (2, 4, 8, 16, 32)
LR = 0.05
WEIGHT_DECAY = 5e-4
EPOCHS = 10


def net(width: int = 32) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(1, width), *block(width, width), nn.MaxPool2d(2), *block(width, 2 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))


def train(model: nn.Module, data: dict[str, torch.Tensor], seed: int, epochs: int) -> dict:
    """SGD (momentum 0.9, weight decay, cosine learning rate) in batches of 32; returns what training saw."""
    g = torch.Generator().manual_seed(1000 + seed)
    n = len(data["x_train"])
    steps_per_epoch = n // BATCH  # drop the last partial batch: every step has 32 samples
    total = steps_per_epoch * epochs
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    model.train()
    wrong = seen = 0
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * BATCH:(i + 1) * BATCH]
            logits = model(data["x_train"][idx])
            loss = F.cross_entropy(logits, data["y_train"][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if epoch == epochs - 1:
                wrong += int((logits.argmax(1) != data["y_train"][idx]).sum())
                seen += len(idx)
                losses.append(float(loss.detach()))
    return {"steps": total, "train_err_batch_stats_last_epoch": wrong / seen, "train_loss_last_epoch":
            statistics.fmean(losses)}


@torch.no_grad()
def error(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) != y).float().mean())


def run_one(nbs: int, data: dict[str, torch.Tensor], seed: int, epochs: int, width: int = 32) -> dict:
    torch.manual_seed(seed)
    model = normfx.rewrite(net(width), f"ghost:virtual_batch_size={nbs}")
    seen = train(model, data, seed, epochs)
    return {**seen, "train_err": error(model, data["x_train"], data["y_train"]),
            "val_err": error(model, data["x_val"], data["y_val"])}


def run_all(data: dict[str, torch.Tensor], nbs_list, seeds: int, epochs: int, width: int = 32, log=print) -> dict:
    results = {}
    for nbs in nbs_list:
        start = time.perf_counter()
        runs = [run_one(nbs, data, seed, epochs, width) for seed in range(seeds)]
        results[str(nbs)] = {"runs": runs, **{f"{k}_mean": statistics.fmean(r[k] for r in runs) for k in
                                              ("train_err", "val_err", "train_err_batch_stats_last_epoch")},
                             **{f"{k}_std": statistics.pstdev([r[k] for r in runs]) for k in ("train_err", "val_err")}}
        log(f"NBS {nbs:>2}: train err {100 * results[str(nbs)]['train_err_mean']:.2f} %, val err "
            f"{100 * results[str(nbs)]['val_err_mean']:.2f} % ({time.perf_counter() - start:.1f} s)")
    return results


def table(results: dict) -> str:
    lines = ["| NBS (virtual batch) | train err % (eval mode) | train err % (training steps, last epoch) | val err % |",
             "|---|---|---|---|"]
    for nbs, r in results.items():
        lines.append(f"| {nbs} | {100 * r['train_err_mean']:.2f} ± {100 * r['train_err_std']:.2f} | "
                     f"{100 * r['train_err_batch_stats_last_epoch_mean']:.2f} | "
                     f"{100 * r['val_err_mean']:.2f} ± {100 * r['val_err_std']:.2f} |")
    return "\n".join(lines)


def plot(results: dict, path: str, title: str) -> None:
    from matplotlib.figure import Figure  # standalone Figure: rendered with Agg, no pyplot state

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    xs = [int(k) for k in results]
    for key, label, style in (("train_err", "train error (eval mode)", "o-"), ("val_err", "val error", "s-"),
                              ("train_err_batch_stats_last_epoch", "train error (training steps)", "^--")):
        ys = [100 * r[f"{key}_mean"] for r in results.values()]
        errs = [100 * r[f"{key}_std"] for r in results.values()] if f"{key}_std" in next(iter(results.values())) \
            else None
        ax.errorbar(xs, ys, yerr=errs, fmt=style, capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("normalization batch size (Ghost BN virtual batch; SGD batch 32)")
    ax.set_ylabel("error (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for the md/json/png (default: %(default)s, "
                                                           "git-ignored; 'examples' updates the committed files)")
    parser.add_argument("--seed", type=int, default=0, help="data split seed")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds (initialization and data order)")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--nbs", default=",".join(str(n) for n in NBS), help="comma-separated virtual batch sizes")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--max-train", type=int, default=0, help="use only the first N training images (quick checks)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results are deterministic per count)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    log = (lambda *a: None) if args.quiet else print
    data = load(args.seed)
    if args.max_train:
        data["x_train"], data["y_train"] = data["x_train"][: args.max_train], data["y_train"][: args.max_train]
    nbs_list = [int(n) for n in args.nbs.split(",")]
    start = time.perf_counter()
    results = run_all(data, nbs_list, args.seeds, args.epochs, args.width, log)
    elapsed = time.perf_counter() - start
    setting = (f"{len(data['x_train'])} train / {len(data['x_val'])} val images, SGD batch {BATCH} (momentum 0.9, "
               f"lr {LR} cosine, weight decay {WEIGHT_DECAY}), {args.epochs} epochs, {args.seeds} seed(s), width "
               f"{args.width}; mean ± std over seeds")
    text = table(results)
    log(text)
    log(f"\n{setting}; {elapsed:.1f} s")
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, "digits_ghost_bn")
    header = ("# Normalization batch size via Ghost BN on scikit-learn digits\n\n"
              f"Generated by `python examples/digits_ghost_bn.py` (data seed {args.seed}, torch {torch.__version__}, "
              f"{args.threads} thread(s)). {setting}. Only the normalization batch size changes "
              "(`normfx.rewrite(model, \"ghost:virtual_batch_size=NBS\")`); NBS 32 is BatchNorm itself.\n\n")
    atomic_write_text(base + ".md", header + text + "\n")
    payload = {"seed": args.seed, "seeds": args.seeds, "torch": torch.__version__, "threads": args.threads,
               "epochs": args.epochs, "batch": BATCH, "lr": LR, "weight_decay": WEIGHT_DECAY, "width": args.width,
               "train_images": len(data["x_train"]), "seconds": round(elapsed, 1), "results": results}
    atomic_write_text(base + ".json", json.dumps(payload, indent=2) + "\n")
    plot(results, base + ".png", f"digits, SGD batch {BATCH}, {args.epochs} epochs, {args.seeds} seed(s)")
    log(f"wrote {base}.md, {base}.json, {base}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
