"""The K-wide work of DINO's step alone: the loss and the teacher targets as they were written
before the blocked rewrite (``losses/dino.py``) and as they are now, at the papers' K.

For each K, in one process and interleaved over ``--rounds`` (median of ``--repeats`` calls per
round, median over rounds, with the rounds' spread):

* ``loss``: forward and backward of DINO's cross-entropy over two global crops (and
  ``--local-crops`` more), B = ``--batch`` rows per crop, from fp32 logits;
* ``teacher``: the centred, sharpened teacher targets of the two global views (2B x K);
* ``sinkhorn``: Sinkhorn-Knopp targets of the two global views (3 iterations), DINO's
  ``teacher_norm=sinkhorn`` and SwAV's codes;
* ``carp``: forward and backward of CARP's loss (block softmaxes over a random partition into
  blocks of 128, consistency and the block marginals' KL to uniform) from the student's two
  crops' and the teacher's two views' scores; "before" gathered the blocks' columns by advanced
  indexing and every row into one M x K tensor for the marginal (the M x K all-gather across
  processes), "now" uses ``index_select`` and sums the rows per process;
* ``loss_compiled`` (``--compile``): the "before" loss through ``torch.compile`` (inductor), with
  the seconds its first call took to compile (``compile_seconds``);
* ``saved_bytes``: what autograd keeps for the backward pass of the loss (the tensors its nodes
  save, each storage counted once), the loss's share of the step's peak memory.

The "before" forms are written out here as they were (one log-softmax per crop, one ``-q * log p``
product per pair; ``(t - c) / tau`` then a softmax; Sinkhorn-Knopp over the whole matrix), so the
comparison stays runnable; the tests check the rewritten functions against them.

    python benchmarks/k_wide_passes.py --k 4096 65536 --rounds 5 --threads 1 [--compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nocollapse.losses.carp import (block_kl_to_uniform, block_probabilities, carp_consistency,  # noqa: E402
                                   marginal_kl_to_uniform)
from nocollapse.losses.dino import dino_loss, teacher_probabilities  # noqa: E402
from nocollapse.losses.sinkhorn import sinkhorn_knopp  # noqa: E402
from nocollapse.methods.carp import CARP  # noqa: E402


def pairwise_loss_before(student_logits, teacher_probs, temperature):
    log_probs = [F.log_softmax(s.float() / temperature, dim=-1) for s in student_logits]
    total, pairs = student_logits[0].new_zeros(()), 0
    for j, q in enumerate(teacher_probs):
        for i, log_p in enumerate(log_probs):
            if i != j:
                total = total + torch.sum(-q * log_p, dim=-1).mean()
                pairs += 1
    return total / pairs


def teacher_before(t, temperature, center):
    return F.softmax((t - center).float() / temperature, dim=-1)


def sinkhorn_before(t, temperature, center=None, iterations=3, row_shift=True):
    q = t.float() * (1.0 / temperature)
    if row_shift:
        q -= q.max(dim=1, keepdim=True).values
    q.exp_()
    q.mul_(q.sum().reciprocal())
    b, k = q.shape
    for _ in range(iterations):
        q.mul_((q.sum(dim=0, keepdim=True).clamp_min(1e-30) * k).reciprocal())
        q.mul_((q.sum(dim=1, keepdim=True).clamp_min(1e-30) * b).reciprocal())
    return q.mul_(b)


def sinkhorn_now(t, temperature, center=None):
    return sinkhorn_knopp(t, temperature, 3)


def saved_bytes(loss_fn, student, teacher) -> int:
    """Bytes of the distinct storages autograd saves while building ``loss_fn``'s graph."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn(student, teacher, 0.1)
    inputs = {s.untyped_storage().data_ptr() for s in [*student, *teacher]}
    return sum(size for ptr, size in storages.items() if ptr not in inputs)


def carp_marginal_before(s_probs, t_probs):
    """CARP's marginal KL as the method computed it before: every row gathered into one tensor."""
    everything = torch.cat([s_probs, t_probs], dim=1).transpose(0, 1)   # [M, blocks, N_B]
    return marginal_kl_to_uniform(everything.contiguous())


def carp_marginal_now(s_probs, t_probs):
    return block_kl_to_uniform(CARP.block_marginal(s_probs, t_probs))


def block_probabilities_before(logits, partition):
    """CARP's block softmaxes as they were: the columns gathered by advanced indexing."""
    grouped = logits[:, partition.reshape(-1)].reshape(logits.shape[0], *partition.shape)
    return torch.softmax(grouped.float(), dim=-1).permute(1, 0, 2)


def carp_loss_before(s_scores, t_scores, partition, batch):
    return carp_loss(s_scores, t_scores, partition, batch, block_probabilities_before, carp_marginal_before)


def carp_loss(s_scores, t_scores, partition, batch, block_probs=block_probabilities, marginal_kl=carp_marginal_now):
    """CARP's loss (consistency + marginal KL), by default as the method computes it now."""
    s_probs = block_probs(s_scores, partition)
    with torch.no_grad():
        t_probs = block_probs(t_scores, partition)
    consistency = carp_consistency(list(s_probs.split(batch, dim=1)), list(t_probs.split(batch, dim=1)))
    return consistency + marginal_kl(s_probs, t_probs)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(k: int, batch: int, local_crops: int, rounds: int, repeats: int, compile_loss: bool = False) -> dict:
    gen = torch.Generator().manual_seed(0)
    crops = 2 + local_crops
    # cosine scores, as the prototype layers give them: unit embeddings against unit prototypes
    # (arbitrary logits / tau_t can underflow to denormal floats, which this CPU runs far slower)
    prototypes = F.normalize(torch.randn(k, 256, generator=gen), dim=1)
    student = [(F.normalize(torch.randn(batch, 256, generator=gen), dim=1) @ prototypes.t()).requires_grad_()
               for _ in range(crops)]
    teacher_logits = F.normalize(torch.randn(2 * batch, 256, generator=gen), dim=1) @ prototypes.t()
    center = teacher_logits.mean(0, keepdim=True)
    with torch.no_grad():
        targets = list(teacher_probabilities(teacher_logits, 0.04, center).split(batch))

    def loss_step(loss_fn):
        def run():
            loss = loss_fn(student, targets, 0.1)
            loss.backward()
            for s in student:
                s.grad = None
        return run

    def teacher_step(fn):
        def run():
            with torch.no_grad():
                fn(teacher_logits, 0.04, center)
        return run

    s_scores = torch.cat([s.detach() for s in student[:2]]).requires_grad_()
    # CARP's blocks of 128 (one block of all K when 128 does not divide K)
    partition = torch.randperm(k, generator=gen).view(-1, 128 if k % 128 == 0 else k)

    def carp_step(loss_fn):
        def run():
            loss_fn(s_scores, teacher_logits, partition, batch).backward()
            s_scores.grad = None
        return run

    cases = {"loss_before": loss_step(pairwise_loss_before), "loss_now": loss_step(dino_loss),
             "carp_before": carp_step(carp_loss_before), "carp_now": carp_step(carp_loss),
             "teacher_before": teacher_step(teacher_before), "teacher_now": teacher_step(teacher_probabilities),
             "sinkhorn_before": teacher_step(sinkhorn_before), "sinkhorn_now": teacher_step(sinkhorn_now)}
    compile_seconds = None
    if compile_loss:
        torch._dynamo.reset()
        cases["loss_compiled"] = loss_step(torch.compile(pairwise_loss_before))
        start = time.perf_counter()
        cases["loss_compiled"]()
        compile_seconds = time.perf_counter() - start
    for run in cases.values():
        run()                                                   # warm-up
    per_round: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, run in cases.items():
            per_round[name].append(timed(run, repeats))
    result: dict = {"k": k, "batch": batch, "crops": crops, "compile_seconds": compile_seconds,
                    "seconds": {name: statistics.median(v) for name, v in per_round.items()},
                    "seconds_rounds": per_round}
    for part in ("loss", "teacher", "sinkhorn", "carp"):
        ratios = [now / before for now, before in zip(per_round[f"{part}_now"], per_round[f"{part}_before"])]
        result[f"{part}_now_over_before"] = statistics.median(ratios)
        result[f"{part}_now_over_before_range"] = [min(ratios), max(ratios)]
    if compile_loss:
        ratios = [now / compiled for now, compiled in zip(per_round["loss_now"], per_round["loss_compiled"])]
        result["loss_now_over_compiled"] = statistics.median(ratios)
        result["loss_now_over_compiled_range"] = [min(ratios), max(ratios)]
    result["saved_bytes"] = {"loss_before": saved_bytes(pairwise_loss_before, student, targets),
                             "loss_now": saved_bytes(dino_loss, student, targets)}
    result["bk_matrix_bytes"] = batch * k * 4
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[4096, 65536])
    parser.add_argument("--batch", type=int, default=256, help="rows per crop")
    parser.add_argument("--local-crops", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="also time the before loss through torch.compile")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [measure(k, args.batch, args.local_crops, args.rounds, args.repeats, args.compile) for k in args.k]
    record = {"threads": torch.get_num_threads(), "torch": torch.__version__, "results": results}
    text = json.dumps(record, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
