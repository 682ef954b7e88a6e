"""CARP's loss (Silva & Ramirez Rivera, NeurIPS 2023): consistency over random partitions of the
prototypes plus a marginal-uniformity term, as pure functions.

The K prototypes are split by a random permutation into K / N_B blocks of N_B. Within block b the
scores of a sample become probabilities by a softmax over the block (no temperature):

    p_b = softmax(logits[partition[b]])                                   (N_B entries)

Consistency between student crop i and teacher view j (i != j), averaged over blocks, samples
and pairs:

    L_cons = mean_{(i,j), b, n} [ -log <p_b^(i)(n), q_b^(j)(n)> ]

Uniformity of each block's marginal over the (gathered) batch of all student and teacher
probabilities, averaged over blocks:

    L_KL = mean_b KL( pbar_b || U(N_B) ) = mean_b [ log N_B + sum_k pbar_bk log pbar_bk ]

A fully collapsed model (uniform probabilities everywhere) scores L_cons = log N_B, L_KL = 0.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def group_by_blocks(values: torch.Tensor, partition: torch.Tensor) -> torch.Tensor:
    """``values [B, K]`` and ``partition [n_blocks, N_B]`` (prototype indices) -> the columns of
    each block side by side, ``[B, n_blocks, N_B]``. ``index_select`` rather than
    ``values[:, index]``: the same values, and on CPU the advanced-indexing gather and its
    scatter-add backward are several times slower at large K (docs/results.md, section 19.1)."""
    return values.index_select(1, partition.reshape(-1)).reshape(values.shape[0], *partition.shape)


def block_softmax(block_ordered_logits: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[B, K]`` logits whose columns already come block by block (columns ``b * N_B`` to
    ``(b + 1) * N_B - 1`` are block ``b``, as scores against the prototypes taken in the
    partition's order are) -> block-softmax probabilities ``[n_blocks, B, N_B]``. The blocks are a
    view of the logits: nothing is gathered."""
    rows, k = block_ordered_logits.shape
    if k % block_size:
        raise ValueError(f"block size {block_size} does not divide the {k} columns")
    grouped = block_ordered_logits.view(rows, k // block_size, block_size)
    return torch.softmax(grouped.float(), dim=-1).permute(1, 0, 2)


def block_probabilities(logits: torch.Tensor, partition: torch.Tensor) -> torch.Tensor:
    """``logits [B, K]`` in prototype order and ``partition [n_blocks, N_B]`` (prototype
    indices) -> block-softmax probabilities ``[n_blocks, B, N_B]``."""
    return torch.softmax(group_by_blocks(logits, partition).float(), dim=-1).permute(1, 0, 2)


def to_prototype_order(block_ordered: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The inverse of taking columns in ``order``: ``[B, K]`` values whose column ``i`` belongs to
    prototype ``order[i]`` -> the same values with column ``k`` belonging to prototype ``k``."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return block_ordered.index_select(1, inverse)


def _eps(t: torch.Tensor) -> float:
    return torch.finfo(t.dtype).eps


def carp_consistency(student_probs: Sequence[torch.Tensor], teacher_probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean ``-log <p, q>`` over student crop i / teacher view j pairs with i != j."""
    total = student_probs[0].new_zeros(())
    pairs = 0
    for i, p in enumerate(student_probs):
        for j, q in enumerate(teacher_probs):
            if i == j:
                continue
            eps = _eps(p)
            agreement = (p * q).sum(-1).clamp(eps, 1.0 - eps)
            total = total - torch.log(agreement).mean()
            pairs += 1
    if pairs == 0:
        raise ValueError("CARP needs at least one student crop / teacher view pair with i != j")
    return total / pairs


def block_kl_to_uniform(pbar: torch.Tensor) -> torch.Tensor:
    """``pbar [n_blocks, N_B]`` (each row a block marginal) -> mean over blocks of
    KL(pbar_b || U(N_B)) = mean_b [ log N_B + sum_k pbar_bk log pbar_bk ]."""
    eps = _eps(pbar)
    return (math.log(pbar.shape[-1]) + (pbar * torch.log(pbar.clamp(eps, 1.0 - eps))).sum(-1)).mean()


def marginal_kl_to_uniform(probs: torch.Tensor) -> torch.Tensor:
    """``probs [M, n_blocks, N_B]`` (M samples) -> mean over blocks of KL(mean_M probs || uniform)."""
    return block_kl_to_uniform(probs.mean(0))
