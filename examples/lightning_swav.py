"""A LightningModule watched by nocollapse's CollapseMonitorCallback.

A small SwAV-style model on scikit-learn's digits (an MLP encoder, L2-normalised embeddings,
K = 64 learned prototypes, swapped prediction against Sinkhorn-Knopp targets), trained by a
Lightning Trainer on the CPU. The module tells the callback what to measure: ``training_step``
returns the teacher probabilities, embeddings, features and labels beside the loss, and
``collapse_prototypes()`` returns the prototype matrix. The labels feed an online k-NN and linear
probe (never the loss); ``validation_step`` returns the held-out features for the probe. Run it with

    python examples/lightning_swav.py --out runs/lightning_swav [--epochs 20] [--collapse] [--stop]

``--collapse`` drops the Sinkhorn balancing, so the run collapses and the alarms fire; ``--stop``
ends training at the first collapse alarm. Needs ``pip install 'nocollapse[lightning]'``.
"""

from __future__ import annotations

import argparse
import json

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from digits_data import augment, digit_images

from nocollapse import OnlineProbe
from nocollapse.integrations.lightning import CollapseMonitorCallback
from nocollapse.losses.sinkhorn import sinkhorn_knopp


class SwAVDigits(pl.LightningModule):
    def __init__(self, num_prototypes: int = 64, dim: int = 32, balanced: bool = True) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU())
        self.projector = nn.Linear(256, dim)
        self.prototypes = nn.Linear(dim, num_prototypes, bias=False)
        self.balanced = balanced
        self.gen = torch.Generator().manual_seed(0)

    def collapse_prototypes(self) -> torch.Tensor:
        """What the callback measures at each epoch end."""
        return self.prototypes.weight

    def training_step(self, batch, batch_idx):
        x, labels = batch
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        f1 = self.encoder(augment(x, self.gen))
        z1 = F.normalize(self.projector(f1), dim=1)
        z2 = F.normalize(self.projector(self.encoder(augment(x, self.gen))), dim=1)
        s1, s2 = self.prototypes(z1), self.prototypes(z2)
        with torch.no_grad():
            if self.balanced:
                q1, q2 = sinkhorn_knopp(s1, 0.05), sinkhorn_knopp(s2, 0.05)
            else:
                q1, q2 = F.softmax(s1 / 0.05, dim=1), F.softmax(s2 / 0.05, dim=1)
        loss = -0.5 * ((q1 * F.log_softmax(s2 / 0.1, 1)).sum(1).mean()
                       + (q2 * F.log_softmax(s1 / 0.1, 1)).sum(1).mean())
        self.log("train/loss", loss)
        # everything beside "loss" is read by the CollapseMonitorCallback, detached
        return {"loss": loss, "probs": q1, "student_probs": F.softmax(s2.detach() / 0.1, 1),
                "embeddings": z1.detach(), "features": f1.detach(), "labels": labels}

    def validation_step(self, batch, batch_idx):
        x, labels = batch
        return {"features": self.encoder(x), "labels": labels}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/lightning_swav")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--collapse", action="store_true", help="no Sinkhorn balancing: watch it collapse")
    parser.add_argument("--stop", action="store_true", help="stop training at the first collapse alarm")
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    images, labels = digit_images(), torch.as_tensor(load_digits().target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, val = order[:1500], order[1500:]
    train_loader = DataLoader(TensorDataset(images[train], labels[train]), batch_size=128, shuffle=True,
                              drop_last=True)
    val_loader = DataLoader(TensorDataset(images[val], labels[val]), batch_size=256)
    steps_per_epoch = len(train) // 128

    callback = CollapseMonitorCallback(
        num_prototypes=64, embedding_dim=32, warmup_steps=2 * steps_per_epoch, log_every=5, log_dir=args.out,
        probe=OnlineProbe(num_classes=10, bank_size=1024),
        stop_on=("one_hot_collapse", "uniform_collapse", "representation_collapse") if args.stop else ())
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=[callback],
                         default_root_dir=args.out, logger=pl.loggers.CSVLogger(args.out, name="lightning"),
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=5)
    trainer.fit(SwAVDigits(balanced=not args.collapse), train_loader, val_loader)
    monitor = callback.monitor
    last = [r for r in monitor.records if "loss" not in r and "unique_0.1" in r][-1]
    print(json.dumps({"epochs_run": trainer.current_epoch, "global_step": trainer.global_step,
                      "last_epoch": last, "alarms": [a.name for a in monitor.alarms]}, default=float))


if __name__ == "__main__":
    main()
