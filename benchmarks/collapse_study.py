"""The collapse study: every method of nocollapse on CIFAR-10 and long-tailed CIFAR-10, on equal terms.

Each entry of ``STUDY`` is a recipe of ``configs/cifar10/`` plus overrides: DINO, DINO + KoLeo,
DINO + decoupled (twice: ``*_paper`` is the mixture as published, with no buffer, refresh or
embedding KoLeo, on the host's own balancing -- DINO's centering, CARP's marginal weight 1 -- and
the plain name is our recipe), CARP, CARP + decoupled (both settings), CPLearn, SimCLR, SupCon and
CLOP (SupCon and CLOP see the same fixed 10 % of the labels). Every run gets the same number of
epochs (``--epochs``, default 5) and ``train.seed``; for each (dataset, method, seed) it trains the
recipe (``nocollapse train``; an interrupted run is resumed), evaluates it (``nocollapse eval``:
k-NN, linear probe, clustering, head / medium / tail accuracy; CIFAR-10-LT runs a second time with
``--balanced-train``) and writes one small JSON **record** per run into ``--records`` (default
``docs/study``). A run whose record exists is not trained again, so the queue can span several
sittings on several machines as long as the records are kept (they are committed; the run
directories with their checkpoints are not needed once a record exists).

A record holds: k-NN per epoch, final k-NN / linear / clustering / long-tail groups, unique
prototypes at every epsilon over all prototypes and among the used ones (n/a for the fixed
codebook and class prototypes, which are distinct by construction), utilisation (nearest-used
/ min(K, N) and training arg-max), effective rank and the singular values of the backbone
features, embedding std, alarms and wall time. A run that stops on a non-finite loss (the
trainer's ``failure.json``) gets a record too, with ``diverged``: the step, epoch, learning rate
and loss. The tables name it in the seeds cell (or give the method a row that says where it
diverged) and no mean or figure reads it; a run that fails any other way stops the study.

Writes ``OUT/study.json`` (records aggregated: mean and std over seeds) and figures, every method
on one axis: ``unique_vs_eps_<dataset>.png``, ``spectra_<dataset>.png``, ``knn_by_epoch_<dataset>.png``
(seed 0 where it exists), and the claim pairs (DINO / DINO + decoupled, CARP / CARP + decoupled,
SwAV / SwAV + decoupled, SupCon / CLOP, the best prototype method / CPLearn) with their differences and whether each is
inside the seed noise; prints the JSON, or markdown tables with ``--markdown``. ``--write-docs``
refills the marked table blocks of the README and ``docs/results.md`` from the records, the
``study-comparison`` block with CPLearn's comparison (CPLearn, Barlow Twins, SwAV, DINO on
CIFAR-10) and ``cplearn_comparison_spectra_cifar10.png`` with their embeddings' spectra.

    # one method per command, so that two queues (one thread each) can share a 2-core machine
    python benchmarks/collapse_study.py --data $CIFAR --methods carp --seeds 0 1 2 --set train.threads=1
    python benchmarks/collapse_study.py --data $CIFAR --collect --markdown     # tables of every record
    python benchmarks/collapse_study.py --collect --out docs/study --write-docs README.md docs/results.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import time
from pathlib import Path

from common import STUDY, cli as _cli, train_once

# CIFAR-10-LT with imbalance 100 keeps 5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50 images per
# class; the ImageNet-LT thresholds (100 / 20) would put 8 classes in the head and none in the tail,
# so the groups here are thirds by frequency: head > 1000 (4 classes), tail < 200 (3 classes).
LT_IMBALANCE = 100
LT_THRESHOLDS = {"many_threshold": 1000, "few_threshold": 200}
DATASETS = {"cifar10": (), "cifar10_lt": (f"data.imbalance_ratio={LT_IMBALANCE}",
                                          *(f"eval.{key}={value}" for key, value in LT_THRESHOLDS.items()))}
STANDARD_EPS = ("0.025", "0.1", "0.25", "0.5")
REPO = Path(__file__).resolve().parent.parent


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


def run_overrides(name: str, dataset: str, data: str, seed: int, epochs: int, extra: list[str]) -> list[str]:
    return [f"data.root={data}", *DATASETS[dataset], *STUDY[name][1], f"train.epochs={epochs}",
            f"train.seed={seed}", *extra]


def train_and_evaluate(run_dir: Path, recipe: str, overrides: list[str], dataset: str) -> None:
    train_once(run_dir, ["--config", f"cifar10/{recipe}", "--set", *overrides])
    if not (run_dir / "eval.json").is_file():
        subprocess.run(_cli("eval", str(run_dir), "--json"), check=True, stdout=subprocess.DEVNULL)
    if dataset.endswith("_lt") and not (run_dir / "eval_balanced.json").is_file():
        # the second protocol: k-NN and probe fitted on all of CIFAR-10's training images
        subprocess.run(_cli("eval", str(run_dir), "--json", "--balanced-train"), check=True,
                       stdout=subprocess.DEVNULL)


def _cached_features(run_dir: Path):
    """The train / test features `nocollapse eval` cached for the checkpoint it evaluated."""
    import torch

    source = json.loads((run_dir / "eval.json").read_text())["source"]
    cache = run_dir / "features" / f"{Path(source['checkpoint']).stem}-step{source['step']}.pt"
    if not cache.is_file():
        return None
    cached = torch.load(cache, map_location="cpu", weights_only=True)
    return cached["train"], cached["test"]


def knn_on_long_tail_groups(run_dir: Path) -> dict | None:
    """A control for the CIFAR-10-LT groups: per-group k-NN accuracy (k = 20, T = 0.07) of a run
    pre-trained on *balanced* CIFAR-10, with the classes grouped as CIFAR-10-LT groups them. The
    tail classes of CIFAR-10-LT (horse, ship, truck) are not equally hard as the head ones
    (airplane, automobile, bird, cat), so a long-tailed run's group accuracy reads against this."""
    import torch

    from nocollapse.data.long_tail import long_tail_counts
    from nocollapse.evaluation.knn import KNN_PROTOCOLS, weighted_knn_predict
    from nocollapse.evaluation.longtail import grouped_accuracy

    cached = _cached_features(run_dir)
    if cached is None:
        return None
    train, test = cached
    num_classes = int(train["labels"].max()) + 1
    sizes = torch.bincount(train["labels"], minlength=num_classes).tolist()
    scores = weighted_knn_predict(train["features"], train["labels"], test["features"], num_classes,
                                  *KNN_PROTOCOLS["dino"])
    return grouped_accuracy(scores.argmax(1), test["labels"], long_tail_counts(sizes, LT_IMBALANCE),
                            **LT_THRESHOLDS)


def backbone_spectrum(run_dir: Path) -> list[float] | None:
    """Singular values of the test split's centred backbone features, largest first (the records'
    ``effective_rank`` is RankMe on the same features uncentred, so the two differ)."""
    import torch

    cached = _cached_features(run_dir)
    if cached is None:
        return None
    features = cached[1]["features"].double()
    return torch.linalg.svdvals(features - features.mean(0)).tolist()


def collect(run_dir: Path) -> dict:
    """The record of one finished run (JSON-serialisable, a few kB)."""
    from nocollapse.evaluation.knn import KNN_PROTOCOLS, knn_protocol_key

    dino_knn = knn_protocol_key(*KNN_PROTOCOLS["dino"])  # eval.json key of the k = 20, T = 0.07 protocol
    summary = json.loads((run_dir / "summary.json").read_text())
    evaluation = json.loads((run_dir / "eval.json").read_text())
    diagnosis_path = run_dir / "diagnosis.json"
    diagnosis = json.loads(diagnosis_path.read_text()) if diagnosis_path.is_file() else {}
    lin, clus = evaluation.get("linear", {}), evaluation.get("clustering", {})
    balanced_path = run_dir / "eval_balanced.json"
    balanced = json.loads(balanced_path.read_text()) if balanced_path.is_file() else {}
    balanced_knn = balanced.get("knn", {}).get(dino_knn, {})
    fixed = bool(summary.get("prototypes_fixed"))
    return {
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
        "kmeans": {k: v for k, v in (clus.get("kmeans") or {}).items() if k != "sizes"} or None,
        "prototype_argmax_clustering": {k: v for k, v in (clus.get("prototype_argmax") or {}).items()
                                        if k != "sizes"} or None,
        "prototypes_fixed": fixed,
        # distinct by construction for a fixed codebook or fixed class prototypes: not measured
        "unique_prototypes": None if fixed else summary.get("unique_prototypes"),
        "unique_prototypes_used": None if fixed else summary.get("unique_prototypes_used"),
        "unique_curve": None if fixed else diagnosis.get("unique_curve"),
        "nearest_used": summary.get("nearest_used"),
        "nearest_utilization": summary.get("nearest_utilization"),
        "nearest_utilization_capped": summary.get("nearest_utilization_capped"),
        "prototype_utilization": summary.get("prototype_utilization"),
        "effective_prototypes": summary.get("effective_prototypes"),
        "effective_rank": summary.get("effective_rank"),
        "alpha_req": summary.get("alpha_req"),
        "embedding_std": summary.get("embedding_std"),
        "spectrum": backbone_spectrum(run_dir),
        # the CPLearn paper's dimensional-collapse plot: eigenvalues of the min-max scaled second
        # moment of the head embeddings (no padding); absent from records collected before it
        "embedding_spectrum": diagnosis.get("embedding_spectrum"),
        "alarms": sorted({a["name"] for a in summary.get("alarms", [])}),
        "per_epoch": epoch_records(run_dir, ("prototype_utilization_train", "knn_top1", "effective_rank",
                                             "mixture_perplexity")),
        "nocollapse_version": summary.get("nocollapse_version"),
        "torch_version": summary.get("torch_version"),
    }


def read_failure(run_dir: Path) -> dict | None:
    """Why the run in ``run_dir`` stopped before its end (the trainer's ``failure.json``): for a
    non-finite loss the step, epoch, learning rate and loss; None if it did not stop that way."""
    from nocollapse.utils.run_directory import FAILURE_NAME

    path = run_dir / FAILURE_NAME
    if not path.is_file():
        return None
    failure = json.loads(path.read_text())
    if failure.get("reason") != "non_finite_loss":
        return None
    return {key: failure.get(key) for key in ("reason", "step", "epoch", "lr", "loss")}


def is_diverged(record: dict) -> bool:
    """A record of a run that stopped on a non-finite loss: it has no evaluation to aggregate."""
    return bool(record.get("diverged"))


def partition(runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """The finished runs (every aggregate reads these) and the diverged ones (named, not averaged)."""
    return [r for r in runs if r and not is_diverged(r)], [r for r in runs if r and is_diverged(r)]


def diverged_note(runs: list[dict]) -> str:
    """``seed 0 diverged at step 14 (lr 0.175)``, one clause per diverged seed ("" when none)."""
    return "; ".join(f"seed {r['seed']} diverged at step {r['diverged']['step']} (lr {r['diverged']['lr']:.3g})"
                     for r in sorted(runs, key=lambda r: r["seed"]) if is_diverged(r))


def study_run(name: str, dataset: str, seed: int, args) -> dict:
    """Train, evaluate and record one run, or load its record if it exists."""
    record_path = Path(args.records) / dataset / f"{name}-seed{seed}.json"
    if record_path.is_file() and not args.redo:
        return json.loads(record_path.read_text())
    if args.collect:
        return {}
    recipe = STUDY[name][0]
    overrides = run_overrides(name, dataset, args.data, seed, args.epochs, args.set)
    run_dir = Path(args.out) / dataset / name / f"seed{seed}"
    started = time.time()
    record = {"method": name, "dataset": dataset, "seed": seed, "recipe": f"cifar10/{recipe}",
              "overrides": [o for o in overrides if not o.startswith("data.root=")],
              "command": f"nocollapse train --config cifar10/{recipe} --set "
                         + " ".join(o if not o.startswith("data.root=") else "data.root=$CIFAR" for o in overrides)}
    try:
        train_and_evaluate(run_dir, recipe, overrides, dataset)
    except subprocess.CalledProcessError:
        failure = read_failure(run_dir)
        if failure is None:  # not a divergence: a fault of the machine or the code, nothing to record
            raise
        # A diverged run is a result of the recipe on these terms: it is recorded, not dropped.
        outcome = {"diverged": failure, "alarms": [], "per_epoch": []}
    else:
        outcome = collect(run_dir)
        if dataset == "cifar10":  # the difficulty control for the CIFAR-10-LT groups
            outcome["knn_on_lt_groups"] = knn_on_long_tail_groups(run_dir)
    record.update(finished=time.strftime("%Y-%m-%d"), wall_seconds_this_sitting=round(time.time() - started),
                  **outcome)
    from nocollapse.utils.run_directory import write_json_atomically

    record_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(record_path, record)
    return record


# ---- aggregation over seeds -----------------------------------------------------------------------
def _get(record: dict, path: tuple[str, ...]):
    value = record
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def mean_std(values: list) -> tuple[float, float, int] | None:
    """Mean, sample standard deviation (0 for one value) and count of the non-missing values."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, std, len(xs)


AGGREGATED = {"knn_top1": ("knn_top1",), "linear_top1": ("linear_top1",), "kmeans_ami": ("kmeans", "ami"),
              "argmax_ami": ("prototype_argmax_clustering", "ami"), "unique_0.1": ("unique_prototypes", "0.1"),
              "unique_used_0.1": ("unique_prototypes_used", "0.1"), "utilization": ("nearest_utilization_capped",),
              "effective_rank": ("effective_rank",), "embedding_std": ("embedding_std",),
              "samples_per_second": ("samples_per_second",), "train_seconds": ("train_seconds",),
              "balanced_knn_top1": ("balanced_knn_top1",), "balanced_linear_top1": ("balanced_linear_top1",),
              "intracluster_variance_ratio": ("prototype_argmax_clustering", "intracluster_variance_ratio")}


def aggregate(records: list[dict]) -> dict:
    out = {key: mean_std([_get(r, path) for r in records]) for key, path in AGGREGATED.items()}
    out["seeds"] = [r["seed"] for r in records]
    out["alarms"] = sorted({a for r in records for a in r["alarms"]})
    out["prototypes_fixed"] = any(r.get("prototypes_fixed") for r in records)
    return out


def figures(records: dict, out: Path) -> list[str]:
    """Every method on one axis, from its lowest seed: unique vs epsilon (methods with learned or
    fitted prototypes), backbone spectra, k-NN per epoch."""
    from nocollapse.diagnostics.plots import distinct_styles, plot_runs_by_epoch, plot_spectrum, plot_unique_vs_eps

    # One look per method across all figures and datasets: eleven methods outrun the ten default colours.
    styles = distinct_styles(list(STUDY))
    paths = []
    for dataset, methods in records.items():
        first = {name: min(runs, key=lambda r: r["seed"]) for name, runs in methods.items() if runs}
        curves = {name: (r["unique_curve"]["eps"], r["unique_curve"]["fraction"])
                  for name, r in first.items() if r.get("unique_curve")}
        if curves:
            paths.append(plot_unique_vs_eps(curves, out / f"unique_vs_eps_{dataset}.png",
                                            title=f"Unique prototypes vs ε after training ({dataset})",
                                            styles=styles))
        spectra = {name: r["spectrum"] for name, r in first.items() if r.get("spectrum")}
        if spectra:
            paths.append(plot_spectrum(spectra, out / f"spectra_{dataset}.png",
                                       title=f"Singular values of the test split's centred backbone features ({dataset})",
                                       styles=styles))
        series = {}
        for name, r in first.items():
            points = [(p["epoch"], p["knn_top1"]) for p in r["per_epoch"] if p.get("knn_top1") is not None]
            if points:
                series[name] = ([e for e, _ in points], [v for _, v in points])
        if series:
            paths.append(plot_runs_by_epoch(series, out / f"knn_by_epoch_{dataset}.png", "k-NN top-1 (test)",
                                            f"k-NN top-1 per epoch ({dataset})", styles=styles))
    return [str(p) for p in paths]


def _cell(stat, percent: bool = False, digits: int = 3) -> str:
    if stat is None:
        return "–"
    mean, std, n = stat
    scale = 100.0 if percent else 1.0
    d = 1 if percent else digits
    return f"{scale * mean:.{d}f}" + (f" ± {scale * std:.{d}f}" if n > 1 else "")


# The pairs that the papers' claims rest on: (baseline, remedy). CPLearn is compared with the best
# prototype method of the same dataset (the highest mean k-NN), found in the records.
CLAIM_PAIRS = (("dino", "dino_decoupled"), ("carp", "carp_decoupled"), ("swav", "swav_decoupled"),
               ("supcon", "clop"), ("best_prototype_method", "cplearn"))
PROTOTYPE_METHODS = ("dino", "dino_koleo", "dino_decoupled_paper", "dino_decoupled", "carp",
                     "carp_decoupled_paper", "carp_decoupled")


def load_throughput(directory: Path) -> dict[str, float]:
    """Images/s of each method's training step from ``benchmarks/throughput.py``'s JSONs (one run
    alone on the machine, at the recipe's settings), keyed by study name."""
    speeds = {}
    for name in STUDY:
        path = directory / f"{name}.json"
        if path.is_file():
            speeds[name] = json.loads(path.read_text()).get("images_per_second_step")
    return speeds


def compare(baseline: list[dict], remedy: list[dict], path: tuple[str, ...]) -> dict | None:
    """Difference of means (remedy - baseline) of one metric and whether it is inside the noise.

    With at least two seeds on each side the standard error of the difference is
    ``sqrt(s_a^2 / n_a + s_b^2 / n_b)`` and a difference is called *inside the noise* when it is
    smaller than twice that; with one seed on either side there is no estimate of the spread."""
    a, b = mean_std([_get(r, path) for r in baseline]), mean_std([_get(r, path) for r in remedy])
    if a is None or b is None:
        return None
    diff = b[0] - a[0]
    if a[2] < 2 or b[2] < 2:
        return {"difference": diff, "standard_error": None, "inside_noise": None, "seeds": (a[2], b[2])}
    se = math.sqrt(a[1] ** 2 / a[2] + b[1] ** 2 / b[2])
    return {"difference": diff, "standard_error": se, "inside_noise": abs(diff) < 2 * se, "seeds": (a[2], b[2])}


PAIR_METRICS = ("knn_top1", "linear_top1")
# On a long-tailed split the classifiers are also fitted on a class-balanced subset of it (the
# balanced protocol), so that a remedy's gain on rare classes is not drowned by the head classes.
LONG_TAIL_PAIR_METRICS = PAIR_METRICS + ("balanced_knn_top1", "balanced_linear_top1")


def pair_metrics(dataset: str) -> tuple[str, ...]:
    """The metrics the claim pairs of ``dataset`` compare (the balanced protocol's too on a long tail)."""
    return LONG_TAIL_PAIR_METRICS if dataset.endswith("_lt") else PAIR_METRICS


def claim_pairs(methods: dict[str, list[dict]], metrics: tuple[str, ...] = PAIR_METRICS) -> list[dict]:
    """The claim pairs of one dataset that have records on both sides, each metric compared."""
    present = {name: runs for name, runs in methods.items() if runs}
    prototype = [n for n in PROTOTYPE_METHODS if n in present]
    best = max(prototype, key=lambda n: mean_std([r["knn_top1"] for r in present[n]])[0], default=None)
    rows = []
    for baseline, remedy in CLAIM_PAIRS:
        baseline = best if baseline == "best_prototype_method" else baseline
        if baseline in present and remedy in present:
            rows.append({"baseline": baseline, "remedy": remedy,
                         **{metric: compare(present[baseline], present[remedy], (metric,))
                            for metric in metrics}})
    return rows


METRIC_TITLES = {"knn_top1": "k-NN", "linear_top1": "linear", "balanced_knn_top1": "balanced k-NN",
                 "balanced_linear_top1": "balanced linear"}


def _difference_cell(comparison: dict | None) -> str:
    if comparison is None:
        return "–"
    text = f"{comparison['difference']:+.3f}"
    if comparison["standard_error"] is None:
        return text + " (one seed: spread not estimated)"
    verdict = "inside the noise" if comparison["inside_noise"] else "outside the noise"
    return text + f" ± {comparison['standard_error']:.3f} ({verdict})"


def summary_table(dataset: str, methods: dict[str, list[dict]], speeds: dict[str, float],
                  diverged: dict[str, list[dict]] | None = None) -> list[str]:
    """The user's table of one dataset: mean ± std over seeds where there are several. A seed that
    diverged (``diverged``: its records, by method) is named in the seeds cell, and a method whose
    every seed diverged gets a row that says where."""
    diverged = diverged or {}
    head = ["method", "seeds", "k-NN", "linear", "k-means AMI", "arg-max AMI", "unique % @ 0.1 (all / used)",
            "utilisation %", "RankMe (uncentred)", "alarms", "train s", "step img/s (alone)"]
    if dataset.endswith("_lt"):
        head[4:4] = ["balanced k-NN", "balanced linear"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in dict.fromkeys([*methods, *diverged]):
        runs, failed = methods.get(name) or [], diverged.get(name) or []
        if not runs:
            if failed:
                seeds = ", ".join(str(r["seed"]) for r in sorted(failed, key=lambda r: r["seed"]))
                lines.append("| " + " | ".join([name, seeds, "diverged: " + diverged_note(failed),
                                                *["–"] * (len(head) - 3)]) + " |")
            continue
        a = aggregate(runs)
        unique = ("n/a (fixed)" if a["prototypes_fixed"]
                  else f"{_cell(a['unique_0.1'], True)} / {_cell(a['unique_used_0.1'], True)}")
        speed = speeds.get(name)
        seeds = ", ".join(map(str, a["seeds"])) + (f" ({diverged_note(failed)})" if failed else "")
        row = [name, seeds, _cell(a["knn_top1"]), _cell(a["linear_top1"]),
               _cell(a["kmeans_ami"]), _cell(a["argmax_ami"]), unique, _cell(a["utilization"], True),
               _cell(a["effective_rank"], digits=1), ", ".join(a["alarms"]) or "none",
               _cell(a["train_seconds"], digits=0), f"{speed:.0f}" if speed else "–"]
        if dataset.endswith("_lt"):
            row[4:4] = [_cell(a["balanced_knn_top1"]), _cell(a["balanced_linear_top1"])]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def markdown_tables(records: dict, speeds: dict[str, float] | None = None, full: bool = True,
                    diverged: dict | None = None) -> str:
    """Per dataset: the user's table; with ``full`` also the claim pairs and k-NN per epoch.
    ``diverged`` holds the records of diverged runs (dataset -> method -> records), which the
    user's table names and nothing aggregates."""
    lines = []
    diverged = diverged or {}
    for dataset, methods in records.items():
        failed = diverged.get(dataset, {})
        if not any(methods.values()) and not any(failed.values()):
            continue
        lines += [f"**{dataset}**", "", *summary_table(dataset, methods, speeds or {}, failed), ""]
        if not full:
            continue
        metrics = pair_metrics(dataset)
        pairs = claim_pairs(methods, metrics)
        if pairs:
            head = ["baseline", "remedy", "seeds", *(METRIC_TITLES[m] + " difference" for m in metrics)]
            lines += [f"The claim pairs on {dataset} (remedy minus baseline; inside the noise: smaller than "
                      "twice the standard error of the difference)", "",
                      "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for p in pairs:
                seeds = " / ".join(map(str, p["knn_top1"]["seeds"])) if p["knn_top1"] else "–"
                cells = [p["baseline"], p["remedy"], seeds, *(_difference_cell(p[m]) for m in metrics)]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        epochs = max((len(r["per_epoch"]) for runs in methods.values() for r in runs), default=0)
        lines += [f"k-NN top-1 per epoch on {dataset} (lowest seed)", "",
                  "| method | " + " | ".join(f"epoch {e}" for e in range(epochs)) + " |",
                  "|---|" + "---|" * epochs]
        for name, runs in methods.items():
            if runs:
                r = min(runs, key=lambda r: r["seed"])
                cells = [f"{p['knn_top1']:.3f}" if p.get("knn_top1") is not None else "–" for p in r["per_epoch"]]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# CPLearn's paper compares it with SwAV, Barlow Twins and DINO on CIFAR-10: one table and one
# figure of the embeddings' spectra (the min-max scaled second moment, the paper's plot).
CPLEARN_COMPARISON = ("cplearn", "barlow_twins", "swav", "dino")


def comparison_table(methods: dict[str, list[dict]]) -> list[str]:
    """CPLearn against SwAV, Barlow Twins and DINO (mean ± std over seeds). Barlow Twins has neither
    prototypes nor codes: its arg-max AMI and intracluster variance are n/a (the CPLearn paper's
    arg-max over embedding dimensions is not computed)."""
    head = ["method", "seeds", "k-NN", "linear", "k-means AMI", "arg-max AMI", "intracluster variance ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in CPLEARN_COMPARISON:
        runs = methods.get(name) or []
        if not runs:
            lines.append(f"| {name} | – | no record yet |" + " |" * (len(head) - 3))
            continue
        a = aggregate(runs)
        none = "n/a (no prototypes or codes)"
        lines.append("| " + " | ".join([
            name, ", ".join(map(str, a["seeds"])), _cell(a["knn_top1"]), _cell(a["linear_top1"]),
            _cell(a["kmeans_ami"]), _cell(a["argmax_ami"]) if a["argmax_ami"] else none,
            _cell(a["intracluster_variance_ratio"]) if a["intracluster_variance_ratio"] else none]) + " |")
    return lines


def comparison_figure(methods: dict[str, list[dict]], path: Path,
                      reruns: dict[str, list[dict]] | None = None) -> Path | None:
    """The embeddings' min-max scaled second-moment spectra of the compared methods, from each
    method's lowest seed that has one. Records collected before the spectrum was recorded have
    none: for those methods the spectrum comes from ``reruns`` (a run trained again on the same
    recipe and seed, its record kept apart so that the study's own records stay as they were),
    labelled as a rerun; a method with neither is left out."""
    from nocollapse.diagnostics.plots import distinct_styles, plot_spectrum

    look = distinct_styles(list(STUDY))
    spectra, styles = {}, {}
    for name in CPLEARN_COMPARISON:
        for source, suffix in ((methods, ""), (reruns or {}, ", rerun")):
            runs = [r for r in source.get(name) or [] if r.get("embedding_spectrum")]
            if runs:
                first = min(runs, key=lambda r: r["seed"])
                label = f"{name} (seed {first['seed']}{suffix})"
                spectra[label], styles[label] = first["embedding_spectrum"], look[name]
                break
    if not spectra:
        return None
    return plot_spectrum(spectra, path, effective_rank_in_legend=False, styles=styles,
                         title="Min-max scaled second moment of the embeddings, CIFAR-10")


COMPARISON_BLOCK = re.compile(r"(<!-- study-comparison:start -->\n).*?(<!-- study-comparison:end -->)", re.S)
DOC_BLOCK = re.compile(r"(<!-- study-(summary|full):start -->\n).*?(<!-- study-\2:end -->)", re.S)


def render_doc_blocks(text: str, records: dict, speeds: dict[str, float], diverged: dict | None = None) -> str:
    """``text`` with every ``<!-- study-summary:start --> ... <!-- study-summary:end -->`` block
    refilled with the user's tables and every ``study-full`` block with all tables."""
    text = DOC_BLOCK.sub(lambda m: m.group(1) + markdown_tables(records, speeds, full=m.group(2) == "full",
                                                                diverged=diverged)
                         + "\n" + m.group(3), text)
    return COMPARISON_BLOCK.sub(lambda m: m.group(1) + "\n".join(comparison_table(records.get("cifar10", {})))
                                + "\n" + m.group(2), text)


def write_doc_blocks(path: Path, records: dict, speeds: dict[str, float], diverged: dict | None = None) -> bool:
    """Refill the study blocks of the document at ``path``; True if it changed."""
    text = path.read_text()
    new = render_doc_blocks(text, records, speeds, diverged)
    if new != text:
        path.write_text(new)
    return new != text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("NOCOLLAPSE_CIFAR10"),
                        help="CIFAR-10 ImageFolder root (train/ and test/); default $NOCOLLAPSE_CIFAR10")
    parser.add_argument("--out", default="runs/collapse_study", help="run directories (checkpoints, logs)")
    parser.add_argument("--records", default=str(REPO / "docs" / "study"),
                        help="one JSON record per finished run; an existing record is not trained again")
    parser.add_argument("--methods", nargs="+", default=list(STUDY), choices=list(STUDY))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=5, help="the same number of epochs for every method")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra overrides for every run (train.threads=1, say; they go into the records)")
    parser.add_argument("--spectrum-reruns", default=str(REPO / "docs" / "study_spectrum_reruns"),
                        help="records of runs trained again only for CPLearn's spectrum figure, for methods "
                             "whose records predate the embedding spectrum (give it as --records to make one)")
    parser.add_argument("--collect", action="store_true", help="train nothing: gather the existing records")
    parser.add_argument("--redo", action="store_true", help="train and record again even where a record exists")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables instead of JSON")
    parser.add_argument("--throughput", default=str(REPO / "docs" / "throughput"),
                        help="benchmarks/throughput.py's JSONs: the images/s column")
    parser.add_argument("--write-docs", nargs="+", default=[], metavar="FILE",
                        help="refill the study-summary / study-full marker blocks of these documents")
    args = parser.parse_args(argv)
    if not args.data and not args.collect:
        parser.error("give --data (or set NOCOLLAPSE_CIFAR10) to the CIFAR-10 ImageFolder root, or --collect")
    out = Path(args.out)
    if args.collect:  # every record there is, whatever --methods / --seeds say
        args.seeds = sorted({int(p.stem.rsplit("-seed", 1)[1]) for p in Path(args.records).glob("*/*-seed*.json")})
    records: dict[str, dict[str, list[dict]]] = {}   # finished runs: every aggregate reads these
    diverged: dict[str, dict[str, list[dict]]] = {}  # runs stopped by a non-finite loss: named, not averaged
    for dataset in args.datasets:
        for name in (STUDY if args.collect else args.methods):
            runs = [study_run(name, dataset, seed, args) for seed in args.seeds]
            records.setdefault(dataset, {})[name], diverged.setdefault(dataset, {})[name] = partition(runs)
    out.mkdir(parents=True, exist_ok=True)
    report = {"aggregated": {d: {n: aggregate(rs) for n, rs in m.items() if rs} for d, m in records.items()},
              "figures": figures(records, out)}
    reruns = {name: [json.loads(p.read_text()) for p in sorted(Path(args.spectrum_reruns).glob(f"cifar10/{name}-seed*.json"))]
              for name in CPLEARN_COMPARISON}
    comparison = comparison_figure(records.get("cifar10", {}), out / "cplearn_comparison_spectra_cifar10.png",
                                   {name: partition(runs)[0] for name, runs in reruns.items()})
    if comparison is not None:
        report["figures"].append(str(comparison))
    speeds = load_throughput(Path(args.throughput))
    report["claim_pairs"] = {d: claim_pairs(m, pair_metrics(d)) for d, m in records.items()}
    report["diverged"] = {d: {n: [{"seed": r["seed"], **r["diverged"]} for r in rs] for n, rs in m.items() if rs}
                          for d, m in diverged.items()}
    (out / "study.json").write_text(json.dumps(report, indent=1))
    for doc in args.write_docs:
        write_doc_blocks(Path(doc), records, speeds, diverged)
    print(markdown_tables(records, speeds, diverged=diverged) if args.markdown else json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
