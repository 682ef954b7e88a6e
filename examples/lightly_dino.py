"""A lightly DINO loop whose last layer is nocollapse's DecoupledPrototypes.

lightly's ``DINOProjectionHead`` ends in a weight-normalised last layer (the learned prototypes).
Here it is replaced by one ``DecoupledPrototypes`` instance shared by student and teacher: the
head's MLP gives the bottleneck embedding (``DINOHeadWithBottleneck.bottleneck``), the teacher's
L2-normalised bottleneck feeds the mixture's EM step, and both networks are scored against its
means. The head is lightly's stock one, without batch norm, whose embeddings sit in a narrow
cone: the mixture is fitted in the whitened space (``DecoupledPrototypes``' default
``space="whitened"``; ``--space sphere`` shows the means collapsing there). The rest is
lightly's: ``DINOLoss`` (centering, temperatures) and the EMA helpers. ``CollapseMonitor``
watches the run and gets the teacher probabilities from ``dino_teacher_probabilities``, read
before ``DINOLoss`` moves its centre. It needs the optional extra: ``pip install
'nocollapse[lightly]'``. On scikit-learn's digits (8x8 images, an MLP backbone) it runs in well
under a minute on a CPU:

    python examples/lightly_dino.py --out runs/lightly_dino [--epochs 15] [--space sphere]
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from torch import nn

from digits_data import augment, digit_images

from nocollapse import CollapseMonitor, DecoupledPrototypes
from nocollapse.integrations.lightly import DINOHeadWithBottleneck, dino_teacher_probabilities
from nocollapse.prototypes import SPACES


class Student(nn.Module):
    """Backbone + lightly's stock DINO head (no batch norm) without its last layer: returns the
    normalised bottleneck."""

    def __init__(self, bottleneck_dim: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 128))
        self.head = DINOHeadWithBottleneck(DINOProjectionHead(128, 256, bottleneck_dim, output_dim=1))
        del self.head.head.last_layer          # the prototypes live in DecoupledPrototypes instead

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.bottleneck(self.backbone(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/lightly_dino")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--prototypes", type=int, default=64)
    parser.add_argument("--space", choices=SPACES, default="whitened", help="where the mixture is fitted")
    args = parser.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    images = digit_images()
    batch_size, dim, k = 128, 32, args.prototypes
    steps_per_epoch = len(images) // batch_size

    student = Student(dim)
    teacher = copy.deepcopy(student)
    deactivate_requires_grad(teacher)
    prototypes = DecoupledPrototypes(k, dim, beta0=0.25, anneal_steps=2 * steps_per_epoch,
                                     buffer_size=4 * k, seed_after_steps=steps_per_epoch, space=args.space)
    criterion = DINOLoss(output_dim=k, warmup_teacher_temp_epochs=0, teacher_temp=0.04)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.04)
    monitor = CollapseMonitor(num_prototypes=k, embedding_dim=dim, warmup_steps=2 * steps_per_epoch,
                              log_every=5, log_dir=args.out)
    step = 0
    for epoch in range(args.epochs):
        order = torch.randperm(len(images), generator=gen)
        for batch in order[: steps_per_epoch * batch_size].split(batch_size):
            views = [augment(images[batch], gen) for _ in range(2)]
            with torch.no_grad():
                h_teacher = torch.cat([teacher(v) for v in views])           # view-major
            prototypes.update(h_teacher, step, views=2)                      # EM step, not yet written
            teacher_scores = prototypes(h_teacher).chunk(2)
            student_scores = prototypes(torch.cat([student(v) for v in views])).chunk(2)
            probs = dino_teacher_probabilities(criterion, teacher_scores[0], epoch=epoch)  # before the centre moves
            loss = criterion(list(teacher_scores), list(student_scores), epoch=epoch)
            optimizer.zero_grad()
            if not torch.isfinite(loss):
                prototypes.discard()                                         # a skipped step changes nothing
                continue
            loss.backward()
            optimizer.step()
            prototypes.commit()
            update_momentum(student, teacher, m=0.99)
            monitor.update(step, probs=probs, embeddings=h_teacher[:batch_size], features=h_teacher[:batch_size], loss=loss.detach())
            step += 1
        last = monitor.end_epoch(step, prototypes=prototypes)
    monitor.plot(args.out)
    monitor.close()
    print(json.dumps({"last_epoch": last, "alarms": [a.name for a in monitor.alarms],
                      "mixture_updates": int(prototypes.num_updates),
                      "buffer_seedings": int(prototypes.num_buffer_seedings)}, default=float))


if __name__ == "__main__":
    main()
