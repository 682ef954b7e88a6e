"""Decoupled prototypes in lightly's stock DINO head: the reproduction of issue 35, item 1.

lightly's DINO example, adapted to small data: a small CNN backbone, lightly's
``DINOProjectionHead`` as shipped (no batch norm: ``batch_norm=False``), ``DINOLoss`` with its
centring and teacher-temperature warm-up, ``DINOTransform`` crops, Adam and the cosine EMA
schedule, on a class-balanced subset of CIFAR-10 training images. Two arms share everything but
the last layer:

* ``learned``: the head's own weight-normalised last layer (lightly's prototypes), its gradient
  cancelled in the first epoch as the example does;
* ``decoupled``: the last layer replaced by one :class:`nocollapse.DecoupledPrototypes` shared by
  student and teacher, fed the teacher's bottleneck (annealed E-step, a buffer of ``4 K``
  embeddings that seeds the mixture after the first epoch). ``--space`` chooses the space the
  mixture is fitted and scored in (``gmm.space``): the raw unit sphere or one that removes what all
  embeddings share.

A :class:`nocollapse.CollapseMonitor` watches each run through the public API and
``nocollapse.integrations.lightly`` (teacher probabilities read before ``DINOLoss`` moves its
centre). Per run the JSON holds: unique prototypes at ε = 0.1 (the greedy cover of
:mod:`nocollapse.diagnostics.prototypes`) right after seeding and at the end, the alarms the monitor
raised, the fraction of prototypes that are some held-out image's arg-max, the mean-direction
norm of the teacher's normalised bottleneck on held-out images (1 = every embedding on one ray),
and the teacher backbone's weighted k-NN top-1 (k = 20, T = 0.07) from the training subset to a
class-balanced test subset, before and after training.

    python benchmarks/lightly_stock_head.py --data $NOCOLLAPSE_CIFAR10 --seeds 0 1 2 \
        --arms learned decoupled --out docs/lightly_stock_head.json

Runs are appended to ``--out`` as they finish, and a run already there (same arm, seed and
settings) is not repeated, so an interrupted call resumes where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from nocollapse import CollapseMonitor, DecoupledPrototypes
from nocollapse.diagnostics import unique_fraction
from nocollapse.evaluation import knn_accuracy
from nocollapse.utils.run_directory import write_json_atomically

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)     # lightly's DINOTransform default


def class_balanced_files(root: Path, per_class: int, seed: int = 1234) -> list[tuple[Path, int]]:
    """``per_class`` files of each CIFAR-10 class under ``root``, the same for every run."""
    rng = random.Random(seed)
    chosen = []
    for label, name in enumerate(CLASSES):
        files = sorted((root / name).glob("*.jpg"))
        if len(files) < per_class:
            raise SystemExit(f"{root / name} holds {len(files)} images, fewer than {per_class}")
        chosen += [(path, label) for path in rng.sample(files, per_class)]
    return chosen


def load_images(files: list[tuple[Path, int]]):
    from PIL import Image
    images = [Image.open(path).convert("RGB") for path, _ in files]
    return images, torch.tensor([label for _, label in files])


class SmallCNN(nn.Module):
    """Four 3x3 conv blocks (32-64-128-128 channels), global average pooling: 128 features."""

    def __init__(self) -> None:
        super().__init__()
        layers, width = [], 3
        for out, pool in ((32, False), (64, True), (128, True), (128, True)):
            layers += [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool2d(2))
            width = out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def eval_tensors(images) -> torch.Tensor:
    from torchvision.transforms import functional as TF
    return torch.stack([TF.normalize(TF.to_tensor(im), MEAN, STD) for im in images])


@torch.no_grad()
def features_of(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    backbone.eval()
    out = torch.cat([backbone(chunk) for chunk in x.split(500)])
    backbone.train()
    return out


def run(arm: str, seed: int, args, train_images, train_labels, train_x, test_x, test_labels) -> dict:
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import DINOTransform
    from lightly.utils.scheduler import cosine_schedule

    from nocollapse.integrations.lightly import dino_teacher_probabilities, last_layer_directions

    torch.manual_seed(seed)
    random.seed(seed)
    k, dim = args.prototypes, args.bottleneck
    backbone = SmallCNN()
    def make_head():
        return DINOProjectionHead(backbone.dim, args.hidden, dim, k, batch_norm=args.batch_norm, freeze_last_layer=1)

    student = nn.ModuleDict({"backbone": backbone, "head": make_head()})
    # a weight-normalised layer cannot be deep-copied: a second head takes the student's weights
    teacher = nn.ModuleDict({"backbone": copy.deepcopy(backbone), "head": make_head()})
    teacher.load_state_dict(student.state_dict())
    deactivate_requires_grad(teacher)
    steps_per_epoch = len(train_images) // args.batch_size
    prototypes = None
    if arm == "decoupled":
        prototypes = DecoupledPrototypes(k, dim, beta0=0.25, anneal_steps=2 * steps_per_epoch,
                                         buffer_size=4 * k, seed_after_steps=steps_per_epoch,
                                         space=args.space)

    def bottleneck(net, x):
        return F.normalize(net["head"].layers(net["backbone"](x)), dim=-1)

    def scores(net, x):
        if prototypes is None:
            return net["head"](net["backbone"](x))
        return prototypes(bottleneck(net, x))

    def vectors():
        if prototypes is None:
            return last_layer_directions(student["head"].last_layer)
        return prototypes

    knn_init = knn_accuracy(features_of(teacher["backbone"], train_x), train_labels,
                            features_of(teacher["backbone"], test_x), test_labels)["top1"]
    transform = DINOTransform(global_crop_size=32, local_crop_size=16, n_local_views=args.local_views)
    criterion = DINOLoss(output_dim=k, warmup_teacher_temp_epochs=5)
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr)
    monitor = CollapseMonitor(num_prototypes=k, embedding_dim=dim, warmup_steps=steps_per_epoch, log_every=5)
    epochs, step, unique_at_seeding = args.epochs, 0, None
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        momentum = cosine_schedule(epoch, epochs, 0.996, 1)
        order = torch.randperm(len(train_images), generator=gen)[: steps_per_epoch * args.batch_size]
        for batch in order.split(args.batch_size):
            crops = [transform(train_images[i]) for i in batch.tolist()]
            views = [torch.stack(v) for v in zip(*crops)]                    # [global, global, local...]
            update_momentum(student, teacher, m=momentum)
            if prototypes is not None:
                with torch.no_grad():
                    h_teacher = torch.cat([bottleneck(teacher, v) for v in views[:2]])
                prototypes.update(h_teacher, step, views=2)
                teacher_out = list(prototypes(h_teacher).chunk(2))
            else:
                with torch.no_grad():
                    teacher_out = [scores(teacher, v) for v in views[:2]]
            student_out = [scores(student, v) for v in views]
            probs = dino_teacher_probabilities(criterion, teacher_out[0], epoch=epoch)
            loss = criterion(teacher_out, student_out, epoch=epoch)
            optimizer.zero_grad()
            loss.backward()
            if prototypes is None:
                student["head"].cancel_last_layer_gradients(current_epoch=epoch)
            optimizer.step()
            if prototypes is not None:
                prototypes.commit()
                if prototypes.num_buffer_seedings and unique_at_seeding is None:
                    unique_at_seeding = unique_fraction(prototypes.snapshot().vectors, 0.1)
            with torch.no_grad():
                embeddings = bottleneck(teacher, views[0])
            monitor.update(step, probs=probs, embeddings=embeddings, loss=loss.detach())
            step += 1
        last = monitor.end_epoch(step, prototypes=vectors())
    seconds = time.perf_counter() - start

    with torch.no_grad():
        teacher.eval()
        h_test = torch.cat([bottleneck(teacher, chunk) for chunk in test_x.split(500)])
        test_scores = prototypes(h_test) if prototypes is not None else h_test @ vectors().t()
        teacher.train()
    used = int(torch.unique(test_scores.argmax(dim=1)).numel())
    knn = knn_accuracy(features_of(teacher["backbone"], train_x), train_labels,
                       features_of(teacher["backbone"], test_x), test_labels)["top1"]
    record = {
        "arm": arm, "seed": seed, "space": args.space if arm == "decoupled" else None,
        "settings": settings_key(args),
        "unique_0.1_at_seeding": unique_at_seeding,
        "unique_0.1": last.get("unique_0.1"),
        "alarms": [{"name": a.name, "step": a.step} for a in monitor.alarms],
        "prototype_collapse_alarm": any(a.name == "prototype_collapse" for a in monitor.alarms),
        "test_argmax_used_fraction": used / k,
        "teacher_mean_direction_norm": float(h_test.mean(dim=0).norm()),
        "knn_top1_init": knn_init, "knn_top1": knn, "train_seconds": seconds, "steps": step,
    }
    if prototypes is not None:
        record["mixture_buffer_seedings"] = int(prototypes.num_buffer_seedings)
        record["mixture_reseeds"] = int(prototypes.num_reseeds)
    return record


def settings_key(args) -> str:
    return (f"n{args.per_class * 10}-e{args.epochs}-k{args.prototypes}-d{args.bottleneck}-h{args.hidden}"
            f"-b{args.batch_size}-l{args.local_views}-bn{int(args.batch_norm)}-lr{args.lr:g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("NOCOLLAPSE_CIFAR10"),
                        help="CIFAR-10 ImageFolder root with train/ and test/ (default $NOCOLLAPSE_CIFAR10)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=["learned", "decoupled"], choices=["learned", "decoupled"])
    parser.add_argument("--space", default="sphere",
                        help="the mixture's space for the decoupled arm (DecoupledPrototypes(space=...))")
    parser.add_argument("--per-class", type=int, default=200, help="training images per class (2,000 in all)")
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--prototypes", type=int, default=256)
    parser.add_argument("--bottleneck", type=int, default=64, help="lightly's example: 64")
    parser.add_argument("--hidden", type=int, default=512, help="lightly's example: 512")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--local-views", type=int, default=2)
    parser.add_argument("--batch-norm", action="store_true", help="batch_norm=True in the head (not stock)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="JSON file the runs are appended to")
    args = parser.parse_args()
    if not args.data:
        parser.error("give --data (or set NOCOLLAPSE_CIFAR10) to the CIFAR-10 ImageFolder root")
    torch.set_num_threads(args.threads)
    root = Path(args.data)
    train_images, train_labels = load_images(class_balanced_files(root / "train", args.per_class))
    test_images, test_labels = load_images(class_balanced_files(root / "test", args.test_per_class))
    train_x, test_x = eval_tensors(train_images), eval_tensors(test_images)
    done = json.loads(args.out.read_text()) if args.out and args.out.is_file() else []
    for seed in args.seeds:
        for arm in args.arms:
            key = (arm, seed, args.space if arm == "decoupled" else None, settings_key(args))
            if any((r["arm"], r["seed"], r["space"], r["settings"]) == key for r in done):
                continue
            record = run(arm, seed, args, train_images, train_labels, train_x, test_x, test_labels)
            print(json.dumps(record), flush=True)
            done.append(record)
            if args.out:
                write_json_atomically(args.out, done)
    if not args.out:
        return
    summary = {}
    for r in done:
        if r["settings"] != settings_key(args):
            continue
        name = r["arm"] if r["space"] is None else f"{r['arm']}[{r['space']}]"
        summary.setdefault(name, []).append(r)
    for name, rows in summary.items():
        mean = lambda key: sum(r[key] for r in rows) / len(rows)   # noqa: E731
        print(f"{name:28s} seeds={len(rows)} unique_0.1={[round(r['unique_0.1'], 3) for r in rows]} "
              f"knn={[round(r['knn_top1'], 3) for r in rows]} (init {mean('knn_top1_init'):.3f}) "
              f"used={mean('test_argmax_used_fraction'):.3f} cone={mean('teacher_mean_direction_norm'):.3f} "
              f"collapse_alarm={[r['prototype_collapse_alarm'] for r in rows]}")


if __name__ == "__main__":
    main()
