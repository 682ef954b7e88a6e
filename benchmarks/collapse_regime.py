"""A regime in which learned prototypes collapse, and the same run with decoupled prototypes.

Trains the built-in digits default (DINO, ResNet-18 at width 16, K = 256) twice with a 10x
learning rate (AdamW 1e-2) for many epochs: once with learned prototypes (free norm, no
frozen first epoch, so every prototype follows its gradient from step one) and once with
decoupled prototypes (the online mixture). Everything else is identical. Per epoch it gathers
unique prototypes at every standard epsilon, the largest pairwise cosine similarity between
prototypes, utilisation, and the k-NN top-1 every ``--knn-every`` epochs; it writes
``OUT/regime_lr<lr>_e<epochs>.json`` and ``OUT/unique_by_epoch_lr<lr>_e<epochs>_eps<e>.png`` for
each epsilon (both runs on one axis). Needs nothing on disk; about 10 minutes per 100 epochs and run on 2 CPU cores.

    python benchmarks/collapse_regime.py --out runs/collapse_regime --epochs 200
    # or two queues side by side, then the line above collects them
    python benchmarks/collapse_regime.py --train-only learned --set train.threads=1
    python benchmarks/collapse_regime.py --train-only decoupled --set train.threads=1

An interrupted run is resumed; a finished one is only collected.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from collapse_study import STANDARD_EPS, epoch_records, train_once

PROTOTYPE_SETTINGS = {
    "learned": ["method.prototypes=learned", "method.head.norm_last_layer=false",
                "method.freeze_last_layer_epochs=0"],
    "decoupled": ["method.prototypes=decoupled"],
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/collapse_regime")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--knn-every", type=int, default=10)
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="extra overrides for both runs")
    parser.add_argument("--train-only", choices=list(PROTOTYPE_SETTINGS),
                        help="train (or resume) this one run and stop, so that two queues can share the machine; "
                             "a later call without it collects both")
    args = parser.parse_args(argv)
    out = Path(args.out)
    common = [f"optim.lr={args.lr}", f"train.epochs={args.epochs}", f"eval.knn_every={args.knn_every}",
              "train.progress=false", *args.set]
    results = {}

    def train(name: str) -> Path:
        run_dir = out / f"{name}_lr{args.lr:g}_e{args.epochs}"
        train_once(run_dir, ["--set", *PROTOTYPE_SETTINGS[name], *common])
        return run_dir

    if args.train_only:
        train(args.train_only)
        return
    for name in PROTOTYPE_SETTINGS:
        run_dir = train(name)
        summary = json.loads((run_dir / "summary.json").read_text())
        results[name] = {
            "run_dir": str(run_dir),
            "knn_top1_init": summary.get("knn_top1_init"),
            "knn_top1": summary.get("knn_top1"),
            "unique_prototypes": summary.get("unique_prototypes"),
            "prototype_utilization": summary.get("prototype_utilization"),
            "alarms": [a["name"] for a in summary.get("alarms", [])],
            "train_seconds": summary.get("train_seconds"),
            "per_epoch": epoch_records(run_dir, ("pairwise_cosine_max", "prototype_utilization_train",
                                                  "knn_top1", "effective_rank")),
        }

    from nocollapse.diagnostics.plots import plot_runs_by_epoch

    figures = []
    tag = f"lr{args.lr:g}_e{args.epochs}"
    for eps in STANDARD_EPS:
        key = f"unique_{eps}"
        series = {name: ([p["epoch"] for p in r["per_epoch"] if key in p],
                         [p[key] for p in r["per_epoch"] if key in p]) for name, r in results.items()}
        figures.append(str(plot_runs_by_epoch(
            series, out / f"unique_by_epoch_{tag}_eps{eps}.png", f"unique prototypes at ε = {eps} (% of K)",
            f"Learned vs decoupled prototypes, AdamW {args.lr:g}, digits", percent=True)))
    report = {"overrides": common, "results": results, "figures": figures}
    (out / f"regime_{tag}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({name: {k: v for k, v in r.items() if k != "per_epoch"} for name, r in results.items()},
                     indent=1))


if __name__ == "__main__":
    main()
