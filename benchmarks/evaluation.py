"""Time the chunked weighted k-NN evaluation and measure its peak memory.

Runs :func:`nocollapse.evaluation.knn.knn_accuracy` once on random features of
the requested sizes (CIFAR-like defaults: 50,000 train x 10,000 test x 512
dims) and prints one JSON object.

Memory is the process resident set size (RSS): torch's CPU allocations are
invisible to ``tracemalloc``, so the script reads the current RSS after the
inputs are created and the peak RSS (``resource.getrusage().ru_maxrss``) after
the evaluation; ``peak_increase_mib`` is the difference, i.e. the extra memory
the evaluation needed on top of its inputs. Run it in a fresh process.

Example::

    python benchmarks/evaluation.py --n-train 50000 --n-test 10000 --dim 512 --k 20 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from common import MIB, current_rss_bytes, peak_rss_bytes
from nocollapse.evaluation.knn import default_chunk_size, knn_accuracy

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=50_000)
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--chunk-size", type=int, default=None, help="test rows per block (default: auto)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--goal-seconds", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    train_features = torch.randn(args.n_train, args.dim, generator=generator)
    test_features = torch.randn(args.n_test, args.dim, generator=generator)
    train_labels = torch.randint(0, args.num_classes, (args.n_train,), generator=generator)
    test_labels = torch.randint(0, args.num_classes, (args.n_test,), generator=generator)

    rss_before = current_rss_bytes()
    start = time.perf_counter()
    accuracy = knn_accuracy(
        train_features,
        train_labels,
        test_features,
        test_labels,
        k=args.k,
        temperature=args.temperature,
        num_classes=args.num_classes,
        chunk_size=args.chunk_size,
    )
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()

    result = {
        "n_train": args.n_train,
        "n_test": args.n_test,
        "dim": args.dim,
        "num_classes": args.num_classes,
        "k": args.k,
        "temperature": args.temperature,
        "threads": torch.get_num_threads(),
        "chunk_size": args.chunk_size if args.chunk_size is not None else default_chunk_size(args.n_train),
        "seconds": round(seconds, 3),
        "inputs_mib": round(
            (train_features.numel() + test_features.numel()) * train_features.element_size() / MIB, 1
        ),
        "rss_before_mib": None if rss_before is None else round(rss_before / MIB, 1),
        "peak_rss_mib": round(peak / MIB, 1),
        "peak_increase_mib": None if rss_before is None else round((peak - rss_before) / MIB, 1),
        "full_similarity_matrix_mib": round(args.n_train * args.n_test * 4 / MIB, 1),
        "top1": accuracy["top1"],
        "goal_seconds": args.goal_seconds,
        "goal_met": seconds < args.goal_seconds,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
