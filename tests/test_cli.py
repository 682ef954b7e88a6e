"""The command line end to end on digits with a tiny budget, and exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from nocollapse.cli import main
from nocollapse.config import config_from_dict
from nocollapse.utils.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

SUMMARY_KEYS = {"method", "dataset", "epochs", "samples_per_second", "train_seconds", "knn_top1",
                "knn_top1_init"}


def _recompute_knn(run_dir):
    """k-NN from the saved checkpoint, independently of the trainer's own bookkeeping."""
    from nocollapse.data import load_dataset
    from nocollapse.evaluation.features import extract_features
    from nocollapse.evaluation.knn import knn_accuracy
    from nocollapse.methods import build_method
    from nocollapse.models.backbones import build_backbone

    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    cfg = config_from_dict(ckpt["config"])
    splits = load_dataset(cfg.data)
    size = splits.image_size
    method = build_method(cfg, build_backbone(cfg.model, size), steps_per_epoch=1)
    method.load_state_dict(ckpt["method"])
    kw = dict(size=size, mean=splits.mean, std=splits.std)
    tr = extract_features(method.eval_backbone(), splits.train, **kw)
    te = extract_features(method.eval_backbone(), splits.test, **kw)
    return knn_accuracy(*tr, *te, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)["top1"]


def test_train_end_to_end_on_digits(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--set", *tiny_overrides]) == 0
    printed = capsys.readouterr().out
    assert "k-NN top-1" in printed and str(out) in printed
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "class_counts.json",
                 "checkpoints/last.pt", "checkpoints/epoch_0002.pt"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["method"] == "dino" and summary["dataset"] == "digits" and summary["epochs"] == 2
    assert summary["samples_per_second"] > 0 and summary["train_seconds"] > 0
    # k-NN is a real measurement: well above chance (0.1) and reproducible from the checkpoint.
    assert 0.3 < summary["knn_top1"] <= 1.0 and 0.3 < summary["knn_top1_init"] <= 1.0
    assert summary["knn_top1"] == pytest.approx(_recompute_knn(out), abs=1e-6)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(steps) and steps[-1] == summary["steps"]
    # the saved config is the fully resolved one and reloads to the same values
    import yaml
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method"]["num_prototypes"] == 32 and "gmm" in saved


def test_existing_run_is_not_overwritten(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--set", *tiny_overrides, "train.epochs=1"]) == 0
    with pytest.raises(SystemExit, match="already holds a run"):
        main(["train", "--out", str(out), "--set", *tiny_overrides])


def test_bad_config_key_fails_before_training(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "r"), "--set", "optim.lrr=0.1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "optim.lr" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("prototypes", ["learned", pytest.param("decoupled", marks=pytest.mark.long)])
def test_resume_continues_from_the_saved_step_and_matches_an_uninterrupted_run(
        tmp_path, tiny_overrides, prototypes):
    common = [*tiny_overrides, f"method.prototypes={prototypes}", "train.deterministic=true"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "--out", str(full), "--set", *common]) == 0
    # steps per epoch = 1347 // 64 = 21; stop in the middle of the second epoch
    assert main(["train", "--out", str(part), "--set", *common, "train.stop_at_step=30"]) == 3
    assert load_checkpoint(part / "checkpoints" / "last.pt")["step"] == 30
    assert main(["train", "--out", str(part), "--resume"]) == 0   # stop_at_step fires only once
    a = load_checkpoint(full / "checkpoints" / "last.pt")
    b = load_checkpoint(part / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 42
    for key, value in a["method"].items():
        assert torch.allclose(value.float(), b["method"][key].float(), atol=1e-6), key
    sa = json.loads((full / "summary.json").read_text())
    sb = json.loads((part / "summary.json").read_text())
    assert sa["knn_top1"] == sb["knn_top1"] and sa["knn_top1_init"] == sb["knn_top1_init"]
    # metrics of the resumed run continue where the interrupted one stopped, without duplicates
    steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps))


def test_resume_without_a_run_fails_clearly(tmp_path):
    with pytest.raises(SystemExit, match="nothing to resume"):
        main(["train", "--out", str(tmp_path / "none"), "--resume"])
