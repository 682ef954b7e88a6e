"""Benchmark: ``CollapseMonitor.end_epoch(prototypes=...)`` at K = 65,536, D = 256 on one CPU thread.

Cases (rows in random index order, as a trained prototype matrix has them):

* ``healthy``: i.i.d. Gaussian rows, every row unique (the worst case of an exact cover);
* ``partial``: half of the rows are copies (plus tiny noise) of 256 directions, half healthy;
* ``loose``: every row near one of 512 directions with a spread close to the standard ε, so
  whether two rows of a direction merge depends on ε and on which rows came first (the hardest
  case for the sampled estimate, which must resolve chains of neighbours);
* the same three at K = 2048 for reference (exact there).

Each case runs ``end_epoch`` on a fresh monitor and reports its wall time against the goal
(under 2 s at K = 65,536) and the epoch metrics it wrote. The ``estimator`` part compares the
sampled estimate of the unique fraction with the exact greedy cover on matrices small enough to
cover exactly (K = 16,384 by default), over several sampling seeds: the error, the error in
units of the stated standard error, and how often the exact value lies within two of them.
Prints one JSON object.

    python benchmarks/monitor_epoch.py [--threads 1] [--num 65536] [--dim 256] [--cases healthy partial ...]
        [--estimator-num 16384] [--seeds 20] [--no-estimator]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

GOAL_SECONDS = 2.0
CASES = ("healthy", "partial", "loose")


def make_matrix(case: str, num: int, dim: int, seed: int = 0):
    """A ``[num, dim]`` prototype matrix of the given kind, rows in random order."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    if case == "healthy":
        return torch.randn(num, dim, generator=gen)
    if case == "partial":
        centers = torch.nn.functional.normalize(torch.randn(256, dim, generator=gen), dim=1)
        rows = torch.nn.functional.normalize(torch.randn(num, dim, generator=gen), dim=1)
        copies = torch.randperm(num, generator=gen)[: num // 2]
        labels = torch.randint(0, centers.shape[0], (copies.numel(),), generator=gen)
        rows[copies] = centers[labels] + 1e-3 / dim**0.5 * torch.randn(copies.numel(), dim, generator=gen)
        return rows
    if case == "loose":
        # noise of norm ~0.33 per row: two rows of one direction are ~0.1 apart in cosine distance
        centers = torch.nn.functional.normalize(torch.randn(512, dim, generator=gen), dim=1)
        labels = torch.randint(0, centers.shape[0], (num,), generator=gen)
        return centers[labels] + 0.33 / dim**0.5 * torch.randn(num, dim, generator=gen)
    raise ValueError(case)


def time_end_epoch(case: str, num: int, dim: int) -> dict:
    """Wall time and metrics of one ``end_epoch`` on a fresh monitor."""
    from nocollapse import CollapseMonitor

    protos = make_matrix(case, num, dim)
    monitor = CollapseMonitor(num, dim, alarms=False)
    start = time.perf_counter()
    metrics = monitor.end_epoch(0, prototypes=protos)
    seconds = time.perf_counter() - start
    keep = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in metrics.items()
            if k.startswith("unique_") or k.startswith("pairwise_cosine")}
    return {"K": num, "seconds": round(seconds, 3), "goal_met": seconds < GOAL_SECONDS, "metrics": keep}


def estimator_error(num: int, dim: int, seeds: int) -> dict:
    """Sampled estimate against the exact cover on matrices small enough to cover exactly."""
    from nocollapse.diagnostics import prototypes as P

    if not hasattr(P, "unique_estimate"):
        return {"skipped": "this version has no sampled estimate"}
    out: dict = {"K": num, "D": dim, "seeds": seeds}
    for case in ("partial", "loose"):
        protos = make_matrix(case, num, dim, seed=1)
        start = time.perf_counter()
        exact = P.unique_fraction(protos, P.STANDARD_EPS, exact=True)
        exact_seconds = time.perf_counter() - start
        errors: dict[str, list[float]] = {f"{e:g}": [] for e in P.STANDARD_EPS}
        zs: dict[str, list[float]] = {f"{e:g}": [] for e in P.STANDARD_EPS}
        seconds = []
        rows = 0
        for seed in range(seeds):
            start = time.perf_counter()
            est = P.unique_estimate(protos, P.STANDARD_EPS, exact=False, seed=seed)
            seconds.append(time.perf_counter() - start)
            rows = est.sampled_rows
            for e in P.STANDARD_EPS:
                err = est.fractions[e] - exact[e]
                errors[f"{e:g}"].append(err)
                if est.exact[e]:
                    zs[f"{e:g}"].append(0.0)
                elif est.stderr[e] > 0:
                    zs[f"{e:g}"].append(err / est.stderr[e])
                elif err != 0:
                    zs[f"{e:g}"].append(float("inf"))
                else:
                    zs[f"{e:g}"].append(0.0)
        out[case] = {
            "exact_fraction": {f"{e:g}": round(exact[e], 5) for e in P.STANDARD_EPS},
            "exact_seconds": round(exact_seconds, 3),
            "sampled_rows": rows,
            "estimate_seconds_median": round(sorted(seconds)[len(seconds) // 2], 3),
            "stderr_last_seed": {f"{e:g}": round(est.stderr[e], 5) for e in P.STANDARD_EPS},
            "mean_error": {k: round(sum(v) / len(v), 5) for k, v in errors.items()},
            "max_abs_error": {k: round(max(abs(x) for x in v), 5) for k, v in errors.items()},
            "rms_z": {k: round((sum(z * z for z in v) / len(v)) ** 0.5, 3) for k, v in zs.items()},
            "within_2_stderr": {k: sum(abs(z) <= 2 for z in v) / len(v) for k, v in zs.items()},
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--num", type=int, default=65536)
    parser.add_argument("--reference-num", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--no-reference", action="store_true", help="skip the K = 2048 cases")
    parser.add_argument("--estimator-num", type=int, default=16384)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--no-estimator", action="store_true")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    result: dict = {"D": args.dim, "threads": args.threads, "torch": torch.__version__,
                    "machine": platform.machine(), "goal_seconds": GOAL_SECONDS}
    for case in args.cases:
        result[case] = time_end_epoch(case, args.num, args.dim)
        if not args.no_reference:
            result[f"{case}_K{args.reference_num}"] = time_end_epoch(case, args.reference_num, args.dim)
    result["goal_met"] = all(result[c]["goal_met"] for c in args.cases)
    if not args.no_estimator:
        result["estimator"] = estimator_error(args.estimator_num, args.dim, args.seeds)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
