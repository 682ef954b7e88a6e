"""SimCLR, SupCon and CLOP: the losses against hand-derived values and the written-out formulas,
the orthonormal prototypes, the labelled subset, 2-process parity and digits runs from the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn import functional as F

from distributed_helpers import run_distributed
from nocollapse.config import ConfigError, build_config
from nocollapse.data.semi_supervised import labelled_subset, masked_labels
from nocollapse.losses.clop import clop_loss
from nocollapse.prototypes.fixed import orthonormal_prototypes
from nocollapse.losses.contrastive import nt_xent, supcon

EYE2 = torch.eye(2)


# ---- NT-Xent and SupCon -------------------------------------------------------------------

def test_nt_xent_by_hand():
    # anchor u1_0 = e0: keys e1 (s = 0), its positive e0 (s = 1), e1 (s = 0); all anchors alike
    assert float(nt_xent(EYE2, EYE2.clone(), temperature=1.0)) == pytest.approx(math.log(2 + math.e) - 1)
    # at T = 0.5 the similarities double
    assert float(nt_xent(EYE2, EYE2.clone(), temperature=0.5)) == pytest.approx(math.log(2 + math.e ** 2) - 2)


def test_supcon_by_hand():
    # both samples share class 0: anchor e0's positives are e1 (s=0), e0 (s=1), e1 (s=0) of 3 keys
    labels = torch.tensor([0, 0])
    expected = math.log(2 + math.e) - 1 / 3
    assert float(supcon(EYE2, EYE2.clone(), labels, temperature=1.0)) == pytest.approx(expected)
    # different classes: only the other view is positive, as NT-Xent
    assert float(supcon(EYE2, EYE2.clone(), torch.tensor([0, 1]), 1.0)) == pytest.approx(math.log(2 + math.e) - 1)


def _supcon_reference(z1, z2, labels, t):
    """L_out with explicit loops over anchors and positives."""
    u = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    y = torch.cat([labels, labels])
    n2 = u.shape[0]
    total = 0.0
    for a in range(n2):
        other = (a + n2 // 2) % n2
        denominator = sum(math.exp(float(u[a] @ u[k]) / t) for k in range(n2) if k != a)
        positives = [p for p in range(n2) if p != a and (p == other or (y[a] >= 0 and y[p] == y[a]))]
        total += -sum(float(u[a] @ u[p]) / t - math.log(denominator) for p in positives) / len(positives)
    return total / n2


def test_supcon_equals_the_written_out_formula_and_nt_xent_without_labels():
    gen = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    labels = torch.tensor([0, 1, 0, -1, 2, 1])
    assert float(supcon(z1, z2, labels, 0.3)) == pytest.approx(_supcon_reference(z1, z2, labels, 0.3), abs=1e-5)
    unlabelled = torch.full((6,), -1)
    assert float(supcon(z1, z2, unlabelled, 0.3)) == pytest.approx(float(nt_xent(z1, z2, 0.3)), abs=1e-6)
    assert float(supcon(z1, z2, None, 0.3)) == pytest.approx(float(nt_xent(z1, z2, 0.3)), abs=1e-6)
    assert float(nt_xent(z1, z2, 0.3)) == pytest.approx(_supcon_reference(z1, z2, unlabelled, 0.3), abs=1e-5)


# ---- CLOP ---------------------------------------------------------------------------------

def test_prototypes_are_orthonormal_seeded_and_need_enough_dimensions():
    p = orthonormal_prototypes(10, 128, seed=3)
    assert p.shape == (10, 128)
    assert torch.allclose(p.double() @ p.double().t(), torch.eye(10, dtype=torch.float64), atol=1e-6)
    assert torch.equal(p, orthonormal_prototypes(10, 128, seed=3))
    assert not torch.equal(p, orthonormal_prototypes(10, 128, seed=4))
    with pytest.raises(ValueError, match="dimension of at least 10"):
        orthonormal_prototypes(10, 8)


def test_clop_term_is_zero_on_the_prototype_one_when_orthogonal_and_ignores_unlabelled():
    p = orthonormal_prototypes(3, 8, seed=0)
    labels = torch.tensor([0, 2, -1])
    on = torch.stack([p[0], 5 * p[2], torch.randn(8)])       # scale does not matter
    assert float(clop_loss(on, on.clone(), labels, p)) == pytest.approx(0.0, abs=1e-6)
    orthogonal = torch.stack([p[1], p[0], p[0]])
    assert float(clop_loss(orthogonal, orthogonal.clone(), labels, p)) == pytest.approx(1.0, abs=1e-6)
    # one view on, one orthogonal: the mean of the two cosines
    assert float(clop_loss(on, orthogonal, labels, p)) == pytest.approx(0.5, abs=1e-6)
    # no labelled sample: 0
    assert float(clop_loss(on, on, torch.full((3,), -1), p)) == 0.0
    # euclidean (unsquared): orthogonal unit vectors are sqrt(2) apart
    assert float(clop_loss(orthogonal, orthogonal, labels, p, distance="euclidean")) == pytest.approx(math.sqrt(2))


# ---- the labelled subset ------------------------------------------------------------------

def test_labelled_subset_is_stratified_seeded_and_independent_of_anything_else():
    labels = torch.arange(10).repeat_interleave(50)
    keep = labelled_subset(labels, fraction=0.1, seed=5)
    assert torch.bincount(labels[keep]).tolist() == [5] * 10
    assert torch.equal(keep, labelled_subset(labels, fraction=0.1, seed=5))
    torch.manual_seed(123)  # the global RNG (train.seed) plays no part
    assert torch.equal(keep, labelled_subset(labels, fraction=0.1, seed=5))
    assert not torch.equal(keep, labelled_subset(labels, fraction=0.1, seed=6))
    assert torch.bincount(labels[labelled_subset(labels, per_class=3)]).tolist() == [3] * 10
    masked = masked_labels(labels, keep)
    assert int((masked >= 0).sum()) == 50 and torch.equal(masked[keep], labels[keep])
    # unknown labels are never chosen
    partly = labels.clone()
    partly[:250] = -1
    assert bool((partly[labelled_subset(partly, fraction=1.0)] >= 0).all())


def test_label_settings_are_rejected_for_methods_without_labels():
    with pytest.raises(ConfigError, match="uses labels"):
        build_config(overrides=["method.name=simclr", "data.label_fraction=0.1"])
    with pytest.raises(ConfigError, match="not both"):
        build_config(overrides=["method.name=supcon", "data.label_fraction=0.1", "data.labels_per_class=4"])
    build_config(overrides=["method.name=clop", "data.label_fraction=0.1"])


# ---- two processes ------------------------------------------------------------------------

def _losses(rank, world_size, z1, z2, labels, prototypes):
    n = z1.shape[0] // world_size
    shard = slice(rank * n, (rank + 1) * n)
    out = {}
    for name in ("nt_xent", "supcon", "clop"):
        a = z1[shard].clone().requires_grad_(True)
        b = z2[shard].clone().requires_grad_(True)
        if name == "nt_xent":
            loss = nt_xent(a, b, 0.4)
        elif name == "supcon":
            loss = supcon(a, b, labels[shard], 0.4)
        else:
            loss = clop_loss(a, b, labels[shard], prototypes)
        loss.backward()
        out[name] = {"loss": loss.detach(), "grad_a": a.grad, "grad_b": b.grad}
    from nocollapse.methods import build_method
    from nocollapse.models.backbones import build_backbone

    cfg, _ = build_config(overrides=["method.name=clop", "clop.num_classes=3", "contrastive.output_dim=8",
                                     "model.width_multiplier=0.125"])
    torch.manual_seed(rank)
    out["prototypes"] = build_method(cfg, build_backbone(cfg.model, 8), steps_per_epoch=2).prototype_vectors()
    return out


def test_two_processes_equal_one_process_on_the_joined_batch():
    gen = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(8, 8, generator=gen), torch.randn(8, 8, generator=gen)
    labels = torch.tensor([0, 1, -1, 2, 0, -1, -1, 1])
    prototypes = orthonormal_prototypes(3, 8)
    ranks = run_distributed(_losses, 2, args=(z1, z2, labels, prototypes))
    for name in ("nt_xent", "supcon", "clop"):
        a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
        if name == "nt_xent":
            joined = nt_xent(a, b, 0.4)
        elif name == "supcon":
            joined = supcon(a, b, labels, 0.4)
        else:
            joined = clop_loss(a, b, labels, prototypes)
        joined.backward()
        mean_loss = float((ranks[0][name]["loss"] + ranks[1][name]["loss"]) / 2)
        assert mean_loss == pytest.approx(float(joined.detach()), abs=1e-5), name
        # DDP averages the per-process gradients: (g_0 + g_1) / 2 per parameter
        for key, full in (("grad_a", a.grad), ("grad_b", b.grad)):
            per_rank = torch.cat([ranks[0][name][key], ranks[1][name][key]]) / 2
            assert torch.allclose(per_rank, full, atol=1e-6), (name, key)
    # the CLOP term is the global mean on every process: its weight is not divided by 2
    assert float(ranks[0]["clop"]["loss"]) == pytest.approx(float(ranks[1]["clop"]["loss"]), abs=1e-6)
    assert torch.equal(ranks[0]["prototypes"], ranks[1]["prototypes"])


# ---- end to end ---------------------------------------------------------------------------

TINY = ["data.image_size=8", "model.width_multiplier=0.125", "contrastive.hidden_dim=64",
        "contrastive.output_dim=16", "train.epochs=2", "train.batch_size=64", "train.progress=false",
        "train.threads=1", "eval.batch_size=256"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["simclr", "supcon", "clop"])
def test_each_method_trains_end_to_end_on_digits(tmp_path, name, monkeypatch):
    from nocollapse.cli import main
    from nocollapse.methods.simclr import SimCLR

    seen = []
    original = SimCLR.contrastive_loss

    def spy(self, z1, z2, batch):
        seen.append((batch.indices.cpu(), None if batch.labels is None else batch.labels.cpu()))
        return original(self, z1, z2, batch)

    monkeypatch.setattr(SimCLR, "contrastive_loss", spy)
    labels = [] if name == "simclr" else ["data.label_fraction=0.1"]
    out = tmp_path / name
    assert main(["train", "--out", str(out), "--set", f"method.name={name}", *TINY, *labels]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == name and 0.3 < summary["knn_top1"] <= 1.0
    if name == "simclr":
        assert all(lab is None for _, lab in seen)
        return
    subset = set(json.loads((out / "labelled_indices.json").read_text())["indices"])
    assert 0 < len(subset) < 0.15 * summary["train_images"]
    for indices, batch_labels in seen:
        for i, y in zip(indices.tolist(), batch_labels.tolist()):
            assert (y >= 0) == (i in subset)
    if name == "clop":
        assert summary["num_prototypes"] == 10 and summary["clusters"]["num_clusters"] == 10
