"""What a trained method looks like on held-out data: k-NN, prototype health, embeddings.

Shared by the end of ``nocollapse train``, ``nocollapse diagnose`` and ``nocollapse eval``:

* :func:`encode_split` runs the method's evaluation network (the teacher's backbone and, when the
  method has one, its projection head) over a split and returns backbone features, bottleneck
  embeddings and the method's prototype assignment probabilities;
* :class:`HeldOutEncoder` encodes a fixed set of training images in eval mode for the
  held-out metrics of the collapse alarms, during training;
* :func:`method_report` turns the test split's outputs into the collapse report of
  ``nocollapse.diagnostics`` (unique prototypes, utilisation, effective prototypes, effective
  rank and spectrum of the backbone features, mixture weights);
* :func:`write_run_plots` draws the standard figures into ``RUN_DIR/plots``;
* :func:`run_summary` and :func:`format_summary` build and print the end-of-run summary.

Everything it needs from a method comes through the hooks of ``SSLMethod``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .version import __version__
from .data.loader import eval_batches
from .data.registry import DatasetSplits
from .data.sources import ImageSource
from .diagnostics.assignments import AssignmentAccumulator
from .diagnostics.clusters import cluster_size_stats, intracluster_variance_ratio, minmax_moment_spectrum
from .diagnostics.embeddings import (
    alpha_req,
    effective_rank,
    effective_rank_from_singular_values,
    embedding_std,
    singular_values,
)
from .diagnostics.plots import plot_spectrum, plot_training_curves
from .diagnostics.report import prototype_report, report_warnings, write_plots
from .evaluation.clustering import assignment_clustering, kmeans_clustering
from .evaluation.features import extract_outputs
from .utils.checkpoint import atomic_save, describe_unreadable
from .utils.run_directory import record


@dataclass
class SplitOutputs:
    features: torch.Tensor              # [N, F] backbone features
    labels: torch.Tensor                # [N]
    embeddings: torch.Tensor | None     # [N, D] bottleneck embeddings (methods with a head)
    assigned: torch.Tensor | None = None    # [N] arg-max of the method's assignment probabilities
    assignment: dict | None = None      # assignment_stats of those probabilities over the split
    nearest: torch.Tensor | None = None  # [N] index of each sample's highest-scoring prototype


log = logging.getLogger("nocollapse")

#: rows of embeddings scored at once: bounds the [rows, K] score matrix (16 M entries)
SCORE_CHUNK_ENTRIES = 1 << 24
#: the format of the cached split outputs (a cache of another format is re-encoded)
CACHE_FORMAT = 2


def score_split(method, embeddings: torch.Tensor, device: torch.device) -> tuple:
    """Assignments of a split's embeddings in row chunks, so no ``[N, K]`` matrix is held: the
    arg-max of the method's assignment probabilities ``[N]``, their statistics and the
    highest-scoring prototype ``[N]`` (None for each when the method has no prototypes). Each
    chunk is scored once; the probabilities come from those scores."""
    k = method.num_prototypes
    if k is None:
        return None, None, None
    rows = max(1, SCORE_CHUNK_ENTRIES // k)
    accumulator = AssignmentAccumulator(k)
    assigned, nearest = [], []
    with torch.no_grad():
        for chunk in embeddings.split(rows):
            scores = method.scores(chunk.to(device))
            if scores is None:
                return None, None, None
            nearest.append(scores.argmax(dim=1).cpu())
            probs = method.probs_from_scores(scores)
            if probs is not None:
                assigned.append(accumulator.add(probs.float()).cpu())
    if not assigned:
        return None, None, torch.cat(nearest)
    return torch.cat(assigned), accumulator.stats(), torch.cat(nearest)


class _EvalNetwork(nn.Module):
    """images -> (backbone features, bottleneck embeddings) of a method's evaluation network."""

    def __init__(self, method) -> None:
        super().__init__()
        self.encoder = method.eval_encoder()
        self.backbone = method.eval_backbone()

    def forward(self, x: torch.Tensor):
        if self.encoder is None:
            return self.backbone(x)
        features, embeddings = self.encoder([x])
        return features, embeddings


def encode_split(method, source: ImageSource, size: int, splits: DatasetSplits, batch_size: int,
                 device: torch.device, num_workers: int = 0, max_samples: int = 0,
                 with_head: bool = True, bad_images: str = "skip") -> SplitOutputs:
    network = _EvalNetwork(method) if with_head else method.eval_backbone()
    outputs, labels = extract_outputs(network, source, size, splits.mean, splits.std, batch_size=batch_size,
                                      device=device, num_workers=num_workers, max_samples=max_samples,
                                      bad_images=bad_images)
    embeddings = outputs[1] if len(outputs) > 1 else None
    assigned = assignment = nearest = None
    if embeddings is not None:
        assigned, assignment, nearest = score_split(method, embeddings, device)
    return SplitOutputs(outputs[0], labels, embeddings, assigned, assignment, nearest)


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().cpu()


class HeldOutEncoder:
    """The eval-mode embeddings ``[P, D]`` of a fixed set of images, for
    :class:`~nocollapse.diagnostics.monitor.CollapseMonitor`'s ``held_out`` function.

    ``batches``: the images, normalised and on the method's device; :meth:`from_source` draws
    ``count`` images of a split (seeded), decodes them once un-augmented, as for evaluation, and
    keeps them (``count x 3 x size x size`` floats: 3 MiB for 256 images at 32 px). Each call runs
    the method's evaluation network (its bottleneck embeddings, or the backbone features for a
    method without a head) with norm layers in eval mode and restores each module's mode."""

    def __init__(self, method, batches: list[torch.Tensor]) -> None:
        self.network = _EvalNetwork(method)
        self.batches = list(batches)
        self.count = sum(len(b) for b in self.batches)
        if self.count < 2:
            raise ValueError(f"the held-out set needs at least 2 readable images, got {self.count}")

    @classmethod
    def from_source(cls, method, source: ImageSource, count: int, size: int, splits: DatasetSplits,
                    batch_size: int, device: torch.device, seed: int = 0,
                    bad_images: str = "skip") -> "HeldOutEncoder":
        if count < 2:
            raise ValueError(f"the held-out set needs at least 2 images, got {count}")
        if len(source) > count:
            generator = torch.Generator().manual_seed(seed)
            source = source.subset(torch.randperm(len(source), generator=generator)[:count].sort().values)
        return cls(method, [images for images, _ in eval_batches(source, size, splits.mean, splits.std, batch_size,
                                                                 device, 0, bad_images)])

    def __call__(self) -> torch.Tensor:
        # each module's own mode is put back (a teacher may be kept in eval mode while training)
        modes = [(module, module.training) for module in self.network.modules()]
        self.network.eval()
        try:
            with torch.no_grad():
                outputs = [self.network(images) for images in self.batches]
        finally:
            for module, training in modes:
                module.training = training
        picked = [out[1] if isinstance(out, tuple) and out[1] is not None else
                  (out[0] if isinstance(out, tuple) else out) for out in outputs]
        return torch.cat([t.float() for t in picked])


def method_report(method, test: SplitOutputs, seed: int = 0) -> dict[str, Any]:
    """The collapse report of a method on a split's outputs (JSON-serialisable).

    With prototypes: :func:`~nocollapse.diagnostics.report.prototype_report` (uniqueness is not
    measured for fixed prototypes). With embeddings and assignments, also the cluster measures of
    the arg-max assignments: cluster sizes (``clusters``), their NMI / AMI / ARI against the
    labels (``argmax_clustering``), k-means with k = classes on the same embeddings
    (``kmeans_embedding``, the reference a clustering method must beat), the within-cluster share
    of the embeddings' variance (``intracluster_variance_ratio``), RankMe of the embeddings
    (``embedding_rankme``) and the eigenvalues of their min-max scaled second moment
    (``embedding_spectrum``). For every method, ``alpha_req``: the power-law decay of the backbone
    features' eigenspectrum (None when they have too few dimensions for the fit)."""
    prototypes = method.prototype_vectors()
    if prototypes is not None:
        report = prototype_report(prototypes.detach().float().cpu(), assignments=test.assignment,
                                  embeddings=test.features, mixture_weights=_cpu(method.mixture_weights()),
                                  idle=_cpu(method.idle_prototypes()), nearest=test.nearest,
                                  fixed=bool(getattr(method, "fixed_prototypes", False)))
    else:
        sigma = singular_values(test.features)
        report = {"effective_rank": effective_rank_from_singular_values(sigma),
                  "embedding_std": embedding_std(test.features), "spectrum": [float(s) for s in sigma]}
    try:
        report["alpha_req"] = alpha_req(test.features)["alpha"]
    except ValueError:  # too few dimensions or samples for the fit
        report["alpha_req"] = None
    if test.embeddings is not None:
        report["bottleneck_embedding_std"] = embedding_std(test.embeddings)
        report["embedding_rankme"] = effective_rank(test.embeddings)
        report["embedding_spectrum"] = minmax_moment_spectrum(test.embeddings)
        if test.assigned is not None and method.num_prototypes:
            report.update(_cluster_measures(method.num_prototypes, test, seed))
    return report


def _cluster_measures(k: int, test: SplitOutputs, seed: int) -> dict[str, Any]:
    labelled = test.labels >= 0
    assigned, embeddings, labels = test.assigned[labelled], test.embeddings[labelled], test.labels[labelled]
    out: dict[str, Any] = {"clusters": cluster_size_stats(test.assigned, k),
                           "intracluster_variance_ratio": intracluster_variance_ratio(test.embeddings, test.assigned)}
    classes = int(torch.unique(labels).numel())
    if classes >= 2 and labels.numel() > classes:
        out["argmax_clustering"] = assignment_clustering(assigned, labels, num_clusters=k)
        out["kmeans_embedding"] = kmeans_clustering(embeddings, labels, n_clusters=classes, seed=seed, n_init=3)
    return out


def features_cache_path(run_dir: Path, checkpoint: Path, step: int, balanced_train: bool = False) -> Path:
    """Where the split outputs of ``checkpoint`` at ``step`` are cached in a run directory."""
    return run_dir / "features" / f"{checkpoint.stem}-step{step}{'-balanced' if balanced_train else ''}.pt"


def _fingerprint(checkpoint: Path) -> str:
    stat = checkpoint.stat()
    return f"{stat.st_size}-{stat.st_mtime_ns}"


def save_outputs(path: Path, checkpoint: Path, train: SplitOutputs, test: SplitOutputs) -> None:
    """Cache the train and test outputs of ``checkpoint`` (read back by :func:`cached_outputs`)."""
    atomic_save({"fingerprint": _fingerprint(checkpoint), "format": CACHE_FORMAT, "train": vars(train),
                 "test": vars(test)}, path)


def _load_outputs(path: Path, checkpoint: Path) -> tuple[SplitOutputs, SplitOutputs] | None:
    """The cached outputs in ``path`` if they were made from this very checkpoint file.

    A cache that cannot be used (truncated, foreign, of another layout) costs a warning and
    returns None, so the outputs are encoded again and the file is overwritten, as the
    decoded-image cache does."""
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        log.warning("ignoring unreadable feature cache: %s %s; encoding the features again", path,
                    describe_unreadable(path, exc))
        return None
    try:
        if cached.get("fingerprint") != _fingerprint(checkpoint) or cached.get("format") != CACHE_FORMAT:
            return None
        return SplitOutputs(**cached["train"]), SplitOutputs(**cached["test"])
    except Exception as exc:
        log.warning("ignoring unreadable feature cache: %s holds no cached outputs (%s: %s); encoding the "
                    "features again", path, type(exc).__name__, exc)
        return None


def cached_outputs(run, device: torch.device, use_cache: bool = True,
                   balanced_train: bool = False) -> tuple[SplitOutputs, SplitOutputs]:
    """Train and test outputs of a loaded run (see :mod:`nocollapse.runs`), cached per checkpoint
    in ``RUN_DIR/features/<checkpoint>-step<N>[-balanced].pt`` (the trainer writes the one of its
    final ``last.pt``, ``eval.save_features``). The cache is keyed by the checkpoint file's size
    and modification time, so an overwritten ``last.pt`` is re-encoded.

    ``balanced_train`` encodes the labelled train split as it was before long-tail subsampling
    (``splits.full_train``) instead of the subsampled one; a run without long tail has none. The
    test split's outputs do not depend on the train split, so they are taken from the other cache
    when it holds them."""

    train_source = run.splits.train
    if balanced_train:
        if run.splits.full_train is None:
            raise ValueError(f"--balanced-train needs a run pre-trained on a long-tailed subset "
                             f"(data.imbalance_ratio > 1); {run.run_dir} used all of {run.cfg.data.dataset}")
        train_source = run.splits.full_train
    path = features_cache_path(run.run_dir, run.checkpoint, run.step, balanced_train)
    cached = _load_outputs(path, run.checkpoint) if use_cache else None
    if cached is not None:
        return cached
    other = (_load_outputs(features_cache_path(run.run_dir, run.checkpoint, run.step, not balanced_train),
                           run.checkpoint) if use_cache else None)
    cfg = run.cfg
    common = dict(size=run.image_size, splits=run.splits, batch_size=cfg.eval.batch_size, device=device,
                  num_workers=cfg.data.num_workers, bad_images=cfg.data.bad_images)
    train = encode_split(run.method, train_source, with_head=False, **common)
    test = other[1] if other is not None else encode_split(run.method, run.splits.test, **common)
    record(run.run_dir, path)  # the run's manifest lists its caches (train --force removes them)
    save_outputs(path, run.checkpoint, train, test)
    return train, test


SUMMARY_KEYS = ("prototypes_fixed", "unique_prototypes", "unique_prototypes_used", "prototype_utilization", "nearest_used",
                "nearest_utilization", "nearest_utilization_capped", "effective_prototypes", "effective_rank", "alpha_req",
                "embedding_std", "embedding_rankme", "clusters", "argmax_clustering", "kmeans_embedding",
                "intracluster_variance_ratio")


def write_run_plots(run_dir: Path, method, report: dict[str, Any], records: list[dict] | None = None,
                    label: str = "model") -> list[Path]:
    """The standard figures of a run into ``run_dir/plots``."""
    out = Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    prototypes = method.prototype_vectors()
    if prototypes is not None:
        paths += write_plots(prototypes.detach().float().cpu(), out, report=report, label=label)
    elif "spectrum" in report:
        paths.append(plot_spectrum({label: report["spectrum"]}, out / "spectrum.png"))
    if report.get("embedding_spectrum"):
        paths.append(plot_spectrum(
            {label: report["embedding_spectrum"]}, out / "embedding_spectrum.png",
            title="Eigenvalues of the min-max scaled second moment of the head embeddings",
            effective_rank_in_legend=False))
    if records:
        paths.append(plot_training_curves(records, out / "training_curves.png"))
    return paths


def run_summary(cfg, method, *, steps: int, processes: int, device: torch.device, train_seconds: float,
                knn: dict[str, float], knn_init: dict[str, float] | None, report: dict[str, Any],
                alarms: list, splits: DatasetSplits, skipped_images: list[str], substituted: int,
                skipped_steps: int) -> dict[str, Any]:
    """The ``summary.json`` of a finished run. Samples seen are derived: steps x global batch."""
    global_batch = cfg.train.batch_size * processes
    samples_seen = steps * global_batch
    summary: dict[str, Any] = {
        "method": cfg.method.name,
        **method.summary_fields(),
        "dataset": cfg.data.dataset,
        "backbone": cfg.model.backbone,
        "epochs": cfg.train.epochs,
        "steps": steps,
        "global_batch_size": global_batch,
        "processes": processes,
        "device": str(device),
        "train_seconds": round(train_seconds, 3),
        "samples_per_second": round(samples_seen / train_seconds, 2) if train_seconds > 0 else None,
        "knn_top1": knn["top1"],
        "knn_top5": knn["top5"],
        "knn_top1_init": (knn_init or {}).get("top1"),
        "knn_protocol": {"k": cfg.eval.knn_k, "temperature": cfg.eval.knn_temperature,
                         "features": method.eval_network_name, "split": "test"},
    }
    summary.update({k: report[k] for k in SUMMARY_KEYS if k in report})
    summary["alarms"] = [a.to_dict() for a in alarms]
    summary["warnings"] = report_warnings(report)
    files = sorted(set(skipped_images))
    summary.update({
        "skipped_images": {"count": len(files) + substituted, "files": files[:50],
                           "substituted_during_training": substituted},
        "skipped_steps": skipped_steps,
        "train_images": len(splits.ssl_train),
        "test_images": len(splits.test),
        "nocollapse_version": __version__,
        "torch_version": torch.__version__,
    })
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The table ``nocollapse train`` prints at the end of a run."""
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 100 else f"{v:,.1f}"
        return str(v)

    knn = fmt(summary.get("knn_top1"))
    init = summary.get("knn_top1_init")
    if init is not None and summary.get("knn_top1") is not None:
        knn += f"   (random init {init:.4f}, {summary['knn_top1'] - init:+.4f})"
    method = summary["method"]
    if summary.get("prototypes") is not None:
        method += f" ({summary['prototypes']} prototypes, K={summary.get('num_prototypes')})"
    rows = [
        ("method", method),
        ("dataset", f"{summary['dataset']} ({summary.get('train_images')} train / "
                    f"{summary.get('test_images')} test images)"),
        ("backbone", summary.get("backbone")),
        ("epochs / steps", f"{summary['epochs']} / {summary.get('steps')}"),
        ("train time", f"{fmt(summary.get('train_seconds'))} s on {summary.get('device')} "
                       f"x {summary.get('processes')}"),
        ("throughput", f"{fmt(summary.get('samples_per_second'))} images/s"),
        ("k-NN top-1", knn),
        ("k-NN top-5", fmt(summary.get("knn_top5"))),
    ]
    if summary.get("prototypes_fixed"):
        rows.append(("prototypes", "fixed by construction (uniqueness n/a)"))
    elif summary.get("num_prototypes") is None:
        rows.append(("prototypes", "none: prototype measures n/a; the embeddings are measured instead"))
    for key, label in (("unique_prototypes", "unique prototypes"),
                       ("unique_prototypes_used", "unique among used"),
                       ("prototype_utilization", "prototype utilisation"),
                       ("nearest_utilization_capped", "nearest-used / min(K, N)"),
                       ("effective_rank", "effective rank"),
                       ("embedding_rankme", "embedding RankMe"),
                       ("embedding_std", "embedding std (unit rows)"),
                       ("alpha_req", "alpha-ReQ (spectrum decay)")):
        if summary.get(key) is not None:
            value = summary[key]
            if isinstance(value, dict):
                value = "  ".join(f"eps {k}: {v:.1%}" for k, v in value.items())
            rows.append((label, fmt(value)))
    clusters = summary.get("clusters")
    if clusters:
        rows.append(("clusters (arg-max)", f"{clusters['used']} of {clusters['num_clusters']} used, largest "
                                           f"{clusters['largest_fraction']:.1%} of the test set, "
                                           f"size perplexity {clusters['size_perplexity']:.1f}"))
    scores = summary.get("argmax_clustering")
    if scores:
        ref = summary.get("kmeans_embedding") or {}
        text = f"NMI {scores['nmi']:.4f}  AMI {scores['ami']:.4f}  ARI {scores['ari']:.4f}"
        if "ami" in ref:
            text += f"   (k-means k={ref['n_clusters']}: AMI {ref['ami']:.4f})"
        rows.append(("arg-max clustering", text))
    if summary.get("intracluster_variance_ratio") is not None:
        rows.append(("within-cluster variance", f"{summary['intracluster_variance_ratio']:.1%} of the total"))
    if summary.get("skipped_steps"):
        steps = summary.get("steps")
        share = f" ({summary['skipped_steps'] / steps:.0%})" if steps else ""
        rows.append(("skipped steps", f"{summary['skipped_steps']} of {steps}{share}: non-finite loss, "
                                      f"no update (train.nonfinite=skip)"))
    if summary.get("alarms"):
        rows.append(("alarms", ", ".join(a["name"] for a in summary["alarms"])))
    for warning in summary.get("warnings") or []:
        rows.append((f"warning {warning['name']}", warning["message"]))
    width = max(len(r[0]) for r in rows)
    lines = ["", "nocollapse train: summary", "-" * 60]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)
