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

On a CUDA device the same cover runs there (rows normalised in float64 on the
device, the similarity matmuls on the device; screening only when TF32 is off).

Large K: a sampled estimate with its error
------------------------------------------
A healthy matrix costs the exact cover all ``K^2 / 2`` pairs. :func:`unique_estimate`
therefore chooses, unless told (``exact=True`` / ``exact=False``):

* the exact cover when ``K <= max_exact`` (default :data:`EXACT_MAX_ROWS`) or when the
  prototypes are on a CUDA device;
* otherwise an estimate from ``m = sample_rows`` rows (default :data:`SAMPLE_ROWS`)
  drawn uniformly without replacement by a generator seeded with ``seed``, so a call
  is reproducible.

Each sampled row's status is resolved exactly, by the definition above read
backwards: row ``j`` is a representative iff none of its *earlier ε-neighbours*
(rows ``i < j`` with ``1 - <u_i, u_j> < ε``) is a representative. The neighbours of
all sampled rows come from one blocked similarity pass against the rows before them
(float32 screening with float64 re-checks near the threshold, as above, so every
neighbour decision is the float64 one; about ``m x K / 2 x D`` multiply-adds). A
memoised recursion then settles their statuses: a row is covered as soon as one of
its earlier neighbours is known to be a representative; a row with no earlier
neighbour, or whose earlier neighbours are all covered, is a representative;
otherwise its earliest neighbour of unknown status is resolved first (the earliest
rows are the likeliest representatives and the cheapest to resolve). The
neighbourhoods the recursion asks for are computed in batches, one per round, and
at most ``neighbour_segment`` neighbours are kept per row at a time (the next ones
are scanned only if all kept ones turn out covered). In tight clusters a row is
settled by one more neighbourhood, its cluster's first row; chains of rows, each
within ε of the next, need one per link. The extra work is capped at
``max_extra_cost`` times the first pass; a threshold still unsettled at the cap is
computed by the exact cover instead (cheap when it has few representatives) and
reported as exact.

Every sampled row thus has the status the exact cover gives it. With ``x``
representatives among the ``m`` sampled rows, the unique fraction is estimated by
``x / m`` (unbiased; the count by ``K x / m``) with the standard error of sampling
without replacement,

.. math:: \\mathrm{se} = \\sqrt{\\tilde p (1 - \\tilde p) / m \\cdot (K - m) / (K - 1)},
          \\qquad \\tilde p = (x + 2) / (m + 4),

where the adjusted ``p~`` (Agresti-Coull) keeps the error above zero when every
sampled row is unique (or none is).

Which measures are exact and which sampled:

* :func:`unique_prototypes`, :func:`unique_fraction` and :func:`unique_curve` are
  exact by default (``exact=True``); ``exact=None`` gives them the automatic choice
  (a sampled count is then rounded to an integer).
* :func:`unique_estimate` chooses automatically by default and says, per ε, whether
  its figure is exact and its standard error (0 when exact).
* :func:`pairwise_cosine_stats`: ``mean`` is always exact; ``max`` and ``p99`` are
  taken over ``sample`` rows (4,096 by default) when K is larger.
* :func:`prototype_geometry`, the per-epoch geometry of
  :class:`~nocollapse.diagnostics.monitor.CollapseMonitor` and so of the trainer, uses
  the automatic choice and writes ``unique_sampled_rows`` (0 when every ε is exact)
  and, when sampled, ``unique_<ε>_stderr``.

Conventions:

* ``ε <= 0`` gives ``K`` unique prototypes: a cosine distance is never negative
  (round-off that makes ``1 - <u, u>`` slightly negative is ignored).
* An all-zero row cannot be normalised; it is kept as the zero vector, which has
  cosine distance 1 to every row, itself and other zero rows included.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "STANDARD_EPS",
    "EXACT_MAX_ROWS",
    "SAMPLE_ROWS",
    "UniqueEstimate",
    "default_eps_grid",
    "unique_prototypes",
    "unique_estimate",
    "unique_fraction",
    "unique_curve",
    "pairwise_cosine_stats",
    "prototype_geometry",
]

#: The collapse thresholds marked in "Why Prototypes Collapse" (Fig. 3a).
STANDARD_EPS: tuple[float, ...] = (0.025, 0.1, 0.25, 0.5)

# Defaults of the cover's tuning knobs, shared by unique_estimate and prototype_geometry (the
# results do not depend on the first two).
_BLOCK_SIZE = 1024
_CHUNK_ELEMENTS = 1 << 24
_MAX_EXTRA_COST = 1.0
_NEIGHBOUR_SEGMENT = 256

#: Up to this many prototypes the automatic choice of :func:`unique_estimate` is the exact cover
#: on the CPU (its cost grows as K^2 for a healthy matrix; the estimate's as K).
EXACT_MAX_ROWS = 8192

#: Rows the sampled estimate draws (its standard error is at most about ``0.5 / sqrt(m)``).
SAMPLE_ROWS = 2048

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
    if x.is_floating_point():
        # NaN and infinities propagate to the extremes: no [K, D] boolean mask is needed
        lo, hi = torch.aminmax(x.detach())
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _normalized_rows(prototypes: Tensor, device: torch.device | str = "cpu") -> Tensor:
    """Rows L2-normalised in float64 on ``device`` (the CPU by default; zero rows stay zero)."""
    x = _check_matrix(prototypes).detach().to(device=device, dtype=torch.float64, copy=True)
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x.div_(torch.where(norms > 0, norms, torch.ones_like(norms)))  # in place: own copy


def _accelerated(device: torch.device) -> bool:
    """Whether the exact cover runs on ``device`` itself rather than on the CPU (CUDA: fast
    float64 and float32 matmuls; other accelerators may lack float64, so they use the CPU)."""
    return device.type == "cuda"


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


def _float32_matmul_is_ieee(device: torch.device | str = "cpu") -> bool:
    """Whether float32 matmuls on ``device`` run in full IEEE float32 (the bound needs it)."""
    try:
        if torch.get_float32_matmul_precision() != "highest":
            return False
    except (AttributeError, RuntimeError):
        return False
    if torch.device(device).type == "cuda":
        cuda_matmul = torch.backends.cuda.matmul
        if getattr(cuda_matmul, "allow_tf32", False):
            return False
        backend = cuda_matmul
    else:
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
    nearest = (1.0 - gram.amax(dim=1)).cpu().numpy()
    gram_np = gram.cpu().numpy()
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
    device = sims.device
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
        e_idx = torch.tensor(members, device=device)
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
            in_sub_rows = torch.from_numpy(rows_mask).to(device)
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
    """Number of greedy-cover representatives of ``unit`` rows for each ``eps > 0``.

    Everything runs on ``unit``'s device; only the sequential part inside a block
    (:func:`_resolve_block`) and the per-threshold bookkeeping read values on the host."""
    num, dim = unit.shape
    device = unit.device
    n_eps = len(eps_values)
    if n_eps == 0:
        return []
    eps_t = torch.tensor(list(eps_values), dtype=torch.float64, device=device)
    covered = torch.zeros(num, n_eps, dtype=torch.bool, device=device)  # covered[k, e]
    counts = np.zeros(n_eps, dtype=np.int64)
    unit32 = unit.float() if screen else None
    cross = unit32 if unit32 is not None else unit  # compared with the rows after a block
    delta = _f32_dot_error_bound(dim) if screen else 0.0
    upper = torch.ones(block_size, block_size, dtype=torch.bool, device=device).triu_()
    buffer = torch.empty(0, dtype=cross.dtype, device=device)  # reused similarity chunk (no page faults)

    rem_idx = torch.arange(num, device=device)
    rem_cross = cross  # rows of `cross` at rem_idx (a view until covered rows are dropped)
    start: int | None = 0  # rem_idx == arange(start, num) while nothing was dropped
    while rem_idx.numel() > 0:
        n_blk = min(block_size, rem_idx.numel())
        blk = rem_idx[:n_blk]
        rest_idx, rest_cross = rem_idx[n_blk:], rem_cross[n_blk:]
        cand = np.ascontiguousarray((~covered[blk]).cpu().numpy().T)
        block32 = rem_cross[:n_blk] if unit32 is not None else None
        reps = _resolve_block(unit[blk], block32, cand, eps_values, upper, delta)
        covered[blk] = True
        counts += reps.sum(axis=1)
        union = reps.any(axis=0)
        n_rest = rest_idx.numel()
        rest_start = None if start is None else start + n_blk
        if n_rest and union.any():
            rep_rows = blk[torch.from_numpy(union).to(device)]
            queries = cross[rep_rows]
            sel = reps[:, union]
            n_union = int(rep_rows.numel())
            chunk = min(n_rest, max(256, chunk_elements // n_union))
            if buffer.numel() < n_union * chunk:
                buffer = torch.empty(n_union * chunk, dtype=cross.dtype, device=device)
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


class _Record:
    """The earlier ε-neighbours found so far of one row (see :class:`_SampledCover`).

    ``idx``: their indices, ascending; ``within[e, n]``: whether ``idx[n]`` is within
    ``eps[e]`` of the row; ``end``: every column ``< end`` has been scanned (the record is
    complete when ``end`` is the row itself)."""

    __slots__ = ("idx", "within", "end")

    def __init__(self, idx: np.ndarray, within: np.ndarray, end: int) -> None:
        self.idx, self.within, self.end = idx, within, end

    def extend(self, idx: np.ndarray, within: np.ndarray, end: int) -> None:
        self.idx = np.concatenate([self.idx, idx])
        self.within = np.concatenate([self.within, within], axis=1)
        self.end = end


# A scan of a few rows reads as much memory as one of this many (the matmul is memory bound):
# the work of a scan is counted as at least this many rows.
_MIN_SCAN_ROWS = 32
# Rows scanned together: all of them are compared with the columns before the last one, so a
# smaller group wastes less on the earlier rows of the group.
_MAX_SCAN_GROUP = 128
# Unscanned neighbours a blocked row asks for at once (see _SampledCover._resolve_one). A few, the
# earliest: in a tight cluster the earliest is the cluster's first row, a representative that
# settles the row at once; asking for all of them (a copy has as many earlier neighbours as its
# cluster has rows before it) spent the work cap on scans that decide nothing, so that a matrix of
# half copies fell back to the exact cover.
_FANOUT = 4


class _SampledCover:
    """Greedy-cover status of chosen rows without covering the rest (module doc, "Large K").

    ``status[e, k]`` is 1 when row ``k`` is a representative at ``eps[e]``, 0 when it is
    covered and -1 while unknown. Rows are scanned for their earlier neighbours on
    ``unit``'s device; the recursion runs on the host. ``cost`` counts the work of the
    scans in row-column products (``D`` multiply-adds each)."""

    def __init__(self, unit: Tensor, eps_values: Sequence[float], screen: bool, chunk_elements: int,
                 segment: int) -> None:
        self.unit = unit
        self.num, dim = unit.shape
        self.eps = [float(e) for e in eps_values]
        self.cross = unit.float() if screen else unit
        self.delta = _f32_dot_error_bound(dim) if screen else 0.0
        # below this similarity no pair is within the loosest eps; with screening the float32
        # comparison itself may round the bound up by half an ulp, which a second delta covers
        self.low = 1.0 - max(self.eps) - 2.0 * self.delta - _SLACK
        self.eps_t = torch.tensor(self.eps, dtype=torch.float64, device=unit.device)[:, None]
        self.chunk_elements = chunk_elements
        self.segment = segment
        self.fanout = _FANOUT
        self.status = np.full((len(self.eps), self.num), -1, dtype=np.int8)
        self.records: dict[int, _Record] = {}
        self.cost = 0
        self.buffer = torch.empty(0, dtype=self.cross.dtype, device=unit.device)  # reused (no page faults)

    # ---- scanning -----------------------------------------------------------------------
    def _groups(self, requests: dict[int, int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """The requests ``{row: first column}`` as groups of rows scanned together."""
        rows = np.array(sorted(requests), dtype=np.int64)
        starts = np.array([requests[int(r)] for r in rows], dtype=np.int64)
        size = max(1, min(_MAX_SCAN_GROUP, self.chunk_elements // max(1, int(rows[-1]))))
        return [(rows[g:g + size], starts[g:g + size]) for g in range(0, rows.size, size)]

    def scan_cost(self, requests: dict[int, int]) -> int:
        """The work :meth:`scan` will count for ``requests``."""
        return sum(max(r.size, _MIN_SCAN_ROWS) * max(0, int(r.max()) - int(s.min()))
                   for r, s in self._groups(requests))

    def scan(self, requests: dict[int, int]) -> None:
        """Record, for each ``row: start`` of ``requests``, the first ``segment`` rows ``i`` in
        ``[start, row)`` (ascending) that may be within the loosest ε, with the exact decision per ε."""
        for rows, starts in self._groups(requests):
            self._scan_group(rows, starts)

    def _scan_group(self, rows: np.ndarray, starts: np.ndarray) -> None:
        lo, hi = int(starts.min()), int(rows.max())
        self.cost += max(rows.size, _MIN_SCAN_ROWS) * max(0, hi - lo)
        device = self.unit.device
        n_eps = len(self.eps)
        if hi <= lo:
            counts = np.zeros(rows.size, dtype=np.int64)
            cols_np = np.zeros(0, dtype=np.int64)
            within_np = np.zeros((n_eps, 0), dtype=bool)
        else:
            rows_t = torch.from_numpy(rows).to(device)
            starts_t = torch.from_numpy(starts).to(device)
            size = rows.size * (hi - lo)
            if self.buffer.numel() < size:
                self.buffer = torch.empty(size, dtype=self.cross.dtype, device=device)
            sims = self.buffer[:size].view(rows.size, hi - lo)
            torch.mm(self.cross[rows_t], self.cross[lo:hi].T, out=sims)
            ri, ci = torch.nonzero(sims >= self.low, as_tuple=True)  # row-major: columns ascending
            # only the columns in [start, row) of each row
            inside = (ci >= starts_t[ri] - lo) & (ci < rows_t[ri] - lo)
            ri, ci = ri[inside], ci[inside]
            counts_t = torch.bincount(ri, minlength=rows.size)
            first = torch.cumsum(counts_t, 0) - counts_t
            keep = (torch.arange(ri.numel(), device=device) - first[ri]) < self.segment
            ri, ci = ri[keep], ci[keep]
            within = self._within(rows_t[ri], ci + lo, sims[ri, ci].double())
            counts = counts_t.cpu().numpy()
            cols_np = (ci + lo).cpu().numpy()
            within_np = within.cpu().numpy()
        kept = np.minimum(counts, self.segment)
        bounds = np.concatenate([[0], np.cumsum(kept)])
        for k, row in enumerate(rows.tolist()):
            a, b = int(bounds[k]), int(bounds[k + 1])
            idx, inside = cols_np[a:b], within_np[:, a:b]
            end = int(idx[-1]) + 1 if counts[k] > self.segment else row
            record = self.records.get(row)
            if record is None:
                if end == row and not inside.any():
                    self.status[:, row] = 1  # no earlier row within any eps: a representative
                self.records[row] = _Record(idx, inside, end)
            else:
                record.extend(idx, inside, end)

    def _within(self, rows: Tensor, cols: Tensor, sims: Tensor) -> Tensor:
        """``[E, n]``: pair ``(rows[n], cols[n])`` is within ``eps[e]``, decided as in float64."""
        if self.delta == 0:  # the similarities are float64 already
            return (1.0 - sims)[None, :] < self.eps_t
        thr = 1.0 - self.eps_t
        margin = self.delta + _SLACK
        hit = sims[None, :] > thr + margin
        amb = (sims[None, :] >= thr - margin) & ~hit
        pairs = torch.nonzero(amb.any(dim=0)).squeeze(1)
        if pairs.numel():  # near a threshold: decide in float64
            exact = (self.unit[rows[pairs]] * self.unit[cols[pairs]]).sum(dim=1)
            hit[:, pairs] |= amb[:, pairs] & ((1.0 - exact)[None, :] < self.eps_t)
        return hit

    # ---- resolving ----------------------------------------------------------------------
    def resolve(self, roots: np.ndarray, eps_index: Sequence[int]) -> dict[int, int]:
        """Settle what the recorded neighbourhoods allow; return the scans still needed."""
        requests: dict[int, int] = {}
        for e in eps_index:
            status = self.status[e]
            blocked: set[int] = set()  # rows that wait for a scan this round
            for root in roots[status[roots] < 0].tolist():
                self._resolve_one(root, e, status, requests, blocked)
        return requests

    def _resolve_one(self, root: int, e: int, status: np.ndarray, requests: dict[int, int],
                     blocked: set[int]) -> None:
        """Depth-first over earlier neighbours, earliest first (each step goes to a smaller
        index, so it ends). A row none of whose undecided neighbours can be explored this round
        is blocked: it asks for the scans of its first ``fanout`` unscanned undecided
        neighbours (or for the rest of its own scan), and its parent goes on with its other
        neighbours. Asking for several at once saves rounds when a row turns out to be a
        representative, which needs every neighbour decided."""
        records = self.records
        stack = [root]
        while stack:
            row = stack[-1]
            if status[row] >= 0 or row in blocked:
                stack.pop()
                continue
            record = records.get(row)
            if record is None:  # never scanned
                requests.setdefault(row, 0)
                blocked.add(row)
                stack.pop()
                continue
            near = record.idx[record.within[e]]
            known = status[near]
            if (known == 1).any():  # an earlier representative covers it
                status[row] = 0
                stack.pop()
                continue
            unknown = near[known < 0].tolist()
            if unknown:
                explore = next((i for i in unknown if i in records and i not in blocked), None)
                if explore is not None:
                    stack.append(explore)
                    continue
                for i in [i for i in unknown if i not in records][: self.fanout]:
                    requests.setdefault(i, 0)
                blocked.add(row)
                stack.pop()
                continue
            if record.end >= row:  # every earlier neighbour is covered
                status[row] = 1
                stack.pop()
                continue
            requests[row] = record.end  # all recorded ones are covered: scan on
            blocked.add(row)
            stack.pop()


def _sampled_cover_status(
    unit: Tensor,
    eps_values: Sequence[float],
    rows: np.ndarray,
    *,
    screen: bool,
    chunk_elements: int,
    segment: int,
    max_extra_cost: float,
) -> tuple[np.ndarray, list[int]]:
    """Greedy-cover status ``[E, len(rows)]`` (1 representative, 0 covered, -1 unsettled) of
    the sorted ``rows``, and the indices of the thresholds left unsettled at the work cap."""
    cover = _SampledCover(unit, eps_values, screen, chunk_elements, segment)
    cover.scan({int(r): 0 for r in rows})
    budget = cover.cost * (1.0 + max_extra_cost)
    open_eps = list(range(len(eps_values)))
    while open_eps:
        requests = cover.resolve(rows, open_eps)
        open_eps = [e for e in open_eps if (cover.status[e, rows] < 0).any()]
        if not requests or cover.cost + cover.scan_cost(requests) > budget:
            break
        cover.scan(requests)
    return cover.status[:, rows], open_eps


@dataclass(frozen=True)
class UniqueEstimate:
    """Unique prototypes at each ε, exact or estimated from sampled rows (see the module doc).

    Attributes:
        num_prototypes: K.
        counts: ``{ε: number of unique prototypes}``; an estimate ``K x / m`` where sampled
            (a float; exact counts are whole numbers).
        fractions: ``{ε: counts[ε] / K}``.
        stderr: ``{ε: standard error of the fraction}``, 0.0 where exact.
        exact: ``{ε: whether the figure is the exact greedy cover}``.
        sampled_rows: ``m``, the rows sampled; 0 when every ε is exact.
    """

    num_prototypes: int
    counts: dict[float, float]
    fractions: dict[float, float]
    stderr: dict[float, float]
    exact: dict[float, bool]
    sampled_rows: int


def _estimate_from_unit(
    unit: Tensor,
    eps_list: Sequence[float],
    *,
    use_exact: bool,
    sample_rows: int,
    seed: int,
    block_size: int,
    screen: bool,
    chunk_elements: int,
    max_extra_cost: float,
    neighbour_segment: int,
) -> UniqueEstimate:
    """:func:`unique_estimate` on rows already normalised (on the device to compute on)."""
    num = unit.shape[0]
    positive = sorted({e for e in eps_list if e > 0})
    screen = screen and _float32_matmul_is_ieee(unit.device)
    counts: dict[float, float] = {}
    stderr: dict[float, float] = {}
    exact_eps = list(positive) if use_exact else []
    m = 0
    if positive and not use_exact:
        gen = torch.Generator().manual_seed(seed)
        rows = torch.randperm(num, generator=gen)[:sample_rows].sort().values.numpy()
        m = int(rows.size)
        status, unsettled = _sampled_cover_status(
            unit, positive, rows, screen=screen, chunk_elements=chunk_elements,
            segment=neighbour_segment, max_extra_cost=max_extra_cost)
        fpc = (num - m) / (num - 1) if num > 1 else 0.0
        for e, eps in enumerate(positive):
            if e in unsettled:
                exact_eps.append(eps)
                continue
            reps = int((status[e] == 1).sum())
            adjusted = (reps + 2) / (m + 4)
            counts[eps] = num * reps / m
            stderr[eps] = math.sqrt(adjusted * (1.0 - adjusted) / m * fpc)
        if len(exact_eps) == len(positive):
            m = 0
    exact_eps.sort()
    counts.update(zip(exact_eps, (float(c) for c in _greedy_cover_counts(
        unit, exact_eps, block_size, screen, chunk_elements))))
    stderr.update({e: 0.0 for e in exact_eps})
    out_counts = {e: (float(num) if e <= 0 else counts[e]) for e in eps_list}
    return UniqueEstimate(
        num_prototypes=num,
        counts=out_counts,
        fractions={e: c / num for e, c in out_counts.items()},
        stderr={e: (0.0 if e <= 0 else stderr[e]) for e in eps_list},
        exact={e: (e <= 0 or e in exact_eps) for e in eps_list},
        sampled_rows=m,
    )


def _check_estimate_options(block_size: int, chunk_elements: int, sample_rows: int, max_exact: int,
                            max_extra_cost: float, neighbour_segment: int) -> None:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    if sample_rows < 1:
        raise ValueError(f"sample_rows must be >= 1, got {sample_rows}")
    if max_exact < 0:
        raise ValueError(f"max_exact must be >= 0, got {max_exact}")
    if not max_extra_cost >= 0:
        raise ValueError(f"max_extra_cost must be >= 0, got {max_extra_cost}")
    if neighbour_segment < 1:
        raise ValueError(f"neighbour_segment must be >= 1, got {neighbour_segment}")


def _compute_device(prototypes: Tensor) -> torch.device:
    """Where the cover runs: the prototypes' own device when accelerated, else the CPU."""
    return prototypes.device if _accelerated(prototypes.device) else torch.device("cpu")


def _choose_exact(exact: bool | None, num: int, device: torch.device, max_exact: int, sample_rows: int) -> bool:
    """The automatic choice (module doc): exact for small K, on an accelerator, or when the
    sample would hold every row anyway."""
    if sample_rows >= num:
        return True
    if exact is None:
        return num <= max_exact or _accelerated(device)
    return bool(exact)


def unique_estimate(
    prototypes: Tensor,
    eps: float | Iterable[float] = STANDARD_EPS,
    *,
    exact: bool | None = None,
    max_exact: int = EXACT_MAX_ROWS,
    sample_rows: int = SAMPLE_ROWS,
    seed: int = 0,
    block_size: int = _BLOCK_SIZE,
    screen: bool = True,
    chunk_elements: int = _CHUNK_ELEMENTS,
    max_extra_cost: float = _MAX_EXTRA_COST,
    neighbour_segment: int = _NEIGHBOUR_SEGMENT,
) -> UniqueEstimate:
    """Unique prototypes at each ε: the exact greedy cover or, for large K on the CPU, an
    unbiased estimate from sampled rows with its standard error (module doc, "Large K").

    Args:
        prototypes: ``[K, D]`` prototype rows (any real dtype or device).
        eps: one threshold or several; all share one pass.
        exact: ``True``: the exact cover; ``False``: sample (unless ``sample_rows >= K``);
            ``None`` (default): exact when ``K <= max_exact`` or the prototypes are on a CUDA
            device (the cover then runs there), sampled otherwise.
        max_exact: the largest K covered exactly on the CPU by the automatic choice.
        sample_rows: rows ``m`` drawn without replacement for the estimate.
        seed: seed of the generator that draws them (the same rows on every call).
        block_size, screen, chunk_elements: as in :func:`unique_prototypes` (the result does
            not depend on them).
        max_extra_cost: work the recursion may add to the first similarity pass, as a multiple
            of it; a threshold still unsettled then is covered exactly instead.
        neighbour_segment: earlier neighbours kept per sampled row at a time.

    Returns:
        A :class:`UniqueEstimate`: counts, fractions, standard errors and, per ε, whether
        the figure is exact.
    """
    _check_estimate_options(block_size, chunk_elements, sample_rows, max_exact, max_extra_cost,
                            neighbour_segment)
    eps_list = _as_eps_list(eps)
    device = _compute_device(_check_matrix(prototypes))
    use_exact = _choose_exact(exact, prototypes.shape[0], device, max_exact, sample_rows)
    return _estimate_from_unit(
        _normalized_rows(prototypes, device), eps_list, use_exact=use_exact, sample_rows=sample_rows,
        seed=seed, block_size=block_size, screen=screen, chunk_elements=chunk_elements,
        max_extra_cost=max_extra_cost, neighbour_segment=neighbour_segment)


def unique_prototypes(
    prototypes: Tensor,
    eps: float | Iterable[float] = STANDARD_EPS,
    block_size: int = 1024,
    *,
    screen: bool = True,
    chunk_elements: int = 1 << 24,
    exact: bool | None = True,
    max_exact: int = EXACT_MAX_ROWS,
    sample_rows: int = SAMPLE_ROWS,
    seed: int = 0,
) -> dict[float, int]:
    """Number of unique prototypes at each collapse threshold ε (greedy cover, see module doc).

    ``U(ε) = #{representatives}`` where row ``v`` (in index order) is a representative iff
    no earlier representative ``u`` has ``1 - <u, v> < ε`` (rows L2-normalised, float64).

    Args:
        prototypes: ``[K, D]`` prototype rows (any real dtype or device; the cover runs on a
            CUDA device when the rows are there, on the CPU in float64 otherwise).
        eps: one threshold or several; all are computed in a single pass.
        block_size: rows per candidate block (memory ~ ``block_size^2`` float64 for the
            in-block Gram matrix). The result does not depend on it.
        screen: float32 screening with float64 re-checks near the threshold (exact, and faster;
            the measured speed-up is in docs/results.md, "Notes moved from the recipe files").
        chunk_elements: size in elements of each similarity chunk (bounds memory).
        exact: ``True`` (default): the exact cover, whatever K. ``None``: the automatic choice
            of :func:`unique_estimate` (exact up to ``max_exact`` rows on the CPU, sampled
            above); a sampled count is ``K x / m`` rounded to an integer, and
            :func:`unique_estimate` gives its standard error.
        max_exact, sample_rows, seed: as in :func:`unique_estimate`.

    Returns:
        ``{ε: count}`` with the ``ε`` values as given (as floats).
    """
    est = unique_estimate(prototypes, eps, exact=exact, max_exact=max_exact, sample_rows=sample_rows,
                          seed=seed, block_size=block_size, screen=screen, chunk_elements=chunk_elements)
    return {e: int(round(c)) for e, c in est.counts.items()}


def unique_fraction(
    prototypes: Tensor,
    eps: float | Iterable[float] = STANDARD_EPS,
    block_size: int = 1024,
    **kwargs: object,
) -> dict[float, float]:
    """Fraction of unique prototypes ``U(ε) / K`` per ε (see :func:`unique_prototypes`; the
    keyword arguments are its own, ``exact=True`` by default)."""
    kwargs.setdefault("exact", True)
    return dict(unique_estimate(prototypes, eps, block_size=block_size, **kwargs).fractions)  # type: ignore[arg-type]


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


def _pairwise_from_unit(unit: Tensor, sample: int | None, seed: int, block_size: int) -> dict[str, float | int | bool]:
    """:func:`pairwise_cosine_stats` on rows already normalised in float64 on the CPU."""
    num = unit.shape[0]
    if num < 2:
        raise ValueError("pairwise_cosine_stats needs at least 2 prototypes")
    if sample is not None and sample < 2:
        raise ValueError(f"sample must be >= 2 or None, got {sample}")
    total = unit.sum(dim=0)
    flat = unit.reshape(-1)
    mean = (float(total @ total) - float(flat @ flat)) / (num * (num - 1))  # no [K, D] temporary
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
        # the pairs (i, j) with j > i of this block: column c of row r is row i0 + c
        upper = np.arange(n - i0)[None, :] > np.arange(i1 - i0)[:, None]
        seg = gram[upper]
        values[pos : pos + seg.size] = seg
        pos += seg.size
    return {
        "max": float(values.max()),
        # the order of the values does not matter; the quantile may reorder its own buffer
        "p99": float(np.quantile(values, 0.99, overwrite_input=True)),
        "mean": mean,
        "rows": int(n),
        "sampled": bool(sampled),
    }


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
    return _pairwise_from_unit(_normalized_rows(prototypes), sample, seed, block_size)


def prototype_geometry(
    prototypes: Tensor,
    eps: Iterable[float] = STANDARD_EPS,
    *,
    exact: bool | None = None,
    max_exact: int = EXACT_MAX_ROWS,
    sample_rows: int = SAMPLE_ROWS,
    pairwise_sample: int | None = 4096,
    seed: int = 0,
) -> dict[str, float | int]:
    """The per-epoch prototype geometry of :class:`~nocollapse.diagnostics.monitor.CollapseMonitor`
    (and so of the trainer), as flat metrics; the rows are normalised once for all of them.

    Keys: ``unique_<ε>`` (the unique fraction, :func:`unique_estimate` with the automatic
    choice by default), ``unique_sampled_rows`` (rows sampled for it, 0 when every ε is
    exact), ``unique_<ε>_stderr`` (its standard error, only when rows were sampled; 0.0 for an
    ε that was covered exactly) and ``pairwise_cosine_max`` / ``pairwise_cosine_p99``
    (:func:`pairwise_cosine_stats` over ``pairwise_sample`` rows; only for K >= 2).
    """
    eps_list = _as_eps_list(eps)
    _check_estimate_options(_BLOCK_SIZE, _CHUNK_ELEMENTS, sample_rows, max_exact, _MAX_EXTRA_COST,
                            _NEIGHBOUR_SEGMENT)
    device = _compute_device(_check_matrix(prototypes))
    num = prototypes.shape[0]
    use_exact = _choose_exact(exact, num, device, max_exact, sample_rows)
    unit = _normalized_rows(prototypes, device)
    est = _estimate_from_unit(unit, eps_list, use_exact=use_exact, sample_rows=sample_rows, seed=seed,
                              block_size=_BLOCK_SIZE, screen=True, chunk_elements=_CHUNK_ELEMENTS,
                              max_extra_cost=_MAX_EXTRA_COST, neighbour_segment=_NEIGHBOUR_SEGMENT)
    metrics: dict[str, float | int] = {f"unique_{e:g}": est.fractions[e] for e in eps_list}
    metrics["unique_sampled_rows"] = est.sampled_rows
    if est.sampled_rows:
        metrics.update({f"unique_{e:g}_stderr": est.stderr[e] for e in eps_list})
    if num >= 2:
        host = unit if unit.device.type == "cpu" else unit.cpu()
        pc = _pairwise_from_unit(host, pairwise_sample, seed, _BLOCK_SIZE)
        metrics["pairwise_cosine_max"] = pc["max"]
        metrics["pairwise_cosine_p99"] = pc["p99"]
    return metrics
