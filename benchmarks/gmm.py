"""Cost of the decoupled prototypes: online-EM mixture update time and peak memory, and the
step-time ratio of decoupled to learned DINO.

1. Mixture update (``OnlineGMM.update``: annealed E-step, statistics, forgetting, M-step) for
   K in {1k, 4k, 16k, 65k}, D = 256, batch 512, diagonal covariances. Each K runs in a fresh
   subprocess so its peak resident memory is its own; ``largest_tensor_mib`` is the N x K
   responsibility matrix, the biggest tensor the update forms (no K x K or N x K x D tensor).
2. A decoupled DINO training step against a learned one on the throughput configuration
   (ResNet-18 width 16, batch 256, two 32 px crops, K = 4096), interleaved in one process.
   Goal: ratio <= 1.05.

    python benchmarks/gmm.py [--ks 1024 4096 16384 65536] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from common import MIB, current_rss_bytes, peak_rss_bytes, time_call


def update_case(k: int, dim: int, batch: int, repeats: int, threads: int) -> dict:
    from torch.nn import functional as F

    from nocollapse.prototypes.gmm import OnlineGMM

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(batch, dim, generator=gen), dim=1)
    gmm = OnlineGMM(k, dim, init="random")
    before = current_rss_bytes()
    seconds = time_call(lambda: gmm.em_step(x, beta=0.5), repeats)
    return {"K": k, "D": dim, "batch": batch, "seconds_per_update": round(seconds, 4),
            "peak_rss_mib": round(peak_rss_bytes() / MIB, 1),
            "rss_before_update_mib": round(before / MIB, 1) if before else None,
            "largest_tensor_mib": round(batch * k * 4 / MIB, 1),
            "state_mib": round(sum(b.numel() * b.element_size() for b in gmm.buffers()) / MIB, 1)}


def step_ratio(repeats: int, rounds: int, k: int) -> dict:
    from throughput import make_train_step

    args = argparse.Namespace(k=k, batch=256, hidden=2048)
    images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8)
    learned, *_ = make_train_step(args, "learned", images)
    decoupled, *_ = make_train_step(args, "decoupled", images)
    times: dict[str, list[float]] = {"learned": [], "decoupled": []}
    for _ in range(rounds):
        times["learned"].append(time_call(lambda: learned(False), repeats))
        times["decoupled"].append(time_call(lambda: decoupled(False), repeats))
    med = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
    ratio = med["decoupled"] / med["learned"]
    return {"K": k, "seconds_learned_step": round(med["learned"], 4),
            "seconds_decoupled_step": round(med["decoupled"], 4),
            "ratio_decoupled_to_learned": round(ratio, 3), "goal_ratio": 1.05, "goal_met": ratio <= 1.05}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)  # one K, in a subprocess
    parser.add_argument("--skip-step", action="store_true", help="only the mixture updates")
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(update_case(args.case, args.dim, args.batch, args.repeats, args.threads)))
        return
    torch.set_num_threads(args.threads)
    updates = []
    for k in args.ks:
        cmd = [sys.executable, __file__, "--case", str(k), "--dim", str(args.dim), "--batch",
               str(args.batch), "--repeats", str(args.repeats), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            updates.append({"K": k, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]})
        else:
            updates.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    result = {"threads": args.threads, "torch": torch.__version__, "mixture_update": updates}
    if not args.skip_step:
        result["dino_step"] = step_ratio(args.repeats, args.rounds, 4096)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
