"""The collapse study: learned vs decoupled prototypes on CIFAR-10 and long-tailed CIFAR-10.

For every recipe of ``configs/cifar10/`` (DINO, DINO + decoupled, DINO + KoLeo-proto, CARP,
CARP + decoupled) and every dataset (CIFAR-10 and CIFAR-10-LT with imbalance 100), it trains the
recipe (``nocollapse train``; an interrupted run is resumed), evaluates it (``nocollapse eval``:
k-NN, linear probe, clustering, head / medium / tail accuracy) and gathers:

* per epoch: unique prototypes at every standard epsilon, prototype utilisation (fraction of
  prototypes that were some training image's arg-max during the epoch) and k-NN top-1;
* at the end: the unique-vs-epsilon curve, utilisation on the test split, k-NN, linear probe,
  k-means and arg-max-prototype clustering, long-tail groups, alarms and throughput. CIFAR-10-LT
  runs are evaluated twice: k-NN and probe fitted on the long-tailed split they were trained on,
  and on the balanced CIFAR-10 train split (``nocollapse eval --balanced-train``), which measures
  how well the features separate rare classes without the probe's own imbalance.

Writes ``OUT/study.json`` and figures (all recipes on one axis): ``unique_vs_eps_<dataset>.png``,
``unique_by_epoch_eps<e>_<dataset>.png``, ``utilization_by_epoch_<dataset>.png``; prints the JSON.

    python benchmarks/collapse_study.py --data ../shared/datasets/cifar10 --out runs/collapse_study
    python benchmarks/collapse_study.py --data $CIFAR --recipes dino --datasets cifar10 \\
        --tag lr10x --set optim.lr=3.0 train.epochs=20        # another regime, in its own folder
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import cli as _cli, train_once

RECIPES = ("dino", "dino_decoupled", "dino_koleo", "carp", "carp_decoupled")
# CIFAR-10-LT with imbalance 100 keeps 5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50 images per
# class; the ImageNet-LT thresholds (100 / 20) would put 8 classes in the head and none in the tail,
# so the groups here are thirds by frequency: head > 1000 (4 classes), tail < 200 (3 classes).
LT_IMBALANCE = 100
LT_THRESHOLDS = {"many_threshold": 1000, "few_threshold": 200}
DATASETS = {"cifar10": [], "cifar10_lt": [f"data.imbalance_ratio={LT_IMBALANCE}",
                                          *(f"eval.{key}={value}" for key, value in LT_THRESHOLDS.items())]}
STANDARD_EPS = ("0.025", "0.1", "0.25", "0.5")


def epoch_records(run_dir: Path, keys: tuple[str, ...]) -> list[dict]:
    """Per-epoch metrics of a run: every ``unique_*`` key and ``keys``, one dict per epoch."""
    per_epoch: dict[float, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line) if line else {}
        if "loss" in record or "epoch" not in record:
            continue  # step records
        keep = {k: v for k, v in record.items() if k.startswith("unique_") or k in keys}
        per_epoch.setdefault(float(record["epoch"]), {}).update(keep)
    return [{"epoch": e, **v} for e, v in sorted(per_epoch.items())]


def train_and_evaluate(recipe: str, dataset: str, run_dir: Path, data: str, extra: list[str]) -> None:
    overrides = [f"data.root={data}", *DATASETS[dataset], *extra]
    train_once(run_dir, ["--config", f"cifar10/{recipe}", "--set", *overrides])
    if not (run_dir / "eval.json").is_file():
        subprocess.run(_cli("eval", str(run_dir), "--json"), check=True, stdout=subprocess.DEVNULL)
    if dataset.endswith("_lt") and not (run_dir / "eval_balanced.json").is_file():
        # the second protocol: k-NN and probe fitted on all of CIFAR-10's training images
        subprocess.run(_cli("eval", str(run_dir), "--json", "--balanced-train"), check=True,
                       stdout=subprocess.DEVNULL)


def knn_on_long_tail_groups(run_dir: Path) -> dict | None:
    """A control for the CIFAR-10-LT groups: per-group k-NN accuracy (k = 20, T = 0.07) of a run
    pre-trained on *balanced* CIFAR-10, with the classes grouped as CIFAR-10-LT groups them. The
    tail classes of CIFAR-10-LT (horse, ship, truck) are not equally hard as the head ones
    (airplane, automobile, bird, cat), so a long-tailed run's group accuracy reads against this."""
    import torch

    from nocollapse.data.long_tail import long_tail_counts
    from nocollapse.evaluation.knn import KNN_PROTOCOLS, weighted_knn_predict
    from nocollapse.evaluation.longtail import grouped_accuracy

    # the features `nocollapse eval` cached for the checkpoint it evaluated
    source = json.loads((run_dir / "eval.json").read_text())["source"]
    cache = run_dir / "features" / f"{Path(source['checkpoint']).stem}-step{source['step']}.pt"
    if not cache.is_file():
        return None
    cached = torch.load(cache, map_location="cpu", weights_only=True)
    train, test = cached["train"], cached["test"]
    num_classes = int(train["labels"].max()) + 1
    sizes = torch.bincount(train["labels"], minlength=num_classes).tolist()
    scores = weighted_knn_predict(train["features"], train["labels"], test["features"], num_classes,
                                  *KNN_PROTOCOLS["dino"])
    return grouped_accuracy(scores.argmax(1), test["labels"], long_tail_counts(sizes, LT_IMBALANCE),
                            **LT_THRESHOLDS)


def collect(run_dir: Path) -> dict:
    from nocollapse.evaluation.knn import KNN_PROTOCOLS, knn_protocol_key

    dino_knn = knn_protocol_key(*KNN_PROTOCOLS["dino"])  # eval.json key of the k = 20, T = 0.07 protocol
    summary = json.loads((run_dir / "summary.json").read_text())
    evaluation = json.loads((run_dir / "eval.json").read_text())
    diagnosis = json.loads((run_dir / "diagnosis.json").read_text())
    lin, clus = evaluation.get("linear", {}), evaluation.get("clustering", {})
    balanced_path = run_dir / "eval_balanced.json"
    balanced = json.loads(balanced_path.read_text()) if balanced_path.is_file() else {}
    balanced_knn = balanced.get("knn", {}).get(dino_knn, {})
    return {
        "run_dir": str(run_dir),
        "epochs": summary["epochs"],
        "train_images": summary["train_images"],
        "train_seconds": summary["train_seconds"],
        "samples_per_second": summary["samples_per_second"],
        "knn_top1_init": summary["knn_top1_init"],
        "knn_top1": summary["knn_top1"],
        "knn": {k: v["top1"] for k, v in evaluation.get("knn", {}).items()},
        "knn_long_tail": evaluation.get("knn", {}).get(dino_knn, {}).get("long_tail"),
        "linear_top1": lin.get("top1"),
        "linear_long_tail": lin.get("long_tail"),
        # LT runs: k-NN / probe fitted on the balanced CIFAR-10 train split (groups by pre-training counts)
        "balanced_knn_top1": balanced_knn.get("top1"),
        "balanced_knn_long_tail": balanced_knn.get("long_tail"),
        "balanced_linear_top1": balanced.get("linear", {}).get("top1"),
        "balanced_linear_long_tail": balanced.get("linear", {}).get("long_tail"),
        "kmeans": clus.get("kmeans"),
        "prototype_argmax_clustering": clus.get("prototype_argmax"),
        "unique_prototypes": summary.get("unique_prototypes"),
        "unique_curve": diagnosis.get("unique_curve"),
        "prototype_utilization": summary.get("prototype_utilization"),
        "effective_prototypes": summary.get("effective_prototypes"),
        "effective_rank": summary.get("effective_rank"),
        "alarms": [a["name"] for a in summary.get("alarms", [])],
        "per_epoch": epoch_records(run_dir, ("prototype_utilization_train", "knn_top1", "effective_rank",
                                             "mixture_perplexity")),
    }


def figures(results: dict, out: Path) -> list[str]:
    from nocollapse.diagnostics.plots import plot_runs_by_epoch, plot_unique_vs_eps

    paths = []
    for dataset, runs in results.items():
        curves = {name: (r["unique_curve"]["eps"], r["unique_curve"]["fraction"])
                  for name, r in runs.items() if r.get("unique_curve")}
        if curves:
            paths.append(plot_unique_vs_eps(curves, out / f"unique_vs_eps_{dataset}.png",
                                            title=f"Unique prototypes vs ε after training ({dataset})"))
        for key, fname, label, title in (
                *((f"unique_{eps}", f"unique_by_epoch_eps{eps}", f"unique prototypes at ε = {eps} (% of K)",
                   "Unique prototypes per epoch") for eps in STANDARD_EPS),
                ("prototype_utilization_train", "utilization_by_epoch",
                 "prototypes that are some image's arg-max (% of K)", "Prototype utilisation per epoch")):
            series = {}
            for name, r in runs.items():
                points = [(p["epoch"], p[key]) for p in r["per_epoch"] if key in p]
                if points:
                    series[name] = ([e for e, _ in points], [v for _, v in points])
            if series:
                paths.append(plot_runs_by_epoch(series, out / f"{fname}_{dataset}.png", label,
                                                f"{title} ({dataset})", percent=True))
    return [str(p) for p in paths]


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _groups(accuracy: dict | None) -> str:
    return " / ".join(_fmt((accuracy or {}).get(g)) for g in ("head", "medium", "tail"))


def markdown_tables(results: dict) -> str:
    """The study as markdown tables: one for the final numbers, one for k-NN and uniqueness per epoch."""
    lines = []
    for dataset, runs in results.items():
        long_tail = any(r.get("linear_long_tail") for r in runs.values()) and dataset.endswith("_lt")
        head = ["recipe", "k-NN init", "k-NN", "linear", "k-means NMI / ACC", "arg-max NMI / ACC (clusters)",
                "unique % @ " + " / ".join(STANDARD_EPS), "utilisation %", "alarms", "train s"]
        if long_tail:
            head[4:4] = ["linear head / medium / tail", "balanced k-NN (head / medium / tail)",
                         "balanced linear (head / medium / tail)"]
        control = any(r.get("knn_on_lt_groups") for r in runs.values())
        if control:
            head[4:4] = ["k-NN on the LT groups: head / medium / tail"]
        lines += [f"**{dataset}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, r in runs.items():
            km, am = r.get("kmeans") or {}, r.get("prototype_argmax_clustering") or {}
            unique = r.get("unique_prototypes") or {}
            row = [name, _fmt(r["knn_top1_init"]), _fmt(r["knn_top1"]), _fmt(r.get("linear_top1")),
                   f"{_fmt(km.get('nmi'))} / {_fmt(km.get('acc'))}",
                   f"{_fmt(am.get('nmi'))} / {_fmt(am.get('acc'))} ({am.get('clusters_used', '–')})",
                   " / ".join(_percent(unique.get(e)) for e in STANDARD_EPS),
                   _percent(r.get("prototype_utilization")), ", ".join(r["alarms"]) or "none",
                   f"{r['train_seconds']:.0f}"]
            if long_tail:
                row[4:4] = [_groups(r.get("linear_long_tail")),
                            f"{_fmt(r.get('balanced_knn_top1'))} ({_groups(r.get('balanced_knn_long_tail'))})",
                            f"{_fmt(r.get('balanced_linear_top1'))} ({_groups(r.get('balanced_linear_long_tail'))})"]
            if control:
                row[4:4] = [_groups(r.get("knn_on_lt_groups"))]
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", f"Per epoch on {dataset}: k-NN top-1, unique % at ε = 0.025 / 0.25, utilisation %", "",
                  "| recipe | " + " | ".join(f"epoch {p['epoch']:g}" for p in next(iter(runs.values()))["per_epoch"])
                  + " |", "|---|" + "---|" * len(next(iter(runs.values()))["per_epoch"])]
        for name, r in runs.items():
            cells = [f"{_fmt(p.get('knn_top1'))}, {_percent(p.get('unique_0.025'))} / "
                     f"{_percent(p.get('unique_0.25'))}, {_percent(p.get('prototype_utilization_train'))}"
                     for p in r["per_epoch"]]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("NOCOLLAPSE_CIFAR10"),
                        help="CIFAR-10 ImageFolder root (train/ and test/); default $NOCOLLAPSE_CIFAR10")
    parser.add_argument("--out", default="runs/collapse_study")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="extra overrides for every run")
    parser.add_argument("--tag", default="", help="sub-folder for a variant regime (with --set)")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables instead of JSON")
    args = parser.parse_args(argv)
    if not args.data:
        parser.error("give --data (or set NOCOLLAPSE_CIFAR10) to the CIFAR-10 ImageFolder root")
    out = Path(args.out) / args.tag if args.tag else Path(args.out)
    results: dict[str, dict] = {}
    for dataset in args.datasets:
        for recipe in args.recipes:
            run_dir = out / dataset / recipe
            train_and_evaluate(recipe, dataset, run_dir, args.data, args.set)
            results.setdefault(dataset, {})[recipe] = collect(run_dir)
            if dataset == "cifar10":  # the difficulty control for the CIFAR-10-LT groups
                results[dataset][recipe]["knn_on_lt_groups"] = knn_on_long_tail_groups(run_dir)
    report = {"overrides": args.set, "results": results, "figures": figures(results, out)}
    (out / "study.json").write_text(json.dumps(report, indent=1))
    print(markdown_tables(results) if args.markdown else json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
