"""Prototypes as one interface: learned, decoupled and fixed sets answer the same calls, every
method exposes its set through the same hook, and the monitor reads a set as ``nocollapse train``
reads a method's prototypes."""

from __future__ import annotations

import pytest
import torch

from nocollapse import CollapseMonitor
from nocollapse.config import build_config
from nocollapse.methods import build_method
from nocollapse.models.backbones import build_backbone
from nocollapse.prototypes import (DecoupledPrototypes, FixedPrototypes, LearnedPrototypes, PrototypeSet,
                                   orthonormal_prototypes)

K, D = 16, 8


def _sets() -> dict[str, PrototypeSet]:
    torch.manual_seed(0)
    return {"learned": LearnedPrototypes(D, K, ema_teacher=True, freeze_steps=1),
            "decoupled": DecoupledPrototypes(K, D, init="random"),
            "fixed": FixedPrototypes(orthonormal_prototypes(K // 2, D), normalize_inputs=True)}


@pytest.mark.parametrize("kind", ["learned", "decoupled", "fixed"])
def test_every_kind_answers_the_same_calls(kind):
    prototypes = _sets()[kind]
    k = prototypes.num_prototypes
    z = torch.nn.functional.normalize(torch.randn(6, D), dim=1)
    assert prototypes.kind == kind and prototypes.dim == D
    assert prototypes(z).shape == prototypes.target_scores(z).shape == (6, k)
    assert prototypes.vectors().shape == (k, D) and not prototypes.vectors().requires_grad
    snap = prototypes.snapshot()
    assert snap.vectors.shape == (k, D) and snap.fixed == (kind == "fixed")
    gamma = prototypes.update(torch.cat([z, z]), step=0, views=2)
    assert (gamma is not None) == (kind == "decoupled")
    assert (prototypes.usage_weights() is not None) == (kind == "decoupled")
    assert (prototypes.trainable_vectors() is not None) == (kind == "learned")
    prototypes.after_backward(0)
    prototypes.after_optimizer_step(0, teacher_momentum=0.9)
    prototypes.discard()


def test_learned_prototypes_freeze_then_train_and_the_teacher_follows_by_ema():
    prototypes = _sets()["learned"]
    z = torch.randn(4, D)
    for step in range(2):
        prototypes(z).sum().backward()
        prototypes.after_backward(step)
        frozen = all(p.grad is None for p in prototypes.student.parameters())
        assert frozen == (step < 1)
        prototypes.student.zero_grad(set_to_none=True)
    teacher = prototypes.vectors().clone()
    direction = lambda layer: layer.layer.parametrizations.weight.original1.detach().clone()   # noqa: E731
    with torch.no_grad():
        prototypes.student.layer.parametrizations.weight.original1.add_(1.0)
    expected = 0.5 * direction(prototypes.teacher) + 0.5 * direction(prototypes.student)
    prototypes.after_optimizer_step(1, teacher_momentum=0.5)
    # the weight-normalised rows of the EMA of the directions (gains fixed to 1)
    assert torch.allclose(prototypes.vectors(), torch.nn.functional.normalize(expected, dim=1), atol=1e-6)
    assert not torch.allclose(prototypes.vectors(), teacher, atol=1e-3)
    with pytest.raises(ValueError, match="teacher momentum"):
        prototypes.after_optimizer_step(2)


def test_fixed_prototypes_score_in_fp32_under_bf16_autocast_and_never_change():
    rows = torch.sign(torch.randn(K, D))
    prototypes = FixedPrototypes(rows, temperature=0.5)
    h = torch.tanh(torch.randn(5, D))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = prototypes(h.bfloat16())
    assert scores.dtype == torch.float32
    assert torch.allclose(scores, h.bfloat16().float() @ rows.t() / 0.5, atol=1e-5)
    assert not list(prototypes.parameters()) and torch.equal(prototypes.vectors(), rows)
    with pytest.raises(ValueError, match=r"\[K, D\]"):
        FixedPrototypes(torch.zeros(3))


@pytest.mark.parametrize("kind", ["learned", "decoupled", "fixed"])
def test_monitor_reads_a_set_as_it_reads_the_tensors(kind):
    prototypes = _sets()[kind]
    from_set = CollapseMonitor(alarms=False).end_epoch(0, prototypes=prototypes)
    snap = prototypes.snapshot()
    tensors = CollapseMonitor(alarms=False, fixed_prototypes=snap.fixed).end_epoch(
        0, prototypes=snap.vectors, mixture_weights=snap.usage_weights, idle=snap.idle)
    assert from_set == tensors
    assert ("unique_0.1" in from_set) == (kind != "fixed")
    assert ("mixture_perplexity" in from_set) == (kind == "decoupled")


def test_monitor_refuses_what_it_cannot_read():
    monitor = CollapseMonitor(alarms=False)
    with pytest.raises(ValueError, match="brings its own"):
        monitor.end_epoch(0, prototypes=_sets()["decoupled"], mixture_weights=torch.ones(K))
    with pytest.raises(TypeError, match="prototype set"):
        monitor.end_epoch(0, prototypes=[[0.0, 1.0]])


HEAD = ["method.num_prototypes=32", "method.head.hidden_dim=32", "method.head.bottleneck_dim=8"]
CASES = {"dino": ["method.prototypes=learned", *HEAD], "dino-decoupled": ["method.prototypes=decoupled", *HEAD],
         "carp": ["method.name=carp", "carp.block_size=8", *HEAD],
         "swav": ["method.name=swav", "method.prototypes=learned", *HEAD],
         "cplearn": ["method.name=cplearn", "cplearn.embedding_dim=16", "cplearn.num_codes=32"],
         "clop": ["method.name=clop", "clop.num_classes=4", "contrastive.output_dim=8"], "simclr": ["method.name=simclr"]}
KINDS = {"dino": "learned", "dino-decoupled": "decoupled", "carp": "learned", "swav": "learned",
         "cplearn": "fixed", "clop": "fixed", "simclr": None}


@pytest.mark.parametrize("case", list(CASES))
def test_every_method_exposes_its_prototypes_through_one_hook(case):
    cfg, _ = build_config(overrides=["model.width_multiplier=0.125", *CASES[case]])
    method = build_method(cfg, build_backbone(cfg.model, 8), 4)
    prototypes = method.prototype_set()
    if KINDS[case] is None:
        assert prototypes is None and method.num_prototypes is None and method.prototype_vectors() is None
        return
    assert prototypes.kind == KINDS[case]
    assert method.num_prototypes == prototypes.num_prototypes and method.embedding_dim == prototypes.dim
    assert torch.equal(method.prototype_vectors(), prototypes.vectors())
    assert method.fixed_prototypes == (KINDS[case] == "fixed")
    z = torch.randn(3, prototypes.dim)
    assert torch.equal(method.scores(z), prototypes.target_scores(z))


def test_checkpoints_keep_the_names_they_always_had(tmp_path):
    """Learned prototypes are saved as ``student_prototypes`` / ``teacher_prototypes``, CPLearn's
    codes as the ``[f, c]`` ``codebook`` and CLOP's as ``prototypes``: earlier runs load, and
    earlier versions can read new checkpoints."""
    def build(*overrides):
        cfg, _ = build_config(overrides=["model.width_multiplier=0.125", *overrides])
        torch.manual_seed(len(overrides))
        return build_method(cfg, build_backbone(cfg.model, 8), 4)

    dino = build("method.prototypes=learned", *HEAD)
    state = dino.state_dict()
    assert {"student_prototypes.layer.parametrizations.weight.original1",
            "teacher_prototypes.layer.parametrizations.weight.original1"} <= set(state)
    assert not any(key.startswith("prototypes.") for key in state)
    other = build("method.prototypes=learned", "train.seed=1", *HEAD)
    other.load_state_dict(state)
    assert torch.equal(other.prototype_vectors(), dino.prototype_vectors())

    cplearn = build("method.name=cplearn", "cplearn.embedding_dim=16", "cplearn.num_codes=32")
    assert cplearn.state_dict()["codebook"].shape == (16, 32)
    clop = build("method.name=clop", "clop.num_classes=4", "contrastive.output_dim=8")
    assert clop.state_dict()["prototypes"].shape == (4, 8)
    moved = build("method.name=clop", "clop.num_classes=4", "contrastive.output_dim=8", "clop.prototype_seed=3")
    moved.load_state_dict(clop.state_dict())
    assert torch.equal(moved.prototype_vectors(), clop.prototype_vectors())
