"""The cost of the collapse alarms' held-out check against the training step it rides on.

At every log step the trainer encodes ``diagnostics.held_out_images`` fixed, un-augmented training
images with the evaluation network in eval mode (``nocollapse.analysis.HeldOutEncoder``), for the
representation and dimensional alarms. This times, in one process and interleaved over
``--rounds``, the training step as the engine runs it (``optimisation_step`` on the run's own
batches) and one held-out check, and prints their ratio spread over ``train.log_every`` steps: the
share of the training time the check adds. ``benchmarks/throughput.py`` reports the same share on
the CIFAR-10 recipes (``held_out_check_share_per_step``).

    python benchmarks/held_out_cost.py                       # the built-in default (digits)
    python benchmarks/held_out_cost.py --config cifar10/dino --set data.root=$NOCOLLAPSE_CIFAR10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import nocollapse
from nocollapse.config import build_config
from nocollapse.engine.trainer import Trainer, optimisation_step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="a bundled recipe (default: the built-in default)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="training steps timed per round")
    args = parser.parse_args(argv)
    configs = Path(nocollapse.__file__).resolve().parent / "configs"
    cfg, _ = build_config(configs / f"{args.config}.yaml" if args.config else None,
                          ["train.progress=false", "diagnostics.plots=false", *args.set])
    if not cfg.diagnostics.held_out_images:
        raise SystemExit("diagnostics.held_out_images is 0: there is no held-out check to time")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run")
        try:
            trainer.setup()
            held_out = trainer.monitor.held_out
            batches = (batch for epoch in range(10**6) for batch in trainer.batches.epoch(epoch))
            step_seconds, check_seconds = [], []
            for round_index in range(args.rounds + 1):      # round 0 warms up (first calls, caches)
                start = time.perf_counter()
                for step in range(round_index * args.steps, (round_index + 1) * args.steps):
                    batch = trainer.labels_for_method(next(batches))
                    optimisation_step(trainer.model, trainer.method, trainer.optimizer, batch, step,
                                      float(trainer.lr_schedule[step]), float(trainer.wd_schedule[step]),
                                      cfg.optim.clip_grad, trainer.scaler, trainer.amp_dtype)
                steps_done = (time.perf_counter() - start) / args.steps
                start = time.perf_counter()
                held_out()
                if round_index:
                    step_seconds.append(steps_done)
                    check_seconds.append(time.perf_counter() - start)
        finally:
            trainer.release()
    step_s, check_s = sorted(step_seconds)[len(step_seconds) // 2], sorted(check_seconds)[len(check_seconds) // 2]
    print(json.dumps({
        "config": args.config or "default (digits)", "overrides": args.set, "threads": torch.get_num_threads(),
        "held_out_images": held_out.count, "log_every": cfg.train.log_every, "batch": cfg.train.batch_size,
        "step_seconds": round(step_s, 4), "held_out_check_seconds": round(check_s, 4),
        "check_over_step": round(check_s / step_s, 3),
        "share_per_step": round(check_s / cfg.train.log_every / step_s, 4),
        "rounds": [round(c / s, 3) for s, c in zip(step_seconds, check_seconds)],
    }, indent=1))


if __name__ == "__main__":
    main()
