"""The cost of each method's training step, against a bare backbone, at its CIFAR-10 recipe.

For a method of the collapse study (``common.STUDY``: a recipe of ``configs/cifar10/`` plus
overrides), on CIFAR-10-sized input (ResNet-18 at width 16, batch 256, two 32 px crops unless the
recipe says otherwise), it times in one process, interleaved over ``--rounds`` so that machine
noise hits every part alike (median of ``--repeats`` calls per round, median over rounds):

* ``step``: the training step as the engine runs it (batched augmentation of uint8 images, the
  method's forward and loss, backward, optimiser, EMA / mixture commit);
* ``augmentation``: the batched augmentation alone;
* ``teacher_forward``: the EMA teacher's forward on the two global crops (self-distillation only);
* ``student_forward_backward``: the trained encoder (backbone + projection head) forward and a
  backward of a stand-in loss, on all crops;
* ``optimizer``: the optimiser's step alone;
* ``mixture_update``: the E-step and statistics of decoupled prototypes on the teacher embeddings;
* ``backbone``: a bare backbone forward + backward on the same crops (the reference);
* ``lightly_reference_step`` (``--lightly-reference``, for ``dino``): the peer's step, lightly's
  DINO head, loss and EMA on the same backbone, crops and head widths, with the recipe's optimiser;
  ``speed_over_lightly`` is its time over our step's without augmentation (neither augments nor
  runs the monitor), per round and their median;
* ``held_out_check``: the collapse alarms' held-out check (``diagnostics.held_out_images``
  un-augmented images through the evaluation network in eval mode), which the trainer runs once
  per log step; ``held_out_check_share_per_step`` is its cost spread over ``train.log_every`` steps,
  as a share of the step.

Each case is also counted once in FLOPs (``torch.utils.flop_counter``: matrix products and
convolutions, forward and backward; elementwise work, softmaxes and the augmentation count zero),
so ``ratio_step_to_backbone_by_flops`` is the ratio the arithmetic alone sets, the same on every
machine: what the measured ratio holds above it is memory traffic and overhead. ``--flops-only``
counts without timing (seconds per method instead of minutes, and valid on a busy machine) and
writes ``OUT/flops/<method>.json``.

``method_overhead`` is what the step spends beyond augmentation, teacher, encoder and optimiser:
the loss itself (the codebook product, the gathered similarity matrix, the block softmaxes), the
mixture update, EMA and bookkeeping. Writes one JSON per method (``OUT/<method>.json``) and prints them;
where a decoupled recipe and its learned twin are both measured, also their step ratio
(``OUT/<decoupled>-vs-<learned>.json``).

    python benchmarks/throughput.py --methods dino dino_decoupled --out runs/throughput
    python benchmarks/throughput.py --methods carp carp_decoupled --set method.num_prototypes=65536 --tag k65536
    python benchmarks/throughput.py --flops-only --out docs/throughput
    python benchmarks/throughput.py --methods swav swav_paper barlow_twins barlow_twins_paper --out runs/baselines

The baselines (SwAV, Barlow Twins, VICReg, BYOL, SimSiam; ``BASELINES``) have no CIFAR-10 recipe
yet: each is measured on the same input with its bundled digits recipe's head and, as
``<name>_paper``, with its paper's head. For every method the JSON also holds the step's ratio to
the backbone in each round (their spread), the step without the augmentation (which the FLOP
count does not see), and how far each measured ratio sits above its FLOP-count ratio
(``measured_over_flops_ratio``; ``goal_measured_over_flops`` is 1.10, and 1.25 for a method with
more than 4,096 prototypes, whose K-wide elementwise passes the count cannot see). For ``dino``
with ``--lightly-reference``, ``goal_speed_over_lightly`` is 1.0 up to K = 4,096 and 1.3 above. A
decoupled recipe measured with its learned twin gets their step ratio against 1.05 x the ratio of
their FLOP counts (the mixture's E-step and statistics are counted, its elementwise work is not).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import nocollapse
from common import STUDY, peak_rss_bytes, time_call
from nocollapse.config import build_config
from nocollapse.data.batch import Batch
from nocollapse.analysis import HeldOutEncoder
from nocollapse.data.views import BatchedViews, build_view_spec, normalize_uint8
from nocollapse.engine.trainer import optimisation_step
from nocollapse.methods import build_method
from nocollapse.models.backbones import build_backbone
from nocollapse.utils.optim import build_optimizer
from nocollapse.utils.registry import METHODS

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
SIZE = 32
DECOUPLED_PAIRS = (("dino", "dino_decoupled"), ("carp", "carp_decoupled"))
GOAL_MEASURED_OVER_FLOPS = 1.10           # measured ratio to the backbone over the counted one, K <= 4,096
GOAL_MEASURED_OVER_FLOPS_LARGE_K = 1.25   # the same above K = 4,096
GOAL_DECOUPLED_OVER_FLOPS = 1.05          # decoupled / learned step seconds over their FLOP ratio
LARGE_K = 4096


def goal_measured_over_flops(num_prototypes: int) -> float:
    """How far a step's measured ratio to the backbone may sit above the ratio its FLOPs set."""
    return GOAL_MEASURED_OVER_FLOPS_LARGE_K if num_prototypes > LARGE_K else GOAL_MEASURED_OVER_FLOPS


def goal_speed_over_lightly(num_prototypes: int) -> float:
    """How much faster than lightly's DINO step ours must run (ours without augmentation)."""
    return 1.3 if num_prototypes > LARGE_K else 1.0


def decoupled_pair(learned: dict, decoupled: dict) -> dict:
    """Decoupled prototypes against their learned twin measured in the same invocation: the step
    ratio in seconds against ``GOAL_DECOUPLED_OVER_FLOPS`` times the ratio of their FLOP counts."""
    ratio = decoupled["seconds"]["step"] / learned["seconds"]["step"]
    by_flops = decoupled["gflops"]["step"] / learned["gflops"]["step"]
    goal = GOAL_DECOUPLED_OVER_FLOPS * by_flops
    return {"learned": learned["method"], "decoupled": decoupled["method"],
            "num_prototypes": decoupled["config"]["num_prototypes"],
            "ratio_decoupled_to_learned_step": round(ratio, 3), "ratio_by_flops": round(by_flops, 3),
            "ratio_over_flops": round(ratio / by_flops, 3), "goal": round(goal, 3), "goal_met": ratio <= goal}

# The baselines on the CIFAR-10 input of this benchmark (ResNet-18 at width 16, batch 256):
# name -> (bundled recipe, overrides). ``<name>`` keeps the recipe's head; ``<name>_paper`` puts
# the paper's head on (SwAV 2048 -> 128 with K = 3000; Barlow Twins and VICReg 8192-8192-8192;
# BYOL 4096 -> 256 with a 4096-wide predictor; SimSiam 2048-2048-2048 with a 512-wide predictor).
ON_CIFAR = ("data.dataset=cifar10", "train.batch_size=256")
BASELINES: dict[str, tuple[str, tuple[str, ...]]] = {
    "swav": ("digits/swav", ON_CIFAR),
    "swav_paper": ("digits/swav", (*ON_CIFAR, "method.head.hidden_dim=2048", "method.head.bottleneck_dim=128",
                                   "method.num_prototypes=3000")),
    "barlow_twins": ("digits/barlow_twins", ON_CIFAR),
    "barlow_twins_paper": ("digits/barlow_twins", (*ON_CIFAR, "barlow_twins.hidden_dim=8192",
                                                   "barlow_twins.output_dim=8192", "barlow_twins.layers=3")),
    "vicreg": ("digits/vicreg", ON_CIFAR),
    "vicreg_paper": ("digits/vicreg", (*ON_CIFAR, "vicreg.hidden_dim=8192", "vicreg.output_dim=8192",
                                       "vicreg.layers=3")),
    "byol": ("digits/byol", ON_CIFAR),
    "byol_paper": ("digits/byol", (*ON_CIFAR, "byol.hidden_dim=4096", "byol.output_dim=256",
                                   "byol.predictor_hidden_dim=4096")),
    "simsiam": ("digits/simsiam", ON_CIFAR),
    "simsiam_paper": ("digits/simsiam", (*ON_CIFAR, "simsiam.hidden_dim=2048", "simsiam.output_dim=2048",
                                         "simsiam.layers=3", "simsiam.predictor_hidden_dim=512")),
}
CASES = {**{name: (f"cifar10/{recipe}", overrides) for name, (recipe, overrides) in STUDY.items()}, **BASELINES}


def build_config_for(name: str, extra: list[str]):
    """The config of case ``name`` with ``extra`` overrides, resolved for CIFAR-10's classes."""
    recipe, overrides = CASES[name]
    path = Path(nocollapse.__file__).resolve().parent / "configs" / f"{recipe}.yaml"
    cfg, _ = build_config(path, overrides=[*overrides, "train.epochs=1", "data.dataset=cifar10", *extra])
    METHODS.get(cfg.method.name).configure_for_data(cfg, 10)  # CIFAR-10's classes, as the trainer does
    return cfg


def build(name: str, extra: list[str]):
    cfg = build_config_for(name, extra)
    torch.manual_seed(0)
    method = build_method(cfg, build_backbone(cfg.model, SIZE), steps_per_epoch=1000)
    optimizer = build_optimizer(cfg.optim, method.parameter_groups())
    views = BatchedViews(build_view_spec(cfg.views, SIZE, CIFAR_MEAN, CIFAR_STD))
    return cfg, method, optimizer, views


def count_gflops(fn) -> float:
    """GFLOPs of one call of ``fn`` (matrix products and convolutions, forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def lightly_reference_step(cfg, crops):
    """The peer's DINO step on the same input: lightly's ``DINOProjectionHead`` (the recipe's
    widths, BatchNorm as the recipe sets it, weight-normalised last layer), ``DINOLoss`` (the
    recipe's temperatures and centre momentum) and ``update_momentum`` EMA, on a backbone built as
    ours, with the recipe's optimiser (AdamW) over the student. ``None`` without the lightly extra."""
    try:
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad, update_momentum
    except ImportError:
        return None

    head_cfg, k = cfg.method.head, cfg.method.num_prototypes
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model, SIZE)
    with torch.no_grad():
        feature_dim = backbone(crops[0][:2]).shape[1]
    def network(trunk):
        return torch.nn.Sequential(trunk, DINOProjectionHead(feature_dim, head_cfg.hidden_dim, head_cfg.bottleneck_dim,
                                                             k, batch_norm=head_cfg.batchnorm))
    student = network(backbone)
    # a second network given the student's weights (the old-style weight norm of lightly's head
    # cannot be deep-copied)
    teacher = network(build_backbone(cfg.model, SIZE))
    teacher.load_state_dict(student.state_dict())
    deactivate_requires_grad(teacher)
    criterion = DINOLoss(output_dim=k, warmup_teacher_temp=cfg.dino.warmup_teacher_temp,
                         teacher_temp=cfg.dino.teacher_temp, warmup_teacher_temp_epochs=0,
                         student_temp=cfg.dino.student_temp, center_momentum=cfg.dino.center_momentum)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    joined = torch.cat(crops[:2])

    def step() -> None:
        update_momentum(student, teacher, cfg.method.teacher_momentum)
        with torch.no_grad():
            teacher_out = teacher(joined).chunk(2)
        student_out = student(joined).chunk(2)
        loss = criterion(list(teacher_out), list(student_out), epoch=0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def measure(name: str, args) -> dict:
    cfg, method, optimizer, views = build(name, args.set)
    batch = cfg.train.batch_size
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, SIZE, SIZE), dtype=torch.uint8, generator=gen)
    # the labels a semi-supervised recipe sees: a label_fraction of the batch labelled, the rest -1
    labels = torch.randint(0, 10, (batch,), generator=gen)
    labels[torch.rand(batch, generator=gen) >= cfg.data.label_fraction] = -1
    crops = views(images)
    state = {"step": 0}

    def step(with_aug: bool = True) -> None:
        c = views(images) if with_aug else crops
        optimisation_step(method, method, optimizer, Batch(c, labels if method.uses_labels else None),
                          state["step"], cfg.optim.lr, cfg.optim.weight_decay, clip_grad=cfg.optim.clip_grad)
        state["step"] += 1

    backbone = build_backbone(cfg.model, SIZE)
    joined = torch.cat(crops)

    def backbone_step() -> None:
        backbone.zero_grad(set_to_none=True)
        backbone(joined).sum().backward()

    encoder = next(getattr(method, name) for name in ("student", "online", "encoder") if hasattr(method, name))

    def student_forward_backward() -> None:
        encoder.zero_grad(set_to_none=True)
        _, emb = encoder(crops)
        emb.square().mean().backward()

    def optimizer_step() -> None:
        optimizer.step()  # on the gradients the last case left (their values do not change the cost)

    # the alarms' held-out check (diagnostics.held_out_images, every log step): the evaluation
    # network in eval mode on that many un-augmented images
    held_out = HeldOutEncoder(method, [normalize_uint8(images[:cfg.diagnostics.held_out_images], SIZE, CIFAR_MEAN,
                                                       CIFAR_STD)]) if cfg.diagnostics.held_out_images >= 2 else None
    cases = {"step": lambda: step(True), "step_without_augmentation": lambda: step(False),
             "augmentation": lambda: views(images), "backbone": backbone_step,
             "student_forward_backward": student_forward_backward, "optimizer": optimizer_step}
    if held_out is not None:
        cases["held_out_check"] = held_out
    teacher = getattr(method, "teacher", None) or getattr(method, "target", None)
    if teacher is not None:
        def teacher_forward() -> None:
            with torch.no_grad():
                teacher(crops[:2])
        cases["teacher_forward"] = teacher_forward
    prototypes = method.prototype_set()
    if prototypes is not None and prototypes.kind == "decoupled":
        with torch.no_grad():
            t_emb = torch.nn.functional.normalize(teacher(crops[:2])[1].float(), dim=-1)

        def mixture_update() -> None:
            method.gmm.update(t_emb, 0)
            method.gmm.discard()
        cases["mixture_update"] = mixture_update
    lightly_step = lightly_reference_step(cfg, crops) if name == "dino" and args.lightly_reference else None
    if lightly_step is not None:
        cases["lightly_reference_step"] = lightly_step
    # counted before the timing: the counted step is one more warm-up step
    gflops = {case: count_gflops(fn) for case, fn in cases.items()}
    # what summary.json records of the method: prototypes and K, CPLearn's f and number of codes, ...
    settings = {"method": cfg.method.name, **method.summary_fields()}
    result = {
        "method": name, "recipe": CASES[name][0], "overrides": [*CASES[name][1], *args.set],
        "config": {"backbone": cfg.model.backbone, "width_multiplier": cfg.model.width_multiplier,
                   "batch": batch, "crops": [list(c.shape[-2:]) for c in crops],
                   "threads": torch.get_num_threads(), "torch": torch.__version__, **settings},
        "gflops": {k: round(v, 3) for k, v in gflops.items()},
        "ratio_step_to_backbone_by_flops": round(gflops["step"] / gflops["backbone"], 3),
    }
    if args.flops_only:
        return result
    seconds: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.rounds):
        for case, fn in cases.items():
            seconds[case].append(time_call(fn, args.repeats))
    med = {k: sorted(v)[len(v) // 2] for k, v in seconds.items()}
    parts = ("augmentation", "teacher_forward", "student_forward_backward", "optimizer")
    overhead = med["step"] - sum(med.get(p, 0.0) for p in parts)
    ratio = med["step"] / med["backbone"]
    ratio_no_aug = med["step_without_augmentation"] / med["backbone"]
    by_flops = result["ratio_step_to_backbone_by_flops"]
    num_prototypes = int(getattr(cfg.method, "num_prototypes", 0) or 0)
    goal_over_flops = goal_measured_over_flops(num_prototypes)
    rounds = [step_s / backbone_s for step_s, backbone_s in zip(seconds["step"], seconds["backbone"])]
    peer = {}
    if "lightly_reference_step" in med:
        # the peer's step has no augmentation and no monitor: compared with ours without augmentation
        speed = [peer_s / ours for peer_s, ours in zip(seconds["lightly_reference_step"],
                                                       seconds["step_without_augmentation"])]
        median_speed = sorted(speed)[len(speed) // 2]
        peer_goal = goal_speed_over_lightly(num_prototypes)
        peer = {"speed_over_lightly_rounds": [round(r, 3) for r in speed],
                "speed_over_lightly": round(median_speed, 3),
                "goal_speed_over_lightly": peer_goal, "goal_speed_over_lightly_met": median_speed >= peer_goal,
                "lightly_reference_step_to_backbone": round(med["lightly_reference_step"] / med["backbone"], 3)}
    return {
        **result,
        **peer,
        # this process's peak resident memory so far (every case measured in it included)
        "peak_rss_bytes": peak_rss_bytes(),
        "images_per_second_step": round(batch / med["step"], 1),
        "images_per_second_backbone_fwd_bwd": round(batch / med["backbone"], 1),
        "seconds": {k: round(v, 4) for k, v in med.items()},
        "share_of_step": {k: round(v / med["step"], 3) for k, v in med.items() if k not in ("step", "backbone")},
        "method_overhead_seconds": round(overhead, 4),
        "method_overhead_share": round(overhead / med["step"], 3),
        "ratio_step_to_backbone": round(ratio, 3),
        # the held-out check runs once per log step: its share of a step at the recipe's log_every
        **({"held_out_check_share_per_step": round(med["held_out_check"] / cfg.train.log_every / med["step"], 4),
            "held_out_images": cfg.diagnostics.held_out_images, "log_every": cfg.train.log_every}
           if "held_out_check" in med else {}),
        "ratio_step_to_backbone_rounds": [round(r, 3) for r in rounds],
        "ratio_step_to_backbone_spread": round(max(rounds) - min(rounds), 3),
        "ratio_step_without_augmentation_to_backbone": round(ratio_no_aug, 3),
        "measured_over_flops_ratio": round(ratio / by_flops, 3),
        "measured_over_flops_ratio_without_augmentation": round(ratio_no_aug / by_flops, 3),
        "goal_measured_over_flops": goal_over_flops,
        "goal_measured_over_flops_met": ratio / by_flops <= goal_over_flops,
        "goal_ratio_to_backbone": 1.5,
        "goal_met": ratio <= 1.5,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(STUDY), choices=list(CASES))
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every method")
    parser.add_argument("--out", default="runs/throughput", help="one JSON per method goes here")
    parser.add_argument("--tag", default="", help="suffix of the JSON names (for a --set variant)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--lightly-reference", action="store_true",
                        help="for dino: also time lightly's DINO head, loss and EMA on the same backbone and crops "
                             "(the lightly extra), and report speed_over_lightly")
    parser.add_argument("--flops-only", action="store_true",
                        help="count each case's FLOPs, time nothing; writes OUT/flops/<method>.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) / "flops" if args.flops_only else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    suffix = f"-{args.tag}" if args.tag else ""
    for name in args.methods:
        result = measure(name, args)
        (out / f"{name}{suffix}.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1), flush=True)
        results[name] = result
    # decoupled prototypes against their learned twin, measured in this same invocation
    for learned, decoupled in DECOUPLED_PAIRS:
        if learned in results and decoupled in results and not args.flops_only:
            pair = decoupled_pair(results[learned], results[decoupled])
            (out / f"{decoupled}-vs-{learned}{suffix}.json").write_text(json.dumps(pair, indent=1))
            print(json.dumps(pair), flush=True)


if __name__ == "__main__":
    main()
