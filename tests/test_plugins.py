"""Methods are plugins: a method defined outside the package registers, trains and checkpoints
without touching a file of the package; the registries are the one source of the choices."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from nocollapse.cli import main
from nocollapse.config import ConfigError, build_config, setting
from nocollapse.methods import SSLMethod, StepOutput
from nocollapse.utils.checkpoint import load_checkpoint
from nocollapse.utils.registry import DATASETS, METHODS, Registry, UnknownNameError

# ---- a plugin method, defined here ------------------------------------------------------------


@dataclass
class ToySettings:
    weight: float = setting(1.0, "weight of the invariance term", minimum=0.0)
    dim: int = setting(16, "projection dimension", minimum=1)


class ToyInvariance(SSLMethod):
    """Invariance between two views plus a spreading term:
    L = weight * mean_i ||z1_i - z2_i||^2 + log mean_{i != j} exp(-2 ||z_i - z_j||^2)."""

    name = "toy"
    uses_labels = True
    seen: list = []            # (labels, indices) of every batch, for the assertions below

    @classmethod
    def settings(cls):
        return {"toy": ToySettings}

    def __init__(self, cfg, backbone, steps_per_epoch):
        super().__init__(cfg, backbone, steps_per_epoch)
        self.backbone = backbone
        self.projector = nn.Linear(self.feature_dim, cfg.toy.dim)

    def training_step(self, batch, step):
        ToyInvariance.seen.append((batch.labels.cpu(), batch.indices.cpu()))
        z1, z2 = (F.normalize(self.projector(self.backbone(c)), dim=1) for c in batch.crops[:2])
        invariance = (z1 - z2).pow(2).sum(1).mean()
        sq = torch.cdist(z1, z1).pow(2)
        off = ~torch.eye(len(z1), dtype=torch.bool)
        uniformity = torch.log(torch.exp(-2 * sq[off]).mean())
        loss = self.cfg.toy.weight * invariance + uniformity
        return StepOutput(loss=loss, logs={"invariance": float(invariance.detach())}, embeddings=z1.detach())

    def eval_backbone(self):
        return self.backbone


@pytest.fixture
def toy_method():
    METHODS.register("toy", ToyInvariance)
    ToyInvariance.seen = []
    yield ToyInvariance
    METHODS.unregister("toy")


TINY = ["data.image_size=8", "model.width_multiplier=0.125", "train.epochs=1", "train.batch_size=64",
        "train.stop_at_step=0", "train.progress=false", "train.threads=1", "eval.batch_size=256",
        "diagnostics.plots=false"]


@pytest.mark.slow
def test_a_plugin_method_defined_outside_the_package_trains_and_checkpoints(tmp_path, toy_method):
    out = tmp_path / "run"
    # two steps: 1,347 digits / 64 = 21 steps per epoch, stopped after the second
    code = main(["train", "--out", str(out), "--set", "method.name=toy", "toy.weight=0.5", *TINY,
                 "--set", "train.stop_at_step=2"])
    assert code == 3                                        # interrupted as asked, after a checkpoint
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["step"] == 2 and ckpt["config"]["method"]["name"] == "toy"
    assert ckpt["config"]["toy"] == {"weight": 0.5, "dim": 16}
    assert any(k.startswith("projector.") for k in ckpt["method"])
    # the labels the plugin asked for are the training split's labels of the batch's indices
    from nocollapse.data import load_dataset

    splits = load_dataset(build_config(overrides=["data.image_size=8"])[0].data)
    assert len(toy_method.seen) == 2
    for labels, indices in toy_method.seen:
        assert labels.shape == indices.shape == (64,)
        assert torch.equal(labels, splits.ssl_train.labels[indices])
    # and it resumes to the end of the epoch, with a summary
    assert main(["train", "--out", str(out), "--resume"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "toy" and summary["steps"] == 21
    assert "prototypes" not in summary and summary["knn_protocol"]["features"] == "backbone"


def test_a_method_that_uses_no_labels_gets_none(monkeypatch, tmp_path, tiny_overrides):
    from nocollapse.methods.dino import DINO

    seen = []
    original = DINO.training_step

    def spy(self, batch, step):
        seen.append((batch.labels, batch.indices))
        return original(self, batch, step)

    monkeypatch.setattr(DINO, "training_step", spy)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--set", *tiny_overrides, "train.stop_at_step=1"]) == 3
    assert seen and all(labels is None and indices is not None for labels, indices in seen)


def test_plugin_settings_join_the_schema_and_are_validated(toy_method):
    cfg, _ = build_config(overrides=["method.name=toy", "toy.dim=8"])
    assert cfg.toy.dim == 8
    with pytest.raises(ConfigError, match="toy.dim: 0 is too small"):
        build_config(overrides=["method.name=toy", "toy.dim=0"])
    # the prototype keys of DINO / CARP do not apply to a method without prototypes
    with pytest.raises(ConfigError, match=r"method.num_prototypes only apply when method.name is one of "
                                          r"'dino', 'carp'"):
        build_config(overrides=["method.name=toy", "method.num_prototypes=256"])
    # and the toy's keys do not apply to DINO
    with pytest.raises(ConfigError, match="toy.weight only apply when method.name is 'toy'"):
        build_config(overrides=["toy.weight=1.0"])


def test_method_choices_come_from_the_registry(toy_method):
    with pytest.raises(ConfigError, match=r"method.name: unknown method 'dinoo'; known: .*'toy'.*"
                                          r"did you mean 'dino'"):
        build_config(overrides=["method.name=dinoo"])
    with pytest.raises(ConfigError, match="unknown dataset 'cifar11'"):
        build_config(overrides=["data.dataset=cifar11"])
    with pytest.raises(ConfigError, match="unknown backbone 'resnet19'"):
        build_config(overrides=["model.backbone=resnet19"])
    assert "toy" in METHODS and "digits" in DATASETS


def test_a_key_that_does_not_apply_is_rejected_even_at_its_default(tmp_path):
    # carp.block_size's default is 128; setting it while training DINO is still a mistake
    with pytest.raises(ConfigError, match="carp.block_size only apply when method.name is 'carp'"):
        build_config(overrides=["carp.block_size=128"])
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  name: dino\n  prototypes: learned\ngmm:\n  eta: 0.01\n")
    with pytest.raises(ConfigError, match="gmm.eta only apply when method.prototypes is 'decoupled'"):
        build_config(path)
    with pytest.raises(ConfigError, match="method.freeze_last_layer_epochs"):
        build_config(overrides=["method.prototypes=decoupled", "method.freeze_last_layer_epochs=0"])


def test_repeated_set_accumulates(capsys):
    assert main(["config", "--set", "train.epochs=2", "--set", "optim.lr=0.002", "train.seed=3"]) == 0
    text = capsys.readouterr().out
    assert "epochs: 2" in text and "lr: 0.002" in text and "seed: 3" in text


def test_a_data_key_the_dataset_ignores_is_named_in_a_warning(caplog):
    build_config(overrides=["data.root=/somewhere"])
    assert "data.root is set but dataset 'digits' does not read it" in caplog.text
    caplog.clear()
    build_config(overrides=["data.dataset=imagefolder", "data.root=/somewhere"])
    assert "does not read" not in caplog.text


def test_imagefolder_without_root_names_a_placeholder_path():
    with pytest.raises(ConfigError, match=r"data.root.*/path/to/"):
        build_config(overrides=["data.dataset=imagefolder"])


def test_an_entry_point_plugin_registers_on_first_use(monkeypatch):
    registry = Registry("method", entry_point_group="nocollapse.methods.test")
    ep = metadata.EntryPoint(name="toy", value="tests.test_plugins:ToyInvariance", group="nocollapse.methods.test")
    monkeypatch.setattr(metadata, "entry_points",
                        lambda group=None: [ep.__class__(ep.name, ep.value, ep.group)] if group == ep.group else [])
    monkeypatch.setattr(metadata.EntryPoint, "load", lambda self: ToyInvariance)
    assert registry.names() == ("toy",)
    assert registry.get("toy") is ToyInvariance
    with pytest.raises(UnknownNameError, match="unknown method 'tooy'.*did you mean 'toy'"):
        registry.get("tooy")


def test_registering_another_object_under_a_taken_name_is_an_error():
    registry = Registry("thing")
    registry.register("a", 1)
    registry.register("a", 1)           # the same object again: a no-op
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a", 2)
