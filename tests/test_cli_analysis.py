"""`nocollapse diagnose` and `nocollapse eval` on a tiny trained run and on foreign weights."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from nocollapse import analysis
from nocollapse.analysis import encode_split
from nocollapse.cli import main

from conftest import TINY

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "decoupled"
    assert main(["train", "--out", str(out), "--set", *TINY, "method.prototypes=decoupled",
                 "diagnostics.plots=false"]) == 0
    return out


def test_diagnose_run_writes_report_and_plots(run_dir, capsys):
    assert main(["diagnose", str(run_dir), "--plots"]) == 0
    printed = capsys.readouterr().out
    assert "unique prototypes" in printed and "effective rank" in printed
    report = json.loads((run_dir / "diagnosis.json").read_text())
    assert set(report["unique_prototypes"]) == {"0.025", "0.1", "0.25", "0.5"}
    assert report["num_prototypes"] == 32 and report["num_samples"] == 450
    assert 0 < report["prototype_utilization"] <= 1 and report["mixture"]["num_components"] == 32
    for name in ("unique_vs_eps.png", "prototype_uniformity.png", "spectrum.png", "training_curves.png"):
        assert (run_dir / "plots" / name).stat().st_size > 1000
    # the same numbers the end of training wrote into the summary
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["unique_prototypes"] == report["unique_prototypes"]
    assert summary["prototype_utilization"] == pytest.approx(report["prototype_utilization"])


def test_diagnose_json_and_checkpoint_file(run_dir, capsys):
    assert main(["diagnose", str(run_dir / "checkpoints" / "last.pt"), "--json", "--no-data"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["source"]["step"] == 42 and "prototype_utilization" not in data


def test_eval_reads_the_features_training_left_and_they_are_what_encoding_gives(run_dir, monkeypatch, capsys):
    cached = run_dir / "features" / "last-step42.pt"
    assert cached.is_file()  # written by the end of training (eval.save_features)

    def no_encoding(*args, **kwargs):
        raise AssertionError("eval encoded a split although training cached its outputs")

    with monkeypatch.context() as patch:
        patch.setattr(analysis, "encode_split", no_encoding)
        assert main(["eval", str(run_dir), "--knn", "--json"]) == 0
    from_training = json.loads(capsys.readouterr().out)
    saved = torch.load(cached, weights_only=True)
    assert main(["eval", str(run_dir), "--knn", "--json", "--no-cache"]) == 0
    encoded = json.loads(capsys.readouterr().out)
    again = torch.load(cached, weights_only=True)
    for split, key in (("train", "features"), ("test", "features"), ("test", "embeddings"),
                       ("test", "nearest"), ("train", "labels")):
        torch.testing.assert_close(again[split][key], saved[split][key])
    assert saved["train"]["embeddings"] is None  # the memory bank needs backbone features only
    for protocol, value in encoded["knn"].items():
        assert from_training["knn"][protocol]["top1"] == pytest.approx(value["top1"], abs=1e-6)


def test_no_features_are_left_when_the_memory_bank_is_subsampled_or_saving_is_off(tmp_path):
    for name, option in (("subsampled", "eval.max_train_samples=100"), ("off", "eval.save_features=false")):
        out = tmp_path / name
        assert main(["train", "--out", str(out), "--set", *TINY, "train.epochs=1", "eval.knn_init=false",
                     option, "diagnostics.plots=false"]) == 0
        assert not (out / "features").exists()


def test_eval_runs_everything_and_caches_features(run_dir, capsys):
    assert main(["eval", str(run_dir)]) == 0
    assert "linear probe" in capsys.readouterr().out
    result = json.loads((run_dir / "eval.json").read_text())
    assert {"knn", "linear", "clustering"} <= set(result)
    assert set(result["knn"]) == {"knn_k20_t0.07", "knn_k200_t0.1"}
    summary = json.loads((run_dir / "summary.json").read_text())
    # the k-NN of eval equals the one measured at the end of training
    assert result["knn"]["knn_k20_t0.07"]["top1"] == pytest.approx(summary["knn_top1"], abs=1e-6)
    assert 0.1 < result["linear"]["top1"] <= 1
    assert result["clustering"]["prototype_argmax"]["clusters_used"] >= 1
    assert result["linear"]["long_tail"]["num_head"] == 10
    cached = list((run_dir / "features").glob("last-step42.pt"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    assert main(["eval", str(run_dir), "--knn", "--json"]) == 0
    only_knn = json.loads(capsys.readouterr().out)
    assert "linear" not in only_knn and cached[0].stat().st_mtime_ns == stamp


def test_eval_balanced_train_after_long_tailed_pretraining(run_dir, tmp_path, monkeypatch, capsys):
    # a run without long tail has no balanced split: a clear error, and nothing written
    assert main(["eval", str(run_dir), "--balanced-train"]) == 2
    assert "--balanced-train needs a run pre-trained on a long-tailed subset" in capsys.readouterr().err
    assert not (run_dir / "eval_balanced.json").exists()

    lt_run = tmp_path / "long_tail"
    assert main(["train", "--out", str(lt_run), "--set", *TINY, "train.epochs=1", "data.imbalance_ratio=10",
                 "eval.many_threshold=100", "eval.few_threshold=30", "diagnostics.plots=false"]) == 0
    capsys.readouterr()
    assert main(["eval", str(lt_run), "--knn", "--json"]) == 0
    standard = json.loads(capsys.readouterr().out)
    encoded = []
    with monkeypatch.context() as patch:  # the test split's outputs come from the standard cache
        patch.setattr(analysis, "encode_split",
                      lambda *args, **kwargs: encoded.append(len(args[1])) or encode_split(*args, **kwargs))
        assert main(["eval", str(lt_run), "--knn", "--json", "--balanced-train"]) == 0
    assert encoded == [1347]
    balanced = json.loads(capsys.readouterr().out)
    assert json.loads((lt_run / "eval_balanced.json").read_text()) == balanced
    assert json.loads((lt_run / "eval.json").read_text()) == standard  # the standard report is kept
    # digits: 1,347 training images; imbalance 10 keeps far fewer of them
    assert balanced["source"]["evaluation_train_images"] == 1347
    assert standard["source"]["evaluation_train_images"] < 800
    groups = ("num_head", "num_medium", "num_tail")
    lt_standard = standard["knn"]["knn_k20_t0.07"]["long_tail"]
    lt_balanced = balanced["knn"]["knn_k20_t0.07"]["long_tail"]
    # the groups follow the pre-training class counts in both protocols
    assert [lt_balanced[g] for g in groups] == [lt_standard[g] for g in groups]
    assert lt_balanced["num_tail"] >= 1 and lt_balanced["num_head"] >= 1
    assert list((lt_run / "features").glob("*-balanced.pt"))


def _dino_like_checkpoint(path, legacy: bool):
    torch.manual_seed(0)
    layer = nn.Linear(8, 5, bias=False)
    if legacy:
        v = torch.randn(5, 8)
        g = torch.rand(5, 1) + 0.5
        state = {"head.last_layer.weight_g": g, "head.last_layer.weight_v": v}
        expected = g * v / v.norm(dim=1, keepdim=True)
    else:
        layer = weight_norm(layer)
        state = {f"head.last_layer.{k}": t for k, t in layer.state_dict().items()}
        expected = layer.weight.detach()
    torch.save({"teacher": state, "epoch": 3}, path)
    return expected


@pytest.mark.parametrize("legacy", [False, True])
def test_diagnose_foreign_weights(tmp_path, capsys, legacy):
    path = tmp_path / "dino.pth"
    _dino_like_checkpoint(path, legacy)
    assert main(["diagnose", "--weights", str(path), "--key", "teacher.head.last_layer.weight",
                 "--out", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_prototypes"] == 5 and data["dim"] == 8
    assert (tmp_path / "diagnosis.json").is_file()


def test_diagnose_foreign_weights_bad_key_lists_candidates(tmp_path, capsys):
    path = tmp_path / "dino.pth"
    _dino_like_checkpoint(path, legacy=False)
    assert main(["diagnose", "--weights", str(path), "--key", "teacher.head.last_layr.weight"]) == 2
    err = capsys.readouterr().err
    assert "teacher.head.last_layer" in err


def test_diagnose_damaged_file_is_rejected(tmp_path, capsys):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["diagnose", "--weights", str(path), "--key", "w"]) == 2
    assert "not a readable" in capsys.readouterr().err
