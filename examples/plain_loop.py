"""A hand-written PyTorch training loop watched by nocollapse's CollapseMonitor.

A small SwAV-style model on scikit-learn's digits: an MLP encoder, L2-normalised embeddings and
K = 64 learned prototypes, trained by swapped prediction against Sinkhorn-Knopp targets. Only
the monitor comes from nocollapse (and its Sinkhorn helper); the loop is yours. Run it with

    python examples/plain_loop.py --out runs/plain_loop [--epochs 30] [--collapse]

``--collapse`` drops the Sinkhorn balancing so that the run collapses and the alarms fire.
The monitor writes metrics.jsonl, TensorBoard and a training-curves plot into --out.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn import functional as F

from digits_data import augment, digit_images

from nocollapse import CollapseMonitor
from nocollapse.losses.sinkhorn import sinkhorn_knopp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/plain_loop")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--collapse", action="store_true", help="no Sinkhorn balancing: watch it collapse")
    args = parser.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    images = digit_images()

    encoder = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 32))
    prototypes = nn.Linear(32, 64, bias=False)
    optimizer = torch.optim.Adam([*encoder.parameters(), *prototypes.parameters()], lr=1e-3)
    steps_per_epoch = len(images) // 128
    monitor = CollapseMonitor(num_prototypes=64, embedding_dim=32, warmup_steps=2 * steps_per_epoch,
                              log_every=5, log_dir=args.out)
    step = 0
    for _ in range(args.epochs):
        order = torch.randperm(len(images), generator=gen)
        for batch in order[: steps_per_epoch * 128].split(128):
            x = images[batch]
            with torch.no_grad():
                prototypes.weight.copy_(F.normalize(prototypes.weight, dim=1))
            z1 = F.normalize(encoder(augment(x, gen)), dim=1)
            z2 = F.normalize(encoder(augment(x, gen)), dim=1)
            s1, s2 = prototypes(z1), prototypes(z2)
            with torch.no_grad():
                if args.collapse:
                    q1, q2 = F.softmax(s1 / 0.05, dim=1), F.softmax(s2 / 0.05, dim=1)
                else:
                    q1, q2 = sinkhorn_knopp(s1, 0.05), sinkhorn_knopp(s2, 0.05)
            loss = -0.5 * ((q1 * F.log_softmax(s2 / 0.1, 1)).sum(1).mean()
                           + (q2 * F.log_softmax(s1 / 0.1, 1)).sum(1).mean())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.update(step, probs=q1, student_probs=F.softmax(s2.detach() / 0.1, 1), embeddings=z1.detach(),
                           features=z1.detach(), loss=loss.detach())
            step += 1
        epoch = monitor.end_epoch(step, prototypes=prototypes.weight)
    monitor.plot(args.out)
    monitor.close()
    print(f"last epoch: {epoch}")
    print("alarms:", [a.name for a in monitor.alarms] or "none")


if __name__ == "__main__":
    main()
