"""The labelled collapse benchmark: short runs, healthy and broken, whose labels come from a
ground truth measured on a held-out probe, and the scores of the collapse alarms against it.

Ground truth (fixed before any alarm is tuned; the alarms never see it)
------------------------------------------------------------------------
The probe is a fixed held-out batch: the digits test split (450 images; for the CIFAR-10 subset
cases, the subset's 1,000 test images), encoded every
``PROBE_EVERY`` = 10 optimisation steps from step 10 on (and at step 0), with the network in eval
mode. On the probe's L2-normalised embeddings ``e`` (the bottleneck or projection the method's
loss or prototypes read; the backbone features for methods without one) and, with K prototypes
or codes, its assignment probabilities ``p`` (the method's own, for its scores):

* **representation collapse**: the mean pairwise cosine of ``e`` is above
  ``REPRESENTATION_COSINE`` = 0.9 (every embedding nearly the same direction) *and* the mean
  per-dimension standard deviation of ``e`` has fallen below ``SPREAD_FRACTION`` = 0.5 of its
  value at step 0. The second condition keeps a head whose embeddings sit in a narrow cone from
  the start (lightly's stock DINO head: mean cosine above 0.9 at initialisation) from counting
  as collapsed before it has trained;
* **dimensional collapse**: RankMe (``effective_rank``) of the *centred* ``e`` (the probe mean
  removed, so that a shared direction is not counted as one dimension of the data) is below
  ``DIMENSIONAL_FRACTION`` = 0.25 of the same architecture's healthy run (its pair's healthy
  run) at the same probe step. The healthy run of a pair is the reference and is not checked
  for it (a revision made before any alarm was tuned: comparing with the healthy run's highest
  value flagged the early steps of every healthy run, whose rank grows fourfold while it learns);
* **cluster collapse**: the probe's arg-max uses at most ``max(2, 1 % of min(K, N))`` prototypes
  or codes (N = the probe's images);
* **uniform collapse**: every probe assignment has an entropy of at least
  ``1 - UNIFORM_MARGIN`` = 0.98 of ln K;
* a kind's **onset** is the first probe step of ``PERSISTENCE`` = 2 consecutive probe checks at
  which it holds, counted only when it still holds at the last probe check; a kind that held and
  went away is recorded as **transient** and does not make the run failing (a revision made
  before any alarm was tuned: the decoupled default's probe used 4 means at steps 80-90 and 24
  at the end, with the best k-NN of the DINO runs);
* **failing**: any kind has an onset, or the final k-NN (weighted, k = 20, training split to
  probe, backbone features) is not above the random initialisation's;
* **healthy**: not failing;
* **partial prototype collapse** (recorded, a warning, not a failure): fewer than
  ``PARTIAL_UNIQUE`` = 1/2 of the prototypes unique at ε = 0.1 at the end.

Runs
----
*Trainer runs* are ``nocollapse train`` in process (the digits default and the digits recipes,
with the failure switch of each method; CARP on the default's settings with and without its
entropy term; and, on a CIFAR-10 subset of 300 training and 100 test images per class at 16 px,
the study's DINO and SimSiam recipes with and without centering / the stop-gradient, batch 128,
12 epochs), probed through a subclass of the trainer that measures the probe at its log steps.
The CIFAR cases need ``--cifar`` (default ``$NOCOLLAPSE_CIFAR10``) and are skipped without it.
*User-loop runs* are plain PyTorch loops on the flat digits through the public
:class:`nocollapse.CollapseMonitor`: a SimSiam-style loop with and without the stop-gradient
(with the recipe's batch norm at the projector's output, and without it), a healthy InfoNCE loop,
a Barlow Twins loop with and without its off-diagonal term, and lightly's DINO loop, healthy,
with its centre frozen at zero and a teacher temperature of 0.005, and with a flat teacher
(temperature 1) (needs the ``lightly`` extra; skipped without it). Each run's alarms
are those its monitor raised, at its own ``log_every`` (5 for the trainer's digits runs, 5 in the
loops) and ``PATIENCE`` = 3 checks, after a warm-up of one epoch, with ``HELD_OUT`` = 256
training images (not the probe's) encoded in eval mode at every check for the held-out metrics
(records made before they existed have none). (Records made before the
patience was tuned ran at 5; ``--rescore`` replays their collapse alarms at ``PATIENCE``.)

Every run also keeps what its step monitor was fed at each check (``alarm_inputs``: the
monitor's settings and the metrics of every check). ``--rescore`` replays today's collapse
alarms on them and scores again, and ``--alarm-set KEY=VALUE`` tries other
:class:`~nocollapse.diagnostics.alarms.AlarmMonitor` settings, both without training: the
alarms are a function of that stream, so thresholds are tuned on one seed's record and scored on
another's.

Scores
------
Per alarm, on the runs of one seed: detections (fired on a failing run whose ground truth has
the alarm's kind), the delay from that kind's onset in steps, misses (a failing run of the kind
it did not catch), false alarms (fired on a healthy run) and wrong-kind alarms (fired on a
failing run whose ground truth does not have the alarm's kind). Per run: its label, the kinds and
onsets, and what fired when. Alarms are tuned on seed 0 and scored on a seed
not looked at while tuning (seed 1 for the first round, seed 2 for the second: docs/results.md,
sections 17 and 18).

    python benchmarks/collapse_bench.py --seeds 0 --epochs 60 --out docs/alarm_bench/seed0.json
    python benchmarks/collapse_bench.py --seeds 1 --epochs 60 --out docs/alarm_bench/seed1.json
    python benchmarks/collapse_bench.py --rescore --out docs/alarm_bench/seed1.json --markdown
    python benchmarks/collapse_bench.py --out docs/alarm_bench/seed0.json --alarm-set dimensional_fraction=0.1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

PROBE_EVERY = 10
REPRESENTATION_COSINE = 0.9
SPREAD_FRACTION = 0.5
DIMENSIONAL_FRACTION = 0.25
UNIFORM_MARGIN = 0.02
PERSISTENCE = 2
PARTIAL_UNIQUE = 0.5
#: consecutive checks before an alarm fires, in every run of the benchmark (the library's default)
PATIENCE = 3
#: training images the monitor encodes in eval mode at every check, in the trainer runs (the
#: library's default, ``diagnostics.held_out_images``) and the user loops (``held_out=``)
HELD_OUT = 256
KINDS = ("representation", "dimensional", "cluster", "uniform")
#: the kind each collapse alarm claims (warnings and run checks are not scored)
ALARM_KIND = {"representation_collapse": "representation", "dimensional_collapse": "dimensional",
              "one_hot_collapse": "cluster", "uniform_collapse": "uniform"}


# --------------------------------------------------------------------------- alarm inputs, replay
class AlarmInputRecorder:
    """Records what every step alarm monitor is fed during a run (the metrics of each check), so
    that the alarms can be replayed on the same runs with other rules or thresholds (``--rescore``,
    ``--alarm-set``) without training again. Only monitors that check ``representation_collapse``
    are recorded: the step alarms, not the per-epoch geometry or the skipped-steps check."""

    def __init__(self) -> None:
        self.streams: dict[int, dict] = {}

    def __enter__(self) -> "AlarmInputRecorder":
        from nocollapse.diagnostics.alarms import AlarmMonitor

        self._original = original = AlarmMonitor.update
        recorder = self

        def recording_update(monitor, step, metrics):
            if "representation_collapse" in monitor.enabled:
                stream = recorder.streams.setdefault(id(monitor), {"settings": {
                    "num_prototypes": monitor.num_prototypes, "embedding_dim": monitor.embedding_dim,
                    "warmup_steps": monitor.warmup_steps, "patience": monitor.patience,
                    "uniform_loss_reference": monitor.uniform_loss_reference}, "stream": []})
                stream["stream"].append([int(step), {k: _plain(v) for k, v in metrics.items()
                                                     if _plain(v) is not None}])
            return original(monitor, step, metrics)

        AlarmMonitor.update = recording_update
        return self

    def __exit__(self, *exc) -> None:
        from nocollapse.diagnostics.alarms import AlarmMonitor

        AlarmMonitor.update = self._original

    def result(self) -> dict | None:
        """The stream of the run's step monitor (a monitor rebuilt once K or D is known continues it)."""
        if not self.streams:
            return None
        streams = list(self.streams.values())
        merged = {"settings": streams[-1]["settings"], "stream": [item for s in streams for item in s["stream"]]}
        return merged


def _plain(value) -> float | int | None:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value if isinstance(value, int) else float(f"{value:.6g}")


def replay_alarms(run: dict, overrides: dict | None = None) -> list[dict] | None:
    """The collapse alarms today's rules raise on a run's recorded alarm inputs (None when the run
    was recorded without them); ``overrides``: :class:`AlarmMonitor` keyword arguments to try."""
    from nocollapse.diagnostics.alarms import COLLAPSE_ALARMS, AlarmMonitor

    inputs = run.get("alarm_inputs")
    if not inputs:
        return None
    settings = {**inputs["settings"], "patience": PATIENCE, **(overrides or {})}
    settings["patience"] = int(settings["patience"])
    monitor = AlarmMonitor(**settings, enabled=COLLAPSE_ALARMS)
    fired = []
    for step, metrics in inputs["stream"]:
        fired += [{"name": a.name, "step": a.step} for a in monitor.update(step, metrics)]
    return fired


# --------------------------------------------------------------------------- ground truth
def probe_state(embeddings: torch.Tensor, probs: torch.Tensor | None, step: int) -> dict:
    """The probe's ground-truth measures at one step."""
    from nocollapse.diagnostics import effective_rank

    e = F.normalize(embeddings.float(), dim=1)
    n = e.shape[0]
    total = e.sum(0)
    mean_cosine = float((total @ total - n) / (n * (n - 1)))
    state = {"step": step, "mean_cosine": mean_cosine, "spread": float(e.std(0).mean()),
             "rankme": float(effective_rank(e - e.mean(0)))}
    if probs is not None:
        k = probs.shape[1]
        entropy = -(probs.clamp_min(1e-12).log() * probs).sum(1)
        state.update(argmax_used=int(probs.argmax(1).unique().numel()), num_prototypes=k, probe_size=n,
                     min_entropy_ratio=float(entropy.min() / math.log(k)) if k > 1 else 0.0)
    return state


def kind_holds(kind: str, state: dict, healthy_rank: dict[int, float] | None, initial_spread: float) -> bool:
    if kind == "representation":
        return state["mean_cosine"] > REPRESENTATION_COSINE and state["spread"] < SPREAD_FRACTION * initial_spread
    if kind == "dimensional":
        reference = (healthy_rank or {}).get(state["step"])
        return reference is not None and state["rankme"] < DIMENSIONAL_FRACTION * reference
    if "argmax_used" not in state:
        return False
    if kind == "cluster":
        return state["argmax_used"] <= max(2, 0.01 * min(state["num_prototypes"], state.get("probe_size", 450)))
    return state["min_entropy_ratio"] >= 1.0 - UNIFORM_MARGIN      # uniform


def label_run(run: dict, healthy_rank: dict[int, float] | None) -> dict:
    """Kinds with their onsets, and the label, from a run's probe history and k-NN.
    ``healthy_rank``: the healthy partner's probe RankMe by step (None for a reference run)."""
    onsets, transient = {}, {}
    initial_spread = run["probe"][0]["spread"]
    for kind in KINDS:
        streak = []
        for state in run["probe"]:
            streak = streak + [state["step"]] if kind_holds(kind, state, healthy_rank, initial_spread) else []
            if len(streak) >= PERSISTENCE:
                at_end = kind_holds(kind, run["probe"][-1], healthy_rank, initial_spread)
                (onsets if at_end else transient)[kind] = streak[0]
                break
    knn_ok = run["knn_top1"] > run["knn_top1_init"]
    partial = run.get("unique_0.1") is not None and run["unique_0.1"] < PARTIAL_UNIQUE
    return {"onsets": onsets, "transient": transient, "knn_above_init": knn_ok, "failing": bool(onsets) or not knn_ok,
            "kinds_at_end": [k for k in KINDS if run["probe"] and kind_holds(k, run["probe"][-1], healthy_rank, initial_spread)],
            "partial_prototype_collapse": partial}


# --------------------------------------------------------------------------- trainer runs
#: CIFAR-10 subset: the first 300 training and 100 test images of each class (3,000 / 1,000)
CIFAR_SUBSET = {"train": 300, "test": 100}
CIFAR_SETS = ["data.image_size=16", "train.batch_size=128", "train.epochs=12", "train.log_every=5",
              "eval.knn_every=0"]

TRAINER_CASES = {
    # name: (config, overrides, healthy partner or None); a case's overrides win over the shared ones
    "dino_decoupled": (None, [], None),
    "dino_learned": (None, ["method.prototypes=learned"], None),
    "dino_learned_no_centering": (None, ["method.prototypes=learned", "dino.teacher_norm=none"], "dino_learned"),
    "dino_flat_teacher": (None, ["method.prototypes=learned", "dino.teacher_norm=centering", "dino.teacher_temp=1.0",
                                 "dino.warmup_teacher_temp=1.0"], "dino_learned"),
    "dino_learned_high_lr": (None, ["method.prototypes=learned", "optim.lr=0.01"], "dino_learned"),
    "swav": ("digits/swav", [], None),
    "swav_softmax_codes": ("digits/swav", ["swav.codes=softmax"], "swav"),
    "barlow_twins": ("digits/barlow_twins", [], None),
    "barlow_twins_no_offdiag": ("digits/barlow_twins", ["barlow_twins.lambda_offdiag=0"], "barlow_twins"),
    "vicreg": ("digits/vicreg", [], None),
    "vicreg_no_variance": ("digits/vicreg", ["vicreg.variance_weight=0"], "vicreg"),
    "byol": ("digits/byol", [], None),
    "byol_no_predictor": ("digits/byol", ["byol.predictor=false"], "byol"),
    "simsiam": ("digits/simsiam", [], None),
    "simsiam_no_stop_gradient": ("digits/simsiam", ["simsiam.stop_gradient=false"], "simsiam"),
    # CARP on the built-in default's digits settings; without its entropy term nothing spreads the
    # batch over the prototypes (the paper's collapse switch)
    "carp": (None, ["method.name=carp", "method.prototypes=learned"], None),
    "carp_no_entropy": (None, ["method.name=carp", "method.prototypes=learned", "carp.entropy_weight=0"], "carp"),
    # A CIFAR-10 subset (CIFAR_SUBSET below) at 16 px, batch 128, 12 epochs (276 steps): the
    # recipes of the study with their failure switches
    "cifar_dino": ("cifar10/dino", CIFAR_SETS, None),
    "cifar_dino_no_centering": ("cifar10/dino", [*CIFAR_SETS, "dino.teacher_norm=none"], "cifar_dino"),
    "cifar_simsiam": ("cifar10/simsiam", CIFAR_SETS, None),
    "cifar_simsiam_no_stop_gradient": ("cifar10/simsiam", [*CIFAR_SETS, "simsiam.stop_gradient=false"],
                                       "cifar_simsiam"),
    # CPLearn's prior-matching weight beta = 2 puts the digits on a handful of codes (results section 7.1)
    "cplearn": ("digits_cplearn", [], None),
    "cplearn_beta2": ("digits_cplearn", ["cplearn.beta=2"], "cplearn"),
}
QUICK_TRAINER = ("dino_learned", "dino_learned_no_centering", "simsiam", "simsiam_no_stop_gradient",
                 "vicreg", "vicreg_no_variance")


def cifar_subset(cifar: Path, out: Path, per_class: dict[str, int] = CIFAR_SUBSET) -> Path:
    """An image folder of links to the first ``per_class[split]`` files (sorted) of each class of
    a CIFAR-10 ImageFolder root; made once, reused when ``out`` already holds it."""
    cifar, out = Path(cifar), Path(out)
    for split, count in per_class.items():
        if not (cifar / split).is_dir():
            raise FileNotFoundError(f"{cifar / split} is not a folder: --cifar must be a CIFAR-10 root with train/ and test/")
        for class_dir in sorted(d for d in (cifar / split).iterdir() if d.is_dir()):
            target = out / split / class_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for path in sorted(class_dir.iterdir())[:count]:
                link = target / path.name
                if not link.exists():
                    link.symlink_to(path.resolve())
    return out


def run_trainer_case(name: str, seed: int, epochs: int, extra: list[str] | tuple[str, ...] = (),
                     cifar_root: Path | None = None) -> dict:
    """One trainer case; ``extra``: more ``--set`` overrides (the test suite's tiny sizes);
    ``cifar_root``: the CIFAR-10 subset folder the ``cifar_`` cases train on."""
    from nocollapse.analysis import encode_split
    from nocollapse.config import build_config
    from nocollapse.engine.trainer import Trainer

    config, overrides, _ = TRAINER_CASES[name]
    configs = Path(__file__).resolve().parents[1] / "src" / "nocollapse" / "configs"
    sets = [f"train.epochs={epochs}", f"train.seed={seed}", "train.threads=1", "train.progress=false",
            "diagnostics.plots=false", "train.log_every=5", "eval.save_features=false",
            f"diagnostics.held_out_images={HELD_OUT}",
            f"diagnostics.alarm_patience={PATIENCE}", *overrides, *extra]
    if name.startswith("cifar_"):
        if cifar_root is None:
            raise ValueError(f"{name} needs the CIFAR-10 subset folder (--cifar DIR or $NOCOLLAPSE_CIFAR10)")
        sets.insert(0, f"data.root={cifar_root}")
    cfg, _ = build_config(configs / f"{config or 'digits'}.yaml", sets)
    history: list[dict] = []

    class ProbedTrainer(Trainer):
        def probe(self) -> None:
            out = encode_split(self.method, self.splits.test, self.image_size, self.splits, 512, self.device,
                               with_head=True)
            embeddings = out.embeddings if out.embeddings is not None else out.features
            probs = None
            if self.method.num_prototypes:
                with torch.no_grad():
                    scores = self.method.scores(out.embeddings.to(self.device)) if out.embeddings is not None else None
                    if scores is not None:
                        probs = self.method.probs_from_scores(scores)
                        probs = None if probs is None else probs.float().cpu()
            history.append(probe_state(embeddings, probs, self.position.step))

        def _log_step(self, step, loss, out, progress) -> None:
            super()._log_step(step, loss, out, progress)
            if self.position.step % PROBE_EVERY == 0:
                self.probe()

    with tempfile.TemporaryDirectory() as tmp, AlarmInputRecorder() as recorder:
        trainer = ProbedTrainer(cfg, Path(tmp) / "run")
        start = time.perf_counter()
        summary = trainer.fit()
        seconds = time.perf_counter() - start
        alarms = [{"name": a.name, "step": a.step} for a in trainer.monitor.alarms]
    unique = (summary.get("unique_prototypes") or {}).get("0.1")
    return {"name": name, "kind": "trainer", "seed": seed, "config": config or "digits", "overrides": overrides,
            "steps": summary["steps"], "seconds": round(seconds, 1), "knn_top1": summary["knn_top1"],
            "knn_top1_init": summary["knn_top1_init"], "unique_0.1": unique, "alarms": alarms, "probe": history,
            "alarm_inputs": recorder.result()}


# --------------------------------------------------------------------------- user loops
def digits_split(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=450, random_state=0, stratify=y)
    return train_x, train_y, test_x, test_y


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    noise = 0.3 * torch.randn(x.shape, generator=gen)
    keep = (torch.rand(x.shape, generator=gen) > 0.2).float()
    return (x + noise) * keep


def mlp(out_dim: int, hidden: int = 256, batchnorm_out: bool = False, in_dim: int = 64) -> nn.Sequential:
    layers = [nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out_dim)]
    if batchnorm_out:
        layers.append(nn.BatchNorm1d(out_dim))
    return nn.Sequential(*layers)


def knn(train_f, train_y, test_f, test_y) -> float:
    from nocollapse.evaluation import knn_accuracy

    return float(knn_accuracy(train_f, train_y, test_f, test_y, k=20, temperature=0.07, num_classes=10)["top1"])


def run_loop_case(name: str, seed: int, epochs: int) -> dict:
    """A user's own loop with the public monitor (module doc)."""
    from nocollapse import CollapseMonitor

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train_x, train_y, test_x, test_y = digits_split(seed)
    batch, steps_per_epoch = 128, len(train_x) // 128
    dim = 64
    history: list[dict] = []
    backbone = mlp(128)
    k = None
    if name.startswith("loop_simsiam"):
        # "plain": no batch norm at the projector's output, as in a user's first SimSiam-style loop;
        # the recipe's output batch norm keeps every dimension's variance even when it collapses
        plain = name.startswith("loop_simsiam_plain")
        projector = mlp(dim, batchnorm_out=not plain, in_dim=128)
        predictor = nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, dim))
        params = [*backbone.parameters(), *projector.parameters(), *predictor.parameters()]
        stop_gradient = not name.endswith("no_stop_gradient")
    elif name == "loop_infonce":
        projector = mlp(dim, in_dim=128)
        params = [*backbone.parameters(), *projector.parameters()]
    elif name.startswith("loop_barlow_twins"):
        # lambda 1 / d: Barlow Twins' 0.0051 is sized for thousands of dimensions (d = 64 here)
        from nocollapse.losses.barlow_twins import barlow_twins_loss

        projector = mlp(dim, in_dim=128)
        params = [*backbone.parameters(), *projector.parameters()]
        lambda_offdiag = 0.0 if name.endswith("no_offdiag") else 1.0 / dim
    else:                                             # lightly DINO
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad, update_momentum

        from nocollapse.integrations.lightly import dino_teacher_probabilities

        k = 64
        projector = DINOProjectionHead(128, 256, 32, output_dim=k)
        student = nn.Sequential(backbone, projector)
        teacher = nn.Sequential(mlp(128), DINOProjectionHead(128, 256, 32, output_dim=k))  # weight norm: no deepcopy
        teacher.load_state_dict(student.state_dict())
        deactivate_requires_grad(teacher)
        frozen = name == "loop_lightly_dino_frozen_centre"
        # flat teacher: a teacher temperature as high as the student's, so the centred teacher is uniform
        teacher_temp = 0.005 if frozen else 1.0 if name == "loop_lightly_dino_flat_teacher" else 0.04
        criterion = DINOLoss(output_dim=k, warmup_teacher_temp_epochs=0,
                             teacher_temp=teacher_temp, center_momentum=1.0 if frozen else 0.9)
        params = list(student.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3)
    held_out_x = train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))[:HELD_OUT]]

    def held_out_embeddings():                      # the monitor's held-out images, in eval mode
        modules = [backbone, projector] + ([teacher] if name.startswith("loop_lightly") else [])
        for m in modules:
            m.eval()
        try:
            return embed(held_out_x)[0]
        finally:
            for m in modules:
                m.train()

    monitor = CollapseMonitor(num_prototypes=k, embedding_dim=dim if k is None else 32,
                              warmup_steps=steps_per_epoch, log_every=5, patience=PATIENCE, tensorboard=False,
                              held_out=held_out_embeddings if HELD_OUT else None)

    def embed(x):                                    # the probe's embeddings and probabilities
        if name.startswith("loop_lightly"):    # the teacher's embeddings and DINO targets
            z = F.normalize(teacher[1].layers(teacher[0](x)), dim=1)
            return z, dino_teacher_probabilities(criterion, teacher(x), epoch=epochs)
        return F.normalize(projector(backbone(x)), dim=1), None

    def probe(step):
        modules = [backbone, projector] + ([teacher] if name.startswith("loop_lightly") else [])
        for m in modules:
            m.eval()
        with torch.no_grad():
            e, p = embed(test_x)
        for m in modules:
            m.train()
        history.append(probe_state(e, p, step))

    with torch.no_grad():
        backbone.eval()
        init = knn(backbone(train_x), train_y, backbone(test_x), test_y)
        backbone.train()
    probe(0)
    step = 0
    start = time.perf_counter()
    with AlarmInputRecorder() as recorder:
        for epoch in range(epochs):
            order = torch.randperm(len(train_x), generator=gen)
            for idx in order[: steps_per_epoch * batch].split(batch):
                x1, x2 = augment(train_x[idx], gen), augment(train_x[idx], gen)
                update = {}
                if name.startswith("loop_simsiam"):
                    z1, z2 = projector(backbone(x1)), projector(backbone(x2))
                    p1, p2 = predictor(z1), predictor(z2)
                    t1, t2 = (z1.detach(), z2.detach()) if stop_gradient else (z1, z2)
                    loss = -0.5 * (F.cosine_similarity(p1, t2).mean() + F.cosine_similarity(p2, t1).mean())
                    update["embeddings"] = F.normalize(z1.detach(), dim=1)
                elif name.startswith("loop_barlow_twins"):
                    z1, z2 = projector(backbone(x1)), projector(backbone(x2))
                    loss = barlow_twins_loss(z1, z2, lambda_offdiag=lambda_offdiag)
                    update["embeddings"] = z1.detach()
                elif name == "loop_infonce":
                    z1, z2 = F.normalize(projector(backbone(x1)), dim=1), F.normalize(projector(backbone(x2)), dim=1)
                    logits = z1 @ z2.t() / 0.2
                    target = torch.arange(len(idx))
                    loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
                    update["embeddings"] = z1.detach()
                else:
                    with torch.no_grad():
                        teacher_out = [teacher(x1), teacher(x2)]
                        h = F.normalize(teacher[1].layers(teacher[0](x1)), dim=1)
                    student_out = [student(x1), student(x2)]
                    update["probs"] = dino_teacher_probabilities(criterion, teacher_out[0], epoch=epoch)
                    loss = criterion(teacher_out, student_out, epoch=epoch)
                    if frozen:
                        criterion.center.zero_()
                    update["embeddings"] = h
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if name.startswith("loop_lightly"):
                    update_momentum(student, teacher, m=0.99)
                step += 1
                monitor.update(step, loss=loss.detach(), **update)
                if step % PROBE_EVERY == 0:
                    probe(step)
            monitor.end_epoch(step)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        backbone.eval()
        end = knn(backbone(train_x), train_y, backbone(test_x), test_y)
    return {"name": name, "kind": "loop", "seed": seed, "steps": step, "seconds": round(seconds, 1),
            "knn_top1": end, "knn_top1_init": init, "unique_0.1": None,
            "alarms": [{"name": a.name, "step": a.step} for a in monitor.alarms], "probe": history,
            "alarm_inputs": recorder.result()}


LOOP_CASES = {"loop_simsiam": None, "loop_simsiam_no_stop_gradient": "loop_simsiam",
              "loop_simsiam_plain": None, "loop_simsiam_plain_no_stop_gradient": "loop_simsiam_plain", "loop_infonce": None,
              "loop_barlow_twins": None, "loop_barlow_twins_no_offdiag": "loop_barlow_twins",
              "loop_lightly_dino": None, "loop_lightly_dino_frozen_centre": "loop_lightly_dino",
              "loop_lightly_dino_flat_teacher": "loop_lightly_dino"}


# --------------------------------------------------------------------------- scores
def score(runs: list[dict]) -> dict:
    """Per alarm: detections with delays, misses and false alarms; per run: label and alarms."""
    per_alarm: dict[str, dict] = {}
    for alarm, kind in ALARM_KIND.items():
        detections, misses, false_alarms, wrong_kind = [], [], [], []
        for run in runs:
            fired = next((a["step"] for a in run["alarms"] if a["name"] == alarm), None)
            label = run["label"]
            if not label["failing"]:
                if fired is not None:
                    false_alarms.append(run["name"])
                continue
            onset = label["onsets"].get(kind)
            if onset is None:
                if fired is not None:          # failing, but not in the way this alarm says
                    wrong_kind.append(run["name"])
                continue
            if fired is None:
                misses.append(run["name"])
            else:
                detections.append({"run": run["name"], "delay": fired - onset})
        delays = sorted(d["delay"] for d in detections)
        per_alarm[alarm] = {"kind": kind, "detections": detections, "misses": misses, "false_alarms": false_alarms,
                            "wrong_kind": wrong_kind,
                            "median_delay": delays[len(delays) // 2] if delays else None,
                            "worst_delay": delays[-1] if delays else None}
    caught, uncaught = [], []
    for run in runs:
        if not run["label"]["failing"]:
            continue
        kinds = set(run["label"]["onsets"])
        fired_kinds = {ALARM_KIND[a["name"]] for a in run["alarms"] if a["name"] in ALARM_KIND}
        (caught if kinds & fired_kinds else uncaught).append(run["name"])
    healthy_with_collapse_alarm = [r["name"] for r in runs if not r["label"]["failing"]
                                   and any(a["name"] in ALARM_KIND for a in r["alarms"])]
    all_delays = sorted(d["delay"] for entry in per_alarm.values() for d in entry["detections"])
    summary = {"runs": len(runs), "healthy": sum(not r["label"]["failing"] for r in runs),
               "failing": sum(r["label"]["failing"] for r in runs),
               "failing_with_a_kind": sum(bool(r["label"]["onsets"]) for r in runs), "caught": len(caught),
               "healthy_with_a_collapse_alarm": len(healthy_with_collapse_alarm),
               "median_delay": all_delays[len(all_delays) // 2] if all_delays else None,
               "worst_delay": all_delays[-1] if all_delays else None}
    return {"per_alarm": per_alarm, "failing_caught_by_right_kind": caught, "failing_not_caught": uncaught,
            "healthy_with_a_collapse_alarm": healthy_with_collapse_alarm, "summary": summary}


def markdown(record: dict, seed: int) -> str:
    """The per-run and per-alarm tables of one seed, as in docs/results.md."""
    runs = [r for r in record["runs"] if r["seed"] == seed]
    lines = ["| run | label | onsets (step) | k-NN init → end | unique @ 0.1 | alarms (step) |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        label = run["label"]
        kind = "healthy" if not label["failing"] else "failing" if label["onsets"] else "failing (k-NN only)"
        onsets = ", ".join(f"{k} {v}" for k, v in label["onsets"].items()) or "-"
        unique = "-" if run.get("unique_0.1") is None else f"{run['unique_0.1']:.3f}"
        alarms = ", ".join(f"{a['name']} ({a['step']})" for a in run["alarms"]) or "none"
        lines.append(f"| {run['name']} | {kind} | {onsets} | {run['knn_top1_init']:.3f} → {run['knn_top1']:.3f} | "
                     f"{unique} | {alarms} |")
    scores = score(runs)
    lines += ["", "| alarm | kind | detections (delay) | misses | wrong kind | false alarms on healthy runs |",
              "|---|---|---|---|---|---|"]
    for alarm, entry in scores["per_alarm"].items():
        detections = ", ".join(f"{d['run']} (+{d['delay']})" for d in entry["detections"]) or "-"
        lines.append(f"| {alarm} | {entry['kind']} | {detections} | {', '.join(entry['misses']) or '-'} | "
                     f"{', '.join(entry['wrong_kind']) or '-'} | {', '.join(entry['false_alarms']) or '-'} |")
    summary = scores["summary"]
    lines += ["", f"failing runs with a collapse kind caught by an alarm of that kind: {summary['caught']} of "
              f"{summary['failing_with_a_kind']} ({summary['failing'] - summary['failing_with_a_kind']} more fail "
              f"by k-NN only); healthy runs with a collapse alarm: {summary['healthy_with_a_collapse_alarm']} "
              f"of {summary['healthy']}; delays: median {summary['median_delay']}, worst {summary['worst_delay']}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--quick", action="store_true", help="a subset at fewer steps, for tuning (< 10 min)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 20; --quick 10)")
    parser.add_argument("--cases", nargs="*", default=None, help="only these runs (and their healthy partners)")
    parser.add_argument("--out", type=Path, required=True, help="JSON record; runs already in it are kept")
    parser.add_argument("--cifar", default=os.environ.get("NOCOLLAPSE_CIFAR10"),
                        help="CIFAR-10 ImageFolder root (train/, test/) for the cifar_ cases; default "
                             "$NOCOLLAPSE_CIFAR10, without which they are skipped")
    parser.add_argument("--cifar-subset", default=str(Path(tempfile.gettempdir()) / "nocollapse_bench_cifar_subset"),
                        help="where the subset's folder of links is made (reused when present)")
    parser.add_argument("--rescore", action="store_true",
                        help="train nothing: replay today's collapse alarms on the recorded alarm inputs of the "
                             "record's runs (runs recorded without them keep the alarms they raised), and score")
    parser.add_argument("--alarm-set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="AlarmMonitor keyword arguments for the replay (tuning); implies --rescore and "
                             "leaves the record unchanged")
    parser.add_argument("--markdown", action="store_true", help="print the tables of docs/results.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    epochs = args.epochs or (10 if args.quick else 20)
    record = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    overrides = {key: float(value) for key, value in (item.split("=", 1) for item in args.alarm_set)}
    if args.rescore or overrides:
        for run in record["runs"]:
            replayed = replay_alarms(run, overrides)
            if replayed is not None:
                run["alarms"] = sorted([a for a in run["alarms"] if a["name"] not in ALARM_KIND] + replayed,
                                       key=lambda a: a["step"])
        seeds = sorted({r["seed"] for r in record["runs"]})
    else:
        train_runs(args, record, epochs)
        seeds = args.seeds
    partners = {**{n: c[2] for n, c in TRAINER_CASES.items()}, **LOOP_CASES}
    by_key = {(r["name"], r["seed"]): r for r in record["runs"]}
    for run in record["runs"]:
        partner = by_key.get((partners.get(run["name"]), run["seed"])) if partners.get(run["name"]) else None
        healthy_rank = {s["step"]: s["rankme"] for s in partner["probe"]} if partner else None
        run["label"] = label_run(run, healthy_rank)
    record["definitions"] = {"probe_every": PROBE_EVERY, "representation_cosine": REPRESENTATION_COSINE,
                             "spread_fraction": SPREAD_FRACTION,
                             "dimensional_fraction": DIMENSIONAL_FRACTION, "uniform_margin": UNIFORM_MARGIN,
                             "persistence": PERSISTENCE, "partial_unique": PARTIAL_UNIQUE,
                             "epochs": record.get("definitions", {}).get("epochs", epochs) if args.rescore else epochs}
    record["scores"] = {str(seed): score([r for r in record["runs"] if r["seed"] == seed]) for seed in seeds}
    if not overrides:
        args.out.write_text(json.dumps(record, indent=1))
    if args.markdown:
        for seed in seeds:
            print(f"#### Seed {seed}\n\n{markdown(record, seed)}\n")
        return
    for run in record["runs"]:
        label = run["label"]
        print(f"{run['name']:28s} seed {run['seed']} {'FAILING' if label['failing'] else 'healthy':8s} "
              f"onsets {label['onsets']} knn {run['knn_top1_init']:.3f}->{run['knn_top1']:.3f} "
              f"alarms {[(a['name'], a['step']) for a in run['alarms']]}")
    print(json.dumps({seed: entry["summary"] for seed, entry in record["scores"].items()}, indent=1))


def train_runs(args, record: dict, epochs: int) -> None:
    """Train the chosen cases of the chosen seeds that the record does not hold yet, saving after each."""
    try:
        import lightly  # noqa: F401
        loops = dict(LOOP_CASES)
    except ImportError:
        loops = {k: v for k, v in LOOP_CASES.items() if not k.startswith("loop_lightly")}
    trainer_names = list(QUICK_TRAINER if args.quick else TRAINER_CASES)
    loop_names = list(loops)
    if args.cases:
        wanted = set(args.cases)
        wanted |= {TRAINER_CASES[c][2] for c in wanted if c in TRAINER_CASES and TRAINER_CASES[c][2]}
        wanted |= {loops[c] for c in wanted if loops.get(c)}
        trainer_names = [n for n in trainer_names if n in wanted]
        loop_names = [n for n in loop_names if n in wanted]
    cifar_root = None
    if any(n.startswith("cifar_") for n in trainer_names):
        if args.cifar:
            try:
                cifar_root = cifar_subset(Path(args.cifar), Path(args.cifar_subset))
            except FileNotFoundError as exc:
                raise SystemExit(f"collapse_bench: {exc}") from None
        else:
            print("no CIFAR-10 folder (--cifar or $NOCOLLAPSE_CIFAR10): the cifar_ cases are skipped", flush=True)
            trainer_names = [n for n in trainer_names if not n.startswith("cifar_")]
    done = {(r["name"], r["seed"]) for r in record["runs"]}
    for seed in args.seeds:
        for name in trainer_names + loop_names:
            if (name, seed) in done:
                continue
            if name in trainer_names:
                run = run_trainer_case(name, seed, epochs, cifar_root=cifar_root)
            else:
                run = run_loop_case(name, seed, epochs)
            record["runs"].append(run)
            args.out.write_text(json.dumps(record, indent=1))
            print(json.dumps({k: run[k] for k in ("name", "seed", "steps", "seconds", "knn_top1", "knn_top1_init",
                                                  "alarms")}), flush=True)


if __name__ == "__main__":
    main()
