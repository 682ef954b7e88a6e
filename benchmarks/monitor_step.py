"""Benchmark: the cost of one log step of the collapse monitor, with and without the measures the
representation and dimensional alarms read (``mean_cosine``, ``direction_rank``).

For each shape (batch B, embedding width D, prototypes K) it times, in one process, the step
measures the monitor computed before those alarms (assignment statistics, embedding std, mean
direction) and the two added ones, as medians over ``--repeats`` calls after a warm-up. Only log
steps compute them, so the cost per training step is the log step's divided by ``log_every``.
Prints one JSON object.

    python benchmarks/monitor_step.py [--threads 1] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json

import torch

from common import time_call

# (name, batch, embedding width, prototypes or 0, the recipe's log_every)
SHAPES = (("digits default", 128, 256, 256, 5), ("cifar10 dino", 256, 256, 4096, 20),
          ("cifar10 barlow_twins", 256, 2048, 0, 20), ("dino K = 65,536", 256, 256, 65536, 20))


def main() -> None:
    from nocollapse.diagnostics import (assignment_stats, direction_rank, embedding_std, mean_direction_norm,
                                        mean_pairwise_cosine)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, batch, dim, k, log_every in SHAPES:
        embeddings = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1)
        probs = torch.softmax(torch.randn(batch, k, generator=gen) / 0.1, dim=1) if k else None

        def before():
            if probs is not None:
                assignment_stats(probs)
            embedding_std(embeddings)
            mean_direction_norm(embeddings)

        def added():
            mean_pairwise_cosine(embeddings)
            direction_rank(embeddings)

        t_before, t_added = time_call(before, args.repeats), time_call(added, args.repeats)
        rows.append({"shape": name, "batch": batch, "dim": dim, "prototypes": k, "log_every": log_every,
                     "log_step_ms_before": round(1e3 * t_before, 2), "added_ms": round(1e3 * t_added, 2),
                     "added_ms_per_training_step": round(1e3 * t_added / log_every, 3),
                     "log_step_ratio": round((t_before + t_added) / t_before, 2)})
    print(json.dumps({"threads": args.threads, "repeats": args.repeats, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
