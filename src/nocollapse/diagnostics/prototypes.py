"""Prototype-level collapse metrics: unique prototypes and pairwise cosine statistics.

Partial prototype collapse means that many of the K prototypes (rows of the last
layer) converge to nearly the same direction. It is measured here by counting
*unique* prototypes with a greedy cover (Definition 2.1 of "Why Prototypes
Collapse", as reimplemented):

1. L2-normalise the rows, ``u_k = c_k / ||c_k||``, in float64.
2. Scan the rows in index order. The first row that is not yet covered becomes a
   *representative*; every still-uncovered row ``v`` with cosine distance

   .. math:: d(u, v) = 1 - \\langle u, v \\rangle < \\varepsilon \\quad (\\text{strict})

   joins it (is covered).
3. The number of unique prototypes at ``ε`` is the number of representatives.

The cost is about ``#representatives x K x D`` multiply-adds, so a collapsed
matrix is cheap and a healthy one (every row a representative) is the worst case.
The implementation never forms a ``K x K`` matrix: candidate rows are taken a
block at a time, the order inside the block is resolved sequentially from the
block's own ``B x B`` Gram matrix, and only the block's representatives are then
compared with the rows after the block. All ε are computed in one pass: the
representatives of all thresholds share one similarity block.

Speed-up with exact results (``screen=True``, the default): the comparisons with
the rows after a block are first computed in float32. A float32 dot product of
two (float64-normalised) unit vectors differs from the float64 one by at most
``delta = 2 (D + 2) 2^-24`` (a conservative forward error bound, about ``3e-5``
for ``D = 256``). Only the columns whose best float32 similarity lies within
``delta`` of the threshold ``1 - ε`` are recomputed in float64, so every
decision is the float64 decision. Inside a block, a float32 Gram matrix likewise
only checks whether any pair can be within ε at all before the float64 one is
built. For a threshold whose representatives are a subset of the block's, the
maximum over all representatives and its arg-max decide most rows without
re-reading the similarities. Use ``screen=False`` for pure float64. Screening
is switched off automatically when float32 matmuls may run in reduced precision
(``torch.set_float32_matmul_precision`` other than ``"highest"``).

Conventions:

* ``ε <= 0`` gives ``K`` unique prototypes: a cosine distance is never negative
  (round-off that makes ``1 - <u, u>`` slightly negative is ignored).
* An all-zero row cannot be normalised; it is kept as the zero vector, which has
  cosine distance 1 to every row, itself and other zero rows included.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "STANDARD_EPS",
    "default_eps_grid",
    "unique_prototypes",
    "unique_fraction",
    "unique_curve",
    "pairwise_cosine_stats",
]

#: The collapse thresholds marked in "Why Prototypes Collapse" (Fig. 3a).
STANDARD_EPS: tuple[float, ...] = (0.025, 0.1, 0.25, 0.5)

_F32_UNIT = 2.0**-24
_SLACK = 1e-12  # absorbs float64 rounding of the thresholds themselves


def default_eps_grid() -> list[float]:
    """The default ε grid for :func:`unique_curve`: 0 to 1 in steps of 0.05 plus
    0.0125, 0.025 and 0.075 (24 points, including every standard ε)."""
    grid = {round(0.05 * i, 4) for i in range(21)} | {0.0125, 0.025, 0.075}
    return sorted(grid)


def _check_matrix(x: Tensor, name: str = "prototypes") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D tensor [K, D], got shape {tuple(x.shape)}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    if x.is_complex():
        raise ValueError(f"{name} must be real, got dtype {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _normalized_rows(prototypes: Tensor) -> Tensor:
    """Rows L2-normalised in float64 on the CPU (zero rows stay zero)."""
    x = _check_matrix(prototypes).detach().to(device="cpu", dtype=torch.float64, copy=True)
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x.div_(torch.where(norms > 0, norms, torch.ones_like(norms)))  # in place: own copy


def _as_eps_list(eps: float | Iterable[float]) -> list[float]:
    values = [float(eps)] if isinstance(eps, (int, float)) else [float(e) for e in eps]
    if not values:
        raise ValueError("eps must contain at least one threshold")
    for e in values:
        if not math.isfinite(e):
            raise ValueError(f"eps values must be finite, got {e}")
    return values


def _f32_dot_error_bound(dim: int) -> float:
    """Bound on |float32 dot - float64 dot| for two float64 unit vectors rounded to float32.

    Rounding the inputs costs at most ``(2u + u^2) sum |x_i y_i| <= 2.0001 u``, the float32
    dot product at most ``gamma_D (1 + u)^2`` with ``gamma_D = D u / (1 - D u)``, and the
    float64 reference itself ``D 2^-53``. ``2 (D + 2) u`` covers all three with room to spare.
    """
    return 2.0 * (dim + 2) * _F32_UNIT


def _float32_matmul_is_ieee() -> bool:
    """Whether float32 matmuls on the CPU run in full IEEE float32 (the bound needs it)."""
    try:
        if torch.get_float32_matmul_precision() != "highest":
            return False
    except (AttributeError, RuntimeError):
        return False
    backend = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    return getattr(backend, "fp32_precision", "none") in ("none", "ieee")


def _resolve_block(
    block: Tensor,
    block32: Tensor | None,
    candidates: np.ndarray,
    eps_values: Sequence[float],
    upper: Tensor,
    delta: float,
) -> np.ndarray:
    """Sequential greedy cover inside one block of rows.

    ``candidates[e, i]`` says whether row ``i`` of the block is still uncovered at
    threshold ``eps_values[e]`` when the block starts; ``upper`` is a boolean mask that
    is True on and above the diagonal (at least ``n x n``). When ``block32`` (the block
    in float32) is given, a float32 Gram matrix first checks whether any pair of the
    block can be within the largest ε at all (error bound ``delta``); if not, every
    candidate is a representative. Otherwise the float64 Gram matrix decides.
    Returns ``reps[e, i]``: row ``i`` becomes a representative at that threshold.
    """
    n = block.shape[0]
    reps = candidates.copy()
    if n < 2:
        return reps
    if block32 is not None:
        gram32 = block32 @ block32.T
        gram32.masked_fill_(upper[:n, :n], -math.inf)
        if float(gram32.max()) + delta + _SLACK < 1.0 - max(eps_values):
            return reps
    gram = block @ block.T
    gram.masked_fill_(upper[:n, :n], -math.inf)  # row j keeps <u_j, u_i> for earlier i < j
    # fl(1 - s) is monotone in s, so "some earlier row is closer than eps" is decided
    # exactly by the row maximum of the similarities.
    nearest = (1.0 - gram.amax(dim=1)).numpy()
    gram_np = gram.numpy()
    for e, eps in enumerate(eps_values):
        rep = reps[e]
        for j in np.flatnonzero(rep & (nearest < eps)):  # rows with an earlier row within eps
            if np.any(rep[:j] & ((1.0 - gram_np[j, :j]) < eps)):
                rep[j] = False  # covered by an earlier representative of this block
    return reps


def _cover_after_block(
    unit: Tensor,
    sims: Tensor,
    rep_rows: Tensor,
    sel: np.ndarray,
    cols: Tensor,
    cov: Tensor,
    eps_t: Tensor,
    delta: float,
) -> bool:
    """Mark the rows ``cols`` covered by this block's representatives, per threshold.

    ``sims[c, r]`` is the (float32 screened or float64) similarity of row ``cols[c]``
    with representative ``rep_rows[r]``; ``sel[e, r]`` says whether ``rep_rows[r]`` is a
    representative at threshold ``eps_t[e]``; ``cov[c, e]`` (updated in place) says
    whether row ``cols[c]`` is covered at ``eps_t[e]``. Thresholds with the same
    representatives are handled together, and only on the rows still uncovered at one
    of them. Returns whether anything was covered.
    """
    changed = False
    n_cols = cols.numel()
    groups: dict[bytes, list[int]] = {}
    for e in range(sel.shape[0]):
        if sel[e].any():
            groups.setdefault(np.packbits(sel[e]).tobytes(), []).append(e)
    # Best similarity over all representatives of the block, and which one attains it.
    # For a threshold whose representatives are a subset, the subset maximum equals it
    # wherever the arg-max is in the subset, and it is an upper bound everywhere else.
    best_all, arg_all = sims.max(dim=1)
    for members in groups.values():
        e_idx = torch.tensor(members)
        eps_g = eps_t[e_idx]
        cov_g = cov.index_select(1, e_idx)  # [c, E_g]
        open_mask = ~cov_g.all(dim=1)
        n_open = int(open_mask.sum())
        if n_open == 0:
            continue
        open_pos = None if n_open == n_cols else torch.nonzero(open_mask).squeeze(1)
        best = best_all if open_pos is None else best_all[open_pos]
        rows_mask = sel[members[0]]
        if rows_mask.all():
            rep_sub = rep_rows
        else:
            in_sub_rows = torch.from_numpy(rows_mask)
            rep_sub = rep_rows[in_sub_rows]
            arg = arg_all if open_pos is None else arg_all[open_pos]
            lowest = 1.0 - float(eps_g.max()) - delta - _SLACK
            unknown = ~in_sub_rows[arg] & (best.double() >= lowest)
            if bool(unknown.any()):
                unk = torch.nonzero(unknown).squeeze(1)
                rows_at = unk if open_pos is None else open_pos[unk]
                sub = sims.index_select(0, rows_at)
                sub.masked_fill_(~in_sub_rows[None, :], -math.inf)
                best = best.clone()
                best[unk] = sub.amax(dim=1)
        # nothing here is even close to the loosest threshold of the group
        if float(best.max()) + delta + _SLACK < 1.0 - float(eps_g.max()):
            continue
        best = best.double()[:, None]
        if delta > 0:
            thr = (1.0 - eps_g)[None, :]
            hit = best > thr + (delta + _SLACK)
            amb = (best >= thr - (delta + _SLACK)) & ~hit
            amb_rows = amb.any(dim=1)
            if bool(amb_rows.any()):  # re-decide near-threshold rows in float64
                where = torch.nonzero(amb_rows).squeeze(1)
                sub_cols = cols if open_pos is None else cols[open_pos]
                exact = (unit[sub_cols[where]] @ unit[rep_sub].T).amax(dim=1)
                ok = (1.0 - exact)[:, None] < eps_g[None, :]
                hit[where] |= amb[where] & ok
        else:
            hit = (1.0 - best) < eps_g[None, :]
        if bool(hit.any()):
            if open_pos is None:
                cov_g |= hit
            else:
                cov_g.index_copy_(0, open_pos, cov_g.index_select(0, open_pos) | hit)
            cov.index_copy_(1, e_idx, cov_g)
            changed = True
    return changed


def _greedy_cover_counts(
    unit: Tensor,
    eps_values: Sequence[float],
    block_size: int,
    screen: bool,
    chunk_elements: int,
) -> list[int]:
    """Number of greedy-cover representatives of ``unit`` rows for each ``eps > 0``."""
    num, dim = unit.shape
    n_eps = len(eps_values)
    if n_eps == 0:
        return []
    eps_t = torch.tensor(list(eps_values), dtype=torch.float64)
    covered = torch.zeros(num, n_eps, dtype=torch.bool)  # covered[k, e]
    counts = np.zeros(n_eps, dtype=np.int64)
    unit32 = unit.float() if screen else None
    cross = unit32 if unit32 is not None else unit  # compared with the rows after a block
    delta = _f32_dot_error_bound(dim) if screen else 0.0
    upper = torch.ones(block_size, block_size, dtype=torch.bool).triu_()
    buffer = torch.empty(0, dtype=cross.dtype)  # reused similarity chunk (avoids page faults)

    rem_idx = torch.arange(num)
    rem_cross = cross  # rows of `cross` at rem_idx (a view until covered rows are dropped)
    start: int | None = 0  # rem_idx == arange(start, num) while nothing was dropped
    while rem_idx.numel() > 0:
        n_blk = min(block_size, rem_idx.numel())
        blk = rem_idx[:n_blk]
        rest_idx, rest_cross = rem_idx[n_blk:], rem_cross[n_blk:]
        cand = np.ascontiguousarray((~covered[blk]).numpy().T)
        block32 = rem_cross[:n_blk] if unit32 is not None else None
        reps = _resolve_block(unit[blk], block32, cand, eps_values, upper, delta)
        covered[blk] = True
        counts += reps.sum(axis=1)
        union = reps.any(axis=0)
        n_rest = rest_idx.numel()
        rest_start = None if start is None else start + n_blk
        if n_rest and union.any():
            rep_rows = blk[torch.from_numpy(union)]
            queries = cross[rep_rows]
            sel = reps[:, union]
            n_union = int(rep_rows.numel())
            chunk = min(n_rest, max(256, chunk_elements // n_union))
            if buffer.numel() < n_union * chunk:
                buffer = torch.empty(n_union * chunk, dtype=cross.dtype)
            changed = False
            for c0 in range(0, n_rest, chunk):
                part = rest_cross[c0 : c0 + chunk]
                cols = rest_idx[c0 : c0 + chunk]
                sims = buffer[: n_union * part.shape[0]].view(part.shape[0], n_union)
                torch.mm(part, queries.T, out=sims)
                if rest_start is not None:  # contiguous rows: update `covered` through a view
                    cov = covered[rest_start + c0 : rest_start + c0 + cols.numel()]
                    changed |= _cover_after_block(unit, sims, rep_rows, sel, cols, cov, eps_t, delta)
                else:
                    cov = covered.index_select(0, cols)
                    if _cover_after_block(unit, sims, rep_rows, sel, cols, cov, eps_t, delta):
                        covered.index_copy_(0, cols, cov)
                        changed = True
            if changed:
                alive = ~covered.index_select(0, rest_idx).all(dim=1)
                n_alive = int(alive.sum())
                if n_alive == 0:
                    break
                if n_alive < n_rest - n_rest // 8:  # compact once an eighth of the rows is dead
                    rest_idx, rest_cross = rest_idx[alive], rest_cross[alive]
                    rest_start = None
        rem_idx, rem_cross, start = rest_idx, rest_cross, rest_start
    return [int(c) for c in counts]


def unique_prototypes(
    prototypes: Tensor,
    eps: float | Iterable[float] = STANDARD_EPS,
    block_size: int = 1024,
    *,
    screen: bool = True,
    chunk_elements: int = 1 << 24,
) -> dict[float, int]:
    """Number of unique prototypes at each collapse threshold ε (greedy cover, see module doc).

    ``U(ε) = #{representatives}`` where row ``v`` (in index order) is a representative iff
    no earlier representative ``u`` has ``1 - <u, v> < ε`` (rows L2-normalised, float64).

    Args:
        prototypes: ``[K, D]`` prototype rows (any real dtype or device; copied to CPU float64).
        eps: one threshold or several; all are computed in a single pass.
        block_size: rows per candidate block (memory ~ ``block_size^2`` float64 for the
            in-block Gram matrix). The result does not depend on it.
        screen: float32 screening with float64 re-checks near the threshold (exact, and faster;
            the measured speed-up is in docs/results.md, "Notes moved from the recipe files").
        chunk_elements: size in elements of each similarity chunk (bounds memory).

    Returns:
        ``{ε: count}`` with the ``ε`` values as given (as floats).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    eps_list = _as_eps_list(eps)
    unit = _normalized_rows(prototypes)
    num = unit.shape[0]
    positive = sorted({e for e in eps_list if e > 0})
    screen = screen and _float32_matmul_is_ieee()
    counts = dict(
        zip(positive, _greedy_cover_counts(unit, positive, block_size, screen, chunk_elements))
    )
    return {e: (num if e <= 0 else counts[e]) for e in eps_list}


def unique_fraction(
    prototypes: Tensor,
    eps: float | Iterable[float] = STANDARD_EPS,
    block_size: int = 1024,
    **kwargs: object,
) -> dict[float, float]:
    """Fraction of unique prototypes ``U(ε) / K`` per ε (see :func:`unique_prototypes`)."""
    num = _check_matrix(prototypes).shape[0]
    counts = unique_prototypes(prototypes, eps, block_size, **kwargs)  # type: ignore[arg-type]
    return {e: c / num for e, c in counts.items()}


def unique_curve(
    prototypes: Tensor,
    eps_grid: Iterable[float] | None = None,
    block_size: int = 1024,
    **kwargs: object,
) -> tuple[list[float], list[float]]:
    """Unique fraction over a grid of ε (default :func:`default_eps_grid`, 0 to 1).

    All grid points share one pass, so the cost is that of the smallest positive ε.
    ``ε = 0`` gives 1.0 by the strict inequality.

    Returns:
        ``(eps, fractions)`` as two lists of floats, ε sorted ascending.
    """
    grid = sorted(set(_as_eps_list(default_eps_grid() if eps_grid is None else eps_grid)))
    fractions = unique_fraction(prototypes, grid, block_size, **kwargs)
    return grid, [fractions[e] for e in grid]


def pairwise_cosine_stats(
    prototypes: Tensor,
    sample: int | None = 4096,
    *,
    seed: int = 0,
    block_size: int = 1024,
) -> dict[str, float | int | bool]:
    """Statistics of the cosine similarity ``<u_i, u_j>`` over distinct pairs ``i < j``.

    * ``mean`` is always exact over all ``K (K - 1)`` ordered pairs:
      ``(||sum_i u_i||^2 - sum_i ||u_i||^2) / (K (K - 1))``.
    * ``max`` and ``p99`` (99th percentile, linear interpolation) are exact when
      ``sample is None`` or ``K <= sample``. Otherwise they are computed over the pairs
      among ``sample`` rows drawn without replacement with ``torch.Generator`` seeded by
      ``seed`` (so the max is a lower bound of the true max).

    Memory is ``sample^2 / 2`` float64 values (64 MiB for 4096). Returns
    ``{"max", "p99", "mean", "rows", "sampled"}``.
    """
    unit = _normalized_rows(prototypes)
    num = unit.shape[0]
    if num < 2:
        raise ValueError("pairwise_cosine_stats needs at least 2 prototypes")
    if sample is not None and sample < 2:
        raise ValueError(f"sample must be >= 2 or None, got {sample}")
    total = unit.sum(dim=0)
    mean = (float(total @ total) - float((unit * unit).sum())) / (num * (num - 1))
    sampled = sample is not None and num > sample
    if sampled:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(num, generator=gen)[:sample].sort().values
        rows = unit[idx]
    else:
        rows = unit
    n = rows.shape[0]
    values = np.empty(n * (n - 1) // 2, dtype=np.float64)
    pos = 0
    for i0 in range(0, n, block_size):
        i1 = min(n, i0 + block_size)
        gram = (rows[i0:i1] @ rows[i0:].T).numpy()
        for r in range(i1 - i0):
            seg = gram[r, r + 1 :]
            values[pos : pos + seg.size] = seg
            pos += seg.size
    return {
        "max": float(values.max()),
        "p99": float(np.quantile(values, 0.99)),
        "mean": mean,
        "rows": int(n),
        "sampled": bool(sampled),
    }
