"""Stability of SimCLR, SupCon and CLOP across learning rates and batch sizes.

Every method runs with one optimiser (LARS, as the CLOP paper), the same views and the same
label fraction for SupCon and CLOP, over a grid of learning rates (from small to ones at which
SimCLR collapses) and batch sizes, at equal budgets. Each run is a resumable ``nocollapse train``
into ``OUT/<method>-lr<lr>-b<batch>``; the script then collects, per run, k-NN top-1, the effective
rank and embedding std of the test split's backbone features and the alarms that fired, and
writes ``OUT/clop_lr.json`` and ``OUT/clop_lr.png`` (k-NN and effective rank against the
learning rate, one line per method and batch size).

The default budget is the built-in digits at 8 px for a few epochs (minutes per run on a CPU);
``--config cifar10/simclr --data ROOT --epochs 1`` runs one CIFAR-10 epoch per point instead.

    python benchmarks/clop_lr.py --out runs/clop_lr [--lrs 0.1 0.3 1 3 10] [--batches 64 256]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import train_once

METHODS = ("simclr", "supcon", "clop")


def run_args(method: str, lr: float, batch: int, args) -> list[str]:
    overrides = [f"method.name={method}", "optim.name=lars", f"optim.lr={lr}", f"train.batch_size={batch}",
                 f"train.epochs={args.epochs}", f"train.seed={args.seed}", "train.progress=false",
                 f"train.threads={args.threads}", "diagnostics.plots=false", "eval.knn_init=false"]
    if method != "simclr":
        overrides.append(f"data.label_fraction={args.label_fraction}")
    if args.data:
        overrides.append(f"data.root={args.data}")
    overrides += args.set
    return ["--config", args.config, "--set", *overrides]


def collect(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    return {"knn_top1": s["knn_top1"], "effective_rank": s.get("effective_rank"),
            "embedding_std": s.get("embedding_std"), "alarms": [a["name"] for a in s["alarms"]],
            "train_seconds": s["train_seconds"]}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (method, batch) in sorted({(r["method"], r["batch"]) for r in rows}):
        series = sorted((r for r in rows if r["method"] == method and r["batch"] == batch), key=lambda r: r["lr"])
        lrs = [r["lr"] for r in series]
        axes[0].plot(lrs, [r["knn_top1"] for r in series], marker="o", label=f"{method}, batch {batch}")
        axes[1].plot(lrs, [r["effective_rank"] for r in series], marker="o", label=f"{method}, batch {batch}")
    for ax, name in zip(axes, ("k-NN top-1", "effective rank (RankMe)")):
        ax.set_xscale("log")
        ax.set_xlabel("LARS learning rate (at batch 256)")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/clop_lr")
    parser.add_argument("--config", default="digits_contrastive", help="base config (bundled name or file)")
    parser.add_argument("--data", help="data.root for an image-folder config")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--lrs", nargs="+", type=float, default=[0.03, 0.1, 0.3, 1.0, 3.0, 10.0])
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--label-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], help="further config overrides for every run")
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for batch in args.batches:
        for lr in args.lrs:
            for method in args.methods:
                run_dir = out / f"{method}-lr{lr:g}-b{batch}"
                train_once(run_dir, run_args(method, lr, batch, args))
                rows.append({"method": method, "lr": lr, "batch": batch, **collect(run_dir)})
                print(json.dumps(rows[-1]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "clop_lr.json").write_text(json.dumps({"config": args.config, "epochs": args.epochs,
                                                 "label_fraction": args.label_fraction, "runs": rows}, indent=1))
    plot(rows, out / "clop_lr.png")


if __name__ == "__main__":
    main()
