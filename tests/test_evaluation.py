"""Tests of nocollapse.evaluation: k-NN, linear probe, clustering, long-tail."""

from __future__ import annotations

import math

import pytest
import torch

from nocollapse.evaluation.clustering import (
    assignment_clustering,
    cluster_metrics,
    hungarian_accuracy,
    kmeans_clustering,
)
from nocollapse.evaluation.knn import (
    KNN_PROTOCOLS,
    knn_accuracy,
    knn_protocol_key,
    knn_protocols,
    weighted_knn_predict,
)
from nocollapse.evaluation.linear import linear_probe, stratified_split
from nocollapse.evaluation.longtail import frequency_groups, grouped_accuracy, per_class_accuracy


def _blobs(
    n_per_class: int, num_classes: int, dim: int, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around scaled basis vectors (well separated in angle too)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    centers = 10.0 * torch.eye(num_classes, dim)
    features = centers[labels] + noise * torch.randn(labels.numel(), dim, generator=generator)
    order = torch.randperm(labels.numel(), generator=generator)
    return features[order], labels[order]


# --------------------------------------------------------------------------- k-NN


def test_knn_separable_features_are_perfectly_classified() -> None:
    train_x, train_y = _blobs(20, 10, 32, noise=0.5, seed=0)
    test_x, test_y = _blobs(5, 10, 32, noise=0.5, seed=1)
    result = knn_accuracy(train_x, train_y, test_x, test_y)
    assert result == {"top1": 1.0, "top5": 1.0}


def _hand_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Four training points on the axes, with different norms (cosine similarity
    # must not depend on them), and a test point at 30 degrees:
    #   t0 = (3, 0)  label 0   cos = cos 30 =  sqrt(3)/2
    #   t1 = (0, 2)  label 1   cos = sin 30 =  1/2
    #   t2 = (-1, 0) label 2   cos =          -sqrt(3)/2
    #   t3 = (0, -5) label 1   cos =          -1/2
    train = torch.tensor([[3.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [0.0, -5.0]])
    labels = torch.tensor([0, 1, 2, 1])
    test = torch.tensor([[math.cos(math.pi / 6), math.sin(math.pi / 6)]]) * 7.0
    return train, labels, test


def test_knn_hand_computed_scores_and_temperature() -> None:
    train, labels, test = _hand_case()
    c30 = math.sqrt(3) / 2
    # k = 3 keeps t0, t1, t3. Class scores: s0 = e^{c30/T}, s1 = e^{0.5/T} + e^{-0.5/T}, s2 = 0.
    for temperature in (0.5, 2.0):
        scores = weighted_knn_predict(train, labels, test, num_classes=3, k=3, temperature=temperature)
        expected = [
            math.exp(c30 / temperature),
            math.exp(0.5 / temperature) + math.exp(-0.5 / temperature),
            0.0,
        ]
        assert scores.shape == (1, 3)
        assert scores[0].tolist() == pytest.approx(expected, rel=1e-5)
    # T = 0.5: s0 = e^1.732 = 5.65 > s1 = e^1 + e^-1 = 3.09 -> class 0.
    # T = 2:   s0 = e^0.433 = 1.54 < s1 = e^0.25 + e^-0.25 = 2.06 -> class 1.
    sharp = knn_accuracy(train, labels, test, torch.tensor([0]), k=3, temperature=0.5)
    smooth = knn_accuracy(train, labels, test, torch.tensor([1]), k=3, temperature=2.0)
    assert sharp["top1"] == 1.0 and smooth["top1"] == 1.0
    # With three classes, "top5" is top-3, which always contains the label.
    assert knn_accuracy(train, labels, test, torch.tensor([2]), k=3, temperature=0.5) == {
        "top1": 0.0,
        "top5": 1.0,
    }


def test_knn_k_larger_than_train_set_is_clamped() -> None:
    train, labels, test = _hand_case()
    c30 = math.sqrt(3) / 2
    scores = weighted_knn_predict(train, labels, test, num_classes=3, k=50, temperature=1.0)
    expected = [math.exp(c30), math.exp(0.5) + math.exp(-0.5), math.exp(-c30)]
    assert scores[0].tolist() == pytest.approx(expected, rel=1e-5)


def test_knn_chunked_equals_unchunked() -> None:
    generator = torch.Generator().manual_seed(3)
    train = torch.randn(300, 16, generator=generator)
    labels = torch.randint(0, 7, (300,), generator=generator)
    test = torch.randn(53, 16, generator=generator)
    whole = weighted_knn_predict(train, labels, test, 7, k=20, temperature=0.07, chunk_size=1000)
    for chunk in (1, 7, 53):
        chunked = weighted_knn_predict(train, labels, test, 7, k=20, temperature=0.07, chunk_size=chunk)
        # The matmul may round differently for other block shapes (~1e-7 on the
        # similarities, amplified by 1/T in the exponent): compare with rtol 1e-5.
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=0.0)
        assert torch.equal(chunked.argmax(dim=1), whole.argmax(dim=1))
    auto = weighted_knn_predict(train, labels, test, 7, k=20, temperature=0.07)
    torch.testing.assert_close(auto, whole, rtol=1e-5, atol=0.0)


def test_knn_small_temperature_does_not_overflow() -> None:
    train, labels, test = _hand_case()
    scores = weighted_knn_predict(train, labels, test, num_classes=3, k=3, temperature=0.01)
    assert torch.isfinite(scores).all()
    assert int(scores.argmax()) == 0


def test_knn_protocols_keys_and_consistency() -> None:
    train_x, train_y = _blobs(10, 5, 16, noise=3.0, seed=4)
    test_x, test_y = _blobs(6, 5, 16, noise=3.0, seed=5)
    results = knn_protocols(train_x, train_y, test_x, test_y)
    assert set(results) == {"knn_k20_t0.07", "knn_k200_t0.1"}
    assert set(results) == {knn_protocol_key(k, t) for k, t in KNN_PROTOCOLS.values()}
    for k, temperature in KNN_PROTOCOLS.values():
        single = knn_accuracy(train_x, train_y, test_x, test_y, k=k, temperature=temperature)
        assert results[knn_protocol_key(k, temperature)] == single
        assert 0.0 <= single["top1"] <= single["top5"] <= 1.0


def test_knn_num_classes_defaults_to_both_splits() -> None:
    # Class 3 appears only in the test split: it can never be predicted, but it
    # must be counted (a score column exists) rather than raise.
    train, labels, test = _hand_case()
    result = knn_accuracy(train, labels, test, torch.tensor([3]), k=3)
    assert result["top1"] == 0.0 and result["top5"] == 1.0  # 4 classes -> top-4


def test_knn_bad_inputs_raise() -> None:
    train, labels, test = _hand_case()
    with pytest.raises(ValueError, match="train_labels has 3 entries"):
        weighted_knn_predict(train, labels[:3], test, 3)
    with pytest.raises(ValueError, match="empty"):
        weighted_knn_predict(train[:0], labels[:0], test, 3)
    with pytest.raises(ValueError, match="k must be"):
        weighted_knn_predict(train, labels, test, 3, k=0)
    with pytest.raises(ValueError, match="temperature"):
        weighted_knn_predict(train, labels, test, 3, temperature=0.0)
    with pytest.raises(ValueError, match="feature dimensions"):
        weighted_knn_predict(train, labels, torch.zeros(1, 5), 3)
    with pytest.raises(ValueError, match="integer"):
        weighted_knn_predict(train, labels.float(), test, 3)
    with pytest.raises(ValueError, match="num_classes"):
        weighted_knn_predict(train, labels, test, 2)
    with pytest.raises(ValueError, match="test_labels has 2 entries"):
        knn_accuracy(train, labels, test, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="chunk_size"):
        weighted_knn_predict(train, labels, test, 3, chunk_size=0)


# ----------------------------------------------------------------- clustering


def test_permuted_clusters_score_perfectly() -> None:
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
    permutation = torch.tensor([7, 2, 9, 4])  # arbitrary cluster ids
    metrics = cluster_metrics(permutation[labels], labels)
    assert metrics == pytest.approx({"acc": 1.0, "nmi": 1.0, "ami": 1.0, "ari": 1.0})


def test_hand_computed_nmi_ari_and_hungarian() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    clusters = torch.tensor([0, 0, 1, 1, 1, 1])
    # Contingency (rows clusters, columns classes): [[2, 0], [1, 3]], N = 6.
    # Hungarian: c0 -> 0 (2 right), c1 -> 1 (3 right): acc = 5/6.
    # ARI: sum_ij C(n_ij, 2) = 1 + 3 = 4; rows C(2,2) + C(4,2) = 7; cols 3 + 3 = 6;
    #      expected = 7 * 6 / C(6, 2) = 2.8; max = (7 + 6) / 2 = 6.5;
    #      ARI = (4 - 2.8) / (6.5 - 2.8) = 12 / 37.
    # NMI: H(Y) = ln 2; H(C) = -(1/3 ln 1/3 + 2/3 ln 2/3);
    #      I = 1/3 ln(1/3 / (1/3 * 1/2)) + 1/6 ln(1/6 / (2/3 * 1/2)) + 1/2 ln(1/2 / (2/3 * 1/2))
    #        = 1/6 ln 2 + 1/2 ln 3/2;  NMI = I / ((H(Y) + H(C)) / 2).
    h_y = math.log(2)
    h_c = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))
    mutual = math.log(2) / 6 + math.log(1.5) / 2
    metrics = cluster_metrics(clusters, labels)
    assert metrics["acc"] == pytest.approx(5 / 6)
    assert metrics["ari"] == pytest.approx(12 / 37)
    assert metrics["nmi"] == pytest.approx(mutual / ((h_y + h_c) / 2))
    assert metrics["ami"] < metrics["nmi"]


def test_ami_is_near_zero_for_random_clusters_while_nmi_grows_with_their_number() -> None:
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 10, (2000,), generator=generator)
    few = cluster_metrics(torch.randint(0, 10, (2000,), generator=generator), labels, accuracy=False)
    many = cluster_metrics(torch.randint(0, 2000, (2000,), generator=generator), labels, accuracy=False)
    assert "acc" not in few
    assert many["nmi"] > 0.2 > few["nmi"] + 0.1
    assert abs(few["ami"]) < 0.01 and abs(many["ami"]) < 0.01


def test_hungarian_with_more_or_fewer_clusters_than_classes() -> None:
    labels = torch.tensor([0, 0, 1, 1, 1])
    # Three clusters, two classes: c2 stays unmatched, its sample is wrong -> 4/5.
    assert hungarian_accuracy(torch.tensor([0, 0, 1, 1, 2]), labels) == pytest.approx(4 / 5)
    # One cluster, two classes: it maps to the larger class -> 3/5.
    assert hungarian_accuracy(torch.zeros(5, dtype=torch.long), labels) == pytest.approx(3 / 5)
    # A cluster that mixes classes: c0 = {0, 0, 1}, c1 = {1, 1} -> 2 + 2 right.
    assert hungarian_accuracy(torch.tensor([0, 0, 0, 1, 1]), labels) == pytest.approx(4 / 5)


def test_kmeans_recovers_blobs() -> None:
    features, labels = _blobs(40, 5, 16, noise=1.0, seed=6)
    result = kmeans_clustering(features, labels, seed=0, n_init=3)
    assert result["n_clusters"] == 5
    assert result["acc"] >= 0.99
    assert result["nmi"] >= 0.95 and result["ari"] >= 0.95


def test_assignment_clustering_from_logits_and_ids() -> None:
    generator = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 3, (60,), generator=generator)
    prototype_of_class = torch.tensor([5, 1, 8])  # 3 of 10 prototypes used
    logits = torch.randn(60, 10, generator=generator)
    logits[torch.arange(60), prototype_of_class[labels]] += 10.0
    from_logits = assignment_clustering(logits, labels)
    # ten possible clusters for three classes: no Hungarian accuracy
    assert from_logits == pytest.approx({"nmi": 1.0, "ami": 1.0, "ari": 1.0, "clusters_used": 3})
    from_ids = assignment_clustering(prototype_of_class[labels], labels, num_clusters=10)
    assert from_ids == from_logits
    as_many = assignment_clustering(logits[:, [5, 1, 8]], labels)
    assert as_many["acc"] == pytest.approx(1.0)
    # A collapsed head: every sample on one prototype.
    collapsed = assignment_clustering(torch.zeros(60, dtype=torch.long), labels)
    assert collapsed["clusters_used"] == 1 and collapsed["nmi"] == pytest.approx(0.0)


def test_clustering_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="pred_clusters has 2 entries but labels has 3"):
        cluster_metrics(torch.tensor([0, 1]), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="empty"):
        hungarian_accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        cluster_metrics(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="n_clusters"):
        kmeans_clustering(torch.randn(3, 2), torch.tensor([0, 1, 2]), n_clusters=4)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        assignment_clustering(torch.randn(4), torch.tensor([0, 1, 0, 1]))


# ------------------------------------------------------------------ long-tail


def test_frequency_groups_cifar10_lt_profile() -> None:
    # CIFAR-10-LT, imbalance ratio 100: n_c = int(5000 * 0.01 ** (c / 9))
    #   = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    # > 100: classes 0-7 (head); 20..100: 8 (83), 9 (50) (medium); < 20: none.
    counts = [int(5000 * 0.01 ** (c / 9)) for c in range(10)]
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    groups = frequency_groups(torch.tensor(counts))
    assert groups == {"head": list(range(8)), "medium": [8, 9], "tail": []}


def test_frequency_groups_cifar100_lt_profile() -> None:
    # CIFAR-100-LT, ratio 100: n_c = int(500 * 0.01 ** (c / 99)); n_34 = 102, n_35 = 98,
    # n_69 = 20, n_70 = 19 -> 35 head, 35 medium, 30 tail classes (the usual split).
    counts = [int(500 * 0.01 ** (c / 99)) for c in range(100)]
    assert (counts[34], counts[35], counts[69], counts[70]) == (102, 98, 20, 19)
    groups = frequency_groups(counts)
    assert groups == {"head": list(range(35)), "medium": list(range(35, 70)), "tail": list(range(70, 100))}


def test_frequency_groups_custom_thresholds_and_errors() -> None:
    assert frequency_groups([10, 5, 1], many_threshold=5, few_threshold=2) == {
        "head": [0],
        "medium": [1],
        "tail": [2],
    }
    with pytest.raises(ValueError, match="few_threshold"):
        frequency_groups([10], many_threshold=5, few_threshold=10)
    with pytest.raises(ValueError, match="non-negative"):
        frequency_groups([10, -1])
    with pytest.raises(ValueError, match="empty"):
        frequency_groups([])


def test_per_class_and_grouped_accuracy_hand_case() -> None:
    counts = [200, 50, 5]  # head: class 0, medium: class 1, tail: class 2
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    predictions = torch.tensor([0, 0, 0, 1, 1, 0, 2, 0, 0])
    # class 0: 3/4, class 1: 1/2, class 2: 1/3; overall 5/9.
    per_class = per_class_accuracy(predictions, labels, 3)
    assert per_class.tolist() == pytest.approx([3 / 4, 1 / 2, 1 / 3])
    result = grouped_accuracy(predictions, labels, counts)
    assert result == pytest.approx(
        {
            "head": 3 / 4,
            "medium": 1 / 2,
            "tail": 1 / 3,
            "overall": 5 / 9,
            "mean_per_class": (3 / 4 + 1 / 2 + 1 / 3) / 3,
            "num_head": 1,
            "num_medium": 1,
            "num_tail": 1,
        }
    )
    # Scores [N, C] are accepted too (arg-max is taken).
    scores = torch.nn.functional.one_hot(predictions, 3).float()
    assert grouped_accuracy(scores, labels, counts) == result


def test_grouped_accuracy_empty_groups_and_absent_classes() -> None:
    counts = [500, 300, 150, 30]  # three head classes, one medium, no tail
    labels = torch.tensor([0, 0, 1, 2])  # class 3 absent from the test set
    predictions = torch.tensor([0, 1, 1, 2])
    per_class = per_class_accuracy(predictions, labels, 4)
    assert per_class[:3].tolist() == [0.5, 1.0, 1.0] and math.isnan(per_class[3].item())
    result = grouped_accuracy(predictions, labels, counts)
    assert result["head"] == pytest.approx(2.5 / 3)
    assert result["medium"] is None and result["tail"] is None
    assert (result["num_head"], result["num_medium"], result["num_tail"]) == (3, 1, 0)
    assert result["overall"] == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="labels must lie"):
        grouped_accuracy(predictions, torch.tensor([0, 0, 1, 4]), counts)
    with pytest.raises(ValueError, match="predictions has 3 entries"):
        per_class_accuracy(predictions[:3], labels, 4)


# --------------------------------------------------------------- linear probe


def _digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    datasets = pytest.importorskip("sklearn.datasets")
    images, targets = datasets.load_digits(return_X_y=True)
    features = torch.tensor(images, dtype=torch.float32)
    labels = torch.tensor(targets, dtype=torch.long)
    order = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))
    train, test = order[:1200], order[1200:]
    return features[train], labels[train], features[test], labels[test]


def test_linear_probe_on_digits_beats_chance() -> None:
    train_x, train_y, test_x, test_y = _digits_split()
    lrs, weight_decays = (1e-3, 1e-2), (0.0, 1e-3)
    result = linear_probe(
        train_x, train_y, test_x, test_y, lrs=lrs, weight_decays=weight_decays, return_predictions=True
    )
    assert result["top1"] >= 0.85  # chance is 0.1; logistic regression reaches ~0.96
    assert result["top1"] <= result["top5"] <= 1.0
    assert result["best_lr"] in lrs and result["best_weight_decay"] in weight_decays
    assert len(result["sweep"]) == 4
    assert {(s["lr"], s["weight_decay"]) for s in result["sweep"]} == {
        (lr, wd) for lr in lrs for wd in weight_decays
    }
    assert result["val_top1"] == max(s["val_top1"] for s in result["sweep"])
    predictions = result["predictions"]
    assert predictions.shape == test_y.shape and predictions.dtype == torch.long
    assert (predictions == test_y).float().mean().item() == pytest.approx(result["top1"])


def test_linear_probe_is_deterministic_and_single_config_skips_validation() -> None:
    train_x, train_y = _blobs(30, 4, 8, noise=4.0, seed=8)
    test_x, test_y = _blobs(10, 4, 8, noise=4.0, seed=9)
    kwargs = dict(lrs=(1e-2, 1e-1), weight_decays=(0.0,), epochs=5, min_steps=50, seed=3)
    first = linear_probe(train_x, train_y, test_x, test_y, **kwargs)
    second = linear_probe(train_x, train_y, test_x, test_y, **kwargs)
    assert first == second
    single = linear_probe(
        train_x, train_y, test_x, test_y, lrs=(1e-2,), weight_decays=(0.0,), val_fraction=0.0, min_steps=50
    )
    assert single["val_top1"] is None
    assert single["sweep"] == [{"lr": 1e-2, "weight_decay": 0.0, "val_top1": None}]


def test_stratified_split_keeps_every_class() -> None:
    labels = torch.tensor([0] * 20 + [1] * 10 + [2])
    fit, val = stratified_split(labels, 0.1, seed=0)
    assert torch.cat([fit, val]).sort().values.tolist() == list(range(31))
    assert torch.bincount(labels[val], minlength=3).tolist() == [2, 1, 0]
    assert torch.bincount(labels[fit], minlength=3).tolist() == [18, 9, 1]
    again, _ = stratified_split(labels, 0.1, seed=0)
    assert torch.equal(fit, again)


def test_linear_probe_bad_inputs_raise() -> None:
    x, y = torch.randn(10, 3), torch.arange(10) % 2
    with pytest.raises(ValueError, match="train_labels has 9 entries"):
        linear_probe(x, y[:9], x, y)
    with pytest.raises(ValueError, match="empty"):
        linear_probe(x[:0], y[:0], x, y)
    with pytest.raises(ValueError, match="feature dimensions"):
        linear_probe(x, y, torch.randn(10, 4), y)
    with pytest.raises(ValueError, match="lrs"):
        linear_probe(x, y, x, y, lrs=())
    with pytest.raises(ValueError, match="val_fraction must be > 0"):
        linear_probe(x, y, x, y, val_fraction=0.0)
