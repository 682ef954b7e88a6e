"""One-call collapse report: numbers (JSON-serialisable dict), text table and plots."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .assignments import assignment_stats, mixture_stats
from .embeddings import (
    effective_rank_from_singular_values,
    embedding_std,
    mean_direction_norm,
    singular_values,
)
from .plots import plot_prototype_uniformity, plot_spectrum, plot_unique_vs_eps
from .prototypes import (
    STANDARD_EPS,
    _check_matrix,
    default_eps_grid,
    pairwise_cosine_stats,
    unique_prototypes,
)

__all__ = ["prototype_report", "format_report", "flat_metrics", "write_plots", "report_warnings",
           "UNUSED_TEST_FRACTION"]

#: the final report warns when fewer than this share of min(K, N) prototypes are some evaluated
#: image's nearest (the same share the training warning ``unused_prototypes`` uses)
UNUSED_TEST_FRACTION = 0.5


def report_warnings(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The warnings of a final report, in the warning tier (wasted capacity, not a failure).

    ``unused_prototypes_test``: fewer than :data:`UNUSED_TEST_FRACTION` of ``min(K, N)``
    prototypes are the nearest (highest-scoring) prototype of some evaluated image. It reads the
    evaluated images against the prototypes, so it can differ from the training warning
    ``unused_prototypes``, which reads the arg-max of the training batch's *teacher* assignments:
    those are balanced by Sinkhorn-Knopp or centring, and a run can use most prototypes there
    while its test images land on a few. The two are named apart for that reason; the summary
    (``summary.json``, ``warnings``), the printed summary and ``nocollapse diagnose`` all take
    this one from here.
    """
    out = []
    capped = report.get("nearest_utilization_capped")
    if capped is not None and capped < UNUSED_TEST_FRACTION:
        out.append({
            "name": "unused_prototypes_test", "tier": "warning", "value": float(capped),
            "message": (f"only {report.get('nearest_used')} prototypes ({100.0 * capped:.1f} % of min(K, N)) are "
                        f"the nearest of some evaluated image (threshold {UNUSED_TEST_FRACTION:.0%}); the "
                        f"training warning unused_prototypes reads the balanced teacher assignments instead"),
        })
    return out


def _eps_key(eps: float) -> str:
    return f"{eps:g}"


def prototype_report(
    prototypes: Tensor,
    probs: Tensor | None = None,
    embeddings: Tensor | None = None,
    mixture_weights: Tensor | None = None,
    idle: Tensor | None = None,
    nearest: Tensor | None = None,
    *,
    assignments: Mapping[str, Any] | None = None,
    fixed: bool = False,
    eps: Iterable[float] = STANDARD_EPS,
    eps_grid: Iterable[float] | None = None,
    block_size: int = 1024,
    pairwise_sample: int | None = 4096,
    seed: int = 0,
) -> dict[str, Any]:
    """Every diagnostic that applies to the given tensors, as a JSON-serialisable dict.

    Always (from ``prototypes [K, D]``): ``num_prototypes``, ``dim``,
    ``unique_prototypes`` (``{"0.025": fraction, ...}``, string keys), ``unique_counts``
    (same keys, counts), ``unique_curve`` (``{"eps": [...], "fraction": [...]}``) and
    ``pairwise_cosine`` (:func:`pairwise_cosine_stats`). The standard ε and the curve's
    grid are computed in one greedy-cover pass.

    With ``probs [N, K]``: the keys of :func:`assignment_stats` (``mean_entropy``,
    ``entropy_of_mean``, ``effective_prototypes``, ``argmax_used``, ``mass_used``,
    ``max_prob``, ``prototype_utilization``, ``num_samples``).
    With ``embeddings [N, D']``: ``effective_rank``, ``embedding_std``,
    ``mean_direction_norm``, ``embedding_dim`` and ``spectrum`` (singular values, list).
    With ``nearest [N]`` (each sample's highest-scoring prototype; without it, the arg-max of
    ``probs``): ``nearest_used`` (prototypes that are some sample's nearest),
    ``nearest_utilization`` (``nearest_used / K``), ``nearest_utilization_capped``
    (``nearest_used / min(K, N)``: N samples can use at most N prototypes) and
    ``unique_prototypes_used`` (the unique fraction at each ε among the used prototypes, 0 when
    none is used; ``unique_used_curve`` on the grid). A set of distinct prototypes that the data
    do not use scores high on ``unique_prototypes`` and low here.
    With ``mixture_weights [K]``: ``mixture`` (:func:`mixture_stats`; ``idle``, the mixture's
    boolean ``[K]`` idle mask, counts its dead components by usage).

    ``assignments`` passes the :func:`assignment_stats` of a set too large for one ``probs``
    matrix (see :class:`~nocollapse.diagnostics.assignments.AssignmentAccumulator`) instead.
    ``fixed`` marks prototypes that are distinct by construction and never trained (a random
    codebook, orthonormal class prototypes): the uniqueness keys are left out
    (``prototypes_fixed: True``), the usage keys are kept.
    """
    _check_matrix(prototypes)
    k, d = int(prototypes.shape[0]), int(prototypes.shape[1])
    eps_std = sorted({float(e) for e in eps})
    grid = sorted({float(e) for e in (default_eps_grid() if eps_grid is None else eps_grid)})
    report: dict[str, Any] = {"num_prototypes": k, "dim": d}
    if fixed:
        report["prototypes_fixed"] = True
    else:
        counts = unique_prototypes(prototypes, sorted(set(eps_std) | set(grid)), block_size)
        report.update({
            "unique_prototypes": {_eps_key(e): counts[e] / k for e in eps_std},
            "unique_counts": {_eps_key(e): counts[e] for e in eps_std},
            "unique_curve": {"eps": grid, "fraction": [counts[e] / k for e in grid]},
        })
    report["pairwise_cosine"] = pairwise_cosine_stats(prototypes, pairwise_sample, seed=seed)
    if assignments is not None:
        if probs is not None:
            raise ValueError("pass probs or assignments, not both")
        if int(assignments.get("num_prototypes", k)) != k:
            raise ValueError(f"assignments were computed for {assignments.get('num_prototypes')} "
                             f"prototypes, not {k}")
        report.update(assignments)
    if probs is not None:
        if probs.ndim != 2 or probs.shape[1] != k:
            raise ValueError(
                f"probs must be [N, {k}] to match the prototypes, got {tuple(probs.shape)}"
            )
        report.update(assignment_stats(probs))
    if embeddings is not None:
        sigma = singular_values(embeddings)
        report.update(
            {
                "effective_rank": effective_rank_from_singular_values(sigma),
                "embedding_std": embedding_std(embeddings),
                "mean_direction_norm": mean_direction_norm(embeddings),
                "embedding_dim": int(embeddings.shape[1]),
                "spectrum": [float(s) for s in sigma],
            }
        )
    if nearest is None and probs is not None:
        nearest = probs.argmax(dim=1)
    if nearest is not None:
        used = torch.unique(nearest.reshape(-1).long())
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= k):
            raise ValueError(f"nearest holds prototype indices outside [0, {k})")
        n_used, n_samples = int(used.numel()), int(nearest.numel())
        report["nearest_used"] = n_used
        report["nearest_utilization"] = n_used / k
        report["nearest_utilization_capped"] = n_used / max(1, min(k, n_samples))
        if not fixed:
            if n_used:
                used_counts = unique_prototypes(prototypes[used], sorted(set(eps_std) | set(grid)), block_size)
                frac = {e: used_counts[e] / n_used for e in used_counts}
            else:
                frac = {e: 0.0 for e in sorted(set(eps_std) | set(grid))}
            report["unique_prototypes_used"] = {_eps_key(e): frac[e] for e in eps_std}
            report["unique_used_curve"] = {"eps": grid, "fraction": [frac[e] for e in grid]}
    if mixture_weights is not None:
        if mixture_weights.numel() != k:
            raise ValueError(f"mixture_weights must have {k} entries, got {mixture_weights.numel()}")
        report["mixture"] = mixture_stats(mixture_weights, idle=idle)
    return report


def flat_metrics(report: Mapping[str, Any]) -> dict[str, float | int]:
    """Scalars of a report as one flat dict, ready for ``metrics.jsonl`` and
    :class:`~nocollapse.diagnostics.alarms.AlarmMonitor` (``unique_<eps>`` fractions,
    ``pairwise_cosine_<stat>``, ``mixture_<stat>`` and the scalar keys as they are)."""
    out: dict[str, float | int] = {}
    for key, value in report.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[key] = value
    for eps, frac in report.get("unique_prototypes", {}).items():
        out[f"unique_{eps}"] = frac
    for eps, frac in report.get("unique_prototypes_used", {}).items():
        out[f"unique_used_{eps}"] = frac
    for name, value in report.get("pairwise_cosine", {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"pairwise_cosine_{name}"] = value
    for name, value in report.get("mixture", {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"mixture_{name}"] = value
    return out


def _row(label: str, value: str, note: str = "") -> str:
    line = f"  {label:<30} {value:>18}"
    return f"{line}   {note}" if note else line


def format_report(report: Mapping[str, Any]) -> str:
    """A readable, aligned plain-text table of a :func:`prototype_report`."""
    k = int(report["num_prototypes"])
    lines = [
        "nocollapse diagnostics",
        _row("prototypes", f"K = {k}, D = {report['dim']}"),
        "",
        "unique prototypes (greedy cover, cosine distance < eps)" if not report.get("prototypes_fixed")
        else "prototypes fixed by construction: uniqueness not measured",
    ]
    used_unique = report.get("unique_prototypes_used", {})
    for eps, frac in report.get("unique_prototypes", {}).items():
        count = report.get("unique_counts", {}).get(eps)
        value = f"{count} / {k}" if count is not None else ""
        note = f"{100.0 * frac:6.2f} %"
        if eps in used_unique:
            note += f"   among the {report['nearest_used']} used: {100.0 * used_unique[eps]:6.2f} %"
        lines.append(_row(f"eps = {eps}", value, note))
    if "nearest_used" in report:
        lines.append(_row("prototypes used (nearest)", f"{report['nearest_used']} / {k}",
                          f"{100.0 * report['nearest_utilization_capped']:.2f} % of min(K, N)"))
    pc = report.get("pairwise_cosine")
    if pc:
        how = f"{pc['rows']} sampled rows" if pc.get("sampled") else "all pairs"
        lines += ["", f"pairwise cosine between prototypes (i != j; max/p99 over {how})"]
        lines.append(_row("max", f"{pc['max']:.4f}", "-> 1 when prototypes coincide"))
        lines.append(_row("99th percentile", f"{pc['p99']:.4f}"))
        lines.append(_row("mean", f"{pc['mean']:.4f}", "(exact, all pairs)"))
    if "mean_entropy" in report:
        ln_k = math.log(k)
        n = report.get("num_samples")
        lines += ["", f"assignments ({n} samples)" if n is not None else "assignments"]
        lines.append(_row("mean entropy", f"{report['mean_entropy']:.4f} nats",
                          f"uniform = ln K = {ln_k:.4f}"))
        lines.append(_row("entropy of mean", f"{report['entropy_of_mean']:.4f} nats"))
        lines.append(_row("effective prototypes", f"{report['effective_prototypes']:.1f}",
                          f"exp(H(p_bar)), of {k}"))
        lines.append(_row("arg-max prototypes used", f"{report['argmax_used']}",
                          f"utilisation {100.0 * report['prototype_utilization']:.2f} %"))
        lines.append(_row("prototypes with mass", f"{report['mass_used']}", "p_bar_k > 0.1/K"))
        lines.append(_row("mean max probability", f"{report['max_prob']:.4f}", "-> 1 when one-hot"))
    if "effective_rank" in report:
        dim = report.get("embedding_dim")
        lines += ["", "embeddings"]
        cap = len(report.get("spectrum", [])) or dim
        lines.append(_row("effective rank (RankMe)", f"{report['effective_rank']:.2f}",
                          f"of at most min(N, D) = {cap}" if cap else ""))
        healthy = f"healthy ~ 1/sqrt(D) = {1.0 / math.sqrt(dim):.4f}" if dim else ""
        lines.append(_row("std of normalised embeddings", f"{report['embedding_std']:.4f}", healthy))
        lines.append(_row("mean direction norm", f"{report['mean_direction_norm']:.4f}",
                          "-> 1 when all point the same way"))
    clusters = report.get("clusters")
    if clusters:
        lines += ["", "arg-max clusters of the test embeddings"]
        lines.append(_row("clusters used", f"{clusters['used']} / {clusters['num_clusters']}",
                          f"{100.0 * clusters['used_fraction_capped']:.2f} % of min(K, N)"))
        lines.append(_row("largest cluster", f"{100.0 * clusters['largest_fraction']:.2f} %", "of the samples"))
        lines.append(_row("median size / singletons", f"{clusters['median_size']:g} / {clusters['singletons']}"))
        lines.append(_row("size perplexity", f"{clusters['size_perplexity']:.1f}", "equally filled clusters"))
        scores, ref = report.get("argmax_clustering"), report.get("kmeans_embedding")
        if scores:
            lines.append(_row("NMI / AMI / ARI", f"{scores['nmi']:.3f} / {scores['ami']:.3f} / {scores['ari']:.3f}",
                              "AMI is 0 for random clusters"))
        if ref:
            lines.append(_row(f"k-means (k = {ref['n_clusters']}) AMI", f"{ref['ami']:.3f}", "on the same embeddings"))
        if "intracluster_variance_ratio" in report:
            lines.append(_row("within-cluster variance", f"{100.0 * report['intracluster_variance_ratio']:.2f} %",
                              "-> 0 under intracluster collapse"))
    if "embedding_rankme" in report:
        lines.append(_row("head embedding RankMe", f"{report['embedding_rankme']:.2f}"))
    mix = report.get("mixture")
    if mix:
        lines += ["", "mixture weights"]
        lines.append(_row("perplexity", f"{mix['perplexity']:.1f}", f"of {mix['num_components']}"))
        rule = "recent usage below the idle threshold" if mix.get("dead_by") == "usage" else "pi_k < 0.1/K"
        lines.append(_row("idle components", f"{mix['dead']}", rule))
    warnings = report_warnings(report)
    if warnings:
        lines += ["", "warnings (wasted capacity, not a failure)"]
        lines += [f"  {w['name']}: {w['message']}" for w in warnings]
    return "\n".join(lines)


def write_plots(
    prototypes: Tensor,
    out_dir: str | Path,
    *,
    embeddings: Tensor | None = None,
    report: Mapping[str, Any] | None = None,
    label: str = "model",
    projection: str = "pca",
) -> list[Path]:
    """Write the standard figures for one model into ``out_dir`` and return their paths.

    ``unique_vs_eps.png`` (from ``report["unique_curve"]`` when a report is given, else
    computed), ``prototype_uniformity.png``, and ``spectrum.png`` when embeddings (or a
    report with a spectrum) are given.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if report is None:
        report = prototype_report(prototypes, embeddings=embeddings)
    paths = []
    if "unique_curve" in report:
        curve = report["unique_curve"]
        curves = {f"{label}, all": (curve["eps"], curve["fraction"])}
        if "unique_used_curve" in report:
            used = report["unique_used_curve"]
            curves[f"{label}, used by the data ({report['nearest_used']})"] = (used["eps"], used["fraction"])
        else:
            curves = {label: curves[f"{label}, all"]}
        paths.append(plot_unique_vs_eps(curves, out / "unique_vs_eps.png"))
    paths.append(plot_prototype_uniformity({label: prototypes}, out / "prototype_uniformity.png",
                                           projection=projection))
    if "spectrum" in report:
        paths.append(plot_spectrum({label: list(report["spectrum"])}, out / "spectrum.png"))
    elif embeddings is not None:
        paths.append(plot_spectrum({label: singular_values(embeddings)}, out / "spectrum.png"))
    return paths


def format_embedding_report(report: Mapping[str, Any]) -> str:
    """A readable table of the report of a method without prototypes: what is measured instead
    (the spectrum of the backbone features and of the projection), and ``n/a`` for the
    prototype measures."""
    def value(key: str, fmt: str = "{:.4f}") -> str:
        v = report.get(key)
        return "n/a" if v is None else fmt.format(v)

    lines = [
        "nocollapse diagnostics",
        _row("prototypes", "none: unique prototypes, utilisation and clusters are n/a"),
        "",
        "backbone features",
        _row("effective rank (RankMe)", value("effective_rank")),
        _row("std of unit rows", value("embedding_std")),
        _row("alpha-ReQ (spectrum decay)", value("alpha_req")),
        "",
        "projection (the embedding the loss sees)",
        _row("RankMe", value("embedding_rankme")),
        _row("std of unit rows", value("bottleneck_embedding_std")),
    ]
    return "\n".join(lines)
