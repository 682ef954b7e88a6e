"""Online k-NN and linear probe on detached features, fed from the training loop.

The offline protocols (:mod:`~nocollapse.evaluation.knn`, :mod:`~nocollapse.evaluation.linear`)
need a pass over frozen train and test sets. During training one wants a cheaper running
signal, as solo-learn's online classifiers give: :class:`OnlineProbe` sees each labelled batch
once, *first predicts it, then learns from it* (prequential evaluation), so every accuracy it
reports is on samples the probe had not seen when it predicted them.

- **k-NN**: a first-in-first-out bank of the last ``bank_size`` labelled features; a batch is
  classified by the weighted vote of :func:`~nocollapse.evaluation.knn.weighted_knn_predict`
  (``score_c = sum_{j in topk} exp(s_j / T) [y_j = c]``, cosine similarities ``s``) and then
  pushed into the bank.
- **Linear**: a linear classifier ``W BN(f) + b`` on the detached features, one Adam step of
  cross-entropy per batch after its predictions are counted. ``BN`` is a batch normalisation
  without affine parameters (as in MAE's linear probe), so the probe's step size does not depend on
  the scale of the features; predictions use its running statistics. No gradient reaches the
  encoder.

Samples labelled ``-1`` (unlabelled, as in a semi-supervised run) are ignored. The bank holds
features of an encoder that is still moving, so the online k-NN trails the offline one on a
frozen encoder; use it to watch trends, and the offline evaluation for reported numbers.

Under ``torch.distributed`` every rank must call :meth:`OnlineProbe.update` with the same number
of rows: the batch is gathered from all ranks first, so every rank keeps an identical bank and
classifier, equal to one process fed the joined batch.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..utils import distributed as dist_utils
from .knn import weighted_knn_predict

__all__ = ["OnlineProbe"]


class OnlineProbe:
    """Prequential online k-NN and linear probe (see the module doc).

    Args:
        num_classes: C, the number of classes; labels outside ``[-1, C)`` are an error.
        knn / linear: which of the two probes to run.
        bank_size: rows of the k-NN bank (the most recent labelled features).
        k / temperature: the k-NN vote (DINO's k = 20, T = 0.07 by default).
        lr / weight_decay: the linear probe's Adam step.
        seed: initialises the linear probe, so that every rank starts from the same weights.
    """

    def __init__(self, num_classes: int, *, knn: bool = True, linear: bool = True, bank_size: int = 4096,
                 k: int = 20, temperature: float = 0.07, lr: float = 1e-2, weight_decay: float = 0.0,
                 seed: int = 0) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if not (knn or linear):
            raise ValueError("OnlineProbe needs knn=True or linear=True")
        if bank_size < 1 or k < 1 or temperature <= 0 or lr <= 0:
            raise ValueError(f"bank_size, k, temperature and lr must be positive, got {bank_size}, {k}, "
                             f"{temperature}, {lr}")
        self.num_classes = num_classes
        self.knn, self.linear = knn, linear
        self.bank_size, self.k, self.temperature = bank_size, k, temperature
        self.lr, self.weight_decay, self.seed = lr, weight_decay, seed
        self.feature_dim: int | None = None
        self.classifier: nn.Linear | None = None
        self.optimizer: torch.optim.Adam | None = None
        self.bank_features: Tensor | None = None
        self.bank_labels: Tensor | None = None
        self.bank_filled = 0
        self.bank_next = 0
        self.reset_epoch()

    # ---- set-up ------------------------------------------------------------------------
    def _build(self, feature_dim: int) -> None:
        self.feature_dim = feature_dim
        if self.knn:
            self.bank_features = torch.zeros(self.bank_size, feature_dim)
            self.bank_labels = torch.zeros(self.bank_size, dtype=torch.long)
        if self.linear:
            gen = torch.Generator().manual_seed(self.seed)
            # skip_init: building the probe must not draw from the global RNG, which the training
            # run's augmentations use (a resumed run builds it at a different moment)
            linear = nn.utils.skip_init(nn.Linear, feature_dim, self.num_classes)
            bound = feature_dim ** -0.5                      # nn.Linear's default range, seeded
            with torch.no_grad():
                linear.weight.uniform_(-bound, bound, generator=gen)
                linear.bias.uniform_(-bound, bound, generator=gen)
            self.classifier = nn.Sequential(nn.BatchNorm1d(feature_dim, affine=False), linear)
            self.optimizer = torch.optim.Adam(self.classifier.parameters(), lr=self.lr,
                                              weight_decay=self.weight_decay)

    def reset_epoch(self) -> None:
        """Zero the running counts that :meth:`end_epoch` reports."""
        self.seen = 0
        self.knn_seen = 0
        self.knn_correct = 0
        self.linear_correct = 0
        self.linear_loss_sum = 0.0

    def _check(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if features.dim() != 2:
            raise ValueError(f"features must be [B, F], got shape {tuple(features.shape)}")
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.shape[0] != features.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {features.shape[0]} feature rows")
        if labels.numel() and (int(labels.min()) < -1 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [-1, {self.num_classes}) (-1 = unlabelled), got "
                             f"{int(labels.min())}..{int(labels.max())}")
        if self.feature_dim is not None and features.shape[1] != self.feature_dim:
            raise ValueError(f"features have {features.shape[1]} columns, the probe was built for "
                             f"{self.feature_dim}")
        return features.detach().float().cpu(), labels.detach().long().cpu()

    # ---- predictions ---------------------------------------------------------------------
    def _knn_predict(self, features: Tensor) -> Tensor | None:
        if not self.knn or self.bank_filled == 0:
            return None
        scores = weighted_knn_predict(self.bank_features[: self.bank_filled], self.bank_labels[: self.bank_filled],
                                      features, self.num_classes, k=self.k, temperature=self.temperature)
        return scores.argmax(dim=1)

    def _linear_logits(self, features: Tensor) -> Tensor | None:
        if not self.linear:
            return None
        self.classifier.eval()
        with torch.no_grad():
            return self.classifier(features)

    # ---- every step ----------------------------------------------------------------------
    def update(self, features: Tensor, labels: Tensor) -> dict[str, float]:
        """Predict the labelled rows of the (gathered) batch, then learn from them. Returns the
        batch's ``online_knn_top1`` (once the bank holds something), ``online_linear_top1`` and
        ``online_linear_loss``; ``{}`` when no row is labelled."""
        features, labels = self._check(features, labels)
        features = dist_utils.all_gather_cat(features)
        labels = dist_utils.all_gather_cat(labels)
        keep = labels >= 0
        features, labels = features[keep], labels[keep]
        if features.shape[0] == 0:
            return {}
        if self.feature_dim is None:
            self._build(int(features.shape[1]))
        out: dict[str, float] = {}
        n = int(labels.shape[0])
        self.seen += n
        predicted = self._knn_predict(features)
        if predicted is not None:
            correct = int((predicted == labels).sum())
            self.knn_correct += correct
            self.knn_seen += n
            out["online_knn_top1"] = correct / n
        if self.linear:
            logits = self._linear_logits(features)
            correct = int((logits.argmax(dim=1) == labels).sum())
            loss_before = float(F.cross_entropy(logits, labels))
            self.linear_correct += correct
            self.linear_loss_sum += loss_before * n
            out["online_linear_top1"] = correct / n
            out["online_linear_loss"] = loss_before
            self.classifier.train()
            loss = F.cross_entropy(self.classifier(features), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        if self.knn:
            self._push(features, labels)
        return out

    def _push(self, features: Tensor, labels: Tensor) -> None:
        rows = features[-self.bank_size:]
        ids = (self.bank_next + torch.arange(rows.shape[0])) % self.bank_size
        self.bank_features[ids] = rows
        self.bank_labels[ids] = labels[-self.bank_size:]
        self.bank_next = int((self.bank_next + rows.shape[0]) % self.bank_size)
        self.bank_filled = min(self.bank_size, self.bank_filled + rows.shape[0])

    def end_epoch(self) -> dict[str, float]:
        """The epoch's prequential accuracies (every labelled row counted once), then a new epoch."""
        out: dict[str, float] = {}
        if self.knn_seen:
            out["online_knn_top1"] = self.knn_correct / self.knn_seen
        if self.linear and self.seen:
            out["online_linear_top1"] = self.linear_correct / self.seen
            out["online_linear_loss"] = self.linear_loss_sum / self.seen
        self.reset_epoch()
        return out

    def evaluate(self, features: Tensor, labels: Tensor) -> dict[str, float]:
        """Accuracy on held-out labelled features (for example a validation split) without
        learning from them: ``val_online_knn_top1`` against the current bank and
        ``val_online_linear_top1``. Not gathered: pass the whole split on every rank."""
        features, labels = self._check(features, labels)
        keep = labels >= 0
        features, labels = features[keep], labels[keep]
        out: dict[str, float] = {}
        if features.shape[0] == 0 or self.feature_dim is None:
            return out
        predicted = self._knn_predict(features)
        if predicted is not None:
            out["val_online_knn_top1"] = float((predicted == labels).float().mean())
        logits = self._linear_logits(features)
        if logits is not None:
            out["val_online_linear_top1"] = float((logits.argmax(dim=1) == labels).float().mean())
        return out

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The bank, the linear classifier and its optimiser, and the epoch's counts (copies)."""
        state: dict[str, Any] = {"feature_dim": -1 if self.feature_dim is None else self.feature_dim,
                                 "bank_filled": self.bank_filled, "bank_next": self.bank_next,
                                 "epoch_counts": [self.seen, self.knn_seen, self.knn_correct, self.linear_correct,
                                                  self.linear_loss_sum]}
        if self.feature_dim is not None:
            if self.knn:
                state["bank_features"] = self.bank_features.clone()
                state["bank_labels"] = self.bank_labels.clone()
            if self.linear:
                state["classifier"] = {k: v.clone() for k, v in self.classifier.state_dict().items()}
                state["optimizer"] = copy.deepcopy(self.optimizer.state_dict())   # not the live moments
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, building the bank and classifier for its feature width."""
        dim = int(state["feature_dim"])
        if dim < 0:
            return
        counts = state["epoch_counts"]                    # a run resumed mid-epoch reports the whole epoch
        self.seen, self.knn_seen, self.knn_correct, self.linear_correct = (int(c) for c in counts[:4])
        self.linear_loss_sum = float(counts[4])
        if self.feature_dim is None:
            self._build(dim)
        elif dim != self.feature_dim:
            raise ValueError(f"the saved probe has {dim} feature columns, this one {self.feature_dim}")
        if self.knn:
            if "bank_features" not in state or state["bank_features"].shape[0] != self.bank_size:
                raise ValueError("the saved probe has no k-NN bank of this bank_size")
            self.bank_features.copy_(state["bank_features"])
            self.bank_labels.copy_(state["bank_labels"])
            self.bank_filled, self.bank_next = int(state["bank_filled"]), int(state["bank_next"])
        if self.linear:
            if "classifier" not in state:
                raise ValueError("the saved probe has no linear classifier")
            self.classifier.load_state_dict(state["classifier"])
            self.optimizer.load_state_dict(state["optimizer"])
