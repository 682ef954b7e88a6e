"""Benchmark: time and peak memory of ``unique_prototypes`` at K = 65,536, D = 256.

Two matrices:

* ``healthy``: i.i.d. Gaussian rows (every row is its own representative, the worst case);
* ``collapsed``: 100 random directions, each row one of them plus tiny noise
  (relative size 1e-3), so 100 representatives cover everything.

Each case runs in a fresh subprocess so its peak resident set size (``ru_maxrss``) is
its own. The goal for the healthy case is under 30 s and under 2 GiB peak RSS with
2 threads. Prints one JSON object.

    python benchmarks/diagnostics.py [--threads 2] [--num 65536] [--dim 256] [--no-screen] [--curve]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

from common import MIB, current_rss_bytes, peak_rss_bytes

GOAL_SECONDS = 30.0
GOAL_PEAK_MIB = 2048.0


def run_case(case: str, num: int, dim: int, threads: int, screen: bool, curve: bool) -> dict:
    """Run one case in this process and return its measurements."""
    import time

    import torch

    from nocollapse.diagnostics import unique_curve, unique_prototypes

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    if case == "healthy":
        protos = torch.randn(num, dim, generator=gen)
    elif case == "collapsed":
        centers = torch.randn(100, dim, generator=gen)
        centers = centers / centers.norm(dim=1, keepdim=True)
        labels = torch.randint(0, 100, (num,), generator=gen)
        protos = centers[labels] + 1e-3 / dim**0.5 * torch.randn(num, dim, generator=gen)
    else:
        raise ValueError(case)
    baseline = current_rss_bytes() / MIB
    start = time.perf_counter()
    counts = unique_prototypes(protos, screen=screen)
    seconds = time.perf_counter() - start
    out = {
        "seconds": round(seconds, 3),
        "peak_rss_mib": round(peak_rss_bytes() / MIB, 1),
        "rss_before_mib": round(baseline, 1),
        "counts": {f"{e:g}": c for e, c in counts.items()},
    }
    if curve:
        start = time.perf_counter()
        eps, frac = unique_curve(protos, screen=screen)
        out["curve_seconds"] = round(time.perf_counter() - start, 3)
        out["curve_points"] = len(eps)
        out["peak_rss_mib"] = round(peak_rss_bytes() / MIB, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--no-screen", action="store_true", help="pure float64 (no float32 screening)")
    parser.add_argument("--curve", action="store_true", help="also time unique_curve (24 eps)")
    parser.add_argument("--case", choices=["healthy", "collapsed"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    screen = not args.no_screen

    if args.case:  # child process
        print(json.dumps(run_case(args.case, args.num, args.dim, args.threads, screen, args.curve)))
        return 0

    import torch

    result: dict = {
        "K": args.num,
        "D": args.dim,
        "threads": args.threads,
        "screen": screen,
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    for case in ("healthy", "collapsed"):
        cmd = [sys.executable, __file__, "--case", case, "--threads", str(args.threads),
               "--num", str(args.num), "--dim", str(args.dim)]
        if not screen:
            cmd.append("--no-screen")
        if args.curve:
            cmd.append("--curve")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            result[case] = {"error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
            continue
        result[case] = json.loads(proc.stdout.strip().splitlines()[-1])
    healthy = result.get("healthy", {})
    result["goal"] = {"seconds": GOAL_SECONDS, "peak_rss_mib": GOAL_PEAK_MIB}
    result["goal_met"] = bool(
        "seconds" in healthy
        and healthy["seconds"] < GOAL_SECONDS
        and healthy["peak_rss_mib"] < GOAL_PEAK_MIB
    )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
