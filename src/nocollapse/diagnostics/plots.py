"""PNG figures of the collapse diagnostics (matplotlib, Agg canvas).

Figures are built with :class:`matplotlib.figure.Figure` and rendered by the Agg
backend directly, so this module never touches pyplot's global state and works
on headless machines and inside notebooks alike. Every function writes one PNG
and returns its path.

Matplotlib and SciPy are imported inside the functions that draw, not with this module: they are
slow to import, and ``nocollapse.diagnostics`` (which the training loop imports) loads this module.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .embeddings import effective_rank_from_singular_values
from .prototypes import STANDARD_EPS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "plot_unique_vs_eps",
    "project_to_circle",
    "plot_prototype_uniformity",
    "plot_spectrum",
    "plot_training_curves",
    "plot_runs_by_epoch",
    "distinct_styles",
]

_DPI = 120
# Matplotlib's default cycle has ten colours, so an eleventh line would repeat the first one's look;
# past ten lines the line style changes as well.
_COLOURS = tuple(f"C{i}" for i in range(10))
_LINESTYLES = ("-", "--", ":", "-.")
# Beyond this many lines the legend goes beside the axes instead of over the curves.
_LEGEND_INSIDE_MAX = 6

LineStyles = Mapping[str, Mapping[str, Any]]


def distinct_styles(labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A ``color`` and ``linestyle`` for each label, no two alike (ten colours per line style).

    Compute it once over every run of a report and pass it to each figure, so that a run keeps its
    look across figures that show different subsets of the runs."""
    if len(set(labels)) != len(labels):
        raise ValueError("labels must be distinct")
    if len(labels) > len(_COLOURS) * len(_LINESTYLES):
        raise ValueError(f"at most {len(_COLOURS) * len(_LINESTYLES)} distinct styles, got {len(labels)} labels")
    return {label: {"color": _COLOURS[i % len(_COLOURS)], "linestyle": _LINESTYLES[i // len(_COLOURS)]}
            for i, label in enumerate(labels)}


def _styles_for(labels: Sequence[str], styles: LineStyles | None) -> dict[str, dict[str, Any]]:
    """``styles`` for the labels it names; the others get distinct styles after those."""
    given = dict(styles or {})
    palette = distinct_styles([*given, *(label for label in labels if label not in given)])
    return {label: dict(given.get(label, palette[label])) for label in labels}


def _legend(ax, lines: int) -> None:
    if lines > _LEGEND_INSIDE_MAX:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    else:
        ax.legend(loc="best")


def _save(fig: Figure, path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, format="png", dpi=_DPI)
    return out


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


# --------------------------------------------------------------------------- unique vs eps
def plot_unique_vs_eps(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    marks: Sequence[float] = STANDARD_EPS,
    title: str = "Unique prototypes vs collapse threshold ε",
    styles: LineStyles | None = None,
) -> Path:
    """Unique prototypes (% of K) against ε for several runs on one axis.

    Args:
        curves: ``label -> (eps, fractions)`` as returned by
            :func:`~nocollapse.diagnostics.prototypes.unique_curve` (fractions in [0, 1]).
        path: output PNG.
        marks: ε values drawn as vertical dotted lines (the paper's thresholds).
        styles: ``label -> matplotlib line keywords`` (see :func:`distinct_styles`); labels it
            does not name get distinct styles of their own.
    """
    if not curves:
        raise ValueError("curves is empty")
    fig = _new_figure(7.0 if len(curves) <= _LEGEND_INSIDE_MAX else 8.5, 4.5)
    ax = fig.add_subplot()
    look = _styles_for(list(curves), styles)
    for label, (eps, frac) in curves.items():
        if len(eps) != len(frac):
            raise ValueError(f"curve {label!r}: {len(eps)} eps values but {len(frac)} fractions")
        ax.plot(list(eps), [100.0 * f for f in frac], marker="o", markersize=3, label=label, **look[label])
    for m in marks:
        ax.axvline(m, color="0.4", linestyle=":", linewidth=1)
        ax.annotate(f"ε = {m:g}", xy=(m, 0.5), xycoords=("data", "axes fraction"),
                    xytext=(2, 0), textcoords="offset points", fontsize=8, color="0.3",
                    rotation=90, ha="left", va="center")
    ax.set_xlabel("ε (cosine distance threshold, 1 − cos)")
    ax.set_ylabel("unique prototypes (% of K)")
    ax.set_ylim(-2, 105)
    ax.set_xlim(left=0)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    _legend(ax, len(curves))
    return _save(fig, path)


# --------------------------------------------------------------------------- uniformity
def project_to_circle(
    prototypes: Tensor, projection: str = "pca", seed: int = 0
) -> np.ndarray:
    """Project L2-normalised rows to 2-D and put them back on the unit circle.

    * ``"pca"`` (default): the top-2 eigenvectors of the **uncentred** second moment
      ``U^T U / K`` of the normalised rows ``U``. Uncentred so that a collapsed set, whose
      mean direction dominates, shows up as a spike rather than as the noise around it;
      the first direction is oriented so the mean projects onto positive P1 (angle ≈ 0).
    * ``"random"``: a Gaussian random ``D x 2`` matrix (seeded ``torch.Generator``),
      orthonormalised by QR. For prototypes spread uniformly over the sphere any such
      projection gives a uniform angle.

    Rows whose projection is shorter than ``1e-12`` are dropped. Returns ``[n, 2]``.
    """
    x = prototypes.detach().to(device="cpu", dtype=torch.float64)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"need a [K, D] matrix with D >= 2, got shape {tuple(x.shape)}")
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    u = x[norms.squeeze(1) > 0] / norms[norms.squeeze(1) > 0]
    if u.shape[0] == 0:
        raise ValueError("all prototype rows are zero")
    if projection == "pca":
        second = u.T @ u / u.shape[0]
        _, vecs = torch.linalg.eigh(second)
        basis = vecs[:, [-1, -2]].clone()
        mean = u.mean(dim=0)
        for c in range(2):
            if float(mean @ basis[:, c]) < 0:
                basis[:, c] = -basis[:, c]
    elif projection == "random":
        gen = torch.Generator().manual_seed(seed)
        basis, _ = torch.linalg.qr(torch.randn(u.shape[1], 2, generator=gen, dtype=torch.float64))
    else:
        raise ValueError(f"projection must be 'pca' or 'random', got {projection!r}")
    y = (u @ basis).numpy()
    r = np.linalg.norm(y, axis=1)
    keep = r > 1e-12
    return y[keep] / r[keep, None]


def _angle_density(theta: np.ndarray, bins: int = 720, bandwidth: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Circular (wrap-around) Gaussian-smoothed histogram density of angles, in 1/rad."""
    from scipy.ndimage import gaussian_filter1d

    hist, edges = np.histogram(theta, bins=bins, range=(-math.pi, math.pi), density=True)
    width = edges[1] - edges[0]
    smooth = gaussian_filter1d(hist, sigma=bandwidth / width, mode="wrap")
    centers = 0.5 * (edges[:-1] + edges[1:])
    return centers, smooth


def plot_prototype_uniformity(
    prototypes: Tensor | Mapping[str, Tensor],
    path: str | Path,
    title: str = "Prototype uniformity",
    projection: str = "pca",
    seed: int = 0,
) -> Path:
    """Uniformity plot of prototypes on the circle (one column per matrix).

    Top: 2-D density (Gaussian-smoothed 2-D histogram) of the rows projected to 2-D
    and re-normalised onto the unit circle (see :func:`project_to_circle`), with the unit
    circle drawn. Bottom: density of the angle ``atan2(P2, P1)`` on ``[-π, π]`` (circular
    Gaussian smoothing, bandwidth 0.05 rad) with the uniform density ``1/(2π)``.
    Spread prototypes give a ring and a flat angle density; collapsed ones give spikes.

    Args:
        prototypes: one ``[K, D]`` matrix or ``label -> matrix`` for side-by-side columns.
        projection: ``"pca"`` (uncentred top-2 principal directions) or ``"random"``.
    """
    from scipy.ndimage import gaussian_filter

    mats = dict(prototypes) if isinstance(prototypes, Mapping) else {"prototypes": prototypes}
    if not mats:
        raise ValueError("no prototype matrices given")
    n = len(mats)
    fig = _new_figure(3.6 * n + 0.8, 7.2)
    axes = fig.subplots(2, n, squeeze=False, height_ratios=[1.25, 1.0])
    lim = 1.25
    grid_bins = 160
    circle = np.linspace(-math.pi, math.pi, 400)
    uniform = 1.0 / (2.0 * math.pi)
    top_density = 0.0
    for col, (label, mat) in enumerate(mats.items()):
        pts = project_to_circle(mat, projection=projection, seed=seed)
        hist, xe, ye = np.histogram2d(
            pts[:, 0], pts[:, 1], bins=grid_bins, range=[[-lim, lim], [-lim, lim]], density=True
        )
        dens = gaussian_filter(hist, sigma=2.0)
        ax = axes[0, col]
        mesh = ax.pcolormesh(xe, ye, dens.T, cmap="viridis", shading="flat", rasterized=True)
        ax.plot(np.cos(circle), np.sin(circle), color="white", linestyle="--", linewidth=0.8,
                label="unit circle")
        ax.set_aspect("equal")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_xlabel("P1 (projection, unit norm)")
        ax.set_ylabel("P2 (projection, unit norm)")
        ax.set_title(f"{label}\n(K = {mat.shape[0]}, D = {mat.shape[1]})", fontsize=10)
        ax.legend(loc="upper right", fontsize=7, framealpha=0.6)
        fig.colorbar(mesh, ax=ax, shrink=0.75, label="density (per unit area)")

        theta = np.arctan2(pts[:, 1], pts[:, 0])
        centers, smooth = _angle_density(theta)
        top_density = max(top_density, float(smooth.max()))
        axb = axes[1, col]
        axb.plot(centers, smooth, color="C0", label="angle density")
        axb.fill_between(centers, smooth, color="C0", alpha=0.25)
        axb.axhline(uniform, color="C3", linestyle="--", linewidth=1.2,
                    label=f"uniform 1/(2π) = {uniform:.3f}")
        axb.set_xlim(-math.pi, math.pi)
        axb.set_xticks([-math.pi, -math.pi / 2, 0, math.pi / 2, math.pi])
        axb.set_xticklabels(["−π", "−π/2", "0", "π/2", "π"])
        axb.set_xlabel("angle atan2(P2, P1) (rad)")
        axb.set_ylabel("density (1/rad)")
        axb.grid(True, alpha=0.3)
        axb.legend(loc="upper right", fontsize=7)
    for col in range(n):
        axes[1, col].set_ylim(0, max(1.15 * top_density, 2.0 * uniform))
    proj = "top-2 uncentred principal directions" if projection == "pca" else f"random projection (seed {seed})"
    fig.suptitle(f"{title}\nprojected on the {proj}", fontsize=10 if n == 1 else 12)
    return _save(fig, path)


# --------------------------------------------------------------------------- spectrum
def plot_spectrum(
    spectra: Mapping[str, Tensor | Sequence[float]],
    path: str | Path,
    normalize: bool = True,
    title: str = "Singular value spectrum of the embeddings",
    effective_rank_in_legend: bool = True,
    styles: LineStyles | None = None,
) -> Path:
    """``log10`` singular values against their index (1 = largest), one line per run.

    With ``normalize`` each spectrum is divided by its largest value so runs of different
    scale compare. The legend gives each run's RankMe effective rank. Zeros are drawn at
    ``1e-16`` relative. ``styles`` as in :func:`plot_unique_vs_eps`.
    """
    if not spectra:
        raise ValueError("spectra is empty")
    fig = _new_figure(7.0 if len(spectra) <= _LEGEND_INSIDE_MAX else 9.0, 4.5)
    ax = fig.add_subplot()
    look = _styles_for(list(spectra), styles)
    for label, sigma in spectra.items():
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).clamp_min(0)
        if s.numel() == 0:
            raise ValueError(f"spectrum {label!r} is empty")
        s = torch.sort(s, descending=True).values
        erank = effective_rank_from_singular_values(s)
        top = float(s[0]) if float(s[0]) > 0 else 1.0
        scaled = s / top if normalize else s
        floor = 1e-16 * (1.0 if normalize else top)
        y = torch.log10(scaled.clamp_min(floor)).numpy()
        legend = f"{label} (effective rank {erank:.1f})" if effective_rank_in_legend else label
        ax.plot(np.arange(1, len(y) + 1), y, label=legend, **look[label])
    ax.set_xlabel("singular value index (descending)")
    ax.set_ylabel("log10 σ / σ_max" if normalize else "log10 σ")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    _legend(ax, len(spectra))
    return _save(fig, path)


# --------------------------------------------------------------------------- training curves
_LOSS_KEYS = ("loss", "train/loss", "train_loss")
_KNN_KEYS = ("knn_top1", "knn/top1", "knn_acc", "knn")
_RANK_KEYS = ("effective_rank", "rankme")
_UNIQUE_RE = re.compile(r"^unique(?:_fraction|_frac|_pct)?[_/@]?(?:eps)?[_=]?([0-9]*\.?[0-9]+)$")


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, rec in enumerate(records):
        value = rec.get(key)
        if value is None:
            continue
        try:
            y = float(value)
        except (TypeError, ValueError):
            continue
        if not math.isfinite(y):
            continue
        x = rec.get("step", rec.get("epoch", i))
        xs.append(float(x))
        ys.append(y)
    return xs, ys


def _as_percent(ys: list[float]) -> list[float]:
    """Values in [0, 1] are fractions: show them as %."""
    return [100.0 * y for y in ys] if ys and max(ys) <= 1.0 else ys


def plot_training_curves(records: Sequence[Mapping[str, Any]], path: str | Path,
                         title: str = "Training curves") -> Path:
    """Grid of training curves from ``metrics.jsonl`` records (one dict per logged step).

    Panels (each skipped when its series is absent): loss (``loss``), k-NN top-1
    (``knn_top1``; fractions shown as %), unique prototypes (every ``unique_<eps>`` key,
    one line per ε; fractions shown as %) and effective rank (``effective_rank``). The
    x axis is ``step`` (or ``epoch`` when a record has no step).
    """
    if not records:
        raise ValueError("records is empty")
    keys = {k for rec in records for k in rec}
    has_step = any("step" in rec for rec in records)
    panels: list[tuple[str, str, list[tuple[str, list[float], list[float]]]]] = []

    def first_present(candidates: Sequence[str]) -> str | None:
        return next((k for k in candidates if k in keys), None)

    k = first_present(_LOSS_KEYS)
    if k and _series(records, k)[0]:
        panels.append(("Loss", "loss (nats)", [(k, *_series(records, k))]))
    k = first_present(_KNN_KEYS)
    if k and _series(records, k)[0]:
        xs, ys = _series(records, k)
        panels.append(("k-NN top-1 accuracy", "top-1 accuracy (%)", [(k, xs, _as_percent(ys))]))
    unique_keys = sorted(
        (key for key in keys if _UNIQUE_RE.match(key)), key=lambda s: float(_UNIQUE_RE.match(s).group(1))  # type: ignore[union-attr]
    )
    lines = []
    for key in unique_keys:
        xs, ys = _series(records, key)
        if xs:
            eps = _UNIQUE_RE.match(key).group(1)  # type: ignore[union-attr]
            lines.append((f"ε = {eps}", xs, _as_percent(ys)))
    if lines:
        panels.append(("Unique prototypes", "unique prototypes (% of K)", lines))
    k = first_present(_RANK_KEYS)
    if k and _series(records, k)[0]:
        panels.append(("Effective rank (RankMe)", "effective rank (dimensions)", [(k, *_series(records, k))]))
    if not panels:
        raise ValueError(
            "records contain none of the plottable series: loss, knn_top1, unique_<eps>, effective_rank"
        )
    ncols = 1 if len(panels) == 1 else 2
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure(6.0 * ncols, 3.6 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax, (name, ylabel, series) in zip(axes, panels):
        for label, xs, ys in series:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        ax.set_title(name)
        ax.set_xlabel("training step" if has_step else "epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return _save(fig, path)


# --------------------------------------------------------------------------- runs over epochs
def plot_runs_by_epoch(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    ylabel: str,
    title: str,
    percent: bool = False,
    styles: LineStyles | None = None,
) -> Path:
    """One metric of several runs against the epoch (e.g. unique prototypes at ε = 0.025).

    Args:
        series: ``label -> (epochs, values)``.
        percent: values are fractions in [0, 1], drawn as %.
        styles: as in :func:`plot_unique_vs_eps`.
    """
    if not series:
        raise ValueError("series is empty")
    fig = _new_figure(7.0 if len(series) <= _LEGEND_INSIDE_MAX else 8.5, 4.5)
    ax = fig.add_subplot()
    look = _styles_for(list(series), styles)
    for label, (epochs, values) in series.items():
        if len(epochs) != len(values):
            raise ValueError(f"series {label!r}: {len(epochs)} epochs but {len(values)} values")
        ys = [100.0 * v for v in values] if percent else list(values)
        ax.plot(list(epochs), ys, marker="o", markersize=3, label=label, **look[label])
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    _legend(ax, len(series))
    return _save(fig, path)
