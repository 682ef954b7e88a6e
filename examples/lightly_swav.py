"""lightly's SwAV loop watched by CollapseMonitor, with learned or decoupled prototypes.

The model is lightly's: ``SwaVProjectionHead`` and ``SwaVLoss`` (Sinkhorn-Knopp codes from the
two high-resolution views, swapped prediction from every other view). The prototypes are either
lightly's ``SwaVPrototypes`` (renormalised before each step, frozen for the first epoch) or
nocollapse's ``DecoupledPrototypes``, fitted by online EM on the detached high-resolution
embeddings and shared by every view. ``nocollapse.integrations.lightly`` gives the monitor the
codes the loss trains towards (``swav_codes``) and the prototype rows (``swav_prototype_vectors``).
Two high-resolution views and two noisier "low-resolution" ones stand in for multi-crop on
scikit-learn's digits (8x8 images, an MLP backbone); it runs in well under a minute on a CPU:

    python examples/lightly_swav.py --out runs/lightly_swav [--prototypes decoupled] [--epochs 15]

Needs the optional extra: ``pip install 'nocollapse[lightly]'``.
"""

from __future__ import annotations

import argparse
import json

import torch
from lightly.loss import SwaVLoss
from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
from torch import nn
from torch.nn import functional as F

from digits_data import augment, digit_images

from nocollapse import CollapseMonitor, DecoupledPrototypes
from nocollapse.integrations.lightly import swav_codes, swav_prototype_vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/lightly_swav")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--num-prototypes", type=int, default=64)
    parser.add_argument("--prototypes", choices=["learned", "decoupled"], default="learned")
    args = parser.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    images = digit_images()
    batch_size, dim, k = 128, 32, args.num_prototypes
    steps_per_epoch = len(images) // batch_size

    backbone = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 128))
    projection = SwaVProjectionHead(128, 128, dim)
    if args.prototypes == "learned":
        prototypes = SwaVPrototypes(dim, k, n_steps_frozen_prototypes=steps_per_epoch)
    else:
        prototypes = DecoupledPrototypes(k, dim, beta0=0.25, anneal_steps=2 * steps_per_epoch,
                                         buffer_size=4 * k, seed_after_steps=steps_per_epoch)
    criterion = SwaVLoss(sinkhorn_epsilon=0.05)
    model = nn.ModuleDict({"backbone": backbone, "projection": projection})
    if args.prototypes == "learned":
        model["prototypes"] = prototypes
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = CollapseMonitor(num_prototypes=k, embedding_dim=dim, warmup_steps=2 * steps_per_epoch,
                              log_every=5, log_dir=args.out)

    def embed(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(projection(backbone(x)), dim=1)

    step = 0
    for _ in range(args.epochs):
        order = torch.randperm(len(images), generator=gen)
        for batch in order[: steps_per_epoch * batch_size].split(batch_size):
            x = images[batch]
            high = [augment(x, gen) for _ in range(2)]
            low = [augment(augment(x, gen), gen) for _ in range(2)]        # harder views
            z_high = [embed(v) for v in high]
            z_low = [embed(v) for v in low]
            if args.prototypes == "learned":
                prototypes.normalize()
                scores_high = [prototypes(z, step) for z in z_high]
                scores_low = [prototypes(z, step) for z in z_low]
            else:
                prototypes.update(torch.cat(z_high).detach(), step, views=2)   # EM step, not yet written
                scores_high = [prototypes(z) for z in z_high]
                scores_low = [prototypes(z) for z in z_low]
            codes = swav_codes(criterion, scores_high[0])                  # what view 0 teaches
            loss = criterion(scores_high, scores_low)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if args.prototypes == "decoupled":
                prototypes.commit()
            monitor.update(step, probs=codes, student_probs=F.softmax(scores_high[1].detach() / 0.1, dim=1),
                           embeddings=z_high[0].detach(), features=z_high[0].detach(), loss=loss.detach())
            step += 1
        vectors = swav_prototype_vectors(prototypes) if args.prototypes == "learned" else prototypes
        last = monitor.end_epoch(step, prototypes=vectors)
    monitor.plot(args.out)
    monitor.close()
    print(json.dumps({"last_epoch": last, "alarms": [a.name for a in monitor.alarms], "steps": step},
                     default=float))


if __name__ == "__main__":
    main()
