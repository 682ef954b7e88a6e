"""Tests for nocollapse.diagnostics: constructed cases with known answers."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from nocollapse.diagnostics import (
    STANDARD_EPS,
    Alarm,
    AlarmMonitor,
    CheckpointError,
    PrototypeKeyError,
    assignment_stats,
    effective_rank,
    embedding_std,
    flat_metrics,
    format_report,
    list_candidates,
    load_prototypes,
    mean_direction_norm,
    mixture_stats,
    pairwise_cosine_stats,
    plot_prototype_uniformity,
    plot_spectrum,
    plot_training_curves,
    plot_unique_vs_eps,
    prototype_report,
    prototype_utilization,
    singular_values,
    teacher_student_kl,
    unique_curve,
    unique_fraction,
    unique_prototypes,
    write_plots,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def naive_unique(prototypes: torch.Tensor, eps_values) -> dict[float, int]:
    """The sequential definition, row by row, in float64 (the reference)."""
    u = prototypes.double()
    norms = u.norm(dim=1, keepdim=True)
    u = u / torch.where(norms > 0, norms, torch.ones_like(norms))
    out = {}
    for eps in eps_values:
        if eps <= 0:
            out[eps] = u.shape[0]
            continue
        covered = torch.zeros(u.shape[0], dtype=torch.bool)
        reps = 0
        for i in range(u.shape[0]):
            if covered[i]:
                continue
            reps += 1
            covered[i] = True
            covered |= (1.0 - u @ u[i]) < eps
        out[eps] = reps
    return out


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- unique prototypes
@pytest.mark.parametrize("block_size", [1, 3, 1024])
def test_identical_copies_are_one_prototype(block_size):
    v = torch.randn(16, generator=gen(0))
    scales = torch.rand(40, 1, generator=gen(1)) * 5 + 0.1  # norms differ, directions equal
    protos = scales * v
    counts = unique_prototypes(protos, block_size=block_size)
    assert counts == {e: 1 for e in STANDARD_EPS}
    assert unique_fraction(protos, block_size=block_size) == {e: 1 / 40 for e in STANDARD_EPS}


@pytest.mark.parametrize("screen", [True, False])
def test_orthonormal_set_is_fully_unique(screen):
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=gen(2), dtype=torch.float64))
    counts = unique_prototypes(q, eps=(*STANDARD_EPS, 0.99), block_size=5, screen=screen)
    assert all(c == 32 for c in counts.values())


def test_two_tight_clusters():
    centers = torch.randn(2, 24, generator=gen(3))
    labels = torch.randint(0, 2, (60,), generator=gen(4))
    labels[:2] = torch.tensor([0, 1])
    protos = centers[labels] + 1e-4 * torch.randn(60, 24, generator=gen(5))
    assert unique_fraction(protos, block_size=7) == {e: 2 / 60 for e in STANDARD_EPS}


@pytest.mark.parametrize("block_size", [1, 2, 5, 16, 64, 4096])
@pytest.mark.parametrize("screen", [True, False])
def test_blocked_equals_naive_sequential_cover(block_size, screen):
    eps = [0.0, 0.025, 0.1, 0.25, 0.5, 0.8, 1.0, 1.3, 2.5]
    g = gen(10)
    cases = [
        torch.randn(150, 6, generator=g),  # healthy, low D: many merges at large eps
        torch.randn(120, 3, generator=g) @ torch.randn(3, 10, generator=g),  # low rank
    ]
    centers = torch.randn(7, 8, generator=g)
    cases.append(centers[torch.randint(0, 7, (200,), generator=g)] + 0.25 * torch.randn(200, 8, generator=g))
    with_zeros = torch.randn(80, 5, generator=g)
    with_zeros[::9] = 0.0
    cases.append(with_zeros)
    for protos in cases:
        got = unique_prototypes(protos, eps, block_size=block_size, screen=screen, chunk_elements=64)
        assert got == naive_unique(protos, eps)


@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 100])
def test_order_inside_a_block_matters(block_size):
    # Points on a circle at angles 0, t, 2t, ... with 1 - cos(t) < eps < 1 - cos(2t):
    # the greedy cover keeps every second point, and rows of one block cover each other.
    eps = 0.1
    t = 0.6 * math.acos(1 - eps)
    angles = torch.arange(9, dtype=torch.float64) * t
    chain = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    assert 1 - math.cos(t) < eps < 1 - math.cos(2 * t)
    expected = naive_unique(chain, [eps])[eps]
    assert expected == 5  # rows 0, 2, 4, 6, 8
    assert unique_prototypes(chain, [eps], block_size=block_size)[eps] == expected
    perm = torch.randperm(9, generator=gen(11))
    shuffled = chain[perm]
    assert unique_prototypes(shuffled, [eps], block_size=block_size) == naive_unique(shuffled, [eps])


@pytest.mark.parametrize("block_size", [1, 1024])
@pytest.mark.parametrize("screen", [True, False])
def test_distance_exactly_eps_is_not_merged(block_size, screen):
    # Entries +-1 normalise exactly (norms 2 and 4), so the float64 dot products are exact:
    # 4-d: <u, v> = 0.5 (distance 0.5); 16-d: 0.75 (distance 0.25); orthogonal: distance 1.
    cases = [
        (torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, -1]], dtype=torch.float64), 0.5),
        (torch.tensor([[1.0] * 16, [1.0] * 14 + [-1.0] * 2], dtype=torch.float64), 0.25),
        (torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64), 1.0),
    ]
    for protos, eps in cases:
        u = protos / protos.norm(dim=1, keepdim=True)
        assert 1.0 - float(u[0] @ u[1]) == eps  # exactly eps in float64
        above = math.nextafter(eps, math.inf)
        counts = unique_prototypes(protos, [eps, above], block_size=block_size, screen=screen)
        assert counts == {eps: 2, above: 1}


@pytest.mark.parametrize("block_size", [1, 64])
def test_float32_screening_is_exact_near_the_threshold(block_size):
    # Pairs whose float64 distance is eps +- (1e-8 .. 1e-5), finer than float32 resolves.
    d, eps = 256, 0.1
    g = gen(40)
    rows = []
    offsets = [-1e-5, -1e-6, -1e-7, -1e-8, 1e-8, 1e-7, 1e-6, 1e-5]
    for off in offsets:
        u = torch.randn(d, generator=g, dtype=torch.float64)
        u /= u.norm()
        w = torch.randn(d, generator=g, dtype=torch.float64)
        w -= (w @ u) * u
        w /= w.norm()
        c = 1.0 - (eps + off)
        rows += [u, c * u + math.sqrt(1 - c * c) * w]
    protos = torch.stack(rows)
    expected = naive_unique(protos, [eps])
    assert expected[eps] == len(offsets) + 4  # the four pairs with a positive offset stay apart
    assert unique_prototypes(protos, [eps], block_size=block_size, screen=True) == expected


def test_reduced_precision_matmul_disables_screening():
    protos = torch.randn(300, 6, generator=gen(41))
    eps = [0.025, 0.1, 0.5, 1.0]
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # may run float32 matmuls in bfloat16
        got = unique_prototypes(protos, eps, block_size=32)
    finally:
        torch.set_float32_matmul_precision(before)
    assert got == naive_unique(protos, eps)


def test_unique_curve_and_eps_zero():
    protos = torch.randn(64, 8, generator=gen(12))
    eps, frac = unique_curve(protos)
    assert eps == sorted(eps) and eps[0] == 0.0 and frac[0] == 1.0
    assert set(STANDARD_EPS) <= set(eps) and len(eps) == len(frac) >= 20
    assert all(0 < f <= 1 for f in frac)
    ref = naive_unique(protos, eps)
    assert frac == [ref[e] / 64 for e in eps]
    copies = torch.ones(10, 4)
    assert unique_prototypes(copies, [0.0])[0.0] == 10  # strict inequality at eps = 0


def test_unique_input_validation():
    with pytest.raises(ValueError):
        unique_prototypes(torch.randn(5))
    with pytest.raises(ValueError):
        unique_prototypes(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError):
        unique_prototypes(torch.randn(4, 3), block_size=0)
    with pytest.raises(ValueError):
        unique_prototypes(torch.randn(4, 3), eps=[])


def test_pairwise_cosine_stats():
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen(13), dtype=torch.float64))
    stats = pairwise_cosine_stats(q)
    assert abs(stats["max"]) < 1e-12 and abs(stats["mean"]) < 1e-12 and not stats["sampled"]
    copies = torch.ones(5, 3)
    s2 = pairwise_cosine_stats(copies)
    assert s2["max"] == pytest.approx(1.0) and s2["mean"] == pytest.approx(1.0)
    protos = torch.randn(300, 8, generator=gen(14))
    u = protos.double() / protos.double().norm(dim=1, keepdim=True)
    gram = (u @ u.T).numpy()
    pairs = gram[np.triu_indices(300, 1)]
    exact = pairwise_cosine_stats(protos)
    assert exact["max"] == pytest.approx(pairs.max()) and exact["p99"] == pytest.approx(np.quantile(pairs, 0.99))
    assert exact["mean"] == pytest.approx(pairs.mean(), abs=1e-12)
    sampled = pairwise_cosine_stats(protos, sample=50, seed=1)
    assert sampled["sampled"] and sampled["rows"] == 50 and sampled["max"] <= exact["max"] + 1e-12
    assert sampled["mean"] == pytest.approx(exact["mean"], abs=1e-12)  # the mean is always exact
    assert sampled == pairwise_cosine_stats(protos, sample=50, seed=1)  # seeded


# ----------------------------------------------------------------------------- assignments
def test_uniform_and_one_hot_assignments():
    k = 37
    uniform = torch.full((20, k), 1.0 / k)
    stats = assignment_stats(uniform)
    assert stats["effective_prototypes"] == pytest.approx(k)
    assert stats["mean_entropy"] == pytest.approx(math.log(k))
    assert stats["entropy_of_mean"] == pytest.approx(math.log(k))
    assert stats["mass_used"] == k
    assert stats["max_prob"] == pytest.approx(1.0 / k)
    one_hot = torch.zeros(20, k)
    one_hot[:, 4] = 1.0
    s1 = assignment_stats(one_hot)
    assert s1["effective_prototypes"] == pytest.approx(1.0)
    assert s1["mean_entropy"] == 0.0 and s1["argmax_used"] == 1 and s1["mass_used"] == 1
    assert s1["max_prob"] == 1.0 and s1["prototype_utilization"] == pytest.approx(1 / k)
    assert s1["num_samples"] == 20 and s1["num_prototypes"] == k
    json.dumps(stats)
    with pytest.raises(ValueError, match="softmax"):
        assignment_stats(torch.randn(4, k))


def test_teacher_student_kl():
    t = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    s = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    expected = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75) + math.log(1 / 0.5)) / 2
    assert teacher_student_kl(t, s.log()) == pytest.approx(expected)
    logits = s.log() + torch.tensor([[3.0], [-1.0]])  # unnormalised: same softmax
    assert teacher_student_kl(t, logits) == pytest.approx(expected)
    p = torch.softmax(torch.randn(6, 9, generator=gen(15)), dim=1)
    assert teacher_student_kl(p, p.log()) == pytest.approx(0.0, abs=1e-6)


def test_mixture_stats_and_utilization():
    assert mixture_stats(torch.full((50,), 3.0))["perplexity"] == pytest.approx(50)
    w = torch.ones(100)
    w[:10] = 1e-5
    m = mixture_stats(w)
    assert m["dead"] == 10 and m["num_components"] == 100
    assert mixture_stats(torch.tensor([1.0, 0, 0, 0]))["perplexity"] == pytest.approx(1.0)
    assert prototype_utilization(torch.tensor([0, 1, 1, 3]), 8) == pytest.approx(3 / 8)
    probs = torch.eye(4)[[0, 0, 2]]
    assert prototype_utilization(probs, 4) == pytest.approx(2 / 4)
    with pytest.raises(ValueError):
        prototype_utilization(torch.tensor([0, 9]), 4)


# ----------------------------------------------------------------------------- embeddings
@pytest.mark.parametrize("r", [1, 3, 7])
def test_effective_rank_of_equal_singular_values(r):
    n, d = 40, 12
    a, _ = torch.linalg.qr(torch.randn(n, r, generator=gen(16), dtype=torch.float64))
    b, _ = torch.linalg.qr(torch.randn(d, r, generator=gen(17), dtype=torch.float64))
    z = 3.0 * a @ b.T  # rank r, all non-zero singular values equal to 3
    assert effective_rank(z) == pytest.approx(r, abs=1e-4)
    g = gen(18)
    generic = torch.randn(n, r, generator=g, dtype=torch.float64) @ torch.randn(r, d, generator=g, dtype=torch.float64)
    assert 1.0 <= effective_rank(generic) <= r + 1e-6


def test_effective_rank_bounds_and_no_floor():
    wide = torch.randn(5, 64, generator=gen(20))  # N < D
    assert effective_rank(wide) <= 5 + 1e-9
    tall = torch.randn(500, 8, generator=gen(21))
    assert 7.0 < effective_rank(tall) <= 8.0
    collapsed = torch.ones(6, 32) * torch.randn(32, generator=gen(22))
    assert effective_rank(collapsed) == pytest.approx(1.0, abs=1e-6)  # no 1/N or other floor
    assert effective_rank(collapsed, center=True) == 0.0
    s = singular_values(tall)
    assert torch.all(s[:-1] >= s[1:]) and s.dtype == torch.float64


def test_embedding_std_and_mean_direction():
    same = torch.randn(1, 16, generator=gen(23), dtype=torch.float64).repeat(10, 1)
    same = same * torch.tensor([1.0, 2.0, 0.5, 4.0, 8.0, 0.25, 1.0, 2.0, 16.0, 1.0], dtype=torch.float64)[:, None]
    assert embedding_std(same) == pytest.approx(0.0, abs=1e-12)  # power-of-2 scales: exact
    assert mean_direction_norm(same) == pytest.approx(1.0)
    noisy32 = same.float() * torch.rand(10, 1, generator=gen(24))  # float32 rounding only
    assert embedding_std(noisy32) < 1e-6
    d = 64
    healthy = torch.randn(4000, d, generator=gen(25))
    assert embedding_std(healthy) == pytest.approx(1 / math.sqrt(d), rel=0.05)
    assert mean_direction_norm(healthy) < 0.1


# ----------------------------------------------------------------------------- alarms
def healthy_metrics(step: int, k: int = 1024) -> dict:
    return {
        "loss": 6.0 - 1e-4 * step,
        "mean_entropy": 2.0,
        "entropy_of_mean": 6.5,
        "effective_prototypes": 650.0,
        "argmax_used": 200,
        "num_samples": 256,
        "prototype_utilization": 200 / k,
        "max_prob": 0.6,
        "embedding_std": 1 / math.sqrt(64),
        "mean_direction_norm": 0.05,
        "unique_0.025": 1.0,
    }


def run(monitor: AlarmMonitor, steps, make) -> list[Alarm]:
    fired = []
    for step in steps:
        fired += monitor.update(step, make(step))
    return fired


def test_alarms_quiet_on_healthy_run():
    mon = AlarmMonitor(num_prototypes=1024, embedding_dim=64, warmup_steps=10, patience=3)
    assert run(mon, range(0, 200), healthy_metrics) == []
    assert mon.fired == {}


@pytest.mark.parametrize(
    "name, broken",
    [
        # a uniform collapse shows in the assignments as well as the loss (the assignments decide)
        ("uniform_collapse", {"loss": math.log(1024) + 1e-3, "mean_entropy": math.log(1024) - 1e-3}),
        # a one-hot collapse puts the whole batch on one prototype: one arg-max
        ("one_hot_collapse", {"max_prob": 0.999, "effective_prototypes": 1.0, "argmax_used": 1}),
        ("representation_collapse", {"embedding_std": 1e-4, "mean_direction_norm": 0.999}),
        ("unused_prototypes", {"argmax_used": 12, "prototype_utilization": 12 / 1024}),
        ("prototype_collapse", {"unique_0.025": 0.02}),
    ],
)
def test_each_alarm_fires_once(name, broken):
    mon = AlarmMonitor(num_prototypes=1024, embedding_dim=64, warmup_steps=10, patience=3)

    def metrics(step):
        m = healthy_metrics(step)
        if step >= 50:  # the failure appears at step 50 and persists
            m.update(broken)
        return m

    fired = run(mon, range(0, 120), metrics)
    if name == "one_hot_collapse":  # a batch on one prototype also leaves the others unused: a warning
        fired = [a for a in fired if a.name != "unused_prototypes"]
    assert [a.name for a in fired] == [name]
    assert fired[0].step == 52  # patience 3: steps 50, 51, 52
    text = str(fired[0])
    assert name in text and "remedy" in text and "cause" in text
    if name == "uniform_collapse":
        assert "1024" in fired[0].message and f"{math.log(1024):.4f}" in fired[0].message


def test_alarm_warmup_patience_missing_keys_and_resume():
    k = 512
    mon = AlarmMonitor(num_prototypes=k, warmup_steps=100, patience=4)
    stuck = {"loss": math.log(k)}
    assert run(mon, range(0, 100), lambda s: stuck) == []  # warm-up
    assert mon.update(100, {}) == []  # missing keys: skipped
    assert run(mon, range(101, 104), lambda s: stuck) == []
    assert mon.update(104, {"loss": 3.0}) == []  # a healthy value resets the counter
    assert run(mon, range(105, 108), lambda s: stuck) == []
    fired = mon.update(108, stuck)
    assert [a.name for a in fired] == ["uniform_collapse"]
    state = json.loads(json.dumps(mon.state_dict()))
    resumed = AlarmMonitor(num_prototypes=k, warmup_steps=100, patience=4)
    resumed.load_state_dict(state)
    assert resumed.fired["uniform_collapse"] == fired[0]
    assert run(resumed, range(200, 300), lambda s: stuck) == []  # stays quiet after resume


def test_alarm_uses_metric_keys_for_k_and_dim_and_batch_size():
    mon = AlarmMonitor(warmup_steps=0, patience=1)
    # 200 arg-max prototypes out of a batch of 256 with K = 65536 is healthy for one batch
    ok = {"argmax_used": 200, "num_samples": 256, "num_prototypes": 65536,
          "embedding_std": 0.06, "embedding_dim": 256}
    assert mon.update(0, ok) == []
    bad = dict(ok, argmax_used=20, embedding_std=1e-3)
    assert sorted(a.name for a in mon.update(1, bad)) == ["representation_collapse", "unused_prototypes"]
    sharp_but_diverse = {"max_prob": 0.999, "effective_prototypes": 5000.0, "num_prototypes": 65536}
    assert AlarmMonitor(warmup_steps=0, patience=1).update(0, sharp_but_diverse) == []
    entropy_only = {"mean_entropy": math.log(100) - 1e-4, "num_prototypes": 100}
    assert [a.name for a in AlarmMonitor(warmup_steps=0, patience=1).update(0, entropy_only)] == [
        "uniform_collapse"
    ]


# ----------------------------------------------------------------------------- foreign checkpoints
class DinoStyleHead(nn.Module):
    def __init__(self, dim: int, k: int) -> None:
        super().__init__()
        self.mlp = nn.Linear(8, dim)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(dim, k, bias=False))


def test_load_parametrized_weight_norm_with_ddp_prefix(tmp_path):
    torch.manual_seed(0)
    head = DinoStyleHead(dim=6, k=10)
    g = head.last_layer.parametrizations.weight.original0
    v = head.last_layer.parametrizations.weight.original1
    with torch.no_grad():
        g.copy_(torch.rand_like(g) + 0.5)
    state = {f"module.head.{k}": t for k, t in head.state_dict().items()}
    ckpt = {"teacher": state, "epoch": 3, "args": argparse.Namespace(out_dim=10)}
    path = tmp_path / "dino.pth"
    torch.save(ckpt, path)
    expected = torch.stack([g[i, 0] * v[i] / v[i].norm() for i in range(10)]).detach()
    got = load_prototypes(path, "teacher.head.last_layer.weight")
    assert got.shape == (10, 6)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(load_prototypes(path, "teacher.module.head.last_layer"), expected)
    torch.testing.assert_close(load_prototypes(path, "teacher.head.last_layer.weight", transpose=True), expected.T)
    assert list_candidates(path)[0][0].endswith("last_layer.weight")


def test_load_legacy_weight_g_weight_v(tmp_path):
    v = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0], [1.0, 2.0, 2.0]])
    g = torch.tensor([[2.0], [0.5], [3.0]])
    ckpt = {"student": {"head.last_layer.weight_g": g, "head.last_layer.weight_v": v,
                        "head.mlp.0.weight": torch.randn(4, 3)}}
    path = tmp_path / "legacy.pth"
    torch.save(ckpt, path)
    expected = torch.tensor([[1.2, 1.6, 0.0], [0.0, 0.0, 0.5], [1.0, 2.0, 2.0]])  # g * v / ||v||
    torch.testing.assert_close(load_prototypes(path, "student.head.last_layer.weight"), expected)


def test_load_errors(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"teacher": {"head.last_layer.weight": torch.randn(5, 3), "head.bias": torch.zeros(3)}}, path)
    with pytest.raises(PrototypeKeyError) as err:
        load_prototypes(path, "teacher.head.last_layr.weight")
    assert "teacher.head.last_layer.weight" in str(err.value)
    assert isinstance(err.value, KeyError)
    with pytest.raises(PrototypeKeyError, match=r"head\.last_layer\.weight  \[5x3\]"):
        load_prototypes(path)
    with pytest.raises(ValueError, match="2-D"):
        load_prototypes(path, "teacher.head.bias")
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError):
        load_prototypes(damaged, "x")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError):
        load_prototypes(truncated, "x")
    with pytest.raises(CheckpointError):
        load_prototypes(tmp_path / "missing.pth", "x")
    bare = tmp_path / "bare.pt"
    protos = torch.randn(7, 4)
    torch.save(protos, bare)
    torch.testing.assert_close(load_prototypes(bare), protos)


# ----------------------------------------------------------------------------- report and plots
def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000


def test_report_is_json_and_formats():
    g = gen(30)
    protos = torch.randn(128, 16, generator=g)
    probs = torch.softmax(torch.randn(64, 128, generator=g), dim=1)
    emb = torch.randn(64, 16, generator=g)
    rep = prototype_report(protos, probs=probs, embeddings=emb, mixture_weights=torch.rand(128, generator=g))
    json.dumps(rep)
    assert rep["num_prototypes"] == 128 and rep["dim"] == 16
    assert set(rep["unique_prototypes"]) == {"0.025", "0.1", "0.25", "0.5"}
    assert rep["unique_counts"]["0.025"] == naive_unique(protos, [0.025])[0.025]
    for key in ("pairwise_cosine", "unique_curve", "prototype_utilization", "effective_prototypes",
                "effective_rank", "embedding_std", "mean_direction_norm", "spectrum", "mixture"):
        assert key in rep
    text = format_report(rep)
    assert "eps = 0.025" in text and "effective rank" in text and "perplexity" in text
    flat = flat_metrics(rep)
    assert flat["unique_0.025"] == rep["unique_prototypes"]["0.025"] and "pairwise_cosine_max" in flat


def test_plots_write_pngs(tmp_path):
    g = gen(31)
    healthy = torch.randn(300, 16, generator=g)
    centers = torch.randn(3, 16, generator=g)
    collapsed = centers[torch.randint(0, 3, (300,), generator=g)] + 0.01 * torch.randn(300, 16, generator=g)
    assert_png(plot_unique_vs_eps({"healthy": unique_curve(healthy), "collapsed": unique_curve(collapsed)},
                                  tmp_path / "u.png"))
    assert_png(plot_prototype_uniformity({"healthy": healthy, "collapsed": collapsed}, tmp_path / "f.png"))
    assert_png(plot_prototype_uniformity(healthy, tmp_path / "r.png", projection="random"))
    assert_png(plot_spectrum({"a": singular_values(torch.randn(50, 8, generator=g)), "b": [3.0, 1.0, 0.0]},
                             tmp_path / "s.png"))
    records = [{"step": 10 * i, "epoch": i // 5, "loss": 9.0 - 0.1 * i, "knn_top1": 0.2 + 0.01 * i,
                "unique_0.025": 1.0 - 0.02 * i, "unique_0.1": 1.0 - 0.03 * i} for i in range(12)]
    assert_png(plot_training_curves(records, tmp_path / "t.png"))  # no effective_rank: skipped
    with pytest.raises(ValueError):
        plot_training_curves([{"step": 1}], tmp_path / "empty.png")
    paths = write_plots(healthy, tmp_path / "out", embeddings=torch.randn(40, 8, generator=g))
    assert [p.name for p in paths] == ["unique_vs_eps.png", "prototype_uniformity.png", "spectrum.png"]
    for p in paths:
        assert_png(p)


def test_distinct_styles_never_repeat_a_look():
    from nocollapse.diagnostics.plots import distinct_styles

    labels = [f"run{i}" for i in range(25)]
    styles = distinct_styles(labels)
    looks = {(s["color"], s["linestyle"]) for s in styles.values()}
    assert len(looks) == 25
    assert styles["run0"]["linestyle"] == styles["run9"]["linestyle"] != styles["run10"]["linestyle"]
    with pytest.raises(ValueError, match="distinct"):
        distinct_styles(["a", "b", "a"])
    with pytest.raises(ValueError, match="at most 40"):
        distinct_styles([str(i) for i in range(41)])


def test_many_runs_keep_the_given_styles_and_their_own_looks(tmp_path, monkeypatch):
    """Eleven runs on one axis: the named runs are drawn as given, the others get looks of their
    own, no two lines alike, and the legend moves beside the axes."""
    from nocollapse.diagnostics import plots
    from nocollapse.diagnostics.plots import distinct_styles, plot_runs_by_epoch

    drawn = {}
    real_save = plots._save

    def capture(fig, path):
        ax = fig.axes[0]
        drawn["lines"] = {line.get_label(): (line.get_color(), line.get_linestyle()) for line in ax.get_lines()
                          if not line.get_label().startswith("_")}
        drawn["legend_outside"] = ax.get_legend().get_bbox_to_anchor().x0 > ax.get_window_extent().x1
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", capture)
    names = [f"m{i}" for i in range(11)]
    given = distinct_styles(["m10", "m3"])
    series = {name: ([1, 2, 3], [0.1 * i, 0.2, 0.3]) for i, name in enumerate(names)}
    assert_png(plot_runs_by_epoch(series, tmp_path / "k.png", "k-NN", "k-NN per epoch", styles=given))
    lines = drawn["lines"]
    assert set(lines) == set(names) and len(set(lines.values())) == 11
    assert lines["m10"] == (given["m10"]["color"], "-") and lines["m3"] == (given["m3"]["color"], "-")
    assert drawn["legend_outside"]
    curves = {name: unique_curve(torch.randn(20, 4, generator=gen(40 + i))) for i, name in enumerate(names)}
    assert_png(plot_unique_vs_eps(curves, tmp_path / "u.png", styles=distinct_styles(names)))
    assert len(set(drawn["lines"].values())) == 11


def test_prototype_collapse_alarm_watches_the_configured_eps():
    """Prototypes merged at cosine 0.95 are unique at eps 0.025 but not at 0.1: the alarm follows its eps."""
    def metrics(step):
        return {**healthy_metrics(step), "unique_0.025": 0.8, "unique_0.1": 0.26}

    strict = AlarmMonitor(num_prototypes=1024, warmup_steps=0, patience=1, enabled=["prototype_collapse"])
    assert run(strict, range(10), metrics) == []
    loose = AlarmMonitor(num_prototypes=1024, warmup_steps=0, patience=1, unique_eps="0.1",
                         enabled=["prototype_collapse"])
    fired = run(loose, range(10), metrics)
    assert [a.name for a in fired] == ["prototype_collapse"] and fired[0].value == pytest.approx(0.26)
    assert "eps = 0.1" in fired[0].message


def test_prototype_collapse_eps_is_a_validated_setting():
    from nocollapse.config import ConfigError, build_config

    cfg, _ = build_config(None, ["diagnostics.prototype_collapse_eps=0.25"])
    assert cfg.diagnostics.prototype_collapse_eps == "0.25"
    with pytest.raises(ConfigError, match="prototype_collapse_eps"):
        build_config(None, ["diagnostics.prototype_collapse_eps=0.3"])


def test_distinct_but_idle_prototypes_no_longer_look_healthy():
    """1,000 random (hence distinct) prototypes of which the data use 3 near-identical ones: all
    unique, but among the used ones only one is unique at eps = 0.1, and the use is 3 / min(K, N)."""
    from nocollapse.diagnostics import prototype_report

    gen = torch.Generator().manual_seed(0)
    protos = torch.nn.functional.normalize(torch.randn(1000, 64, generator=gen), dim=1)
    base = protos[0]
    protos[1] = torch.nn.functional.normalize(base + 0.01 * torch.randn(64, generator=gen), dim=0)
    protos[2] = torch.nn.functional.normalize(base + 0.01 * torch.randn(64, generator=gen), dim=0)
    nearest = torch.tensor([0, 1, 2] * 100)
    report = prototype_report(protos, nearest=nearest)
    assert report["unique_prototypes"]["0.1"] > 0.99
    assert report["nearest_used"] == 3 and report["nearest_utilization"] == pytest.approx(0.003)
    assert report["nearest_utilization_capped"] == pytest.approx(3 / 300)
    assert report["unique_prototypes_used"]["0.1"] == pytest.approx(1 / 3)
    assert prototype_report(protos, nearest=torch.empty(0, dtype=torch.long))["unique_prototypes_used"]["0.1"] == 0.0


def test_reports_of_a_method_without_prototypes_say_what_they_measure_and_na_for_the_rest():
    from nocollapse.analysis import format_summary
    from nocollapse.diagnostics.report import format_embedding_report

    report = {"effective_rank": 12.5, "embedding_std": 0.08, "alpha_req": None, "embedding_rankme": 30.25,
              "bottleneck_embedding_std": 0.11}
    text = format_embedding_report(report)
    assert "12.5000" in text and "30.2500" in text and "0.1100" in text
    assert "n/a" in text.split("alpha-ReQ")[1].splitlines()[0]          # not measured: n/a, not a number
    assert "unique prototypes, utilisation and clusters are n/a" in text
    summary = {"method": "barlow_twins", "dataset": "digits", "epochs": 1, "embedding_rankme": 30.25,
               "embedding_std": 0.08, "num_prototypes": None}
    table = format_summary(summary)
    assert "prototype measures n/a" in table and "embedding RankMe" in table and "30.2500" in table
