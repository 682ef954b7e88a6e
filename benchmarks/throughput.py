"""Throughput of a DINO training step on CIFAR-10-sized input, against a bare backbone.

Configuration (the issue's throughput setting): ResNet-18 at width 16 (multiplier 0.25, CIFAR
stem), batch 256, two 32 px crops, K = 4096, head 2048-2048-256. Measures, in one process and
interleaved so that machine noise hits both alike:

* ``step``: the full training step as the engine runs it (batched augmentation of uint8 images,
  teacher forward, student forward/backward, AdamW, EMA update);
* ``step_no_aug``: the same without the augmentation;
* ``backbone``: a bare backbone forward + backward on the same 2 x 256 crops;
* ``teacher_forward``: the EMA teacher's forward alone (its share of the step).

Prints one JSON object with images/s of each and the ratio step / backbone (goal: <= 1.25).

    python benchmarks/throughput.py [--prototypes decoupled] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json

import torch

from common import time_call
from nocollapse.config import build_config
from nocollapse.data.views import BatchedViews, build_view_spec
from nocollapse.utils.optim import build_optimizer
from nocollapse.engine.trainer import optimisation_step
from nocollapse.methods import build_method
from nocollapse.models.backbones import build_backbone

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def build(args, prototypes: str):
    overrides = [
        "model.width_multiplier=0.25", "model.stem=cifar", f"method.num_prototypes={args.k}",
        f"method.head.hidden_dim={args.hidden}",
        f"method.prototypes={prototypes}", f"train.batch_size={args.batch}", "train.epochs=1",
        "method.freeze_last_layer_epochs=0" if prototypes == "learned" else "train.seed=0",
    ]
    cfg, _ = build_config(overrides=overrides)
    torch.manual_seed(0)
    method = build_method(cfg, build_backbone(cfg.model, 32), steps_per_epoch=1000)
    optimizer = build_optimizer(cfg.optim, method.parameter_groups())
    views = BatchedViews(build_view_spec(cfg.views, 32, CIFAR_MEAN, CIFAR_STD))
    return cfg, method, optimizer, views


def make_train_step(args, prototypes: str, images: torch.Tensor):
    """A closure running one engine-style training step (``with_aug``: augment ``images`` first),
    plus the crops and config it uses."""
    cfg, method, optimizer, views = build(args, prototypes)
    crops = views(images)
    state = {"step": 0}

    def train_step(with_aug: bool = True) -> None:
        c = views(images) if with_aug else crops
        optimisation_step(method, method, optimizer, c, state["step"], 1e-4, 0.04, clip_grad=3.0)
        state["step"] += 1

    return train_step, crops, cfg, method


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    images = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8)
    train_step, crops, cfg, method = make_train_step(args, args.prototypes, images)
    backbone = build_backbone(cfg.model, 32)
    joined = torch.cat(crops)

    def backbone_step() -> None:
        backbone.zero_grad(set_to_none=True)
        backbone(joined).sum().backward()

    def teacher_forward() -> None:
        with torch.no_grad():
            method.teacher(crops[:2])

    cases = {"step": lambda: train_step(True), "step_no_aug": lambda: train_step(False),
             "backbone": backbone_step, "teacher_forward": teacher_forward}
    results: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            results[name].append(time_call(fn, args.repeats))
    med = {k: sorted(v)[len(v) // 2] for k, v in results.items()}
    ratio = med["step"] / med["backbone"]
    return {
        "config": {"backbone": "resnet18", "width_multiplier": 0.25, "channels_last": cfg.model.channels_last,
                   "batch": args.batch, "crops": "2 x 32 px", "num_prototypes": args.k,
                   "head_hidden_dim": args.hidden, "prototypes": args.prototypes,
                   "threads": torch.get_num_threads()},
        "seconds_per_step": round(med["step"], 4),
        "images_per_second_step": round(args.batch / med["step"], 1),
        "images_per_second_step_no_aug": round(args.batch / med["step_no_aug"], 1),
        "images_per_second_backbone_fwd_bwd": round(args.batch / med["backbone"], 1),
        "ratio_step_to_backbone": round(ratio, 3),
        "ratio_step_no_aug_to_backbone": round(med["step_no_aug"] / med["backbone"], 3),
        "teacher_forward_share_of_step": round(med["teacher_forward"] / med["step"], 3),
        "goal_ratio": 1.25,
        "goal_met": ratio <= 1.25,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prototypes", choices=["learned", "decoupled"], default="learned")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=2048, help="hidden width of the projection MLP")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    print(json.dumps(run(parser.parse_args(argv)), indent=2))


if __name__ == "__main__":
    main()
