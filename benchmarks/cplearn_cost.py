"""The cost of CPLearn's codebook product against the backbone it sits on.

For each (f, c) it times, interleaved so that machine noise hits both alike:

* ``backbone``: a bare ResNet-18 (width 16, CIFAR stem) forward + backward on 2 x batch crops;
* ``codebook``: for both views, the projector output ``h`` ``[batch, f]`` times the fixed ``[f, c]``
  codebook, the loss and its backward to ``h`` (the part of the step that grows with f and c);

and prints one JSON object per setting with the median seconds of each, their ratio, the
codebook's FLOP count (2 views x 2 batch f c for the product and as much again for its backward
to ``h``) and its size in bytes.

    python benchmarks/cplearn_cost.py [--settings 512x4096 2048x16384] [--batch 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import json

import torch

from common import time_call
from nocollapse.config import build_config
from nocollapse.losses.cplearn import cplearn_loss, cplearn_temperature
from nocollapse.models.backbones import build_backbone
from nocollapse.prototypes.fixed import rademacher_codebook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["512x4096", "2048x16384"], help="f x c pairs")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg, _ = build_config(overrides=["model.width_multiplier=0.25", "model.stem=cifar"])
    backbone = build_backbone(cfg.model, 32)
    crops = torch.randn(2 * args.batch, 3, 32, 32)

    def backbone_step() -> None:
        backbone.zero_grad(set_to_none=True)
        backbone(crops).float().sum().backward()

    for setting in args.settings:
        f, c = (int(v) for v in setting.lower().split("x"))
        book = rademacher_codebook(f, c, seed=0)
        inv_tau = 1.0 / cplearn_temperature(f, c, args.batch)
        h = torch.tanh(torch.randn(2, args.batch, f)).requires_grad_(True)

        def codebook_step() -> None:
            h.grad = None
            loss = cplearn_loss((h[0] @ book) * inv_tau, (h[1] @ book) * inv_tau)
            loss.backward()

        times = {"backbone": [], "codebook": []}
        backbone_step()
        codebook_step()
        for _ in range(args.repeats):
            times["backbone"].append(time_call(backbone_step, 1, warmup=0))
            times["codebook"].append(time_call(codebook_step, 1, warmup=0))
        median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        flops = 2 * 2 * 2 * args.batch * f * c
        print(json.dumps({"f": f, "c": c, "batch": args.batch, "threads": args.threads,
                          "backbone_seconds": round(median["backbone"], 4),
                          "codebook_seconds": round(median["codebook"], 4),
                          "codebook_over_backbone": round(median["codebook"] / median["backbone"], 3),
                          "codebook_gflop": round(flops / 1e9, 2),
                          "codebook_bytes": 4 * f * c}))


if __name__ == "__main__":
    main()
