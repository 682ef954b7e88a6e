"""Contrastive losses over two views, as pure functions: NT-Xent (SimCLR, Chen et al. 2020) and
supervised contrastive SupCon (Khosla et al. 2020, the L_out form).

Both take the projections ``z1``, ``z2`` (``[n, d]``, L2-normalised here) of this process's share
of the batch and contrast them with the views of the whole global batch (gathered across
processes with gradients). With ``N`` samples globally, the ``2N`` views are the keys; each of
this process's ``2n`` views is an anchor ``a`` whose logits are ``s_ak = <u_a, u_k> / T`` over all
keys ``k != a``:

    log q_a(p) = s_ap - log sum_{k != a} exp(s_ak)

NT-Xent: the positive of an anchor is the other view of the same image,

    L = -mean_a log q_a(pos(a)).

SupCon (L_out): the positives ``P(a)`` of an anchor are all other views whose label equals its
own (label >= 0), and always the other view of the same image,

    L = -mean_a (1 / |P(a)|) sum_{p in P(a)} log q_a(p),

so a sample labelled -1 has only its own other view as positive and with no labels SupCon equals
NT-Xent. Each process returns the mean over its anchors; averaged over processes (as DDP averages
gradients) it is the loss of one process holding the global batch.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..utils import distributed as dist_utils


def _anchor_log_probs(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Log-probabilities ``[2n, 2N]`` of every key for this process's anchors (self excluded), and
    the global index of each anchor's key (``[2n]``), with ``N`` the global batch."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be [n, d], got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    with torch.autocast(z1.device.type, enabled=False):
        u1, u2 = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)
        k1, k2 = dist_utils.all_gather_cat(u1), dist_utils.all_gather_cat(u2)
        n, big_n = u1.shape[0], k1.shape[0]
        offset = dist_utils.rank() * n
        anchors = torch.cat([u1, u2])
        keys = torch.cat([k1, k2])
        logits = anchors @ keys.t() / temperature
        local = torch.arange(n, device=z1.device) + offset
        self_index = torch.cat([local, local + big_n])
        logits = logits.masked_fill(
            F.one_hot(self_index, 2 * big_n).bool(), float("-inf"))
        return torch.log_softmax(logits, dim=1), self_index, big_n


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent over the ``2N`` views of the global batch (see the module doc)."""
    log_q, self_index, big_n = _anchor_log_probs(z1, z2, temperature)
    positive = (self_index + big_n) % (2 * big_n)
    return -log_q.gather(1, positive[:, None]).mean()


def supcon(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor | None, temperature: float = 0.5) -> torch.Tensor:
    """Supervised contrastive loss, L_out form; labels of -1 (or ``labels=None``) mark unlabelled
    samples, whose only positive is their own other view."""
    if labels is None:
        labels = torch.full((z1.shape[0],), -1, dtype=torch.long, device=z1.device)
    if labels.shape != (z1.shape[0],):
        raise ValueError(f"labels must be [n] = [{z1.shape[0]}], got {tuple(labels.shape)}")
    log_q, self_index, big_n = _anchor_log_probs(z1, z2, temperature)
    all_labels = dist_utils.all_gather_cat(labels.long())
    key_labels = torch.cat([all_labels, all_labels])
    anchor_labels = torch.cat([labels, labels]).long()
    same = (anchor_labels[:, None] == key_labels[None, :]) & (anchor_labels[:, None] >= 0)
    positive = same.clone()
    positive[torch.arange(2 * z1.shape[0], device=z1.device), (self_index + big_n) % (2 * big_n)] = True
    positive[torch.arange(2 * z1.shape[0], device=z1.device), self_index] = False
    log_q = log_q.masked_fill(~positive, 0.0)
    per_anchor = -log_q.sum(1) / positive.sum(1)
    return per_anchor.mean()
