"""DINO's and CARP's step with the loss making the scores itself, against the layer-then-loss form.

Both methods hand their loss the student's rows and the prototype rows (``PrototypeSet.
product_factors``), so that the loss makes the [B, K] scores inside one autograd node and never
holds their whole gradient (``losses/dino.py``, ``losses/carp.py``). Sets without product factors
take the layer-then-loss form, which the methods keep. This script times the two forms of the same
method in one process, on the same model, optimiser and crops (the recipe of ``throughput.py``,
no augmentation), alternating which form goes first over ``--rounds`` rounds, so that the
machine's drift hits both alike. It prints one JSON per method: the step seconds of each form per
round, their medians and ``ratio_fused_to_unfused`` (median over rounds of the per-round ratio).

The steps train the model as they run, so the rounds see slightly different weights; the two
forms compute the same values (tests/test_methods.py), so that does not favour either.

    python benchmarks/fused_losses.py --methods dino dino_decoupled carp carp_decoupled \
        --set method.num_prototypes=65536 --rounds 6 --threads 2 --out docs/throughput_goals/fused_losses/ab.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import throughput  # noqa: E402
from nocollapse.data.batch import Batch  # noqa: E402
from nocollapse.engine.trainer import optimisation_step  # noqa: E402

DRY_RUN = ["train.batch_size=8", "model.width_multiplier=0.125", "method.head.hidden_dim=64",
           "method.head.bottleneck_dim=16", "method.num_prototypes=64"]
#: the methods whose loss makes the scores from the prototype set's product factors
FUSED = ("dino", "carp")


def compare(method_name: str, sets: list[str], rounds: int) -> dict:
    """Step seconds of the fused and the layer-then-loss form of ``method_name``, interleaved."""
    name = throughput.build_config_for(method_name, sets).method.name
    if name not in FUSED:
        raise SystemExit(f"{method_name}: a {name} step has no fused loss to compare (only {', '.join(FUSED)})")
    cfg, method, optimizer, views = throughput.build(method_name, sets)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (cfg.train.batch_size, 3, throughput.SIZE, throughput.SIZE),
                           dtype=torch.uint8, generator=generator)
    crops = views(images)
    prototypes = method.prototype_set()
    factors = prototypes.product_factors
    if factors(torch.zeros(1, prototypes.dim)) is None:
        raise SystemExit(f"{method_name}: its prototypes give no product factors, so it has no fused form")
    step = 0

    def timed_step(fused: bool) -> float:
        nonlocal step
        prototypes.product_factors = factors if fused else (lambda z: None)
        start = time.perf_counter()
        optimisation_step(method, method, optimizer, Batch(crops, None), step, cfg.optim.lr,
                          cfg.optim.weight_decay, clip_grad=cfg.optim.clip_grad)
        step += 1
        return time.perf_counter() - start

    timed_step(True), timed_step(False)                # warm-up: allocator, optimiser moments
    seconds = {"fused": [], "unfused": []}
    for r in range(rounds):
        for fused in ((True, False) if r % 2 == 0 else (False, True)):
            seconds["fused" if fused else "unfused"].append(round(timed_step(fused), 4))
    prototypes.product_factors = factors
    per_round = [round(f / u, 3) for f, u in zip(seconds["fused"], seconds["unfused"])]
    return {"method": method_name, "sets": sets, "num_prototypes": cfg.method.num_prototypes,
            "batch": cfg.train.batch_size, "threads": torch.get_num_threads(), "rounds": rounds,
            "step_seconds": seconds,
            "median_step_seconds": {form: statistics.median(v) for form, v in seconds.items()},
            "ratio_fused_to_unfused_rounds": per_round,
            "ratio_fused_to_unfused": statistics.median(per_round)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["dino", "dino_decoupled", "carp", "carp_decoupled"])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, two rounds: the code paths only")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 2 if args.dry_run else args.rounds
    results = []
    for name in args.methods:
        dry = [*DRY_RUN, *(["carp.block_size=8"] if name.startswith("carp") else [])] if args.dry_run else []
        results.append(compare(name, [*dry, *args.set], rounds))
    text = json.dumps(results, indent=1)
    if args.out is not None:
        from nocollapse.utils.run_directory import write_text_atomically

        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(args.out, text)
    print(text)
    return results


if __name__ == "__main__":
    main()
