"""Where a training step's time goes, operator by operator, on this checkout or another one.

Builds one method at the study's CIFAR-10 recipe as ``benchmarks/throughput.py`` does, from the
package and ``throughput.py`` of ``--tree`` (default: this checkout; an older commit's worktree
to compare, e.g. ``git worktree add /tmp/ref e460262``), runs ``--warmup`` steps on fixed crops
(no augmentation, as the peer comparison of ``throughput.py`` times it), then profiles ``--steps``
steps with ``torch.profiler`` and prints one JSON: the step's mean seconds and the operators with
the most self CPU time (their total per step, calls per step and share of the step).

Run it once per checkout in fresh processes, one after the other on an otherwise idle machine, to
see which operators a change made slower or faster:

    python benchmarks/step_profile.py --method dino --threads 2 --out /tmp/now.json
    PYTHONPATH=/tmp/ref/src python benchmarks/step_profile.py --tree /tmp/ref --method dino --threads 2 --out /tmp/ref.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZE = 32


def profile(tree: Path, method_name: str, sets: list[str], warmup: int, steps: int, top: int) -> dict:
    sys.path[:0] = [str(tree / "benchmarks"), str(tree / "src")]
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    import nocollapse

    package = Path(nocollapse.__file__).resolve().parent
    if not package.is_relative_to((tree / "src").resolve()):
        raise SystemExit(f"step_profile: this process had already imported nocollapse from {package}, not from "
                         f"{tree / 'src'}; run the profile in a fresh process (python benchmarks/step_profile.py "
                         f"--tree {tree}) so that the code profiled is the tree's")
    import throughput  # the checkout's own build()
    from nocollapse.data.batch import Batch
    from nocollapse.engine.trainer import optimisation_step

    cfg, method, optimizer, views = throughput.build(method_name, sets)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (cfg.train.batch_size, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
    crops = views(images)
    counter = {"step": 0}

    def step() -> None:
        optimisation_step(method, method, optimizer, Batch(crops, None), counter["step"], cfg.optim.lr,
                          cfg.optim.weight_decay, clip_grad=cfg.optim.clip_grad)
        counter["step"] += 1

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    seconds = (time.perf_counter() - start) / steps
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    ops = [{"op": e.key, "self_seconds_per_step": round(e.self_cpu_time_total / 1e6 / steps, 4),
            "calls_per_step": round(e.count / steps, 2), "share": round(e.self_cpu_time_total / total, 4)}
           for e in events[:top]]
    return {"package": str(package), "method": method_name, "sets": sets,
            "threads": torch.get_num_threads(), "steps": steps, "step_seconds_profiled": round(seconds, 4),
            "top_ops": ops}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=REPO, help="the checkout whose code is profiled")
    parser.add_argument("--method", default="dino")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = profile(args.tree.resolve(), args.method, args.set, args.warmup, args.steps, args.top)
    text = json.dumps(result, indent=1)
    if args.out is not None:
        # a plain write: this process holds --tree's package, which may predate the package's
        # atomic writer (e460262 has none)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
